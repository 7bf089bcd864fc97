/**
 * The test Glance: Debian's glance-api run by scripts/glance-dev.sh from a temp
 * directory (sqlite, a file store `fs`, and with the test Ceph the RBD store
 * `ceph`, then the default). useGlance() gives the run's shared one (started by
 * the first test file that asks; glance-setup.ts stops it); a test that stops
 * Glance on purpose starts its own with startGlance().
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { inject } from 'vitest';
import { cephAvailable, useCeph } from './ceph.js';
import { oncePerRun } from './once-per-run.js';
import { qemuImg, writeRaw } from './qemu.js';
import { curl, type JobJson, type ServiceHarness } from './service.js';

export const GLANCE_SCRIPT = resolve(import.meta.dirname, '../../scripts/glance-dev.sh');
export const GLANCE_API = '/usr/bin/glance-api';
export const haveGlance = existsSync(GLANCE_API);

export interface TestGlance {
  url: string;
  token: string;
  dir: string;
  /** The RBD pool of its `ceph` store, when it has one. */
  rbdPool?: string;
}

export interface GlanceOptions {
  cephConf?: string;
  cephPool?: string;
  /** false: Glance refuses to add locations (403), as many clouds run it. */
  showMultipleLocations?: boolean;
  /** Validate tokens with keystonemiddleware against this Keystone v3 (its admin user as Glance's service user). */
  keystone?: { url: string; password: string };
}

function script(args: string[], env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(GLANCE_SCRIPT, args, { env: { ...process.env, ...env }, timeout: 120_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`glance-dev.sh ${args.join(' ')}: ${stderr || err.message}`));
      else resolvePromise(stdout);
    });
  });
}

function parseEnv(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .split('\n')
      .map((l) => /^([A-Z_]+)=(.*)$/.exec(l.trim()))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => [m[1] as string, m[2] as string]),
  );
}

function glanceFrom(dir: string, vars: Record<string, string>): TestGlance {
  return { url: vars.GLANCE_URL as string, token: vars.GLANCE_TOKEN as string, dir, ...(vars.GLANCE_RBD_POOLS ? { rbdPool: vars.GLANCE_RBD_POOLS } : {}) };
}

let shared: Promise<TestGlance> | undefined;

/** The run's shared Glance, started on first use (with the run's Ceph where Ceph is installed). */
export function useGlance(): Promise<TestGlance> {
  shared ??= startShared();
  return shared;
}

async function startShared(): Promise<TestGlance> {
  const runDir = inject('glanceRunDir');
  if (!runDir) throw new Error('no glanceRunDir: test/helpers/glance-setup.ts is not in vitest.config.ts globalSetup');
  const dir = join(runDir, 'glance');
  const text = await oncePerRun(runDir, 'the test Glance', async () => {
    const env: Record<string, string> = {};
    if (cephAvailable) env.GLANCE_CEPH_CONF = (await useCeph()).CEPH_CONF;
    return script(['up', dir], env);
  });
  return glanceFrom(dir, parseEnv(text));
}

export async function startGlance(options: GlanceOptions = {}): Promise<TestGlance & { stop(): Promise<void>; start(): Promise<void>; down(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'diskconv-glance-'));
  const env: Record<string, string> = {};
  if (options.cephConf) env.GLANCE_CEPH_CONF = options.cephConf;
  if (options.cephPool) env.GLANCE_CEPH_POOL = options.cephPool;
  if (options.keystone) {
    env.GLANCE_KEYSTONE_URL = options.keystone.url;
    env.GLANCE_KEYSTONE_PASSWORD = options.keystone.password;
  }
  if (options.showMultipleLocations !== undefined) env.GLANCE_SHOW_MULTIPLE_LOCATIONS = String(options.showMultipleLocations);
  let vars: Record<string, string>;
  try {
    vars = parseEnv(await script(['up', dir], env));
  } catch (err) {
    await script(['down', dir]).catch(() => {});
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    ...glanceFrom(dir, vars),
    stop: async () => void (await script(['stop', dir])),
    start: async () => void (await script(['start', dir])),
    down: async () => {
      await script(['down', dir]);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A Glance API call with the test token; JSON in and out. */
export async function glanceApi<T = Record<string, unknown>>(g: Pick<TestGlance, 'url' | 'token'>, path: string, init: RequestInit = {}): Promise<{ status: number; body: T }> {
  const headers = new Headers(init.headers);
  headers.set('x-auth-token', g.token);
  const res = await fetch(`${g.url}${path}`, { ...init, headers });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    /* an HTML error page, or an image's bytes */
  }
  return { status: res.status, body: body as T };
}

/** The three digests a Glance publish is checked by: ours (sha256) and Glance's (md5 checksum, sha512 os_hash_value). */
export interface Digests {
  sha256: string;
  sha512: string;
  md5: string;
}

const hashers = () => ({ sha256: createHash('sha256'), sha512: createHash('sha512'), md5: createHash('md5') });

export async function digestsOf(path: string): Promise<Digests> {
  const h = hashers();
  for await (const chunk of createReadStream(path)) for (const x of Object.values(h)) x.update(chunk as Buffer);
  return { sha256: h.sha256.digest('hex'), sha512: h.sha512.digest('hex'), md5: h.md5.digest('hex') };
}

/**
 * The fixture the publishing tests convert: `size` bytes of seeded data made into
 * DIR/disk.qcow2 by qemu-img, and the digests of qemu-img's raw conversion of it
 * (DIR/ref.raw), which every published image must match.
 */
export async function qcow2WithReference(dir: string, size: number, seed: number): Promise<Digests> {
  const base = join(dir, 'base.raw');
  await writeRaw(base, size, seed);
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', base, join(dir, 'disk.qcow2'));
  await qemuImg('convert', '-O', 'raw', join(dir, 'disk.qcow2'), join(dir, 'ref.raw'));
  return digestsOf(join(dir, 'ref.raw'));
}

/** GET url streamed through the three hashes. */
export async function fetchDigests(url: string, headers: Record<string, string>): Promise<Digests & { size: number }> {
  const res = await fetch(url, { headers });
  if (res.status !== 200 || !res.body) throw new Error(`GET ${url}: ${res.status}`);
  const h = hashers();
  let size = 0;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    size += chunk.length;
    for (const x of Object.values(h)) x.update(chunk);
  }
  return { size, sha256: h.sha256.digest('hex'), sha512: h.sha512.digest('hex'), md5: h.md5.digest('hex') };
}

/** A job as the API shows it, with the Glance parts. */
export type GlanceJob = JobJson & {
  output: (JobJson['output'] & { sha512?: string; md5?: string; location?: string; glance?: Record<string, unknown> }) | null;
};

/** POSTs a JSON job body with the bearer token; the created job. */
export async function submitJson(svc: ServiceHarness, token: string, body: unknown): Promise<GlanceJob> {
  return JSON.parse(await curl(['-H', `Authorization: Bearer ${token}`, '-H', 'Content-Type: application/json', '-d', JSON.stringify(body), `${svc.apiUrl}/v1/jobs`])) as GlanceJob;
}

/** Submits a JSON job and waits for its final state. */
export async function runJson(svc: ServiceHarness, token: string, body: unknown, timeoutMs?: number): Promise<GlanceJob> {
  const created = await submitJson(svc, token, body);
  return (await svc.waitForFinal(created.id, { token, ...(timeoutMs ? { timeoutMs } : {}) })) as GlanceJob;
}

/** Glance's images of that name (Glance lists no deleted ones). */
export async function imagesNamed(g: Pick<TestGlance, 'url' | 'token'>, name: string): Promise<Record<string, unknown>[]> {
  const { status, body } = await glanceApi<{ images: Record<string, unknown>[] }>(g, `/v2/images?name=${encodeURIComponent(name)}&limit=100`);
  if (status !== 200) throw new Error(`listing Glance images: ${status}`);
  return body.images;
}
