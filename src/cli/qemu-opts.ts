/**
 * qemu's option strings (QemuOpts), as `-o`, `--object` and `--image-opts`
 * take them: `key=value` pairs split at commas, `,,` a literal comma in a value,
 * a bare `key` meaning `key=on` and a bare `noKEY` meaning `KEY=off`.
 */
import { InvalidArgumentError } from '../engine/errors.js';

/** qemu-img's is_valid_option_list: not empty, no leading comma, no unpaired trailing comma. */
export function validOptionList(text: string): boolean {
  if (text === '' || text.startsWith(',')) return false;
  const trailing = text.length - text.replace(/,+$/, '').length;
  return trailing % 2 === 0;
}

/** `-o` given several times: qemu-img joins them with commas (accumulate_options), each checked first. */
export function accumulateOptions(lists: readonly string[]): string | undefined {
  for (const l of lists) if (!validOptionList(l)) throw new InvalidArgumentError(`Invalid option list: ${l}`);
  return lists.length ? lists.join(',') : undefined;
}

/** The `key=value` pairs of a QemuOpts string, `,,` unescaped, bare keys turned into on/off. */
export function optionPairs(list: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let i = 0;
  while (i < list.length) {
    let key = '';
    while (i < list.length && list[i] !== '=' && list[i] !== ',') key += list[i++];
    let value: string | undefined;
    if (list[i] === '=') {
      i++;
      value = '';
      while (i < list.length) {
        if (list[i] === ',') {
          if (list[i + 1] === ',') {
            value += ',';
            i += 2;
            continue;
          }
          break;
        }
        value += list[i++];
      }
    }
    if (list[i] === ',') i++;
    if (value === undefined) {
      if (key.startsWith('no') && key !== 'no') out.push([key.slice(2), 'off']);
      else out.push([key, 'on']);
    } else out.push([key, value]);
  }
  return out;
}

