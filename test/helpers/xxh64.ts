/**
 * For tests: XXH64 (seed 0), the hash behind a zstd frame's Content_Checksum (RFC 8878
 * 3.1.1: the low 4 bytes, little-endian). BigInt arithmetic: slow, but frames
 * that carry a checksum are rare in disk images (qemu's zstd writes none).
 */
const U64 = 0xffffffffffffffffn;
const XXH_P1 = 0x9e3779b185ebca87n;
const XXH_P2 = 0xc2b2ae3d27d4eb4fn;
const XXH_P3 = 0x165667b19e3779f9n;
const XXH_P4 = 0x85ebca77c2b2ae63n;
const XXH_P5 = 0x27d4eb2f165667c5n;
const rotl64 = (v: bigint, r: bigint): bigint => ((v << r) | (v >> (64n - r))) & U64;
const xxhRound = (acc: bigint, lane: bigint): bigint => (rotl64((acc + lane * XXH_P2) & U64, 31n) * XXH_P1) & U64;
const xxhMerge = (acc: bigint, v: bigint): bigint => (((acc ^ xxhRound(0n, v)) * XXH_P1) & U64) + XXH_P4 & U64;

export function xxh64(data: Uint8Array): bigint {
  const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let p = 0;
  let h: bigint;
  if (b.length >= 32) {
    const v = [(XXH_P1 + XXH_P2) & U64, XXH_P2, 0n, (U64 + 1n - XXH_P1) & U64];
    for (; p + 32 <= b.length; p += 32) for (let i = 0; i < 4; i++) v[i] = xxhRound(v[i] as bigint, b.readBigUInt64LE(p + i * 8));
    const [v1, v2, v3, v4] = v as [bigint, bigint, bigint, bigint];
    h = (rotl64(v1, 1n) + rotl64(v2, 7n) + rotl64(v3, 12n) + rotl64(v4, 18n)) & U64;
    for (const lane of [v1, v2, v3, v4]) h = xxhMerge(h, lane);
  } else {
    h = XXH_P5;
  }
  h = (h + BigInt(b.length)) & U64;
  for (; p + 8 <= b.length; p += 8) h = ((rotl64(h ^ xxhRound(0n, b.readBigUInt64LE(p)), 27n) * XXH_P1) & U64) + XXH_P4 & U64;
  if (p + 4 <= b.length) {
    h = ((rotl64(h ^ ((BigInt(b.readUInt32LE(p)) * XXH_P1) & U64), 23n) * XXH_P2) & U64) + XXH_P3 & U64;
    p += 4;
  }
  for (; p < b.length; p++) h = (rotl64(h ^ ((BigInt(b[p] as number) * XXH_P5) & U64), 11n) * XXH_P1) & U64;
  h ^= h >> 33n;
  h = (h * XXH_P2) & U64;
  h ^= h >> 29n;
  h = (h * XXH_P3) & U64;
  h ^= h >> 32n;
  return h;
}
