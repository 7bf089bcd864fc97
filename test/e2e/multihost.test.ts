/**
 * Several hosts, real processes, sharing only Redis and the store (issue 7):
 * one API and two workers with separate DATA_DIRs, 20 jobs of qcow2, vmdk and
 * vdi (some written to RBD), one worker SIGKILLed mid-batch, Redis SIGKILLed
 * and restarted (appendonly) mid-batch. Every accepted job succeeds with
 * qemu-img's sha256; nothing is left in progress or staged; the API host's
 * disk holds no image. Run once on the S3 store (RGW) and once on a file store
 * that every process mounts. Throughput (one worker, then two) and each
 * process's peak RSS are printed, not asserted (timing has no place in tests).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, readdir, mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import type { S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { ServiceHarness, waitFor, type JobJson, type ServiceProcess } from '../helpers/service.js';

interface Fixture {
  path: string;
  format: string;
  sha256: string;
}

/** A redis-server with appendonly on a fixed port, so it can be killed and started again as the same server. */
class PersistentRedis {
  child: ChildProcess | undefined;
  constructor(
    readonly dir: string,
    readonly port: number,
  ) {}
  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }
  async start(): Promise<void> {
    const child = spawn('redis-server', ['--bind', '127.0.0.1', '--port', String(this.port), '--dir', this.dir, '--appendonly', 'yes', '--appendfsync', 'always', '--save', '', '--daemonize', 'no'], { stdio: 'ignore' });
    this.child = child;
    await waitFor('redis', async () => {
      if (child.exitCode !== null) throw new Error('redis-server exited');
      const { Redis } = await import('ioredis');
      const c = new Redis(this.url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      c.on('error', () => {});
      try {
        await c.connect();
        return (await c.ping()) === 'PONG';
      } finally {
        c.disconnect();
      }
    });
  }
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill(signal);
    await exited;
  }
}

/** Peak resident memory of a process (VmHWM), MiB. */
async function peakRssMiB(pid: number | undefined): Promise<number | undefined> {
  if (!pid) return undefined;
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  const m = /VmHWM:\s+(\d+) kB/.exec(status);
  return m ? Math.round(Number(m[1]) / 1024) : undefined;
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push(p);
    }
  };
  await walk(dir);
  return out;
}

for (const kind of ['s3', 'file'] as const) {
  describe.skipIf(!cephAvailable)(`several hosts on the ${kind} store`, () => {
    let env: CephEnv;
    let client: S3Client | undefined;
    let dir: string;
    let cleanup: () => Promise<void>;
    let redis: PersistentRedis;
    let svc: ServiceHarness;
    const bucket = uniqueBucket(`multi-${kind}`);
    const fixtures: Fixture[] = [];
    const rbdImages: string[] = [];
    const report: Record<string, unknown> = { store: kind };
    let storeEnv: Record<string, string>;
    let sharedStore = '';

    const rbd = (...args: string[]): Promise<string> => cephCli(env, 'rbd', args);

    /** Submits `n` uploads, a few of them to RBD; returns [id, fixture, rbd image?]. */
    async function submit(n: number, tag: string): Promise<Array<{ id: string; fixture: Fixture; image?: string }>> {
      const jobs: Array<{ id: string; fixture: Fixture; image?: string }> = [];
      for (let i = 0; i < n; i++) {
        const fixture = fixtures[i % fixtures.length] as Fixture;
        const image = i % 5 === 4 ? `multi-${tag}-${i}-${process.pid}-${Math.random().toString(36).slice(2, 6)}` : undefined;
        if (image) rbdImages.push(image);
        const query = image ? `?output_target=rbd&rbd_pool=rbd&rbd_image=${image}` : '';
        const res = await fetch(`${svc.apiUrl}/v1/jobs${query}`, {
          method: 'POST',
          headers: { 'content-type': 'application/octet-stream' },
          body: await readFile(fixture.path),
        });
        expect(res.status, await res.clone().text()).toBe(202);
        jobs.push({ id: ((await res.json()) as { id: string }).id, fixture, ...(image ? { image } : {}) });
      }
      return jobs;
    }

    const finals = (ids: string[]): Promise<JobJson[]> =>
      waitFor(
        'every job to finish',
        async () => {
          const jobs = await Promise.all(ids.map((id) => svc.getJob(id).catch(() => undefined)));
          return jobs.every((j) => j && ['succeeded', 'failed', 'cancelled'].includes(j.state)) ? (jobs as JobJson[]) : undefined;
        },
        600_000,
        500,
      );
    const succeededCount = async (ids: string[]): Promise<number> =>
      (await Promise.all(ids.map((id) => svc.getJob(id).then((j) => j.state === 'succeeded', () => false)))).filter(Boolean).length;

    async function checkOutputs(jobs: Array<{ id: string; fixture: Fixture; image?: string }>, done: JobJson[]): Promise<void> {
      for (const [i, job] of jobs.entries()) {
        const j = done[i] as JobJson;
        expect(j, JSON.stringify(j)).toMatchObject({ state: 'succeeded', output: { sha256: job.fixture.sha256 } });
        if (job.image) {
          expect(j.output).toMatchObject({ target: 'rbd', pool: 'rbd', image: job.image, snapshot: 'snap', location: `rbd://${env.CEPH_FSID}/rbd/${job.image}/snap` });
          const out = join(dir, `export-${job.image}.raw`);
          await rbd('export', '--no-progress', `rbd/${job.image}@snap`, out);
          expect(await sha256File(out)).toBe(job.fixture.sha256);
          const snaps = JSON.parse(await rbd('snap', 'ls', '--format', 'json', `rbd/${job.image}`)) as Array<{ name: string; protected: string }>;
          expect(snaps).toEqual([expect.objectContaining({ name: 'snap', protected: 'true' })]);
          const du = JSON.parse(await rbd('du', '--format', 'json', `rbd/${job.image}@snap`)) as { images: Array<{ used_size: number; provisioned_size: number }> };
          expect(du.images[0]?.used_size ?? Infinity).toBeLessThan(du.images[0]?.provisioned_size ?? 0);
        } else {
          const res = await fetch(`${svc.apiUrl}${(j.output as { href: string }).href}`);
          const { createHash } = await import('node:crypto');
          expect(createHash('sha256').update(Buffer.from(await res.arrayBuffer())).digest('hex')).toBe(job.fixture.sha256);
        }
      }
    }

    async function nothingLeft(): Promise<void> {
      // The killed attempt's half-written upload is the sweeper's (ORPHAN_TTL_SECONDS=2) once its job has finished.
      if (client) {
        await waitFor('no multipart upload in progress', async () => (await uploadsInProgress(client as S3Client, bucket)).length === 0, 60_000, 500);
        // A staged input whose job finished while Redis was down is the sweeper's too.
        await waitFor('no staging object', async () => (await objectKeys(client as S3Client, bucket, 'multi/input/')).length === 0, 60_000, 500);
      } else {
        await waitFor('no write in progress', async () => (await readdir(join(sharedStore, 'tmp'))).length === 0, 60_000, 500);
        await waitFor('no staged input', async () => (await readdir(join(sharedStore, 'input'))).length === 0, 60_000, 500);
      }
    }

    beforeAll(async () => {
      env = await useCeph();
      ({ dir, cleanup } = await makeTempDir(`diskconv-multi-${kind}-`));
      if (kind === 's3') {
        client = testS3Client(env);
        await createBucket(client, bucket);
        storeEnv = s3Env(env, bucket, 'multi/');
      } else {
        sharedStore = join(dir, 'shared-store');
        await mkdir(sharedStore);
        storeEnv = { STORE_URL: pathToFileURL(sharedStore).href };
      }
      const base = join(dir, 'base.raw');
      // 48 MiB virtual: 12 MiB of mixed data and holes, then 36 MiB of hole.
      await writeRaw(base, 12 * 2 ** 20, 17);
      await qemuImg('resize', '-f', 'raw', base, '48M');
      for (const format of ['qcow2', 'vmdk', 'vdi']) {
        const path = join(dir, `disk.${format}`);
        await qemuImg('convert', '-f', 'raw', '-O', format, base, path);
        fixtures.push({ path, format, sha256: await qemuRawSha256(path, dir) });
      }
      await mkdir(join(dir, 'redis'));
      redis = new PersistentRedis(join(dir, 'redis'), await freePort());
      await redis.start();
      svc = await ServiceHarness.create(`multi-${kind}`, {
        ...storeEnv,
        REDIS_URL: redis.url,
        RBD_POOLS: 'rbd',
        CEPH_CONF: env.CEPH_CONF,
        CEPH_ARGS: env.CEPH_ARGS,
        ORPHAN_TTL_SECONDS: '2',
        RETENTION_SWEEP_SECONDS: '1',
        JOB_ATTEMPTS: '5',
      });
      await svc.startApi();
    });

    afterAll(async () => {
      console.log(`multihost ${kind}: ${JSON.stringify(report)}`);
      await svc?.close();
      await redis?.kill('SIGTERM');
      await removeRbdImages(env, rbdImages);
      if (client) await removeBucket(client, bucket).catch(() => {});
      await cleanup?.();
    });

    it('20 jobs over two workers with separate data dirs survive a worker SIGKILL and a Redis SIGKILL', async () => {
      const w1 = await svc.startWorker({ DATA_DIR: join(dir, 'worker1') });
      let w2: ServiceProcess | undefined;
      if (kind === 's3') {
        // Throughput: the same 20 jobs with one worker, then with two (printed, not asserted).
        let t0 = Date.now();
        const one = await submit(20, 'one');
        const doneOne = await finals(one.map((j) => j.id));
        report.oneWorkerSeconds = (Date.now() - t0) / 1000;
        await checkOutputs(one, doneOne);
        w2 = await svc.startWorker({ DATA_DIR: join(dir, 'worker2') });
        t0 = Date.now();
        const two = await submit(20, 'two');
        const doneTwo = await finals(two.map((j) => j.id));
        report.twoWorkersSeconds = (Date.now() - t0) / 1000;
        await checkOutputs(two, doneTwo);
      } else {
        w2 = await svc.startWorker({ DATA_DIR: join(dir, 'worker2') });
      }

      // The batch with both failures.
      const jobs = await submit(20, 'chaos');
      const ids = jobs.map((j) => j.id);
      await waitFor('a few jobs to finish', async () => (await succeededCount(ids)) >= 4, 300_000, 200);
      report.worker2PeakRssMiB = await peakRssMiB(w2.child.pid);
      await w2.stop('SIGKILL');
      await waitFor('more jobs to finish', async () => (await succeededCount(ids)) >= 10, 300_000, 200);
      await redis.kill('SIGKILL');
      const during = await fetch(`${svc.apiUrl}/v1/jobs/${ids[0]}`).then((r) => r.status, () => 0);
      report.statusWhileRedisDown = during;
      await sleep(2000);
      await redis.start();
      const done = await finals(ids);
      await checkOutputs(jobs, done);
      report.attempts = done.map((j) => j.attempts).reduce((a, b) => a + b, 0);
      await nothingLeft();

      report.apiPeakRssMiB = await peakRssMiB(svc.processes[0]?.child.pid);
      report.worker1PeakRssMiB = await peakRssMiB(w1.child.pid);
      // The API host's disk: nothing of any image (S3: no store at all; file: the shared store is elsewhere).
      const apiFiles = await filesUnder(svc.dataDir);
      report.apiDataDirFiles = apiFiles.map((f) => f.slice(svc.dataDir.length));
      const sizes = await Promise.all(apiFiles.map(async (f) => (await stat(f)).size));
      report.apiDataDirBytes = sizes.reduce((a, b) => a + b, 0);
      expect(report.apiDataDirBytes).toBe(0);
    }, 1_200_000);
  });
}
