/**
 * `diskconv map`: qemu-img map, human or JSON, byte-equal to qemu-img 7.2's
 * output where the status can be told from the image (engine/block-status.ts):
 * the same entries, merged where qemu merges them, the same fields and spacing.
 */
import { blockStatus, type BlockStatus } from '../../engine/block-status.js';
import { UnsupportedFeatureError } from '../../engine/errors.js';
import { type CommandSpec, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, PASSPHRASE_OPTION, UsageError, type Output } from '../args.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';
import { parseSize, SIZE_HINT } from '../size.js';

export const spec: CommandSpec = {
  name: 'map',
  operands: 'FILE',
  summary: "Show where an image's data lies (guest ranges, host offsets), as qemu-img map does. Reads metadata only.",
  minOperands: 1,
  maxOperands: 1,
  options: [
    FORMAT_OPTION,
    OUTPUT_OPTION,
    { key: 'start-offset', long: 'start-offset', value: 'OFFSET', help: 'start at guest offset OFFSET' },
    { key: 'max-length', long: 'max-length', value: 'LEN', help: 'map at most LEN bytes' },
    PASSPHRASE_OPTION,
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
  notes: [
    'JSON: start, length, depth, present, zero, data and, where the bytes lie in FILE, offset. depth is',
    'always 0: a backing file is never opened, so an image that has one is refused. Human output lists',
    'data ranges only, and refuses compressed or encrypted data (no host offset), as qemu-img does.',
  ].join('\n'),
};

interface Entry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  offset?: number;
}

function sizeOption(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSize(text, what);
  } catch (err) {
    if (err instanceof UsageError && !err.message.includes('Must be')) throw new UsageError(`Invalid ${what} specified. ${SIZE_HINT}`);
    throw err;
  }
}

/** qemu-img's entry_mergeable(); the file name is present exactly when the offset is. */
function mergeable(curr: Entry, next: Entry): boolean {
  if (curr.length === 0) return false;
  if (curr.zero !== next.zero || curr.data !== next.data || curr.present !== next.present || (curr.offset === undefined) !== (next.offset === undefined)) return false;
  return curr.offset === undefined || curr.offset + curr.length === next.offset;
}

/** `%#-16` PRIx64, as qemu prints the human columns: 0 stays `0`. */
const hex16 = (n: number): string => (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const file = args.operands[0] as string;
  const outputText = args.get('output');
  if (outputText !== undefined && outputText !== 'human' && outputText !== 'json') throw new UsageError('--output must be used with human or json as argument.', 'map');
  const output: Output = outputOf(outputText);
  const startOffset = sizeOption(args.get('start-offset'), 'start offset') ?? 0;
  const maxLength = sizeOption(args.get('max-length'), 'max length');
  const opened = await sourceOf(args, file);
  return withImage(opened.path, opened.options, async (image, source) => {
    if (image.archive) {
      // qemu-img maps an archive as a raw file; offsets into its members would be neither that nor a disk file's.
      throw new UnsupportedFeatureError(`${file} is an ${image.archive.kind === 'ova' ? 'OVA' : 'tar bundle'}: map shows one disk file's layout; extract the disk and map it`);
    }
    const end = maxLength === undefined ? image.virtualSize : Math.min(startOffset + maxLength, image.virtualSize);
    let first = true;
    const dump = (e: Entry, next: Entry | undefined): void => {
      if (output === 'human') {
        if (e.data && e.offset === undefined) throw new UnsupportedFeatureError('File contains external, encrypted or compressed clusters.');
        if (e.data && !e.zero) out(`${hex16(e.start)}${hex16(e.length)}${hex16(e.offset ?? 0)}${e.offset !== undefined ? opened.path : ''}`);
        // As qemu: human output ignores the difference between zero kinds, so they coalesce.
        if (next && (!next.data || next.zero)) {
          next.data = false;
          next.zero = true;
        }
        return;
      }
      const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
      out(`${first ? '[' : ''}{ "start": ${e.start}, "length": ${e.length}, "depth": 0, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}${next ? ',' : ']'}`);
      first = false;
    };
    if (output === 'human') out(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`);
    let curr: Entry = { start: startOffset, length: 0, data: false, zero: false, present: false };
    if (startOffset < end) {
      for await (const status of clipped(blockStatus(image, source), startOffset, end)) {
        const next: Entry = {
          start: status.offset,
          length: status.length,
          data: status.data,
          zero: status.zero,
          present: status.present,
          ...(status.hostOffset !== undefined ? { offset: status.hostOffset } : {}),
        };
        if (mergeable(curr, next)) {
          curr.length += next.length;
          continue;
        }
        if (curr.length > 0) dump(curr, next);
        curr = next;
      }
    }
    dump(curr, undefined);
    return 0;
  });
}

/** The statuses within [start, end), cut at both ends (host offsets move with the cut). */
async function* clipped(statuses: AsyncIterable<BlockStatus>, start: number, end: number): AsyncGenerator<BlockStatus> {
  for await (const s of statuses) {
    const from = Math.max(s.offset, start);
    const to = Math.min(s.offset + s.length, end);
    if (to > from) yield { ...s, offset: from, length: to - from, ...(s.hostOffset !== undefined ? { hostOffset: s.hostOffset + (from - s.offset) } : {}) };
    if (s.offset + s.length >= end) return;
  }
}
