/**
 * Publishing into a real Glance (Debian's glance-api 25, scripts/glance-dev.sh):
 * the service as processes (API, worker), a real Redis, curl as the client,
 * images made by qemu-img, Glance's bytes and hashes compared with
 * `qemu-img convert -O raw`.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { digestsOf, fetchDigests, glanceApi, haveGlance, qcow2WithReference, runJson, startGlance, submitJson, useGlance, type Digests, type GlanceJob, type TestGlance } from '../helpers/glance.js';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, waitFor } from '../helpers/service.js';
import { startFileServer, type FileServer } from '../e2e/http-files.js';

const TOKEN = 'glance-test-token-0123456789';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];

describe.skipIf(!haveGlance)('publishing into Glance (file store)', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let glance: TestGlance;
  let svc: ServiceHarness;
  const fixtures: Record<string, { path: string; raw: Digests; size: number }> = {};

  /** A URL import of the fixture `name` with the `glance` option, submitted and waited for. */
  const publishUrl = (s: ServiceHarness, name: string, glanceOption: unknown): Promise<GlanceJob> =>
    runJson(s, TOKEN, { source: { url: `${files.url}/range/${name}` }, glance: glanceOption });

  /** Glance's image: active, raw/bare, its bytes and hashes those of qemu-img's conversion. */
  async function expectPublished(job: GlanceJob, raw: Digests, size: number, method: 'upload' | 'location' = 'upload'): Promise<Record<string, unknown>> {
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output).toMatchObject({ sha256: raw.sha256, sha512: raw.sha512, md5: raw.md5, size });
    const g = job.output?.glance as Record<string, unknown>;
    expect(g).toMatchObject({ status: 'active', method, checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    const { status, body: image } = await glanceApi(glance, `/v2/images/${String(g.image_id)}`);
    expect(status).toBe(200);
    expect(image).toMatchObject({ status: 'active', disk_format: 'raw', container_format: 'bare', size, checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    const served = await fetchDigests(`${glance.url}/v2/images/${String(g.image_id)}/file`, { 'x-auth-token': glance.token });
    expect(served).toEqual({ size, ...raw });
    return image;
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-test-'));
    const base = join(dir, 'base.raw');
    await writeRaw(base, 6 * 2 ** 20, 21);
    for (const [name, format] of [
      ['disk.qcow2', 'qcow2'],
      ['disk.vmdk', 'vmdk'],
      ['disk.vdi', 'vdi'],
    ] as const) {
      const path = join(dir, name);
      await qemuImg('convert', '-f', 'raw', '-O', format, base, path);
      const ref = join(dir, `${name}.ref.raw`);
      await qemuImg('convert', '-O', 'raw', path, ref);
      fixtures[name] = { path, raw: await digestsOf(ref), size: 6 * 2 ** 20 };
      await rm(ref);
    }
    files = await startFileServer(dir);
    glance = await useGlance();
    svc = await ServiceHarness.create('glance', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      // The shared Glance's default store is RBD where Ceph is installed: these tests upload into its file store.
      GLANCE_STORE: 'fs',
      GLANCE_PUBLISH_BACKOFF_MS: '200',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    await files?.close();
    await cleanup?.();
  });

  it('publishes a URL import: an active raw image with our name and properties, its bytes and hashes those of qemu-img', async () => {
    const f = fixtures['disk.qcow2']!;
    const done = await publishUrl(svc, 'disk.qcow2', { name: 'diskconv-url', min_disk: 1, min_ram: 64, properties: { os_distro: 'debian', hw_disk_bus: 'scsi' } });
    expect(done.glance).toMatchObject({ name: 'diskconv-url' });
    const image = await expectPublished(done, f.raw, f.size);
    expect(image).toMatchObject({ name: 'diskconv-url', min_disk: 1, min_ram: 64, os_distro: 'debian', hw_disk_bus: 'scsi', visibility: 'shared', stores: 'fs' });
    // The conversion's output is still served by the service, equal to Glance's.
    const ours = await fetchDigests(`${svc.apiUrl}${done.output?.href}`, { authorization: `Bearer ${TOKEN}` });
    expect(ours).toEqual({ size: f.size, ...f.raw });
  });

  it('publishes a multipart upload (glance as a JSON field) and an octet-stream upload (glance as a query parameter)', async () => {
    const v = fixtures['disk.vmdk']!;
    const multipart = JSON.parse(
      await curl([...AUTH, '-F', `file=@${v.path}`, '-F', `glance=${JSON.stringify({ name: 'diskconv-multipart', visibility: 'private' })}`, `${svc.apiUrl}/v1/jobs`]),
    ) as GlanceJob;
    const d = fixtures['disk.vdi']!;
    const query = encodeURIComponent(JSON.stringify({ name: 'diskconv-octet', protected: false }));
    const octet = JSON.parse(
      await curl([...AUTH, '--data-binary', `@${d.path}`, '-H', 'Content-Type: application/octet-stream', `${svc.apiUrl}/v1/jobs?filename=disk.vdi&glance=${query}`]),
    ) as GlanceJob;
    const image1 = await expectPublished((await svc.waitForFinal(multipart.id, { token: TOKEN })) as GlanceJob, v.raw, v.size);
    expect(image1).toMatchObject({ name: 'diskconv-multipart', visibility: 'private' });
    const image2 = await expectPublished((await svc.waitForFinal(octet.id, { token: TOKEN })) as GlanceJob, d.raw, d.size);
    expect(image2).toMatchObject({ name: 'diskconv-octet', protected: false });
  });

  it('refuses a bad glance option with problem+json before anything is queued', async () => {
    const cases: unknown[] = [
      { name: 'x', visibility: 'everyone' },
      { min_disk: -1 },
      { properties: { checksum: 'abc' } },
      { properties: { os_glance_import_task: 'x' } },
      { disk_format: 'qcow2' },
      'not an object',
    ];
    for (const option of cases) {
      const res = await svc.request('/v1/jobs', {
        method: 'POST',
        token: TOKEN,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ source: { url: `${files.url}/range/disk.qcow2` }, glance: option }),
      });
      expect(res.status, JSON.stringify(option)).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/application\/problem\+json/);
      expect(((await res.json()) as { code: string }).code).toBe('VALIDATION_FAILED');
    }
    const bad = await curl(['-o', '/dev/null', '-w', '%{http_code}', ...AUTH, '-F', `file=@${fixtures['disk.vdi']!.path}`, '-F', 'glance={not json', `${svc.apiUrl}/v1/jobs`]);
    expect(bad).toBe('400');
  });

  it('imports through the staging area when GLANCE_METHOD=import (glance-direct)', async () => {
    const s = await ServiceHarness.create('glance-import', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_STORE: 'fs',
      GLANCE_METHOD: 'import',
    });
    try {
      await s.startApi();
      await s.startWorker();
      const f = fixtures['disk.vdi']!;
      const done = await publishUrl(s, 'disk.vdi', { name: 'diskconv-import' });
      const image = await expectPublished(done, f.raw, f.size);
      expect(image).toMatchObject({ name: 'diskconv-import' });
    } finally {
      await s.close();
    }
  });

  it('a Glance that refuses the token fails the job with GLANCE_REFUSED and Glance’s message; the output stays downloadable', async () => {
    const s = await ServiceHarness.create('glance-refused', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: 'not-the-glance-token',
    });
    try {
      await s.startApi();
      await s.startWorker();
      const f = fixtures['disk.qcow2']!;
      const done = await publishUrl(s, 'disk.qcow2', { name: 'diskconv-refused' });
      expect(done.state).toBe('failed');
      expect(done.error?.code).toBe('GLANCE_REFUSED');
      expect(done.error?.message).toMatch(/authori[sz]ed|credentials/i);
      expect(done.output).toMatchObject({ sha256: f.raw.sha256, md5: f.raw.md5, sha512: f.raw.sha512 });
      const ours = await fetchDigests(`${s.apiUrl}${done.output?.href}`, { authorization: `Bearer ${TOKEN}` });
      expect(ours).toEqual({ size: f.size, ...f.raw });
    } finally {
      await s.close();
    }
  });

  it('refuses glance on a service without GLANCE_URL (422 GLANCE_NOT_CONFIGURED)', async () => {
    const s = await ServiceHarness.create('glance-none', { API_TOKENS: TOKEN, ...files.importEnv });
    try {
      await s.startApi();
      const res = await s.request('/v1/jobs', {
        method: 'POST',
        token: TOKEN,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ source: { url: `${files.url}/range/disk.qcow2` }, glance: { name: 'x' } }),
      });
      expect(res.status).toBe(422);
      expect(((await res.json()) as { code: string }).code).toBe('GLANCE_NOT_CONFIGURED');
    } finally {
      await s.close();
    }
  });
});

describe.skipIf(!haveGlance)('a Glance that goes away during publishing', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let glance: Awaited<ReturnType<typeof startGlance>>;
  let raw: Digests;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-outage-'));
    raw = await qcow2WithReference(dir, 4 * 2 ** 20, 5);
    files = await startFileServer(dir);
    // A Glance of this file's own: stopping the shared one would disturb other tests.
    glance = await startGlance();
  });

  afterAll(async () => {
    await glance?.down();
    await files?.close();
    await cleanup?.();
  });

  const service = (attempts: number): Promise<ServiceHarness> =>
    ServiceHarness.create('glance-outage', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_PUBLISH_ATTEMPTS: String(attempts),
      GLANCE_PUBLISH_BACKOFF_MS: '300',
      URL_CONNECT_TIMEOUT_MS: '2000',
    });

  const submit = (s: ServiceHarness): Promise<GlanceJob> =>
    submitJson(s, TOKEN, { source: { url: `${files.url}/range/disk.qcow2` }, glance: { name: 'diskconv-outage' } });

  it('stopped for a few seconds: the publish is retried and succeeds once Glance is back', async () => {
    const s = await service(12);
    try {
      await s.startApi();
      await s.startWorker();
      await glance.stop();
      const created = await submit(s);
      // Converted, publishing, and at least one attempt failed against the stopped Glance.
      await s.waitForJob(created.id, (j) => j.progress.phase === 'publishing', { token: TOKEN });
      await waitFor('a failed publish attempt', async () => s.logs().includes('Glance publish attempt failed'), 30_000, 100);
      await glance.start();
      const done = (await s.waitForFinal(created.id, { token: TOKEN, timeoutMs: 120_000 })) as GlanceJob;
      expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
      expect(done.output?.glance).toMatchObject({ status: 'active', method: 'upload', checksum: raw.md5, os_hash_value: raw.sha512 });
      const served = await fetchDigests(`${glance.url}/v2/images/${String(done.output?.glance?.image_id)}/file`, { 'x-auth-token': glance.token });
      expect(served).toEqual({ size: 4 * 2 ** 20, ...raw });
    } finally {
      await glance.start().catch(() => {});
      await s.close();
    }
  });

  it('down for longer than the attempts: GLANCE_UNAVAILABLE, and the converted output is still downloadable', async () => {
    const s = await service(2);
    try {
      await s.startApi();
      await s.startWorker();
      await glance.stop();
      const created = await submit(s);
      const done = (await s.waitForFinal(created.id, { token: TOKEN, timeoutMs: 120_000 })) as GlanceJob;
      expect(done.state).toBe('failed');
      expect(done.error?.code).toBe('GLANCE_UNAVAILABLE');
      expect(done.output).toMatchObject({ sha256: raw.sha256, md5: raw.md5, sha512: raw.sha512 });
      const ours = await fetchDigests(`${s.apiUrl}${done.output?.href}`, { authorization: `Bearer ${TOKEN}` });
      expect(ours).toEqual({ size: 4 * 2 ** 20, ...raw });
    } finally {
      await glance.start().catch(() => {});
      await s.close();
    }
  });
});
