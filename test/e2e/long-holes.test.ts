/**
 * Big sparse images through the real service processes (issue 11): hashing a
 * long run of holes must never pin a worker's event loop, or its BullMQ lock
 * lapses, a second worker takes the job, and the two attempts destroy each
 * other's files. Also `diskconv up` (API and worker in one process) stays
 * responsive and honours SIGTERM while such a conversion runs.
 *
 * These run for minutes: 100 GiB of zeros is about 90 s of sha256 on one idle core
 * for the service, and the reference costs as much again. The big image is
 * HOLES_TEST_GIB GiB, default 16; any size over a few GiB blocked the old worker far
 * beyond its 2 s lock. The exact case is HOLES_TEST_GIB=100: it passes here
 * (two runs on the shared 2-core machine at load 9-11: 305 s and 482 s for this test,
 * 286 s of CPU for the whole vitest run, 76 s of it system time reading the sparse
 * reference back), so even idle it costs about 150 s, over the suite's budget of
 * about 90 s for one test. Most of it is SHA-256 itself (0.9 s of CPU per GiB with
 * SHA-NI, twice: service and reference), which no test can skip.
 */
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';
import { curl, ServiceHarness, spawnDiskconv, waitFor, type JobJson, type ServiceProcess } from '../helpers/service.js';

const execFileAsync = promisify(execFile);
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const BIG_GIB = Number(process.env.HOLES_TEST_GIB ?? 16);

/**
 * sha256 of qemu-img's own raw output (sparse on disk, read back whole). Hashed by
 * OpenSSL (`openssl dgst`, SHA-NI where the CPU has it: about 0.9 s of CPU per GiB
 * here) rather than coreutils' sha256sum (about 5 s per GiB, without SHA-NI), which
 * made the reference, not the service, the slow half of this test at 100 GiB.
 */
async function qemuReference(image: string, dir: string): Promise<string> {
  const out = join(dir, 'reference.raw');
  await qemuImg('convert', '-O', 'raw', image, out);
  const { stdout } = await execFileAsync('openssl', ['dgst', '-sha256', '-r', out]);
  return stdout.split(' ')[0] as string;
}

describe('big sparse images in the service', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let big: string;
  let empty64: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-holes-'));
    big = join(dir, 'big.qcow2');
    await qemuImg('create', '-f', 'qcow2', big, `${BIG_GIB}G`);
    await qemuIo('-c', 'write -P 0x5a 0 100M', '-c', `write -P 0xa5 ${BIG_GIB * GiB - 100 * MiB} 100M`, big);
    empty64 = join(dir, 'empty64.qcow2');
    await qemuImg('create', '-f', 'qcow2', empty64, '64G');
  });

  afterAll(async () => cleanup());

  it(`two workers convert a ${BIG_GIB} GiB-virtual qcow2 with 200 MiB of data in one attempt, and a DELETE meanwhile stops the other job`, async () => {
    const svc = await ServiceHarness.create('holes', { WORKER_CONCURRENCY: '1', SHUTDOWN_GRACE_MS: '1000' });
    try {
      await svc.startApi();
      await svc.startWorker();
      await svc.startWorker();
      const reference = qemuReference(big, dir);
      reference.catch(() => {});
      const submit = async (path: string): Promise<string> => (JSON.parse(await curl(['-F', `file=@${path}`, `${svc.apiUrl}/v1/jobs`])) as JobJson).id;
      const converting = (id: string): Promise<JobJson> =>
        svc.waitForJob(id, (j) => j.state === 'running' && j.progress.phase === 'converting', { timeoutMs: 120_000 });

      const bigId = await submit(big);
      await converting(bigId);
      // The second worker is free: it takes the empty 64 GiB image, and the client cancels it mid-hole.
      const emptyId = await submit(empty64);
      await converting(emptyId);
      const t0 = Date.now();
      const res = await svc.request(`/v1/jobs/${emptyId}`, { method: 'DELETE', signal: AbortSignal.timeout(10_000) });
      const answeredMs = Date.now() - t0;
      expect(res.status).toBe(200);
      const cancelled = (await res.json()) as JobJson;
      expect(cancelled.state).toBe('cancelled');
      // The record ends in a terminal phase and says it was cut short while converting (issue 11).
      expect(cancelled.progress).toMatchObject({ phase: 'cancelled', ended_in: 'converting' });
      expect(answeredMs).toBeLessThan(2000); // issue 11: "DELETE answered within 2 s while it runs"
      // The worker takes the cancel within a slice of hashing, not after 64 GiB of it (bounded only to fail rather than hang).
      const worker = await waitFor(
        'a worker to stop the cancelled job',
        async () => svc.processes.find((p) => new RegExp(`"job":"${emptyId}".*"msg":"cancelled"`).test(p.output())),
        15_000,
      );
      expect(worker.name).toMatch(/^worker/);
      const leftovers = async (): Promise<string[]> =>
        (await Promise.all(['input', 'output', 'tmp'].map(async (d) => readdir(join(svc.dataDir, 'store', d))))).flat().filter((n) => n.includes(emptyId));
      await waitFor('the cancelled job to leave nothing in the store', async () => (await leftovers()).length === 0, 15_000);

      const done = await svc.waitForFinal(bigId, { timeoutMs: 25 * 60_000 });
      expect(done.state, JSON.stringify(done.error ?? done)).toBe('succeeded');
      // Why a second attempt ran, if one did: the record and the workers' words for it.
      expect(done.attempts, `${JSON.stringify(done)}\n${svc.logs().split('\n').filter((l) => /attempt|retr|stall|supersed|lock|error/i.test(l)).slice(-20).join('\n')}`).toBe(1);
      expect(done.output?.size).toBe(BIG_GIB * GiB);
      expect(done.output?.sha256).toBe(await reference);
      expect(svc.logs()).not.toMatch(/attempt failed|superseded|stalled/);
    } finally {
      await svc.close();
    }
  }, 30 * 60_000);

  describe('diskconv up', () => {
    const running: ServiceProcess[] = [];
    const startUp = async (name: string): Promise<{ up: ServiceProcess; url: string }> => {
      const port = await freePort();
      const up = spawnDiskconv(name, 'up', { DATA_DIR: join(dir, `data-${name}`), PORT: String(port), QUEUE_NAME: `holes-${name}`, SHUTDOWN_GRACE_MS: '1000' });
      running.push(up);
      const line = await waitFor('the URL line', async () => /diskconv is up: (http:\S+)/.exec(up.output()) ?? undefined, 30_000);
      return { up, url: line[1] as string };
    };
    const convertingIn = async (url: string, image: string): Promise<string> => {
      const { id } = JSON.parse(await curl(['-F', `file=@${image}`, `${url}/v1/jobs`])) as JobJson;
      await waitFor('the conversion to start', async () => {
        const job = JSON.parse(await curl([`${url}/v1/jobs/${id}`])) as JobJson;
        return job.state === 'running' && job.progress.phase === 'converting';
      }, 60_000, 100);
      return id;
    };
    afterAll(async () => {
      for (const p of running) if (p.child.exitCode === null && p.child.signalCode === null) await p.stop('SIGKILL');
    });

    it('/healthz stays responsive while a 64 GiB empty qcow2 converts', async () => {
      const { up, url } = await startUp('healthz');
      const id = await convertingIn(url, empty64);
      for (let i = 0; i < 10; i++) {
        // Today's failure was 43 s; 2 s is generous for a loopback GET on a loaded machine.
        const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(2000) });
        expect(res.status).toBe(200);
        await new Promise((r) => setTimeout(r, 200));
      }
      const job = JSON.parse(await curl([`${url}/v1/jobs/${id}`])) as JobJson;
      expect(job.state).toBe('running');
      // Progress moves inside the one hole.
      expect(job.progress.bytes_done).toBeGreaterThan(0);
      await up.stop('SIGKILL');
    }, 180_000);

    it('honours SIGTERM during such a conversion, handing the job back', async () => {
      const { up, url } = await startUp('sigterm');
      await convertingIn(url, empty64);
      up.child.kill('SIGTERM');
      // SHUTDOWN_GRACE_MS is 1 s; the rest of the 64 GiB hole is a minute of hashing.
      const exit = await Promise.race([up.exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), 20_000))]);
      expect(exit).toBe(0);
      expect(up.output()).toContain('handed back on shutdown');
    }, 180_000);
  });
});
