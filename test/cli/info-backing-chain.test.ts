/**
 * `info --backing-chain`: for an image without a backing file, qemu-img's output
 * byte for byte (the same human text; JSON as a list of one). For an image with
 * one, refused: the chain would open a path named inside the image.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const images: string[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-chain-'));
  const raw = join(dir, 'disk.raw');
  await writeRaw(raw, 3 * 2 ** 20, 6);
  images.push(raw);
  for (const fmt of ['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx']) {
    const img = join(dir, `disk.${fmt}`);
    await qemuImg('convert', '-f', 'raw', '-O', fmt, raw, img);
    images.push(img);
  }
  // Written out, so the allocated size (disk size / actual-size) is settled before both tools read it.
  await sh('sync', images);
});
afterAll(async () => cleanup?.());

describe('info --backing-chain', () => {
  it.each(['human', 'json'])('an image without a backing file: the same output as qemu-img (--output=%s)', async (output) => {
    for (const img of images) {
      const { stdout } = await sh('qemu-img', ['info', '--backing-chain', `--output=${output}`, img]);
      const r = await runDiskconv(['info', '--backing-chain', `--output=${output}`, img]);
      expect(r.code, img).toBe(0);
      expect(r.stdout, img).toBe(stdout);
    }
  });

  it('an image with a backing file is refused with UNSAFE_IMAGE; plain info still shows the backing file', async () => {
    const top = join(dir, 'top.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-b', images[1] as string, '-F', 'qcow2', top);
    const r = await runDiskconv(['info', '--backing-chain', top]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('UNSAFE_IMAGE');
    expect(r.stderr).toContain('never opens a path named inside an image');
    const plain = await runDiskconv(['info', top]);
    expect(plain.code).toBe(0);
    expect(plain.stdout).toContain(`backing file: ${images[1] as string}`);
  });
});
