/**
 * Never destroy (issue 11), through the built CLI: the source is never the
 * destination (however it is linked), devices are written in place and never
 * truncated or unlinked, a failed conversion leaves an existing destination
 * byte-identical and removes only its own temporary file, and output-side
 * failures (full disk, read-only or missing directory) name the path with their
 * own code. Each of these destroyed data or said INTERNAL_ERROR before.
 */
import { execFile } from 'node:child_process';
import { copyFile, link, lstat, mkdir, readdir, readFile, stat, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuRawSha256, seededBytes, sha256File, writeRaw } from '../helpers/qemu.js';

const sh = promisify(execFile);
const isRoot = process.getuid?.() === 0;
const canMount = isRoot && (await sh('mount', ['--version']).then(() => true, () => false));
const canLoop = isRoot && (await sh('losetup', ['--version']).then(() => true, () => false));

let dir: string;
let cleanup: () => Promise<void>;
/** A qcow2 with 20 MiB virtual size and mixed data, its qemu-img raw sha256. */
let image: string;
let imageSha: string;
let refSha: string;
const mounts: string[] = [];
const loops: string[] = [];

/** Each test that could destroy its source gets its own copy, so one failure cannot cascade. */
let copies = 0;
async function ownImage(): Promise<string> {
  const p = join(dir, `own-${++copies}.qcow2`);
  await copyFile(image, p);
  return p;
}

const leftovers = async (d: string): Promise<string[]> => (await readdir(d)).filter((n) => n.includes('.diskconv-'));

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-dest-'));
  const raw = join(dir, 'base.raw');
  await writeRaw(raw, 20 * 2 ** 20, 3);
  image = join(dir, 'disk.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, image);
  imageSha = await sha256File(image);
  refSha = await qemuRawSha256(image, dir);
});

afterAll(async () => {
  for (const m of mounts.reverse()) await sh('umount', [m]).catch(() => {});
  for (const l of loops) await sh('losetup', ['-d', l]).catch(() => {});
  await cleanup?.();
});

async function tmpfs(name: string, options: string): Promise<string> {
  const at = join(dir, name);
  await mkdir(at);
  await sh('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', at]);
  mounts.push(at);
  return at;
}

describe('the source is never the destination', () => {
  it('SRC = DST is refused with SAME_FILE and the image is untouched', async () => {
    const image = await ownImage();
    const r = await runDiskconv(['convert', '-O', 'raw', image, image]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^diskconv: SAME_FILE: /);
    expect(await sha256File(image)).toBe(imageSha);
    expect(await leftovers(dir)).toEqual([]);
  });

  it('a hard link to SRC is refused', async () => {
    const image = await ownImage();
    const hard = join(dir, 'hard.raw');
    await link(image, hard);
    const r = await runDiskconv(['convert', '-O', 'raw', image, hard]);
    expect(r.stderr).toMatch(/SAME_FILE/);
    expect(r.code).toBe(1);
    expect(await sha256File(image)).toBe(imageSha);
    expect((await stat(hard)).ino).toBe((await stat(image)).ino);
  });

  it('DST a symlink to SRC, and SRC a symlink to DST, are refused', async () => {
    const image = await ownImage();
    const sym = join(dir, 'sym.raw');
    await symlink(image, sym);
    for (const [src, dst] of [
      [image, sym],
      [sym, image],
      [join(dir, '.', image.slice(dir.length + 1)), image],
    ] as const) {
      const r = await runDiskconv(['convert', '-O', 'raw', src, dst]);
      expect(r.stderr).toMatch(/SAME_FILE/);
      expect(r.code).toBe(1);
    }
    expect(await sha256File(image)).toBe(imageSha);
    expect((await lstat(sym)).isSymbolicLink()).toBe(true);
  });
});

describe('devices are written in place, never truncated or unlinked', () => {
  it.skipIf(!isRoot)('a character device node (mknod c 1 3, a /dev/null) is written and stays', async () => {
    const node = join(dir, 'null-node');
    await sh('mknod', [node, 'c', '1', '3']);
    const before = await stat(node);
    const r = await runDiskconv(['convert', '-O', 'raw', image, node]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const after = await lstat(node);
    expect(after.isCharacterDevice()).toBe(true);
    expect(after.ino).toBe(before.ino);
    expect(after.rdev).toBe(before.rdev);
    expect(await leftovers(dir)).toEqual([]);
  });

  describe.skipIf(!canLoop)('a block device (a loop device behind a mknod node)', () => {
    let node: string;
    let backing: string;
    const DEVICE = 24 * 2 ** 20;
    beforeAll(async () => {
      backing = join(dir, 'loop-backing.img');
      // Random bytes everywhere: the image's zeros must be written, not assumed.
      await writeFile(backing, seededBytes(DEVICE, 99));
      const { stdout } = await sh('losetup', ['-f', '--show', backing]);
      const dev = stdout.trim();
      loops.push(dev);
      const { stdout: nums } = await sh('stat', ['-c', '%t %T', dev]);
      const [maj, min] = nums.trim().split(' ').map((h) => parseInt(h, 16)) as [number, number];
      node = join(dir, 'blk-node');
      await sh('mknod', [node, 'b', String(maj), String(min)]);
    });

    it('gets the bytes of qemu-img convert, zeros included, and its tail and node stay', async () => {
      const before = await stat(node);
      const r = await runDiskconv(['convert', '-O', 'raw', image, node]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const after = await lstat(node);
      expect(after.isBlockDevice()).toBe(true);
      expect(after.ino).toBe(before.ino);
      const bytes = await readFile(node);
      expect(bytes.length).toBe(DEVICE);
      const { createHash } = await import('node:crypto');
      expect(createHash('sha256').update(bytes.subarray(0, 20 * 2 ** 20)).digest('hex')).toBe(refSha);
      // Beyond the virtual size the device keeps what it had.
      expect(bytes.subarray(20 * 2 ** 20).equals(seededBytes(DEVICE, 99).subarray(20 * 2 ** 20))).toBe(true);
    });

    it('a device smaller than the virtual size is refused before anything is written', async () => {
      const big = join(dir, 'big.qcow2');
      await qemuImg('create', '-f', 'qcow2', big, '64M');
      const { stdout } = await sh('sha256sum', [node]);
      const r = await runDiskconv(['convert', '-O', 'raw', big, node]);
      expect(r.stderr).toMatch(/^diskconv: INSUFFICIENT_SPACE: .*blk-node.*smaller/);
      expect(r.code).toBe(1);
      expect((await sh('sha256sum', [node])).stdout).toBe(stdout);
      expect((await lstat(node)).isBlockDevice()).toBe(true);
    });
  });
});

describe('a failure leaves an existing destination exactly as it was', () => {
  it('a corrupt source over an existing file: the file is byte-identical, no temporary file is left', async () => {
    const bytes = await readFile(image);
    // Cut the image in the middle of its data: the header and tables open, the clusters are missing.
    const cut = join(dir, 'cut.qcow2');
    await writeFile(cut, bytes.subarray(0, Math.floor(bytes.length / 2)));
    const existing = join(dir, 'precious.raw');
    const content = seededBytes(3 * 2 ** 20, 7);
    await writeFile(existing, content);
    const r = await runDiskconv(['convert', '-O', 'raw', cut, existing]);
    expect(r.stderr).toMatch(/^diskconv: IMAGE_CORRUPT: /);
    expect(r.code).toBe(1);
    expect((await readFile(existing)).equals(content)).toBe(true);
    expect(await leftovers(dir)).toEqual([]);
  });

  it('a successful conversion replaces an existing file (through a symlink, the file it names) and keeps its mode', async () => {
    const existing = join(dir, 'replaced.raw');
    await writeFile(existing, seededBytes(1000, 1), { mode: 0o600 });
    const sym = join(dir, 'replaced-link');
    await symlink(existing, sym);
    const r = await runDiskconv(['convert', '-O', 'raw', image, sym]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect((await lstat(sym)).isSymbolicLink()).toBe(true);
    expect(await sha256File(existing)).toBe(refSha);
    expect((await stat(existing)).mode & 0o777).toBe(0o600);
    expect(await leftovers(dir)).toEqual([]);
  });

  it('a conversion that fails on a missing snapshot leaves a new destination uncreated', async () => {
    const dst = join(dir, 'never.raw');
    const r = await runDiskconv(['convert', '-O', 'raw', '-l', 'snapshot.name=nope', image, dst]);
    expect(r.code).toBe(1);
    await expect(stat(dst)).rejects.toThrow(/ENOENT/);
    expect(await leftovers(dir)).toEqual([]);
  });
});

describe('output-side failures name the path', () => {
  it.skipIf(!canMount)('a full tmpfs: INSUFFICIENT_SPACE before writing, nothing left behind', async () => {
    const full = await tmpfs('full', 'size=8m');
    const dst = join(full, 'out.raw');
    const r = await runDiskconv(['convert', '-O', 'raw', image, dst]);
    expect(r.stderr).toMatch(/^diskconv: INSUFFICIENT_SPACE: .*out\.raw/);
    expect(r.code).toBe(1);
    expect(await readdir(full)).toEqual([]);
  });

  it.skipIf(!canMount)('ENOSPC while writing in place (-n onto a sparse file on a full tmpfs) is INSUFFICIENT_SPACE naming the path', async () => {
    const small = await tmpfs('small', 'size=4m');
    const dst = join(small, 'sparse.raw');
    await writeFile(dst, '');
    await truncate(dst, 20 * 2 ** 20);
    const r = await runDiskconv(['convert', '-n', '-O', 'raw', image, dst]);
    expect(r.stderr).toMatch(/^diskconv: INSUFFICIENT_SPACE: .*sparse\.raw/);
    expect(r.code).toBe(1);
    // In place: the file is still there with its size.
    expect((await stat(dst)).size).toBe(20 * 2 ** 20);
  });

  it.skipIf(!canMount)('ENOSPC in a write of the decoding threads (a compressed qcow2, -n onto a full tmpfs) is INSUFFICIENT_SPACE naming the path', async () => {
    // Compressed clusters go to the file from the threads that decode them (native/codec decodeWrite) where it built;
    // their write errors must read as the sink's own.
    const compressed = join(dir, 'disk-c.qcow2');
    await qemuImg('convert', '-f', 'qcow2', '-O', 'qcow2', '-c', image, compressed);
    const small = await tmpfs('small-c', 'size=4m');
    const dst = join(small, 'sparse.raw');
    await writeFile(dst, '');
    await truncate(dst, 20 * 2 ** 20);
    const r = await runDiskconv(['convert', '-n', '-O', 'raw', compressed, dst]);
    expect(r.stderr).toMatch(/^diskconv: INSUFFICIENT_SPACE: .*sparse\.raw/);
    expect(r.code).toBe(1);
    expect((await stat(dst)).size).toBe(20 * 2 ** 20);
  });

  it.skipIf(!canMount)('a read-only directory is DESTINATION_UNWRITABLE naming the path, not INTERNAL_ERROR', async () => {
    const ro = await tmpfs('ro', 'ro,size=64m');
    const dst = join(ro, 'out.raw');
    const r = await runDiskconv(['convert', '-O', 'raw', image, dst]);
    expect(r.stderr).toMatch(/^diskconv: DESTINATION_UNWRITABLE: .*ro\/out\.raw/);
    expect(r.code).toBe(1);
  });

  it('a missing directory is DESTINATION_UNWRITABLE naming the path', async () => {
    const dst = join(dir, 'no-such-dir', 'out.raw');
    const r = await runDiskconv(['convert', '-O', 'raw', image, dst]);
    expect(r.stderr).toMatch(/^diskconv: DESTINATION_UNWRITABLE: .*no-such-dir\/out\.raw/);
    expect(r.code).toBe(1);
  });

  it('a directory as DST is DESTINATION_UNWRITABLE', async () => {
    const r = await runDiskconv(['convert', '-O', 'raw', image, dir]);
    expect(r.stderr).toMatch(/^diskconv: DESTINATION_UNWRITABLE: .* is a directory/);
    expect(r.code).toBe(1);
  });
});
