/** Sizes as qemu-img reads them (qemu_strtosz): `10G`, `1.5M`, `512`, `0x10`; k/M/G/T/P/E are powers of 1024. */
import { UsageError } from './args.js';

const UNITS: Record<string, bigint> = { b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };
export const SIZE_HINT = 'You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

/**
 * Parses a size; `what` names it in the error. A fraction needs a suffix (qemu
 * refuses `1.5`), the fraction's bytes are truncated as qemu truncates them.
 * Sizes beyond 2^53 cannot be a file here and are refused.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(0x[0-9a-f]+|[0-9]+)(\.[0-9]+)?([bkmgtpe])?$/i.exec(text);
  if (!m || (m[2] !== undefined && (m[3] === undefined || m[1]!.startsWith('0x')))) throw new UsageError(`Invalid ${what} specified. ${SIZE_HINT}`);
  const mul = UNITS[(m[3] ?? 'b').toLowerCase()] as bigint;
  let bytes = BigInt(m[1] as string) * mul;
  if (m[2] !== undefined) bytes += BigInt(Math.floor(Number(`0${m[2]}`) * Number(mul)));
  if (bytes > 0x7fffffffffffffffn) throw new UsageError(`Invalid ${what} specified. Must be between 0 and 9223372036854775807.`);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new UsageError(`Invalid ${what} specified: ${bytes} bytes is larger than diskconv handles (${Number.MAX_SAFE_INTEGER})`);
  return Number(bytes);
}
