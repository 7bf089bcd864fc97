// The bench's source disk (bench/run.mjs, bench/range.mjs): a sparse raw file, deterministic from a fixed seed.
import { execFileSync } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';

const MiB = 2 ** 20;
const KiB = 1024;
/** xorshift32: the layout's choices. */
function rng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 2 ** 32;
  };
}
/** Incompressible bytes, deterministic: AES-CTR over zeros with a fixed key. */
function randomBytes(length, at) {
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(Math.floor(at / 16 / 2 ** 32), 8);
  iv.writeUInt32BE((at / 16) % 2 ** 32, 12);
  return createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), iv).update(Buffer.alloc(length));
}
const WORDS = 'the quick brown fox jumps over lazy dogs while kernel modules load block devices mount filesystems and daemons write logs'.split(' ');
function textBytes(length, at) {
  const r = rng(at / 4096 + 17);
  let s = '';
  while (s.length < length) {
    s += `${new Date(1.7e12 + at + s.length * 1000).toISOString()} host${Math.floor(r() * 64)} `;
    for (let w = 0, n = 4 + Math.floor(r() * 12); w < n; w++) s += `${WORDS[Math.floor(r() * WORDS.length)]} `;
    s += `${Math.floor(r() * 1e6)}\n`;
  }
  return Buffer.from(s.slice(0, length), 'latin1');
}
/** Binary like executables and databases: structured, compressible about 2-3x. */
function binaryBytes(length, at) {
  const b = Buffer.alloc(length);
  const r = rng(at / 4096 + 99);
  for (let p = 0; p + 16 <= length; p += 16) {
    b.writeUInt32LE((at + p) / 16, p);
    b.writeUInt32LE(((Math.floor(r() * 256) * 0x01010101) & 0xffff00ff) >>> 0, p + 4);
    b.writeUInt32LE(p % 4096 < 2048 ? 0 : Math.floor(r() * 2 ** 32), p + 8);
    b.writeUInt32LE(0x90909090, p + 12);
  }
  return b;
}

/**
 * The layout: regions of holes and data. Data is long runs (1-6 MiB) of one
 * kind, or a fragmented run: a few dozen 4-60 KiB extents at 4 KiB-aligned
 * starts with holes between. About 30 % of the disk is data.
 */
export function layout(size) {
  const r = rng(0x5eed);
  const extents = [];
  let at = 0;
  while (at < size) {
    const roll = r();
    if (roll < 0.62) {
      at += (1 + Math.floor(r() * 8)) * MiB + Math.floor(r() * 16) * 4 * KiB; // a hole
    } else if (roll < 0.87) {
      const length = (1 + Math.floor(r() * 6)) * MiB;
      const k = r();
      extents.push({ at, length, kind: k < 0.4 ? 'random' : k < 0.65 ? 'text' : k < 0.9 ? 'binary' : 'zeros' });
      at += length;
    } else {
      for (let i = 0, n = 16 + Math.floor(r() * 48); i < n; i++) {
        const length = (1 + Math.floor(r() * 15)) * 4 * KiB;
        const k = r();
        extents.push({ at, length, kind: k < 0.35 ? 'random' : k < 0.6 ? 'text' : k < 0.9 ? 'binary' : 'zeros' });
        at += length + (1 + Math.floor(r() * 8)) * 4 * KiB;
      }
    }
  }
  return extents.filter((e) => e.at < size).map((e) => ({ ...e, length: Math.min(e.length, size - e.at) }));
}

export function makeSource(path, size) {
  const fd = openSync(path, 'w');
  let data = 0;
  for (const e of layout(size)) {
    const bytes = e.kind === 'random' ? randomBytes(e.length, e.at) : e.kind === 'text' ? textBytes(e.length, e.at) : e.kind === 'binary' ? binaryBytes(e.length, e.at) : Buffer.alloc(e.length);
    writeSync(fd, bytes, 0, bytes.length, e.at);
    data += e.length;
  }
  closeSync(fd);
  execFileSync('truncate', ['-s', String(size), path]);
  return data;
}

