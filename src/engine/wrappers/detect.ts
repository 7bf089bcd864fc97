/** Which compressed wrapper an input is, by its magic bytes (never its name); light, so start-up need not load the decompressors (index.ts). */
export type WrapperFormat = 'gzip' | 'xz' | 'bzip2' | 'zstd';
export const WRAPPER_FORMATS: readonly WrapperFormat[] = ['gzip', 'xz', 'bzip2', 'zstd'];

/** Bytes detectWrapper looks at. */
export const WRAPPER_PROBE_BYTES = 10;

/** The wrapper whose magic starts `head`, if any. */
export function detectWrapper(head: Uint8Array): WrapperFormat | undefined {
  const at = (i: number): number => head[i] ?? -1;
  // gzip: 1f 8b, deflate method 8
  if (at(0) === 0x1f && at(1) === 0x8b && at(2) === 0x08) return 'gzip';
  // xz: fd 37 7a 58 5a 00
  if ([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00].every((b, i) => at(i) === b)) return 'xz';
  // bzip2: "BZh" + block size '1'..'9' + the block magic (pi) or the end-of-stream magic (an empty stream)
  if (at(0) === 0x42 && at(1) === 0x5a && at(2) === 0x68 && at(3) >= 0x31 && at(3) <= 0x39) {
    const block = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59].every((b, i) => at(4 + i) === b);
    const eos = [0x17, 0x72, 0x45, 0x38, 0x50, 0x90].every((b, i) => at(4 + i) === b);
    if (block || eos) return 'bzip2';
  }
  // zstd frame: 28 b5 2f fd
  if (at(0) === 0x28 && at(1) === 0xb5 && at(2) === 0x2f && at(3) === 0xfd) return 'zstd';
  return undefined;
}
