/**
 * Zero copy into Glance: jobs whose output is an RBD image in a pool Glance's RBD
 * store uses (GLANCE_RBD_POOLS) are registered in place by location; an RBD output
 * elsewhere is uploaded (rbd export streamed into Glance). Real Glance (its `ceph`
 * store on the run's test Ceph), real Ceph, Redis and HTTP.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { digestsOf, fetchDigests, glanceApi, haveGlance, useGlance, type Digests, type GlanceJob, type TestGlance } from '../helpers/glance.js';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';
import { curl, ServiceHarness } from '../helpers/service.js';
import { startFileServer, type FileServer } from '../e2e/http-files.js';

const TOKEN = 'glance-rbd-token-0123456789';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];
const SIZE = 64 * 2 ** 20;

describe.skipIf(!cephAvailable || !haveGlance)('publishing RBD outputs into Glance (zero copy)', () => {
  let env: CephEnv;
  let glance: TestGlance;
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let svc: ServiceHarness;
  let raw: Digests;
  const glanceImages: string[] = [];
  const rbdNames: string[] = [];
  const OTHER_POOL = `dc-other-${process.pid}`;
  const name = (n: string): string => {
    const full = `${n}-${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
    rbdNames.push(full);
    return full;
  };
  const rbd = (...args: string[]): Promise<string> => cephCli(env, 'rbd', args);
  const ls = async (pool: string): Promise<string[]> => JSON.parse(await rbd('ls', '--format', 'json', pool)) as string[];

  beforeAll(async () => {
    env = await useCeph();
    glance = await useGlance();
    expect(glance.rbdPool, 'the shared Glance has the test Ceph as its RBD store').toBe('rbd');
    await cephCli(env, 'ceph', ['osd', 'pool', 'create', OTHER_POOL, '8']);
    await rbd('pool', 'init', OTHER_POOL);
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-rbd-'));
    const image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, String(SIZE));
    await qemuIo('-c', 'write -P 0x61 0 3M', '-c', 'write -P 0x62 40M 1M', '-c', 'write -P 0x63 63M 1M', image);
    await qemuImg('convert', '-O', 'raw', image, join(dir, 'ref.raw'));
    raw = await digestsOf(join(dir, 'ref.raw'));
    files = await startFileServer(dir);
    svc = await ServiceHarness.create('glance-rbd', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      RBD_POOLS: `rbd,${OTHER_POOL}`,
      CEPH_CONF: env.CEPH_CONF,
      CEPH_ARGS: env.CEPH_ARGS,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_RBD_POOLS: 'rbd',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    // Glance owns what it was given: deleting its image removes the RBD image it points at.
    for (const id of glanceImages) await glanceApi(glance, `/v2/images/${id}`, { method: 'DELETE' }).catch(() => {});
    await removeRbdImages(env, rbdNames.flatMap((n) => [`rbd/${n}`, `${OTHER_POOL}/${n}`]));
    if (env) {
      await cephCli(env, 'ceph', ['osd', 'pool', 'rm', OTHER_POOL, OTHER_POOL, '--yes-i-really-really-mean-it']).catch(() => {});
    }
    await files?.close();
    await cleanup?.();
  });

  /** Active, raw, its bytes and hashes those of qemu-img's conversion. */
  async function expectActive(job: GlanceJob, method: 'location' | 'upload'): Promise<Record<string, unknown>> {
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    const g = job.output?.glance as Record<string, unknown>;
    glanceImages.push(String(g.image_id));
    expect(g).toMatchObject({ status: 'active', method, checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    expect(job.output).toMatchObject({ sha256: raw.sha256, sha512: raw.sha512, md5: raw.md5, size: SIZE });
    const { body: image } = await glanceApi(glance, `/v2/images/${String(g.image_id)}`);
    expect(image).toMatchObject({ status: 'active', disk_format: 'raw', container_format: 'bare', checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    expect(await fetchDigests(`${glance.url}/v2/images/${String(g.image_id)}/file`, { 'x-auth-token': glance.token })).toEqual({ size: SIZE, ...raw });
    return image;
  }

  it('a URL import into the pool Glance uses is registered in place: its location is our snapshot, and no second copy exists', async () => {
    const n = name('url');
    const body = JSON.stringify({ source: { url: `${files.url}/range/disk.qcow2` }, output: { target: 'rbd', pool: 'rbd', image: n }, glance: { name: 'zero-copy-url' } });
    const created = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as GlanceJob;
    const done = (await svc.waitForFinal(created.id, { token: TOKEN })) as GlanceJob;
    const image = await expectActive(done, 'location');
    const location = `rbd://${env.CEPH_FSID}/rbd/${n}/snap`;
    expect(done.output?.location).toBe(location);
    expect(image.locations).toEqual([{ url: location, metadata: { store: 'ceph' } }]);
    expect(image.name).toBe('zero-copy-url');
    // One image: ours. Glance's RBD store would have named a copy after its image id.
    const pool = await ls('rbd');
    expect(pool.filter((x) => x === n)).toHaveLength(1);
    expect(pool).not.toContain(String(image.id));
  });

  it('a multipart upload into the pool Glance uses, the same', async () => {
    const n = name('upload');
    const created = JSON.parse(
      await curl([
        ...AUTH,
        '-F', `file=@${join(dir, 'disk.qcow2')}`,
        '-F', 'output_target=rbd',
        '-F', 'rbd_pool=rbd',
        '-F', `rbd_image=${n}`,
        '-F', `glance=${JSON.stringify({ name: 'zero-copy-upload', properties: { os_distro: 'debian' } })}`,
        `${svc.apiUrl}/v1/jobs`,
      ]),
    ) as GlanceJob;
    const done = (await svc.waitForFinal(created.id, { token: TOKEN })) as GlanceJob;
    const image = await expectActive(done, 'location');
    expect(image.locations).toEqual([{ url: `rbd://${env.CEPH_FSID}/rbd/${n}/snap`, metadata: { store: 'ceph' } }]);
    expect(image.os_distro).toBe('debian');
    const pool = await ls('rbd');
    expect(pool.filter((x) => x === n)).toHaveLength(1);
    expect(pool).not.toContain(String(image.id));
  });

  it('an RBD output in a pool Glance does not use is uploaded (streamed from rbd export) into Glance’s own store', async () => {
    const n = name('other');
    const body = JSON.stringify({ source: { url: `${files.url}/range/disk.qcow2` }, output: { target: 'rbd', pool: OTHER_POOL, image: n }, glance: { name: 'uploaded-from-rbd' } });
    const created = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as GlanceJob;
    const done = (await svc.waitForFinal(created.id, { token: TOKEN })) as GlanceJob;
    const image = await expectActive(done, 'upload');
    // Glance's copy lives in its own pool under its image id; ours stays where it was written.
    expect(image.locations).toEqual([{ url: `rbd://${env.CEPH_FSID}/rbd/${String(image.id)}/snap`, metadata: { store: 'ceph' } }]);
    expect(await ls(OTHER_POOL)).toContain(n);
  });
});
