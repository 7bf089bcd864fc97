/**
 * `check --output=json` byte for byte as qemu-img 7.2 prints it, for every format
 * with a check: stdout (the ImageCheck object in qemu's QDict key order, only
 * qemu's keys), the findings on stderr, the exit status. Clean images and images
 * with leaks and corruptions, made with qemu-img and patched here.
 * Not here: a VMDK whose check fails (a grain past the end of the file), where
 * qemu-img prints "Check failed: Invalid argument" and no JSON at all, and we
 * print the report with check-errors 1 (test/engine/formats/vmdk-hostile.test.ts).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runDiskconv } from '../helpers/cli.js';
import { execFile } from 'node:child_process';

let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

function qemu(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('qemu-img', args, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }));
  });
}

async function made(name: string, fmt: string, writes: string[], opts: string[] = []): Promise<string> {
  await qemuImg('create', '-q', '-f', fmt, ...opts, path(name), '16M');
  if (writes.length > 0) await qemuIo('-f', fmt, ...writes.flatMap((w) => ['-c', w]), path(name));
  return name;
}
async function patched(from: string, name: string, edit: (b: Buffer) => void): Promise<string> {
  const b = await readFile(path(from));
  edit(b);
  await writeFile(path(name), b);
  return name;
}
/** The qcow2 refcount block entry of cluster 0 (the header): 16-bit refcounts. */
const headerRefcount = (b: Buffer): number => Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));

const FIXTURES: string[] = [];
beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-check-json-'));
  const writes = ['write -P 0x11 0 1M', 'write -P 0x12 5M 64k'];
  const q = await made('clean.qcow2', 'qcow2', writes);
  await qemuImg('convert', '-c', '-O', 'qcow2', path(q), path('compressed.qcow2'));
  FIXTURES.push(q, 'compressed.qcow2');
  FIXTURES.push(await patched(q, 'leak.qcow2', (b) => b.writeUInt16BE(5, headerRefcount(b)))); // refcount 5, referenced once: a leak
  FIXTURES.push(await patched(q, 'corrupt.qcow2', (b) => b.writeUInt16BE(0, headerRefcount(b)))); // refcount 0, referenced: a corruption
  const v = await made('clean.vmdk', 'vmdk', writes);
  FIXTURES.push(v);
  const d = await made('clean.vdi', 'vdi', writes);
  FIXTURES.push(d);
  FIXTURES.push(
    await patched(d, 'shared.vdi', (b) => {
      const bmap = b.readUInt32LE(0x154);
      b.writeUInt32LE(b.readUInt32LE(bmap), bmap + 4 * 3); // block 3 (a hole) points at block 0's data
    }),
  );
  FIXTURES.push(await made('clean.vhdx', 'vhdx', writes), await made('clean.vpc', 'vpc', writes));
}, 120_000);
afterAll(async () => cleanup());

describe('check --output=json equals qemu-img check --output=json', () => {
  it('clean, leaked and corrupt images of every format: stdout, stderr findings and exit status', async () => {
    const seen = new Set<number>();
    for (const name of FIXTURES) {
      const theirs = await qemu(['check', '--output=json', path(name)]);
      const ours = await runDiskconv(['check', '--output=json', path(name)]);
      seen.add(theirs.code);
      expect(ours.code, name).toBe(theirs.code);
      expect(ours.stdout.trimEnd(), name).toBe(theirs.stdout.trimEnd());
      // The findings go to stderr as qemu's do, a line each; qcow2's in qemu's words (vdi's are worded
      // our own way). The refusal of a format without checks is worded per CLI.
      if (theirs.code !== 63) expect(ours.stderr.split('\n').length, `${name}: ${ours.stderr}`).toBe(theirs.stderr.split('\n').length);
      if (name.endsWith('.qcow2')) expect(ours.stderr, name).toBe(theirs.stderr);
    }
    // The fixtures cover clean (0), corruptions (2), leaks (3) and no checks (63).
    expect([...seen].sort((a, b) => a - b)).toEqual([0, 2, 3, 63]);
  }, 120_000);
});
