/**
 * The fallback from a refused location to an upload: a second Glance of this file's
 * own, run with `show_multiple_locations = false` (Glance 25 then answers 403 "It's
 * not allowed to add locations if locations are invisible."), its RBD store on the
 * run's test Ceph. A job whose RBD output sits in that store's pool asks for zero
 * copy, is refused, uploads (rbd export streamed into Glance) and says so in its
 * record. Real Glance, Ceph, Redis and HTTP; the Glance is stopped after the file.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { digestsOf, fetchDigests, glanceApi, haveGlance, runJson, startGlance, type Digests } from '../helpers/glance.js';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';
import { ServiceHarness } from '../helpers/service.js';
import { startFileServer, type FileServer } from '../e2e/http-files.js';

const TOKEN = 'glance-fallback-token-0123456789';
const SIZE = 16 * 2 ** 20;

describe.skipIf(!cephAvailable || !haveGlance)('a Glance that refuses locations', () => {
  let env: CephEnv;
  let glance: Awaited<ReturnType<typeof startGlance>>;
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let svc: ServiceHarness;
  let raw: Digests;
  let imageId: string | undefined;
  const rbdName = `fallback-${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
  const rbd = (...args: string[]): Promise<string> => cephCli(env, 'rbd', args);

  beforeAll(async () => {
    env = await useCeph();
    glance = await startGlance({ cephConf: env.CEPH_CONF, cephPool: 'rbd', showMultipleLocations: false });
    expect(glance.rbdPool).toBe('rbd');
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-fallback-'));
    const image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, String(SIZE));
    await qemuIo('-c', 'write -P 0x71 0 1M', '-c', 'write -P 0x72 9M 2M', image);
    await qemuImg('convert', '-O', 'raw', image, join(dir, 'ref.raw'));
    raw = await digestsOf(join(dir, 'ref.raw'));
    files = await startFileServer(dir);
    svc = await ServiceHarness.create('glance-fallback', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      RBD_POOLS: 'rbd',
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
    if (imageId) await glanceApi(glance, `/v2/images/${imageId}`, { method: 'DELETE' }).catch(() => {});
    await glance?.down();
    if (env) await removeRbdImages(env, [rbdName]);
    await files?.close();
    await cleanup?.();
  });

  it('the location is refused (403): the job uploads instead, says why in output.glance, and keeps its own RBD image', async () => {
    const done = await runJson(svc, TOKEN, {
      source: { url: `${files.url}/range/disk.qcow2` },
      output: { target: 'rbd', pool: 'rbd', image: rbdName },
      glance: { name: 'fallback-upload' },
    });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    const g = done.output?.glance as Record<string, unknown>;
    imageId = String(g.image_id);
    expect(g).toMatchObject({ status: 'active', method: 'upload', checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    expect(String(g.fallback_reason)).toMatch(/not allowed to add locations/);
    expect(svc.logs()).toContain('Glance refused the location; uploading instead');
    // Glance's own copy (its RBD store names it after the image id) beside ours.
    const { body: image } = await glanceApi(glance, `/v2/images/${imageId}`);
    expect(image).toMatchObject({ status: 'active', disk_format: 'raw', size: SIZE, checksum: raw.md5, os_hash_value: raw.sha512, stores: 'ceph' });
    expect(image.locations).toBeUndefined(); // invisible, as configured
    const pool = JSON.parse(await rbd('ls', '--format', 'json', 'rbd')) as string[];
    expect(pool).toContain(imageId);
    expect(pool).toContain(rbdName);
    // Ours is still the job's output: the exported snapshot is qemu-img's raw.
    expect(done.output).toMatchObject({ target: 'rbd', pool: 'rbd', image: rbdName, snapshot: 'snap', md5: raw.md5 });
    const exported = join(dir, 'exported.raw');
    await rbd('export', '--no-progress', `rbd/${rbdName}@snap`, exported);
    expect(await digestsOf(exported)).toEqual(raw);
    expect(await fetchDigests(`${glance.url}/v2/images/${imageId}/file`, { 'x-auth-token': glance.token })).toEqual({ size: SIZE, ...raw });
  });
});
