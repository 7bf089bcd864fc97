/**
 * Fixture building with the reference tools: qemu-img and qemu-io make the images,
 * and their outputs are what we compare against.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

export async function run(cmd: string, args: string[]): Promise<{ stdout: string; stderr: string }> {
  return execFileAsync(cmd, args, { maxBuffer: 64 * 2 ** 20 });
}

/**
 * qemu-img times its LUKS key derivation by the thread's CPU clock and, on a busy machine, can fail
 * to ("Unable to get accurate CPU usage"): a fixture that fails so is made again, after a back-off.
 * Any other failure is the command's answer and is thrown at once.
 */
export async function qemuImg(...args: string[]): Promise<{ stdout: string; stderr: string }> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run('qemu-img', args);
    } catch (err) {
      const stderr = (err as { stderr?: unknown }).stderr;
      if (attempt >= 6 || typeof stderr !== 'string' || !stderr.includes('Unable to get accurate CPU usage')) throw err;
      await new Promise((done) => setTimeout(done, 250 * attempt));
    }
  }
}
export const qemuIo = (...args: string[]) => run('qemu-io', args);

/**
 * Flushes fixture files to disk so their allocation is final: ext4 allocates delayed blocks (and the
 * extent-tree block they may need) at writeback, so `actual-size` read before and after it differs by a
 * block, and two tools stat-ing a fresh fixture a moment apart can disagree (seen once in CI, 4096 bytes).
 */
export async function settle(paths: string[]): Promise<void> {
  await Promise.all(
    paths.map(async (p) => {
      const fh = await open(p, 'r+');
      try {
        await fh.datasync();
      } finally {
        await fh.close();
      }
    }),
  );
}

/** A file's data and hole ranges as the filesystem reports them (SEEK_DATA/SEEK_HOLE, through qemu-img map). */
export async function fileAllocation(file: string): Promise<{ start: number; length: number; data: boolean; zero: boolean }[]> {
  const { stdout } = await qemuImg('map', '--output=json', '-f', 'raw', file);
  return (JSON.parse(stdout) as { start: number; length: number; data: boolean; zero: boolean }[]).map(({ start, length, data, zero }) => ({ start, length, data, zero }));
}

/**
 * The bytes of a file's data ranges. What a sparse output allocates for its data: st_blocks also counts
 * ext4's extent-tree blocks, which vary by a block with how the writes were placed on disk, not with what
 * was written (a fragmented output once had 13232 blocks where qemu-img's identical ranges had 13224).
 */
export async function dataBytes(file: string): Promise<number> {
  return (await fileAllocation(file)).reduce((sum, r) => sum + (r.data ? r.length : 0), 0);
}

export async function makeTempDir(prefix = 'diskconv-test-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Deterministic PRNG (xorshift32) so fixtures are reproducible from a seed. */
export function seededBytes(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/**
 * Real-looking disk content: random regions, compressible text-like regions and
 * zero regions, in a pattern that crosses cluster boundaries at odd offsets.
 */
export function mixedContent(size: number, seed = 1): Buffer {
  const buf = Buffer.alloc(size);
  const unit = 37 * 1024 + 512; // deliberately not a power of two
  let pos = 0;
  let i = 0;
  while (pos < size) {
    const len = Math.min(unit * (1 + (i % 3)), size - pos);
    switch (i % 4) {
      case 0:
        seededBytes(len, seed * 1000 + i).copy(buf, pos);
        break;
      case 1:
        buf.fill(`diskconv block ${i} `.repeat(4), pos, pos + len);
        break;
      case 2:
        break; // zeros
      case 3:
        seededBytes(Math.floor(len / 2), seed * 7000 + i).copy(buf, pos);
        break;
    }
    pos += len;
    i++;
  }
  return buf;
}

export async function writeRaw(path: string, size: number, seed = 1): Promise<void> {
  await writeFile(path, mixedContent(size, seed));
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** sha256 of `qemu-img convert -O raw` of the image: the reference result. */
export async function qemuRawSha256(image: string, dir: string, extra: string[] = []): Promise<string> {
  const out = join(dir, `ref-${randomBytes(6).toString('hex')}.raw`);
  await qemuImg('convert', ...extra, '-O', 'raw', image, out);
  try {
    return await sha256File(out);
  } finally {
    await rm(out, { force: true });
  }
}

export async function qemuInfo(image: string): Promise<Record<string, unknown>> {
  const { stdout } = await qemuImg('info', '--output=json', image);
  return JSON.parse(stdout) as Record<string, unknown>;
}

/** The keys issue 2 requires `diskconv info` to match. */
export const INFO_KEYS = [
  'virtual-size',
  'filename',
  'format',
  'actual-size',
  'dirty-flag',
  'cluster-size',
  'encrypted',
  'backing-filename',
  'snapshots',
  'format-specific',
] as const;

export function pickInfo(info: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(INFO_KEYS.filter((k) => k in info).map((k) => [k, info[k]]));
}

export const hasQemuIo = (): Promise<boolean> => run('qemu-io', ['--version']).then(() => true, () => false);
