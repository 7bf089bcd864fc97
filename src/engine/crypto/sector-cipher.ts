/**
 * Sector decryption for encrypted qcow2 (LUKS payloads and legacy AES), with
 * node:crypto. Every mode is built on one reused ECB context per key, so a
 * batch of sectors costs one native call plus XOR passes rather than one
 * cipher object per 512-byte sector:
 *   - cbc: P_j = D(C_j) xor C_{j-1}, C_{-1} = the sector's IV
 *   - xts: IEEE P1619 with whole 16-byte blocks (a 512-byte sector needs no ciphertext stealing)
 *   - ctr: P_j = C_j xor E(IV + j), a 128-bit big-endian counter per sector
 *   - ecb: no IV
 * IVs follow qemu's ivgen (crypto/ivgen-*.c): plain (32-bit little-endian sector
 * number), plain64 (64-bit little-endian), essiv (the plain64 block encrypted
 * with hash(master key)).
 */
import type { Cipher, Decipher } from 'node:crypto';
import { nodeCrypto } from './node-crypto.js';
import { UnsupportedFeatureError } from '../errors.js';

export const CRYPT_SECTOR = 512;
const BLOCK = 16;

export type CipherMode = 'ecb' | 'cbc' | 'ctr' | 'xts';
export type IvGenAlg = 'plain' | 'plain64' | 'essiv';

/** Decrypts whole sectors of stored data; the one reader applies it (src/engine/reader.ts). */
export interface SectorCipher {
  readonly sectorSize: number;
  /**
   * Which offset numbers the sectors for the IV: the host file offset (qcow2 LUKS,
   * qemu's crypt_physical_offset) or the guest offset (legacy qcow2 AES).
   */
  readonly ivFrom: 'file' | 'guest';
  /** Decrypts `input` (whole sectors) into `output` (same length); `firstSector` numbers the first sector. */
  decrypt(input: Uint8Array, output: Uint8Array, firstSector: number): void;
}

export interface SectorCipherSpec {
  /** qemu's name: aes-128, aes-192, aes-256 (others are refused by name). */
  alg: string;
  mode: CipherMode;
  ivgen: IvGenAlg;
  /** Hash for essiv (qemu's ivgen-hash-alg). */
  ivHash?: string;
  /** The whole key; for xts, data key then tweak key. */
  key: Uint8Array;
  ivFrom: 'file' | 'guest';
}

const AES_KEY_BYTES: Record<string, number> = { 'aes-128': 16, 'aes-192': 24, 'aes-256': 32 };

/** A block cipher in ECB mode, one direction, reused for every call (no padding, so nothing is held back). */
function ecb(alg: string, key: Uint8Array, direction: 'encrypt' | 'decrypt'): (data: Uint8Array) => Buffer {
  const name = `${alg}-ecb`;
  const ctx: Cipher | Decipher = direction === 'encrypt' ? nodeCrypto().createCipheriv(name, key, null) : nodeCrypto().createDecipheriv(name, key, null);
  ctx.setAutoPadding(false);
  return (data) => ctx.update(data);
}

function xorInto(out: Uint8Array, outAt: number, a: Uint8Array, aAt: number, b: Uint8Array, bAt: number, length: number): void {
  for (let i = 0; i < length; i++) out[outAt + i] = (a[aAt + i] as number) ^ (b[bAt + i] as number);
}

/** Multiplies an XTS tweak by x in GF(2^128) (little-endian byte order, as IEEE P1619). */
function doubleTweak(t: Uint8Array, at: number): void {
  let carry = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = t[at + i] as number;
    t[at + i] = ((b << 1) | carry) & 0xff;
    carry = b >>> 7;
  }
  if (carry) t[at] = (t[at] as number) ^ 0x87;
}

/** Refuses what node:crypto cannot do, naming it (twofish, serpent, cast5 are qemu ciphers OpenSSL lacks). */
export function assertSupportedCipher(alg: string, mode: string): void {
  if (AES_KEY_BYTES[alg] === undefined) {
    throw new UnsupportedFeatureError(`cipher ${alg} is not supported (node:crypto decrypts only aes-128, aes-192 and aes-256)`);
  }
  if (!['ecb', 'cbc', 'ctr', 'xts'].includes(mode)) throw new UnsupportedFeatureError(`cipher mode ${mode} is not supported`);
}

export function createSectorCipher(spec: SectorCipherSpec): SectorCipher {
  assertSupportedCipher(spec.alg, spec.mode);
  const keyBytes = AES_KEY_BYTES[spec.alg] as number;
  const expected = spec.mode === 'xts' ? 2 * keyBytes : keyBytes;
  if (spec.key.length !== expected) throw new UnsupportedFeatureError(`${spec.alg}-${spec.mode} needs a ${expected}-byte key, not ${spec.key.length}`);
  const dataKey = spec.mode === 'xts' ? spec.key.subarray(0, keyBytes) : spec.key;

  // IVs for `count` sectors from `first`, 16 bytes each, in one buffer.
  let ivs: (first: number, count: number) => Uint8Array;
  const plainIvs = (first: number, count: number, wide: boolean): Buffer => {
    const out = Buffer.alloc(count * BLOCK);
    for (let i = 0; i < count; i++) {
      const sector = first + i;
      out.writeUInt32LE(sector % 2 ** 32, i * BLOCK);
      if (wide) out.writeUInt32LE(Math.floor(sector / 2 ** 32), i * BLOCK + 4);
    }
    return out;
  };
  if (spec.ivgen === 'essiv') {
    const hash = spec.ivHash ?? 'sha256';
    const essivKey = nodeCrypto().createHash(hash).update(spec.key).digest();
    const essivAlg = { 16: 'aes-128', 24: 'aes-192', 32: 'aes-256' }[essivKey.length];
    if (!essivAlg) throw new UnsupportedFeatureError(`essiv with ${hash} gives a ${essivKey.length}-byte key, which no AES variant takes`);
    const encrypt = ecb(essivAlg, essivKey, 'encrypt');
    ivs = (first, count) => encrypt(plainIvs(first, count, true));
  } else {
    const wide = spec.ivgen === 'plain64';
    ivs = (first, count) => plainIvs(first, count, wide);
  }

  const decryptBlocks = ecb(spec.alg, dataKey, 'decrypt');
  const encryptBlocks = spec.mode === 'ctr' ? ecb(spec.alg, dataKey, 'encrypt') : undefined;
  const encryptTweaks = spec.mode === 'xts' ? ecb(spec.alg, spec.key.subarray(keyBytes), 'encrypt') : undefined;
  const sectorSize = CRYPT_SECTOR;

  const decrypt = (input: Uint8Array, output: Uint8Array, firstSector: number): void => {
    const length = input.length;
    if (length % sectorSize !== 0 || output.length !== length) throw new RangeError(`decrypt needs whole sectors (${length} bytes)`);
    const count = length / sectorSize;
    switch (spec.mode) {
      case 'ecb':
        output.set(decryptBlocks(input));
        return;
      case 'cbc': {
        const iv = ivs(firstSector, count);
        const d = decryptBlocks(input);
        for (let s = 0; s < count; s++) {
          const base = s * sectorSize;
          xorInto(output, base, d, base, iv, s * BLOCK, BLOCK);
          xorInto(output, base + BLOCK, d, base + BLOCK, input, base, sectorSize - BLOCK);
        }
        return;
      }
      case 'ctr': {
        const iv = ivs(firstSector, count);
        const counters = Buffer.alloc(length);
        for (let s = 0; s < count; s++) {
          const base = s * sectorSize;
          for (let j = 0; j < sectorSize / BLOCK; j++) {
            const at = base + j * BLOCK;
            counters.set(iv.subarray(s * BLOCK, s * BLOCK + BLOCK), at);
            // add j to the big-endian 128-bit counter
            let carry = j;
            for (let k = BLOCK - 1; k >= 0 && carry > 0; k--) {
              const v = (counters[at + k] as number) + (carry & 0xff);
              counters[at + k] = v & 0xff;
              carry = (carry >>> 8) + (v >>> 8);
            }
          }
        }
        const stream = (encryptBlocks as (d: Uint8Array) => Buffer)(counters);
        xorInto(output, 0, input, 0, stream, 0, length);
        return;
      }
      case 'xts': {
        const tweaks = (encryptTweaks as (d: Uint8Array) => Buffer)(ivs(firstSector, count));
        // One tweak per block: T_0 = E_k2(IV), T_{j+1} = T_j * x.
        const t = Buffer.alloc(length);
        for (let s = 0; s < count; s++) {
          const base = s * sectorSize;
          t.set(tweaks.subarray(s * BLOCK, s * BLOCK + BLOCK), base);
          for (let j = 1; j < sectorSize / BLOCK; j++) {
            const at = base + j * BLOCK;
            t.copyWithin(at, at - BLOCK, at);
            doubleTweak(t, at);
          }
        }
        const x = Buffer.alloc(length);
        xorInto(x, 0, input, 0, t, 0, length);
        const d = decryptBlocks(x);
        xorInto(output, 0, d, 0, t, 0, length);
        return;
      }
    }
  };
  return { sectorSize, ivFrom: spec.ivFrom, decrypt };
}

/**
 * Legacy qcow2 AES (crypt_method 1, qemu's crypto/block-qcow.c): the key is the
 * passphrase's first 16 bytes, zero-padded; AES-128-CBC with plain64 IVs from
 * the guest sector number. There is no key check in the format: a wrong
 * passphrase decrypts to noise, as in qemu.
 */
export function legacyQcowAesCipher(passphrase: Uint8Array): SectorCipher {
  const key = new Uint8Array(16);
  key.set(passphrase.subarray(0, 16));
  return createSectorCipher({ alg: 'aes-128', mode: 'cbc', ivgen: 'plain64', key, ivFrom: 'guest' });
}
