/**
 * Early writeback of flushed outputs (src/engine/writeback.ts, RawFileSink's datasync option): a
 * flushed conversion starts the writeback of its data while it converts (sync_file_range through
 * native/seek), an unflushed one makes no such call, and the output is qemu-img's either way.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { CLI } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { EarlyWriteback } from '../../src/engine/writeback.js';
import { nativeSyncRange } from '../../src/engine/native.js';

const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;
const images: Record<'qcow2' | 'zstd', string> = { qcow2: '', zstd: '' };
const reference: Record<string, string> = {};

/** The CLI under strace: the sync_file_range and fdatasync calls of every thread, from the syscalls alone (--seccomp-bpf keeps the rest untraced). */
function traced(log: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      'strace',
      ['-f', '--seccomp-bpf', '-e', 'trace=sync_file_range,fdatasync', '-o', log, process.execPath, CLI, ...args],
      { timeout: 110_000, maxBuffer: 16 * MiB },
      (err, _stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stderr }),
    );
  });
}

const calls = (text: string, name: string): string[] => text.split('\n').filter((line) => new RegExp(`\\b${name}\\(`).test(line));

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-writeback-'));
  // 768 MiB virtual, 320 MiB of data in 10 MiB pieces with holes between: random (stored as is even when
  // compressed) and text (compressed), so the zstd image has both kinds of cluster the decoding threads write.
  const raw = join(dir, 'source.raw');
  const fh = await open(raw, 'w');
  try {
    for (let i = 0; i < 32; i++) {
      const piece = i % 2 === 0 ? randomBytes(10 * MiB) : Buffer.alloc(10 * MiB, `diskconv writeback piece ${i} `);
      await fh.write(piece, 0, piece.length, i * 24 * MiB);
    }
    await fh.truncate(768 * MiB);
  } finally {
    await fh.close();
  }
  images.qcow2 = join(dir, 'source.qcow2');
  images.zstd = join(dir, 'source-zstd.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, images.qcow2);
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'compression_type=zstd', raw, images.zstd);
  await rm(raw);
  for (const [name, image] of Object.entries(images)) reference[name] = await qemuRawSha256(image, dir);
});

afterAll(async () => {
  await cleanup?.();
});

describe('early writeback of a flushed output', () => {
  for (const name of ['qcow2', 'zstd'] as const) {
    it.skipIf(!nativeSyncRange())(`${name}: -t writeback starts writeback while converting, the default makes no such call, both outputs are qemu-img's`, async () => {
      const image = images[name];
      const flushedOut = join(dir, `${name}-flushed.raw`);
      const flushedLog = join(dir, `${name}-flushed.strace`);
      const flushed = await traced(flushedLog, ['convert', '-O', 'raw', '-t', 'writeback', image, flushedOut]);
      expect(flushed.code, flushed.stderr).toBe(0);
      const log = await readFile(flushedLog, 'latin1');
      // 320 MiB of data at one call per 32 MiB written: several calls, not only the closing fdatasync.
      const early = calls(log, 'sync_file_range');
      expect(early.length, log).toBeGreaterThan(1);
      for (const line of early) expect(line).toMatch(/SYNC_FILE_RANGE_WRITE\) = 0/);
      expect(calls(log, 'fdatasync').length, log).toBeGreaterThanOrEqual(1);
      expect(await sha256File(flushedOut)).toBe(reference[name]);

      const plainOut = join(dir, `${name}-plain.raw`);
      const plainLog = join(dir, `${name}-plain.strace`);
      const plain = await traced(plainLog, ['convert', '-O', 'raw', image, plainOut]);
      expect(plain.code, plain.stderr).toBe(0);
      const plainCalls = await readFile(plainLog, 'latin1');
      expect(calls(plainCalls, 'sync_file_range'), plainCalls).toEqual([]);
      expect(calls(plainCalls, 'fdatasync'), plainCalls).toEqual([]);
      expect(await sha256File(plainOut)).toBe(reference[name]);
      await rm(flushedOut);
      await rm(plainOut);
    });
  }
});

describe('EarlyWriteback', () => {
  it('starts one call per everyBytes written, over the range written since the last, never two at once', async () => {
    const started: [number, number][] = [];
    let release: () => void = () => {};
    const wb = new EarlyWriteback((start, end) => {
      started.push([start, end]);
      return new Promise((done) => (release = () => done(true)));
    }, 100);
    wb.wrote(0, 60);
    expect(started).toEqual([]);
    wb.wrote(200, 50); // a hole between: the range spans it, the count does not
    expect(started).toEqual([[0, 250]]);
    wb.wrote(250, 200); // while the first is in flight: held back
    expect(started.length).toBe(1);
    release();
    await new Promise((done) => setImmediate(done));
    wb.wrote(450, 1); // the held-back bytes start with the next write
    expect(started).toEqual([
      [0, 250],
      [250, 451],
    ]);
    release();
    await wb.settle();
  });

  it('a call that failed fails settle(), even after later writes; stop() does not throw', async () => {
    const eio = Object.assign(new Error('EIO: i/o error, sync_file_range'), { code: 'EIO' });
    const wb = new EarlyWriteback(() => Promise.reject(eio), 10);
    wb.wrote(0, 10);
    await new Promise((done) => setImmediate(done));
    wb.wrote(10, 100);
    await expect(wb.settle()).rejects.toBe(eio);
    const quiet = new EarlyWriteback(() => Promise.reject(eio), 10);
    quiet.wrote(0, 10);
    await expect(quiet.stop()).resolves.toBeUndefined();
  });

  it('a file that cannot take it is not asked again', async () => {
    let n = 0;
    const wb = new EarlyWriteback(async () => {
      n++;
      return false;
    }, 10);
    wb.wrote(0, 10);
    await new Promise((done) => setImmediate(done));
    wb.wrote(10, 10);
    wb.wrote(20, 10);
    expect(n).toBe(1);
    await wb.settle();
  });
});
