/**
 * `-o OPTIONS` of `convert` and `create` for a raw output, read as qemu-img
 * reads them (QemuOpts over the raw format's and the file protocol's creation
 * options): `key=value` pairs split at commas (`,,` is a literal comma), a bare
 * `key` meaning `key=on` and a bare `nokey` meaning `key=off`, `help` or `?`
 * anywhere printing the option list. Errors carry qemu-img's words.
 *
 * The options and what diskconv does with them:
 * - `size`: validated; convert ignores it (qemu-img sets the output's size from
 *   the source), create uses it.
 * - `preallocation=off|falloc|full`: falloc and full give a fully allocated
 *   output (both written as zeros where the image has none: Node has no
 *   fallocate, and a raw file's bytes are the same either way); `metadata` is
 *   refused as qemu-img's file driver refuses it.
 * - `nocow` (on/off) and `extent_size_hint` (a size below 4 GiB): validated and
 *   accepted; they change neither the bytes nor the allocation (qemu applies
 *   them on btrfs and XFS only, through ioctls Node does not offer).
 */
import { InvalidArgumentError } from '../engine/errors.js';
import { optionPairs as pairs } from './qemu-opts.js';

export { accumulateOptions, validOptionList } from './qemu-opts.js';

export type Preallocation = 'off' | 'falloc' | 'full';

export interface RawCreateOptions {
  size?: number;
  /** As given; checked by `preallocationOf()` when the file is made, as qemu checks it. */
  preallocation?: string;
  nocow?: boolean;
  extentSizeHint?: bigint;
}

/** qemu-img's `-o help` for raw, with and without a target filename (the file protocol's options join then). */
export const RAW_OPTIONS_HELP_WITH_FILE = [
  'Supported options:',
  '  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable',
  '  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)',
  '  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)',
  '  size=<size>            - Virtual disk size',
].join('\n');
export const RAW_OPTIONS_HELP_NO_FILE = [
  'Supported raw options:',
  '  size=<size>            - Virtual disk size',
  '',
  'The protocol level may support further options.',
  'Specify the target filename to include those options.',
].join('\n');

const SIZE_WORDS = 'expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';
const KEYS = ['size', 'preallocation', 'nocow', 'extent_size_hint'] as const;
const UNITS: Record<string, bigint> = { b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };

/** True when `help` or `?` appears among the options (qemu's has_help_option). */
export function hasHelpOption(list: string): boolean {
  return pairs(list).some(([k, v]) => (k === 'help' || k === '?') && v === 'on');
}

/** qemu_strtosz for option values (up to 2^64 - 1), or undefined when it does not parse. */
function optionSize(text: string): bigint | undefined {
  const m = /^\s*(0x[0-9a-f]+|[0-9]+)(\.[0-9]+)?([bkmgtpe])?$/i.exec(text);
  if (!m || (m[2] !== undefined && (m[3] === undefined || (m[1] as string).startsWith('0x')))) return undefined;
  const mul = UNITS[(m[3] ?? 'b').toLowerCase()] as bigint;
  let bytes = BigInt(m[1] as string) * mul;
  if (m[2] !== undefined) bytes += BigInt(Math.floor(Number(`0${m[2]}`) * Number(mul)));
  return bytes < 1n << 64n ? bytes : undefined;
}

function optionBool(key: string, value: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new InvalidArgumentError(`Parameter '${key}' expects 'on' or 'off'`);
}

/**
 * Parses the options as qemu_opts_do_parse does for raw: an unknown key is
 * `Invalid parameter 'KEY'`, a bad size or bool is refused with qemu's words.
 * `prefix` (create: `FILE: `) goes before each message, as qemu-img create prints it.
 */
export function parseRawCreateOptions(list: string, prefix = ''): RawCreateOptions {
  const opts: RawCreateOptions = {};
  const fail = (message: string): never => {
    throw new InvalidArgumentError(`${prefix}${message}`);
  };
  for (const [key, value] of pairs(list)) {
    if (!(KEYS as readonly string[]).includes(key)) fail(`Invalid parameter '${key}'`);
    if (key === 'size' || key === 'extent_size_hint') {
      const n = optionSize(value);
      if (n === undefined) fail(`Parameter '${key}' ${SIZE_WORDS}`);
      if (key === 'size') opts.size = Number(n);
      else opts.extentSizeHint = n as bigint;
    } else if (key === 'nocow') {
      try {
        opts.nocow = optionBool(key, value);
      } catch (err) {
        fail((err as Error).message);
      }
    } else opts.preallocation = value;
  }
  return opts;
}

/**
 * What qemu's file driver checks when it makes the file (raw_co_create), with
 * its words after `PREFIX` (convert: `DST: error while converting raw: `):
 * the preallocation mode, then the extent size hint.
 */
export function preallocationOf(opts: RawCreateOptions, prefix: string): Preallocation {
  const mode = opts.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) throw new InvalidArgumentError(`${prefix}invalid parameter value: ${mode}`);
  if (mode === 'metadata') throw new InvalidArgumentError(`${prefix}Unsupported preallocation mode: metadata`);
  if (opts.extentSizeHint !== undefined && opts.extentSizeHint > 0xffffffffn) throw new InvalidArgumentError(`${prefix}Extent size hint is too large`);
  return mode as Preallocation;
}
