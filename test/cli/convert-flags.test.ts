/**
 * qemu-img convert's flags, run side by side with qemu-img itself: every
 * combination gives the same bytes, -S gives qemu-img's allocation (-S 0 fully
 * allocated), -n writes in place without resizing, --target-is-zero needs -n,
 * bad values are refused with qemu-img's messages, and -p prints qemu-img's
 * progress line on stdout even when it is not a terminal.
 */
import { stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { dataBytes, fileAllocation, makeTempDir, qemuImg, seededBytes, sha256File, writeRaw } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let plain: string;
let compressed: string;
const MiB = 2 ** 20;
const SIZE = 24 * MiB;
let n = 0;
const out = (tag: string) => join(dir, `${tag}-${++n}.raw`);

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-flags-'));
  const raw = join(dir, 'base.raw');
  await writeRaw(raw, SIZE, 21);
  plain = join(dir, 'plain.qcow2');
  compressed = join(dir, 'compressed.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, plain);
  await qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, compressed);
});
afterAll(async () => cleanup?.());

async function both(flags: string[], image: string): Promise<{ ours: string; theirs: string }> {
  const ours = out('ours');
  const theirs = out('qemu');
  await qemuImg('convert', ...flags, '-O', 'raw', image, theirs);
  const r = await runDiskconv(['convert', ...flags, '-O', 'raw', image, ours]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return { ours, theirs };
}

const COMBOS: string[][] = [
  [],
  ['-S', '0'],
  ['-S', '64k'],
  ['-S', '512'],
  ['-t', 'writeback'],
  ['-t', 'none', '-T', 'none'],
  ['-t', 'unsafe', '-W', '-m', '1'],
  ['-m', '16', '-U', '-C'],
  ['-q'],
  ['-p', '-q'],
  ['-W', '-S', '0', '-t', 'writethrough'],
];

describe('convert flags give qemu-img\'s bytes and allocation', () => {
  for (const flags of COMBOS) {
    it(`${flags.join(' ') || '(none)'}`, async () => {
      for (const image of [plain, compressed]) {
        const { ours, theirs } = await both(flags, image);
        expect(await sha256File(ours)).toBe(await sha256File(theirs));
        const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
        expect(a.size).toBe(b.size);
        // Allocation as qemu-img's: -S 0 fully allocated, otherwise holes at the -S granularity (never more data than qemu-img's).
        if (flags.includes('-S') && flags[flags.indexOf('-S') + 1] === '0') expect(a.blocks * 512).toBeGreaterThanOrEqual(SIZE);
        else expect(await dataBytes(ours)).toBeLessThanOrEqual(await dataBytes(theirs));
        // By default, data where qemu-img's file has data and holes where it has holes, range for range, as the
        // filesystem reports them (SEEK_DATA/SEEK_HOLE, through qemu-img map). Not st_blocks: ext4 counts its
        // extent-tree blocks there too, which vary with how the writes were placed, not with what was written.
        if (flags.length === 0) expect(await fileAllocation(ours)).toEqual(await fileAllocation(theirs));
      }
    });
  }
});

describe('-n and --target-is-zero', () => {
  it('-n writes into an existing larger file in place: same bytes as qemu-img -n, size and tail kept', async () => {
    const start = seededBytes(SIZE + 3 * MiB, 5);
    const ours = out('n-ours');
    const theirs = out('n-qemu');
    await writeFile(ours, start);
    await writeFile(theirs, start);
    const before = (await stat(ours)).ino;
    await qemuImg('convert', '-n', '-O', 'raw', plain, theirs);
    const r = await runDiskconv(['convert', '-n', '-O', 'raw', plain, ours]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
    const st = await stat(ours);
    expect(st.size).toBe(SIZE + 3 * MiB);
    expect(st.ino).toBe(before);
  });

  it('-n --target-is-zero onto a zero file: same bytes as qemu-img', async () => {
    const ours = out('tz-ours');
    const theirs = out('tz-qemu');
    for (const p of [ours, theirs]) {
      await writeFile(p, '');
      await truncate(p, SIZE);
    }
    await qemuImg('convert', '-n', '--target-is-zero', '-O', 'raw', compressed, theirs);
    const r = await runDiskconv(['convert', '-n', '--target-is-zero', '-O', 'raw', compressed, ours]);
    expect(r.code).toBe(0);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
  });

  it('--target-is-zero without -n is refused as qemu-img refuses it', async () => {
    const dst = out('tz-alone');
    const r = await runDiskconv(['convert', '--target-is-zero', '-O', 'raw', plain, dst]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('--target-is-zero requires use of -n flag');
    await expect(stat(dst)).rejects.toThrow(/ENOENT/);
  });

  it('-n onto a smaller file is refused and the file is left as it was', async () => {
    const dst = out('n-small');
    const content = seededBytes(MiB, 9);
    await writeFile(dst, content);
    const sha = await sha256File(dst);
    const r = await runDiskconv(['convert', '-n', '-O', 'raw', plain, dst]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/INSUFFICIENT_SPACE: .*smaller than input file/);
    expect(await sha256File(dst)).toBe(sha);
  });

  it('-n onto a missing file is refused naming it, and creates nothing', async () => {
    const dst = out('n-missing');
    const r = await runDiskconv(['convert', '-n', '-O', 'raw', plain, dst]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/DESTINATION_UNWRITABLE: .*n-missing/);
    await expect(stat(dst)).rejects.toThrow(/ENOENT/);
  });
});

describe('bad flag values are refused with qemu-img\'s messages', () => {
  it.each([
    [['-S', '1000'], 'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216.'],
    [['-S', '32M'], 'Invalid buffer size for sparse output specified.'],
    [['-m', '0'], 'Invalid number of coroutines. Allowed number of coroutines is between 1 and 16'],
    [['-m', '17'], 'Invalid number of coroutines.'],
    [['-t', 'bogus'], 'Invalid cache option: bogus'],
    [['-T', 'bogus'], 'Invalid source cache option: bogus'],
  ])('%j', async (flags, message) => {
    const qemu = await qemuImg('convert', ...flags, '-O', 'raw', plain, out('qemu-bad')).then(
      () => '',
      (e: { stderr: string }) => e.stderr,
    );
    expect(qemu).toContain(message);
    const dst = out('bad');
    const r = await runDiskconv(['convert', ...flags, '-O', 'raw', plain, dst]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(message);
    await expect(stat(dst)).rejects.toThrow(/ENOENT/);
  });
});

describe('-p', () => {
  const LINE = /^ {4}\((\d+\.\d\d)\/100%\)\r/;
  function steps(stdout: string): number[] {
    const values: number[] = [];
    let rest = stdout;
    for (let m = LINE.exec(rest); m; m = LINE.exec(rest)) {
      values.push(Number(m[1]));
      rest = rest.slice(m[0].length);
    }
    expect(rest).toBe('\n');
    return values;
  }

  it('prints qemu-img\'s line on stdout (not a terminal here), moving at least every ~1 %, ending as qemu-img ends', async () => {
    const dst = out('p');
    const r = await runDiskconv(['convert', '-p', '-O', 'raw', compressed, dst]);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    const v = steps(r.stdout);
    expect(v[0]).toBe(0);
    expect(v.slice(-2)).toEqual([100, 100]);
    for (let i = 1; i < v.length; i++) {
      expect(v[i]).toBeGreaterThanOrEqual(v[i - 1] as number);
      expect((v[i] as number) - (v[i - 1] as number)).toBeLessThanOrEqual(1.5);
    }
    // qemu-img's own output has the same shape.
    const q = await import('node:child_process').then(
      (cp) =>
        new Promise<string>((resolve, reject) =>
          cp.execFile('qemu-img', ['convert', '-p', '-O', 'raw', compressed, out('p-qemu')], (err, stdout) => (err ? reject(err) : resolve(stdout))),
        ),
    );
    const qv = steps(q);
    expect(qv[0]).toBe(0);
    expect(qv.slice(-2)).toEqual([100, 100]);
  });

  it('an empty image prints 0 and 100 once, as qemu-img does', async () => {
    const empty = join(dir, 'empty.qcow2');
    await qemuImg('create', '-f', 'qcow2', empty, '8M');
    const r = await runDiskconv(['convert', '-p', '-O', 'raw', empty, out('pe')]);
    expect(r.stdout).toBe('    (0.00/100%)\r    (100.00/100%)\r\n');
  });

  it('-q silences -p', async () => {
    const r = await runDiskconv(['convert', '-p', '-q', '-O', 'raw', plain, out('pq')]);
    expect(r.stdout).toBe('');
  });
});
