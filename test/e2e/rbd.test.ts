/**
 * Jobs with an RBD target, as real processes on the shared test Ceph: upload
 * with output_target=rbd, the worker writes the image and its protected
 * snapshot; refused pools, name clashes and cancels leave what they did not
 * create as it was.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, type JobJson } from '../helpers/service.js';

describe.skipIf(!cephAvailable)('jobs with an RBD target', () => {
  let env: CephEnv;
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: string;
  let imageSha: string;
  const names: string[] = [];
  const name = (n: string): string => {
    const full = `${n}-${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
    names.push(full);
    return full;
  };
  const rbd = (...args: string[]): Promise<string> => cephCli(env, 'rbd', args);
  const exportSha = async (spec: string): Promise<string> => {
    const out = join(dir, `export-${Math.random().toString(36).slice(2)}.raw`);
    await rbd('export', '--no-progress', spec, out);
    return sha256File(out);
  };
  const exists = async (n: string): Promise<boolean> => (await rbd('ls', '--format', 'json', 'rbd')).includes(`"${n}"`);
  const upload = async (query: string, path = image): Promise<{ status: number; body: Record<string, unknown> }> => {
    const out = await curl(['-w', '\n%{http_code}', '-H', 'content-type: application/octet-stream', '--data-binary', `@${path}`, `${svc.apiUrl}/v1/jobs?${query}`]);
    const lines = out.trimEnd().split('\n');
    const status = Number(lines.pop());
    return { status, body: JSON.parse(lines.join('\n')) as Record<string, unknown> };
  };

  beforeAll(async () => {
    env = await useCeph();
    ({ dir, cleanup } = await makeTempDir('diskconv-e2e-rbd-'));
    image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, '128M');
    await qemuIo('-c', 'write -P 0x41 0 2M', '-c', 'write -P 0x42 126M 2M', image);
    imageSha = await qemuRawSha256(image, dir);
    svc = await ServiceHarness.create('e2e-rbd', { RBD_POOLS: 'rbd', CEPH_CONF: env.CEPH_CONF, CEPH_ARGS: env.CEPH_ARGS });
    await svc.startApi();
    await svc.startWorker({ WORKER_READ_BYTES_PER_SECOND: '2M' });
  });
  afterAll(async () => {
    await svc?.close();
    await removeRbdImages(env, names);
    await cleanup?.();
  });

  it('writes the image and its protected snapshot, reports where, and serves nothing at /output', async () => {
    const n = name('job');
    const res = await upload(`output_target=rbd&rbd_pool=rbd&rbd_image=${n}`);
    expect(res.status).toBe(202);
    const done = await svc.waitForFinal(res.body.id as string);
    expect(done.state).toBe('succeeded');
    expect(done.output).toEqual({
      format: 'raw',
      target: 'rbd',
      pool: 'rbd',
      image: n,
      snapshot: 'snap',
      size: 128 * 2 ** 20,
      sha256: imageSha,
      data_bytes: expect.any(Number),
      location: `rbd://${env.CEPH_FSID}/rbd/${n}/snap`,
    });
    expect(done.destination).toEqual({ target: 'rbd', pool: 'rbd', image: n });
    expect(await exportSha(`rbd/${n}@snap`)).toBe(imageSha);
    const get = await fetch(`${svc.apiUrl}/v1/jobs/${done.id}/output`);
    expect(get.status).toBe(409);
    expect(await get.json()).toMatchObject({ code: 'OUTPUT_ELSEWHERE' });
  });

  it('refuses a pool outside RBD_POOLS at once, storing nothing', async () => {
    const res = await upload('output_target=rbd&rbd_pool=images&rbd_image=x');
    expect(res.status).toBe(422);
    expect(res.body).toMatchObject({ code: 'DESTINATION_REFUSED' });
    const json = await fetch(`${svc.apiUrl}/v1/jobs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ source: { url: 'https://example.org/disk.qcow2' }, output: { target: 'rbd', pool: 'images' } }),
    });
    expect(json.status).toBe(422);
    expect(await json.json()).toMatchObject({ code: 'DESTINATION_REFUSED' });
    const { readdir } = await import('node:fs/promises');
    expect(await readdir(join(svc.dataDir, 'store', 'input'))).toEqual([]);
    expect(await readdir(join(svc.dataDir, 'store', 'tmp'))).toEqual([]);
  });

  it('fails a name clash with DESTINATION_EXISTS and leaves the existing image byte-identical', async () => {
    const n = name('existing');
    const raw = join(dir, 'existing.raw');
    await writeRaw(raw, 16 * 2 ** 20, 9);
    await rbd('import', '--no-progress', raw, `rbd/${n}`);
    const before = await exportSha(`rbd/${n}`);
    const res = await upload(`output_target=rbd&rbd_pool=rbd&rbd_image=${n}`);
    const done = await svc.waitForFinal(res.body.id as string);
    expect(done).toMatchObject({ state: 'failed', error: { code: 'DESTINATION_EXISTS' }, attempts: 1 });
    expect(await exportSha(`rbd/${n}`)).toBe(before);
  });

  it('removes the image it created when the job is cancelled mid-conversion', async () => {
    const n = name('cancelled');
    // Data all through, read at 2 MiB/s: the conversion takes a while.
    const slow = join(dir, 'slow.qcow2');
    const raw = join(dir, 'slow.raw');
    await writeRaw(raw, 24 * 2 ** 20, 3);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, slow);
    const res = await upload(`output_target=rbd&rbd_pool=rbd&rbd_image=${n}`, slow);
    const id = res.body.id as string;
    await svc.waitForJob(id, (j: JobJson) => j.state === 'running' && j.progress.phase === 'converting' && j.progress.bytes_done > 0, { timeoutMs: 60_000 });
    // Mid-conversion the image is the attempt's temporary; its final name holds nothing yet.
    const temps = async (): Promise<string[]> => (JSON.parse(await rbd('ls', '--format', 'json', 'rbd')) as string[]).filter((x) => x.startsWith(`diskconv-tmp.${id}.`));
    expect(await temps()).toHaveLength(1);
    expect(await exists(n)).toBe(false);
    const del = await fetch(`${svc.apiUrl}/v1/jobs/${id}`, { method: 'DELETE' });
    expect(del.status).toBe(200);
    const { waitFor } = await import('../helpers/service.js');
    await waitFor('the image to be removed', async () => (await temps()).length === 0, 60_000, 500);
    expect(await exists(n)).toBe(false);
    expect((await svc.getJob(id)).state).toBe('cancelled');
  });
});
