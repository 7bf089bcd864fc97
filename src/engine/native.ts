import { createRequire } from 'node:module';

/**
 * diskconv's optional native helper (native/seek, built by node-gyp at
 * `npm ci` and `npm run build`): SEEK_DATA/SEEK_HOLE, which Node lacks. Where
 * it did not build or cannot load, callers fall back to reading.
 */
export interface SeekHelper {
  /** Data ranges of [offset, end) as [start0, end0, start1, end1, ...], at most `max` ranges; throws (code ENOTSUP) where the filesystem cannot tell. */
  dataExtents(fd: number, offset: number, end: number, max: number): number[];
}

let helper: SeekHelper | null | undefined;

export function seekHelper(): SeekHelper | null {
  if (helper !== undefined) return helper;
  try {
    // From src/engine or dist/engine alike: two levels below the package root.
    const loaded = createRequire(import.meta.url)('../../native/seek/build/Release/seek.node') as Partial<SeekHelper>;
    helper = typeof loaded.dataExtents === 'function' ? (loaded as SeekHelper) : null;
  } catch {
    helper = null;
  }
  return helper;
}
