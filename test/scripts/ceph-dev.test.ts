/** scripts/ceph-dev.sh through the shared test Ceph: the cluster it prints is the one that answers. */
import { describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, useCeph } from '../helpers/ceph.js';

describe.skipIf(!cephAvailable)('scripts/ceph-dev.sh', () => {
  it('starts one mon, one OSD, an rbd pool and RGW, and prints their env', async () => {
    const env = await useCeph();
    expect((await cephCli(env, 'ceph', ['fsid'])).trim()).toBe(env.CEPH_FSID);
    expect(await cephCli(env, 'ceph', ['osd', 'pool', 'ls'])).toMatch(/^rbd$/m);
    const name = `smoke-${process.pid}`;
    await cephCli(env, 'rbd', ['create', '--size', '16M', '--image-feature', 'layering', `rbd/${name}`]);
    expect(JSON.parse(await cephCli(env, 'rbd', ['info', '--format', 'json', `rbd/${name}`]))).toMatchObject({ size: 16 * 2 ** 20 });
    await cephCli(env, 'rbd', ['rm', '--no-progress', `rbd/${name}`]);
    const res = await fetch(`${env.S3_ENDPOINT}/`);
    expect(await res.text()).toMatch(/ListAllMyBucketsResult|AccessDenied/);
  });
});
