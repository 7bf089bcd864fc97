/**
 * RBD images as per-job destinations, against the shared test Ceph: a
 * conversion streamed sparsely through `rbd import-diff`, snapshot `snap`
 * created and protected, Glance's location; a name clash, a refused pool and
 * a failed write leave everything they did not create as it was.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { DestinationExistsError, DestinationRefusedError, DestinationError } from '../../src/store/index.js';
import { RbdDestinations } from '../../src/store/rbd/destinations.js';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256, writeRaw } from '../helpers/qemu.js';

describe.skipIf(!cephAvailable)('RBD destinations', () => {
  let env: CephEnv;
  let dir: string;
  let cleanup: () => Promise<void>;
  let image: string;
  let imageSha: string;
  let rbd: RbdDestinations;
  const names: string[] = [];
  const name = (n: string): string => {
    const full = `${n}-${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
    names.push(full);
    return full;
  };
  const cli = (...args: string[]): Promise<string> => cephCli(env, 'rbd', args);
  const exportSha = async (spec: string): Promise<string> => {
    const out = join(dir, `export-${Math.random().toString(36).slice(2)}.raw`);
    await cli('export', '--no-progress', spec, out);
    const { sha256File } = await import('../helpers/qemu.js');
    return sha256File(out);
  };
  const exists = async (n: string): Promise<boolean> => (await cli('ls', '--format', 'json', 'rbd')).includes(`"${n}"`);

  async function convertInto(target: { target: 'rbd'; pool: string; image: string }, owner: string) {
    const source = await FileSource.open(image, 'disk.qcow2');
    const img = await openImage(source);
    const writer = await rbd.create(target, img.virtualSize, owner);
    const result = await convertToRaw(img, source, writer, { sha256: true });
    await img.close();
    await source.close();
    return { writer, result };
  }

  beforeAll(async () => {
    env = await useCeph();
    process.env.CEPH_CONF = env.CEPH_CONF;
    process.env.CEPH_ARGS = env.CEPH_ARGS;
    ({ dir, cleanup } = await makeTempDir('diskconv-rbd-'));
    // 256 MiB virtual, 6 MiB of data at both ends and the middle.
    image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, '256M');
    await qemuIo('-c', 'write -P 0x71 0 2M', '-c', 'write -P 0x72 128M 2M', '-c', 'write -P 0x73 254M 2M', image);
    imageSha = await qemuRawSha256(image, dir);
    rbd = new RbdDestinations({ pools: ['rbd'], commandTimeoutMs: 60_000 });
  });
  afterAll(async () => {
    // Temporaries this file's tests leave on purpose (their owners end in the pid).
    const temps = (JSON.parse(await cli('ls', '--format', 'json', 'rbd')) as string[]).filter((n) => n.startsWith('diskconv-tmp.') && n.includes(`-${process.pid}.`));
    names.push(...temps);
    await removeRbdImages(env, names);
    await cleanup?.();
  });

  it('writes a conversion sparsely, snapshots and protects snap, and reports Glance\'s location', async () => {
    const target = { target: 'rbd' as const, pool: 'rbd', image: name('conv') };
    const { writer, result } = await convertInto(target, 'job-conv');
    const done = await writer.commit();
    expect(done).toEqual({ target: 'rbd', pool: 'rbd', image: target.image, snapshot: 'snap', size: 256 * 2 ** 20, location: `rbd://${env.CEPH_FSID}/rbd/${target.image}/snap` });
    expect(result.sha256).toBe(imageSha);
    expect(await exportSha(`rbd/${target.image}@snap`)).toBe(imageSha);
    const snaps = JSON.parse(await cli('snap', 'ls', '--format', 'json', `rbd/${target.image}`)) as Array<{ name: string; protected: string }>;
    expect(snaps).toEqual([expect.objectContaining({ name: 'snap', protected: 'true' })]);
    const info = JSON.parse(await cli('info', '--format', 'json', `rbd/${target.image}`)) as { features: string[]; size: number };
    expect(info.features).toContain('layering');
    // Sparse: 6 MiB of data in 256 MiB; at most the 4 MiB objects the data touches are allocated.
    const du = JSON.parse(await cli('du', '--format', 'json', `rbd/${target.image}@snap`)) as { images: Array<{ used_size: number; provisioned_size: number }> };
    const used = du.images[0]?.used_size ?? Infinity;
    expect(used).toBeLessThanOrEqual(12 * 2 ** 20);
    expect(du.images[0]?.provisioned_size).toBe(256 * 2 ** 20);
    // A clone can be made at once, as Nova does.
    const clone = name('clone');
    await cli('clone', `rbd/${target.image}@snap`, `rbd/${clone}`);
    expect(await exportSha(`rbd/${clone}`)).toBe(imageSha);
    await cli('rm', '--no-progress', `rbd/${clone}`);
  });

  it('fails a name clash with its own code and leaves the existing image byte-identical', async () => {
    const taken = name('taken');
    const raw = join(dir, 'existing.raw');
    await writeRaw(raw, 8 * 2 ** 20, 5);
    await cli('import', '--no-progress', raw, `rbd/${taken}`);
    const before = await exportSha(`rbd/${taken}`);
    await expect(convertInto({ target: 'rbd', pool: 'rbd', image: taken }, 'job-clash')).rejects.toBeInstanceOf(DestinationExistsError);
    expect(await exportSha(`rbd/${taken}`)).toBe(before);
    expect((JSON.parse(await cli('info', '--format', 'json', `rbd/${taken}`)) as { size: number }).size).toBe(8 * 2 ** 20);
  });

  it('refuses a pool outside RBD_POOLS and odd names before anything is written', async () => {
    const n = name('refused');
    expect(() => rbd.check({ target: 'rbd', pool: 'elsewhere', image: n })).toThrow(DestinationRefusedError);
    await expect(rbd.create({ target: 'rbd', pool: 'elsewhere', image: n }, 1 << 20, 'job-x')).rejects.toBeInstanceOf(DestinationRefusedError);
    for (const bad of ['-x', '../a', 'a/b', 'a@snap', '', 'x'.repeat(200)]) {
      expect(() => rbd.check({ target: 'rbd', pool: 'rbd', image: bad })).toThrow(DestinationRefusedError);
    }
    expect(await exists(n)).toBe(false);
  });

  it('removes only the image it created when a write is aborted, also after finish', async () => {
    const t1 = { target: 'rbd' as const, pool: 'rbd', image: name('aborted') };
    const w1 = await rbd.create(t1, 64 << 20, 'job-a');
    await w1.write({ kind: 'data', offset: 0, length: 1 << 20, data: Buffer.alloc(1 << 20, 9) });
    const temps = async (): Promise<string[]> => (JSON.parse(await cli('ls', '--format', 'json', 'rbd')) as string[]).filter((x) => x.startsWith('diskconv-tmp.job-a.'));
    expect(await temps()).toHaveLength(1);
    await w1.abort();
    expect(await temps()).toEqual([]);
    expect(await exists(t1.image)).toBe(false);
    const t2 = { target: 'rbd' as const, pool: 'rbd', image: name('finished') };
    const w2 = await rbd.create(t2, 1 << 20, 'job-b');
    await w2.write({ kind: 'zero', offset: 0, length: 1 << 20 });
    await w2.finish(1 << 20);
    await w2.abort();
    expect(await exists(t2.image)).toBe(false);
  });

  it('takes over its own dead attempt\'s unfinished image, and no one else\'s', async () => {
    const n = name('dead-attempt');
    await cli('create', '--size', '4M', `rbd/${n}`);
    await cli('image-meta', 'set', `rbd/${n}`, 'diskconv.job', 'job:job-dead');
    await expect(rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, 'job-other')).rejects.toBeInstanceOf(DestinationExistsError);
    expect((JSON.parse(await cli('info', '--format', 'json', `rbd/${n}`)) as { size: number }).size).toBe(4 << 20);
    const w = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, 'job-dead');
    await w.write({ kind: 'data', offset: 0, length: 1 << 20, data: Buffer.alloc(1 << 20, 3) });
    await w.finish(1 << 20);
    await w.commit();
    const digest = createHash('sha256').update(Buffer.alloc(1 << 20, 3)).digest('hex');
    expect(await exportSha(`rbd/${n}@snap`)).toBe(digest);
  });

  it('tags and takes over images of jobs whose id starts with a dash (rbd would read it as an option)', async () => {
    const owner = '-JGTc1sMSoJSumpAbfFAdQ';
    const n = name('dash-owner');
    const w = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await w.write({ kind: 'data', offset: 0, length: 1 << 20, data: Buffer.alloc(1 << 20, 5) });
    await w.finish(1 << 20);
    await w.commit();
    expect(await exportSha(`rbd/${n}@snap`)).toBe(createHash('sha256').update(Buffer.alloc(1 << 20, 5)).digest('hex'));
    // A dead attempt's unfinished image, tagged for the same dashed id, is taken over by its retry.
    const dead = name('dash-dead');
    await cli('create', '--size', '4M', `rbd/${dead}`);
    await cli('image-meta', 'set', `rbd/${dead}`, 'diskconv.job', `job:${owner}`);
    const retry = await rbd.create({ target: 'rbd', pool: 'rbd', image: dead }, 1 << 20, owner);
    await retry.write({ kind: 'data', offset: 0, length: 1 << 20, data: Buffer.alloc(1 << 20, 6) });
    await retry.finish(1 << 20);
    await retry.commit();
    expect(await exportSha(`rbd/${dead}@snap`)).toBe(createHash('sha256').update(Buffer.alloc(1 << 20, 6)).digest('hex'));
  });

  const oneMiB = (fill: number) => ({ kind: 'data' as const, offset: 0, length: 1 << 20, data: Buffer.alloc(1 << 20, fill) });
  const sha = (fill: number): string => createHash('sha256').update(Buffer.alloc(1 << 20, fill)).digest('hex');
  const listed = async (): Promise<string[]> => JSON.parse(await cli('ls', '--format', 'json', 'rbd')) as string[];

  it('writes under a temporary name of the attempt and renames into place only when complete', async () => {
    const owner = `job-temp-${process.pid}`;
    const n = name('renamed');
    const w = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await w.write(oneMiB(7));
    await w.finish(1 << 20);
    // Written but not committed: the final name holds nothing yet, the attempt's tagged temporary holds it all.
    expect(await exists(n)).toBe(false);
    const temps = (await listed()).filter((x) => x.startsWith(`diskconv-tmp.${owner}.`));
    expect(temps).toHaveLength(1);
    expect((await cli('image-meta', 'get', `rbd/${temps[0]}`, 'diskconv.job')).trim()).toBe(`job:${owner}`);
    await w.commit();
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(7));
    expect((await listed()).filter((x) => x.startsWith(`diskconv-tmp.${owner}.`))).toEqual([]);
  });

  it('redoes its own image that a dead attempt committed but never recorded; not once it is cloned or handed to Glance', async () => {
    const owner = `job-unrecorded-${process.pid}`;
    const n = name('unrecorded');
    const first = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await first.write(oneMiB(1));
    await first.finish(1 << 20);
    const result = await first.commit();
    // The attempt died here (the job still says running); its retry writes the image again.
    const retry = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await retry.write(oneMiB(2));
    await retry.finish(1 << 20);
    await retry.commit();
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(2));
    // The next attempt died between `snap create` and `snap protect` (what CI once hit after a worker SIGKILL).
    await cli('snap', 'unprotect', `rbd/${n}@snap`);
    const afterUnprotected = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await afterUnprotected.write(oneMiB(3));
    await afterUnprotected.finish(1 << 20);
    await afterUnprotected.commit();
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(3));
    // Died between the rename and `snap create`: no snapshot at all.
    await cli('snap', 'unprotect', `rbd/${n}@snap`);
    await cli('snap', 'rm', '--no-progress', `rbd/${n}@snap`);
    const afterRenamed = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await afterRenamed.write(oneMiB(2));
    await afterRenamed.finish(1 << 20);
    await afterRenamed.commit();
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(2));
    // Someone cloned it meanwhile (it looked finished): the retry refuses and leaves image and clone alone.
    const clone = name('unrecorded-clone');
    await cli('clone', `rbd/${n}@snap`, `rbd/${clone}`);
    await expect(rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner)).rejects.toBeInstanceOf(DestinationExistsError);
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(2));
    expect(await exportSha(`rbd/${clone}`)).toBe(sha(2));
    await cli('rm', '--no-progress', `rbd/${clone}`);
    // Registered in Glance: Glance's now, never rewritten.
    await rbd.handOver(result);
    const err = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DestinationExistsError);
    expect((err as Error).message).toMatch(/Glance/);
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(2));
  });

  it('fails the commit when someone takes the final name during the conversion, and leaves their image alone', async () => {
    const owner = `job-race-${process.pid}`;
    const n = name('raced');
    const w = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await w.write(oneMiB(4));
    await w.finish(1 << 20);
    const raw = join(dir, 'theirs.raw');
    await writeRaw(raw, 2 * 2 ** 20, 9);
    await cli('import', '--no-progress', raw, `rbd/${n}`);
    const theirs = await exportSha(`rbd/${n}`);
    await expect(w.commit()).rejects.toBeInstanceOf(DestinationExistsError);
    await w.abort();
    expect(await exportSha(`rbd/${n}`)).toBe(theirs);
    expect((await listed()).filter((x) => x.startsWith(`diskconv-tmp.${owner}.`))).toEqual([]);
  });

  it('removes temporaries its dead attempts left (tagged, or untagged and empty), never another job\'s or one with data', async () => {
    const owner = `job-leftovers-${process.pid}`;
    const other = `job-neighbour-${process.pid}`;
    const tagged = `diskconv-tmp.${owner}.dead0001`;
    const untaggedEmpty = `diskconv-tmp.${owner}.dead0002`;
    const untaggedData = `diskconv-tmp.${owner}.dead0003`;
    const neighbours = `diskconv-tmp.${other}.live0001`;
    for (const t of [tagged, untaggedEmpty, neighbours]) await cli('create', '--size', '4M', `rbd/${t}`);
    await cli('image-meta', 'set', `rbd/${tagged}`, 'diskconv.job', `job:${owner}`);
    await cli('image-meta', 'set', `rbd/${neighbours}`, 'diskconv.job', `job:${other}`);
    const raw = join(dir, 'leftover.raw');
    await writeRaw(raw, 2 * 2 ** 20, 3);
    await cli('import', '--no-progress', raw, `rbd/${untaggedData}`);
    names.push(untaggedData, neighbours);
    const n = name('after-leftovers');
    const w = await rbd.create({ target: 'rbd', pool: 'rbd', image: n }, 1 << 20, owner);
    await w.write(oneMiB(8));
    await w.finish(1 << 20);
    await w.commit();
    const now = await listed();
    expect(now).not.toContain(tagged);
    expect(now).not.toContain(untaggedEmpty);
    expect(now).toContain(untaggedData);
    expect(now).toContain(neighbours);
    expect(await exportSha(`rbd/${n}@snap`)).toBe(sha(8));
  });

  it('sweeps temporaries of jobs that no longer run, never a live job\'s, one being written, or a committed image', async () => {
    const ended = `job-ended-${process.pid}`;
    const live = `job-live-${process.pid}`;
    const writing = `job-writing-${process.pid}`;
    const endedTemp = `diskconv-tmp.${ended}.dead0001`;
    const liveTemp = `diskconv-tmp.${live}.dead0001`;
    for (const t of [endedTemp, liveTemp]) await cli('create', '--size', '4M', `rbd/${t}`);
    await cli('image-meta', 'set', `rbd/${endedTemp}`, 'diskconv.job', `job:${ended}`);
    await cli('image-meta', 'set', `rbd/${liveTemp}`, 'diskconv.job', `job:${live}`);
    names.push(liveTemp);
    // A write in progress (rbd holds a watch on it) of a job the sweeper is told has ended: rbd refuses, it stays.
    const inFlight = await rbd.create({ target: 'rbd', pool: 'rbd', image: name('in-flight') }, 1 << 20, writing);
    await inFlight.write({ kind: 'data', offset: 0, length: 512 << 10, data: Buffer.alloc(512 << 10, 1) });
    // A committed image of an ended job is not a temporary.
    const committedName = name('committed');
    const committed = await rbd.create({ target: 'rbd', pool: 'rbd', image: committedName }, 1 << 20, ended);
    await committed.write(oneMiB(6));
    await committed.finish(1 << 20);
    await committed.commit();
    const removed = await rbd.sweepLeftovers(async (job) => job === live);
    const now = await listed();
    expect(now).not.toContain(endedTemp);
    expect(now).toContain(liveTemp);
    expect(now.filter((x) => x.startsWith(`diskconv-tmp.${writing}.`))).toHaveLength(1);
    expect(removed).toBeGreaterThanOrEqual(1);
    expect(await exportSha(`rbd/${committedName}@snap`)).toBe(sha(6));
    await inFlight.abort();
    expect((await listed()).filter((x) => x.startsWith(`diskconv-tmp.${writing}.`))).toEqual([]);
  });

  it('reports rbd\'s own message when it fails', async () => {
    const broken = new RbdDestinations({ pools: ['no-such-pool'], commandTimeoutMs: 60_000 });
    const err = await broken.create({ target: 'rbd', pool: 'no-such-pool', image: name('x') }, 1 << 20, 'job-y').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DestinationError);
    expect((err as Error).message).toMatch(/no-such-pool.*No such file or directory|No such file or directory/);
    expect((err as Error).message).not.toMatch(/EPIPE/);
  });
});
