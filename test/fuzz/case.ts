/**
 * One fuzz case, end to end through the engine as the CLI and the service use
 * it: probe and open, info, check, convert to a counting sink. The only
 * acceptable endings are success and a typed DiskconvError.
 */
import { BufferSource, checkImage, convertToRaw, imageInfo, isDiskconvError, openImage, type FormatId } from '../../src/engine/index.js';
import { CountingSink } from './counting-sink.js';
import { DIFFERENTIAL_MAX_VIRTUAL_SIZE } from './differential.js';

export type Stage = 'open' | 'info' | 'check' | 'convert';

export type CaseResult =
  /** sha256 of the raw output, for images small enough to compare with qemu-img (differential.ts). */
  | { outcome: 'converted'; format: FormatId; virtualSize: number; dataBytes: number; sha256?: string }
  | { outcome: 'refused'; stage: Stage; code: string; message: string }
  | { outcome: 'crash'; stage: Stage; name: string; message: string; stack: string };

export async function runCase(bytes: Uint8Array, declared?: FormatId): Promise<CaseResult> {
  const source = new BufferSource(bytes, 'fuzz-case');
  let stage: Stage = 'open';
  try {
    const image = await openImage(source, declared ? { format: declared } : {});
    try {
      stage = 'info';
      await imageInfo(image, source);
      stage = 'check';
      await checkImage(image);
      stage = 'convert';
      const sink = new CountingSink();
      // Hashing costs time per byte of the virtual size: only for images the oracle compares.
      const result = await convertToRaw(image, source, sink, { sha256: image.virtualSize <= DIFFERENTIAL_MAX_VIRTUAL_SIZE });
      return { outcome: 'converted', format: image.format, virtualSize: result.virtualSize, dataBytes: sink.dataBytes, ...(result.sha256 ? { sha256: result.sha256 } : {}) };
    } finally {
      await image.close();
    }
  } catch (err) {
    // A typed error that wraps one of our bugs (a TypeError, say, reported as IMAGE_CORRUPT) is still a crash.
    const bug = bugInCauses(err);
    if (bug) return { outcome: 'crash', stage, name: bug.name, message: `${err instanceof Error ? err.message : String(err)} (caused by ${bug.name}: ${bug.message})`, stack: bug.stack ?? '' };
    if (isDiskconvError(err)) return { outcome: 'refused', stage, code: String(err.code), message: err.message };
    const e = err instanceof Error ? err : new Error(String(err));
    return { outcome: 'crash', stage, name: e.name, message: e.message, stack: e.stack ?? '' };
  } finally {
    await source.close();
  }
}

/**
 * The first error in `err`'s cause chain (itself excluded) that only a bug
 * throws: TypeError, ReferenceError, SyntaxError, or a RangeError other than
 * node's "buffer too large" (which a bounded inflate reports for data).
 */
export function bugInCauses(err: unknown): Error | undefined {
  const seen = new Set<unknown>();
  for (let e = (err as { cause?: unknown } | null)?.cause; e instanceof Error && !seen.has(e); e = (e as { cause?: unknown }).cause) {
    seen.add(e);
    if (e instanceof TypeError || e instanceof ReferenceError || e instanceof SyntaxError) return e;
    if (e instanceof RangeError && (e as { code?: unknown }).code !== 'ERR_BUFFER_TOO_LARGE') return e;
  }
  return undefined;
}
