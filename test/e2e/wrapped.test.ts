/**
 * Compressed wrappers through the service (issue 9): uploads and URL imports of
 * qcow2.gz, raw.xz, vmdk.bz2 and qcow2.zst made by the reference tools, over real
 * HTTP (`diskconv serve` + `diskconv worker`, a loopback file server, curl), each
 * converted to the sha256 of `qemu-img convert -O raw` of the inner image. A bomb
 * stops at MAX_VIRTUAL_SIZE with LIMIT_EXCEEDED and a truncated wrapper is
 * IMAGE_CORRUPT; neither leaves anything staged.
 */
import { execFile, execFileSync } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { curl, ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';
import { tusUpload, TusRefused } from '../helpers/tus.js';
import { startFileServer, type FileServer } from './http-files.js';
import { canMountTmpfs } from '../helpers/tmpfs.js';

const exec = promisify(execFile);
const TOKEN = 'wrapped-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];
const TOOLS = { gzip: 'gzip', xz: 'xz', bzip2: 'bzip2', zstd: 'zstd' } as const;
type Wrapper = keyof typeof TOOLS;

interface Case {
  /** The served and uploaded file; its name says nothing of the wrapper (detection is by magic). */
  name: string;
  wrapper: Wrapper;
  inner: string;
  path: string;
  /** sha256 of qemu-img's raw conversion of the inner image. */
  reference: string;
  innerSize: number;
  fileSha256: string;
  fileSize: number;
}

/** Every file under `dir`, recursively (the staging store and the scratch directory must be empty). */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
}

describe('compressed wrappers through the service', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: FileServer;
  const cases: Case[] = [];

  async function download(job: JobJson): Promise<string> {
    const out = join(dir, `out-${job.id}.raw`);
    await curl([...AUTH, '-o', out, `${svc.apiUrl}${job.output?.href}`]);
    return sha256File(out);
  }

  const post = async (args: string[]): Promise<Record<string, unknown>> => JSON.parse(await curl([...AUTH, ...args])) as Record<string, unknown>;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-wrapped-'));
    const base = join(dir, 'base.raw');
    await writeFile(base, mixedContent(6 * 2 ** 20, 23));
    const make = async (inner: string, wrapper: Wrapper): Promise<void> => {
      const innerPath = join(dir, `inner.${inner}`);
      if (inner !== 'raw') await qemuImg('convert', '-f', 'raw', '-O', inner, base, innerPath);
      const source = inner === 'raw' ? base : innerPath;
      const name = `${inner}-${wrapper}.img`;
      const path = join(dir, name);
      const { stdout } = await exec(TOOLS[wrapper], ['-c', source], { encoding: 'buffer', maxBuffer: 64 * 2 ** 20 });
      await writeFile(path, stdout);
      const innerSize = (await readFile(source)).length;
      cases.push({ name, wrapper, inner, path, reference: await qemuRawSha256(source, dir), innerSize, fileSha256: await sha256File(path), fileSize: stdout.length });
    };
    await make('qcow2', 'gzip');
    await make('raw', 'xz');
    await make('vmdk', 'bzip2');
    await make('qcow2', 'zstd');
    // 256 MiB of zeros in a few hundred KiB: past MAX_VIRTUAL_SIZE (64M) once unwrapped.
    const { stdout: bomb } = await exec('sh', ['-c', 'head -c 268435456 /dev/zero | gzip -c'], { encoding: 'buffer', maxBuffer: 16 * 2 ** 20 });
    await writeFile(join(dir, 'bomb.img'), bomb);
    const whole = await readFile(join(dir, 'qcow2-zstd.img'));
    await writeFile(join(dir, 'truncated.img'), whole.subarray(0, Math.floor(whole.length / 2)));

    files = await startFileServer(dir);
    svc = await ServiceHarness.create('wrapped', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '16M',
      MAX_VIRTUAL_SIZE: '64M',
      ...files.importEnv,
      JOB_ATTEMPTS: '3',
      WORKER_CONCURRENCY: '2',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    await files?.close();
    await cleanup?.();
  });

  it('unwraps multipart and octet-stream uploads into staging; the output equals qemu-img of the inner image', async () => {
    const jobs = await Promise.all(
      cases.map(async (c, i) => {
        const created = (
          i % 2 === 0
            ? await post(['-F', `file=@${c.path}`, `${svc.apiUrl}/v1/jobs`])
            : await post(['--data-binary', `@${c.path}`, '-H', 'Content-Type: application/octet-stream', `${svc.apiUrl}/v1/jobs?filename=${c.name}&expected_sha256=${c.fileSha256}`])
        ) as unknown as JobJson;
        expect(created.state, JSON.stringify(created)).toBe('queued');
        // size and sha256 are of what was sent; the store holds the inner image.
        expect(created.source).toMatchObject({ kind: 'upload', wrapper: c.wrapper, size: c.fileSize, sha256: c.fileSha256, unwrapped_size: c.innerSize });
        return { c, created };
      }),
    );
    for (const { c, created } of jobs) {
      const done = await svc.waitForFinal(created.id, { token: TOKEN });
      expect(done.state, `${c.name}: ${JSON.stringify(done.error)}`).toBe('succeeded');
      expect(done.source).toMatchObject({ wrapper: c.wrapper, format: c.inner, virtual_size: 6 * 2 ** 20 });
      expect(done.output?.sha256, c.name).toBe(c.reference);
      expect(await download(done)).toBe(c.reference);
    }
  });

  it('stages and unwraps URL imports (a range server with an ETag, and one without ranges); output equals qemu-img', async () => {
    for (const c of cases) {
      for (const mode of ['range', 'plain']) {
        const body = JSON.stringify({ source: { url: `${files.url}/${mode}/${c.name}` } });
        const created = (await post(['-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as unknown as JobJson;
        const done = await svc.waitForFinal(created.id, { token: TOKEN });
        expect(done.state, `${mode} ${c.name}: ${JSON.stringify(done.error)}`).toBe('succeeded');
        expect(done.source).toMatchObject({ kind: 'url', mode: 'staged', wrapper: c.wrapper, size: c.fileSize, sha256: c.fileSha256, unwrapped_size: c.innerSize, format: c.inner });
        expect(done.attempts).toBe(1);
        expect(done.output?.sha256, `${mode} ${c.name}`).toBe(c.reference);
      }
    }
    // A dropped download resumes into the same decompressor.
    const c = cases.find((x) => x.wrapper === 'xz') as Case;
    const body = JSON.stringify({ source: { url: `${files.url}/drop/${c.name}` } });
    const created = (await post(['-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as unknown as JobJson;
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(files.dropped.has(c.name)).toBe(true);
    expect(done.attempts).toBe(1);
    expect(done.output?.sha256).toBe(c.reference);
    expect(await filesUnder(join(svc.dataDir, 'work'))).toEqual([]);
  });

  it('inspects wrapped uploads and URLs', async () => {
    const c = cases.find((x) => x.wrapper === 'bzip2') as Case;
    const upload = await post(['-F', `file=@${c.path}`, `${svc.apiUrl}/v1/inspect`]);
    expect(upload).toMatchObject({ safe: true, format: 'vmdk', source: { kind: 'upload', wrapper: 'bzip2', unwrapped_size: c.innerSize } });
    const byUrl = await post(['-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url: `${files.url}/range/${c.name}` } }), `${svc.apiUrl}/v1/inspect`]);
    expect(byUrl).toMatchObject({ safe: true, format: 'vmdk', source: { kind: 'url', mode: 'staged', wrapper: 'bzip2' } });
    expect(await filesUnder(join(svc.dataDir, 'work'))).toEqual([]);
  });

  it('stops a decompression bomb at MAX_VIRTUAL_SIZE (LIMIT_EXCEEDED), leaving nothing staged and no job', async () => {
    const bomb = join(dir, 'bomb.img');
    const before = await svc.request('/v1/jobs', { token: TOKEN }).then((r) => r.json() as Promise<{ jobs?: unknown[] }>);
    const staged = async (): Promise<string[]> => [...(await filesUnder(join(svc.dataDir, 'store', 'input'))), ...(await filesUnder(join(svc.dataDir, 'store', 'tmp')))].sort();
    const stagedBefore = await staged();
    for (const args of [
      ['-F', `file=@${bomb}`],
      ['--data-binary', `@${bomb}`, '-H', 'Content-Type: application/octet-stream'],
    ]) {
      const answer = await post([...args, `${svc.apiUrl}/v1/jobs`]);
      expect(answer).toMatchObject({ status: 422, code: 'LIMIT_EXCEEDED' });
      expect(String(answer.detail)).toMatch(/MAX_VIRTUAL_SIZE/);
    }
    const after = await svc.request('/v1/jobs', { token: TOKEN }).then((r) => r.json() as Promise<{ jobs?: unknown[] }>);
    expect(after.jobs?.length).toBe(before.jobs?.length);
    expect(await staged()).toEqual(stagedBefore);
    // By URL: the job fails without retries (deterministic) and the staged download is gone.
    const created = (await post(['-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url: `${files.url}/range/bomb.img` } }), `${svc.apiUrl}/v1/jobs`])) as unknown as JobJson;
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('LIMIT_EXCEEDED');
    expect(done.attempts).toBe(1);
    expect(await filesUnder(join(svc.dataDir, 'work'))).toEqual([]);
  });

  it('unwraps tus uploads the same way: bzip2 around vmdk converts like qemu-img, a bomb is refused at the last PATCH', async () => {
    const c = cases.find((x) => x.wrapper === 'bzip2') as Case;
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, await readFile(c.path), { filename: c.name }, { chunk: 256 * 1024 });
    const done = await svc.waitForFinal(jobId, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.source).toMatchObject({ wrapper: 'bzip2', unwrapped_size: c.innerSize, sha256: c.fileSha256 });
    expect(done.output?.sha256).toBe(c.reference);
    const err = await tusUpload(svc.apiUrl, TOKEN, await readFile(join(dir, 'bomb.img')), { filename: 'bomb.img' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TusRefused);
    expect((err as TusRefused).json()).toMatchObject({ code: 'LIMIT_EXCEEDED' });
    expect(await filesUnder(join(svc.dataDir, 'store', 'tmp'))).toEqual([]);
  });

  it('refuses a truncated wrapper with IMAGE_CORRUPT, upload and URL, leaving nothing staged', async () => {
    const truncated = join(dir, 'truncated.img');
    const answer = await post(['-F', `file=@${truncated}`, `${svc.apiUrl}/v1/jobs`]);
    expect(answer).toMatchObject({ status: 422, code: 'IMAGE_CORRUPT' });
    expect(await filesUnder(join(svc.dataDir, 'store', 'tmp'))).toEqual([]);
    const created = (await post(['-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url: `${files.url}/plain/truncated.img` } }), `${svc.apiUrl}/v1/jobs`])) as unknown as JobJson;
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('IMAGE_CORRUPT');
    expect(done.attempts).toBe(1);
    expect(await filesUnder(join(svc.dataDir, 'work'))).toEqual([]);
  });
});


describe('unwrapping an upload into a store short of space', () => {
  it.skipIf(!canMountTmpfs() && process.env.CI !== 'true')('answers 507 INSUFFICIENT_SPACE (not LIMIT_EXCEEDED) when the inner image passes the free space, leaving nothing staged', async () => {
    const { dir, cleanup } = await makeTempDir('diskconv-wrapped-space-');
    const mnt = join(dir, 'small-fs');
    await mkdir(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=80m', 'tmpfs', mnt]);
    let svc: ServiceHarness | undefined;
    try {
      const packed = join(dir, 'packed.img');
      const { stdout } = await exec('sh', ['-c', 'head -c 50331648 /dev/zero | gzip -c'], { encoding: 'buffer', maxBuffer: 16 * 2 ** 20 });
      await writeFile(packed, stdout);
      // 80 MiB free minus the 64 MiB kept free: about 16 MiB may be staged; the upload is 48 KiB, its image 48 MiB.
      svc = await ServiceHarness.create('wrapped-space', { API_TOKENS: TOKEN, DATA_DIR: mnt, MAX_VIRTUAL_SIZE: '1G' });
      await svc.startApi();
      const answer = JSON.parse(await curl([...AUTH, '-F', `file=@${packed}`, `${svc.apiUrl}/v1/jobs`])) as Record<string, unknown>;
      expect(answer).toMatchObject({ status: 507, code: 'INSUFFICIENT_SPACE' });
      expect(await filesUnder(join(mnt, 'store', 'input'))).toEqual([]);
      expect(await filesUnder(join(mnt, 'store', 'tmp'))).toEqual([]);
    } finally {
      await svc?.close();
      execFileSync('umount', ['-l', mnt]);
      await cleanup();
    }
  });
});

describe.skipIf(!cephAvailable)('compressed wrappers into an S3 store (Ceph RGW)', () => {
  let env: CephEnv;
  let client: S3Client;
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: FileServer;
  const bucket = uniqueBucket('wrapped');
  const wrappedFiles: Record<string, { path: string; reference: string; innerSize: number }> = {};

  beforeAll(async () => {
    env = await useCeph();
    client = testS3Client(env);
    await createBucket(client, bucket);
    ({ dir, cleanup } = await makeTempDir('diskconv-wrapped-s3-'));
    const base = join(dir, 'base.raw');
    await writeFile(base, mixedContent(5 * 2 ** 20, 29));
    const inner = join(dir, 'inner.vdi');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', base, inner);
    for (const w of ['xz', 'zstd'] as const) {
      const path = join(dir, `vdi-${w}.img`);
      const { stdout } = await exec(TOOLS[w], ['-c', inner], { encoding: 'buffer', maxBuffer: 64 * 2 ** 20 });
      await writeFile(path, stdout);
      wrappedFiles[w] = { path, reference: await qemuRawSha256(inner, dir), innerSize: (await readFile(inner)).length };
    }
    const { stdout: bomb } = await exec('sh', ['-c', 'head -c 100663296 /dev/zero | gzip -c'], { encoding: 'buffer', maxBuffer: 16 * 2 ** 20 });
    await writeFile(join(dir, 'bomb.img'), bomb);
    files = await startFileServer(dir);
    svc = await ServiceHarness.create('wrapped-s3', {
      ...s3Env(env, bucket, 'w/'),
      MAX_VIRTUAL_SIZE: '64M',
      ...files.importEnv,
    });
    await svc.startApi();
    await svc.startWorker({ DATA_DIR: join(dir, 'worker-data') });
  });
  afterAll(async () => {
    await svc?.close();
    await files?.close();
    if (client) await removeBucket(client, bucket);
    await cleanup?.();
  });

  it('streams an unwrapped upload into the bucket and converts a wrapped URL import; both equal qemu-img of the inner image', async () => {
    const xz = wrappedFiles.xz as { path: string; reference: string; innerSize: number };
    const job = JSON.parse(await curl(['-F', `file=@${xz.path}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    expect(job.source).toMatchObject({ wrapper: 'xz', unwrapped_size: xz.innerSize });
    const done = await svc.waitForFinal(job.id);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.output?.sha256).toBe(xz.reference);
    const zst = wrappedFiles.zstd as { path: string; reference: string; innerSize: number };
    const byUrl = JSON.parse(await curl(['-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url: `${files.url}/range/vdi-zstd.img` } }), `${svc.apiUrl}/v1/jobs`])) as JobJson;
    const urlDone = await svc.waitForFinal(byUrl.id);
    expect(urlDone.state, JSON.stringify(urlDone.error)).toBe('succeeded');
    expect(urlDone.source).toMatchObject({ wrapper: 'zstd', mode: 'staged', unwrapped_size: zst.innerSize });
    expect(urlDone.output?.sha256).toBe(zst.reference);
    // The API host's disk held nothing; the bucket holds no unfinished upload.
    expect(await filesUnder(join(svc.dataDir, 'store'))).toEqual([]);
    expect(await uploadsInProgress(client, bucket, 'w/')).toEqual([]);
  });

  it('stops a bomb at MAX_VIRTUAL_SIZE and leaves no object or multipart upload in the bucket', async () => {
    const before = (await objectKeys(client, bucket, 'w/input/')).sort();
    const answer = JSON.parse(await curl(['-F', `file=@${join(dir, 'bomb.img')}`, `${svc.apiUrl}/v1/jobs`])) as Record<string, unknown>;
    expect(answer).toMatchObject({ status: 422, code: 'LIMIT_EXCEEDED' });
    await waitFor('the aborted multipart upload to go', async () => (await uploadsInProgress(client, bucket, 'w/')).length === 0);
    expect((await objectKeys(client, bucket, 'w/input/')).sort()).toEqual(before);
  });
});
