/**
 * Processes dying and clients changing their minds, with real processes: cancel
 * mid-conversion, SIGKILL a worker mid-conversion, restart the API mid-job,
 * SIGTERM a worker (it finishes, or hands the job back after its grace period).
 * Workers read through WORKER_READ_BYTES_PER_SECOND so a small image takes a few
 * seconds to convert. Each test sets up its own service (Redis, data directory,
 * API and the workers it needs), so none depends on what an earlier one left running.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';

const SLOW = { WORKER_READ_BYTES_PER_SECOND: '4M' };

describe('service resilience', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: string;
  let imageSha: string;

  const submit = async (): Promise<string> => {
    const job = JSON.parse(await curl(['-F', `file=@${image}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    return job.id;
  };
  const converting = (id: string): Promise<JobJson> =>
    svc.waitForJob(id, (j) => j.state === 'running' && j.progress.phase === 'converting' && j.progress.bytes_done > 0, { timeoutMs: 30_000 });
  const storeFiles = async (): Promise<string[]> =>
    (await Promise.all(['input', 'output', 'tmp'].map(async (d) => (await readdir(join(svc.dataDir, 'store', d))).map((n) => `${d}/${n}`)))).flat();
  const download = async (job: JobJson): Promise<string> => {
    const out = join(dir, `${job.id}.raw`);
    await curl(['-o', out, `${svc.apiUrl}${job.output?.href}`]);
    const { sha256File } = await import('../helpers/qemu.js');
    return sha256File(out);
  };

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-resilience-'));
    const raw = join(dir, 'base.raw');
    await writeRaw(raw, 24 * 2 ** 20, 5);
    image = join(dir, 'slow.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, image);
    imageSha = await qemuRawSha256(image, dir);
  });

  afterAll(async () => {
    await cleanup();
  });

  beforeEach(async () => {
    svc = await ServiceHarness.create('resilience');
    await svc.startApi();
  });

  afterEach(async () => {
    await svc?.close();
  });

  it('cancels a running conversion: the worker stops at once and removes partial output and input', async () => {
    const worker1 = await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '500' });
    const id = await submit();
    const running = await converting(id);
    expect(running.progress.bytes_total).toBe(24 * 2 ** 20);
    expect(running.progress.percent).toBeLessThan(100);
    const res = await svc.request(`/v1/jobs/${id}`, { method: 'DELETE' });
    expect(res.status).toBe(200);
    expect(((await res.json()) as JobJson).state).toBe('cancelled');
    // The worker notices within a second or two (bounded here only to fail rather than hang).
    await waitFor('the worker to stop the job', async () => /"job":"[^"]+".*"msg":"cancelled"/.test(worker1.output()), 5000);
    await waitFor('the store to be clean', async () => (await storeFiles()).length === 0, 5000);
    const job = await svc.getJob(id);
    expect(job.state).toBe('cancelled');
    expect(job.output).toBeNull();
    expect((await svc.request(`/v1/jobs/${id}/output`)).status).toBe(409);
  });

  it('survives a worker killed mid-conversion: a second worker picks the stalled job up and finishes it', async () => {
    const worker1 = await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '500' });
    const id = await submit();
    await converting(id);
    await worker1.stop('SIGKILL');
    // A live attempt never deletes another attempt's files (issue 11): the killed attempt's partial output
    // is the sweeper's to remove, once no live job owns it; a short orphan TTL lets that happen here.
    const worker2 = await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '30000', RETENTION_SWEEP_SECONDS: '1', ORPHAN_TTL_SECONDS: '1' });
    const done = await svc.waitForFinal(id, { timeoutMs: 60_000 });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.attempts).toBeGreaterThanOrEqual(2);
    expect(done.output?.sha256).toBe(imageSha);
    expect(await download(done)).toBe(imageSha);
    expect(worker2.output()).toContain(id);
    // The killed worker's partial output is gone too.
    await waitFor('the sweeper to remove the killed attempt\'s partial output', async () => (await storeFiles()).filter((f) => !f.startsWith('output/')).length === 0, 15_000);
  });

  it('loses nothing when the API restarts mid-job', async () => {
    await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '30000' });
    const id = await submit();
    await converting(id);
    const api = svc.processes.find((p) => p.name === 'api');
    await api?.stop('SIGKILL');
    await svc.startApi();
    const done = await svc.waitForFinal(id, { timeoutMs: 60_000 });
    expect(done.state).toBe('succeeded');
    expect(done.output?.sha256).toBe(imageSha);
    expect(await download(done)).toBe(imageSha);
    const list = (await (await svc.request('/v1/jobs?limit=10')).json()) as { jobs: JobJson[] };
    expect(list.jobs.map((j) => [j.id, j.state])).toEqual([[id, 'succeeded']]);
  });

  it('finishes the running job on SIGTERM, then exits', async () => {
    const worker = await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '30000' });
    const id = await submit();
    await converting(id);
    const exit = await worker.stop('SIGTERM');
    expect(exit).toBe(0);
    const job = await svc.getJob(id);
    expect(job.state).toBe('succeeded');
    expect(job.output?.sha256).toBe(imageSha);
  });

  it('hands the job back on SIGTERM when the grace period runs out; another worker finishes it', async () => {
    const worker3 = await svc.startWorker({ ...SLOW, SHUTDOWN_GRACE_MS: '300' });
    const id = await submit();
    await converting(id);
    expect(await worker3.stop('SIGTERM')).toBe(0);
    expect(worker3.output()).toContain('handed back on shutdown');
    const queued = await svc.getJob(id);
    expect(queued.state).toBe('queued');
    await svc.startWorker();
    const done = await svc.waitForFinal(id, { timeoutMs: 60_000 });
    expect(done.state).toBe('succeeded');
    expect(done.output?.sha256).toBe(imageSha);
    expect((await storeFiles()).filter((f) => !f.startsWith('output/'))).toEqual([]);
  });

  it('fails a job that stalls more than WORKER_MAX_STALLED_COUNT times with WORKER_LOST, cleaning up', async () => {
    const doomed = await svc.startWorker(SLOW);
    const id = await submit();
    await converting(id);
    await doomed.stop('SIGKILL');
    await svc.startWorker({ WORKER_MAX_STALLED_COUNT: '0' });
    const failed = await svc.waitForFinal(id, { timeoutMs: 60_000 });
    expect(failed).toMatchObject({ state: 'failed', error: { code: 'WORKER_LOST' } });
    await waitFor('the store to be clean', async () => (await storeFiles()).filter((f) => !f.startsWith('output/') || f === `output/${id}`).length === 0, 5000);
  });
});
