/**
 * Keystone v3 password auth against a real Keystone (Debian's keystone 22 from
 * scripts/keystone-dev.sh: sqlite, fernet tokens, keystone-wsgi-public under uWSGI)
 * and a Glance that validates tokens with keystonemiddleware's authtoken (no token
 * cache). The service has only OS_* variables: it fetches a token, keeps it for the
 * next job, and when the token is revoked (the user disabled and enabled again)
 * Glance answers 401 and the service fetches a new one. Keystone's request log names
 * the client (User-Agent), so the test counts the service's token requests.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { digestsOf, glanceApi, haveGlance, runJson, startGlance, type Digests } from '../helpers/glance.js';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor } from '../helpers/service.js';
import { startFileServer, type FileServer } from '../e2e/http-files.js';

const KEYSTONE_DEV = resolve(import.meta.dirname, '../../scripts/keystone-dev.sh');
const haveKeystone = process.env.CI === 'true' || (existsSync('/usr/bin/keystone-wsgi-public') && existsSync('/usr/bin/uwsgi'));
const TOKEN = 'glance-keystone-token-0123456789';

describe.skipIf(!haveGlance || !haveKeystone)('Glance behind a real Keystone', () => {
  let ksDir: string;
  let os: Record<string, string>;
  let glance: Awaited<ReturnType<typeof startGlance>>;
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let svc: ServiceHarness;
  let raw: Digests;
  let userId: string;
  let adminToken: string;

  const keystone = async (path: string, init: RequestInit & { token?: string } = {}): Promise<Response> => {
    const headers = new Headers(init.headers);
    headers.set('content-type', 'application/json');
    if (init.token) headers.set('x-auth-token', init.token);
    return fetch(`${os.OS_AUTH_URL}${path}`, { ...init, headers });
  };
  const passwordToken = async (name: string, password: string): Promise<string> => {
    const res = await keystone('/auth/tokens', {
      method: 'POST',
      body: JSON.stringify({
        auth: {
          identity: { methods: ['password'], password: { user: { name, domain: { name: 'Default' }, password } } },
          scope: { project: { name: 'admin', domain: { name: 'Default' } } },
        },
      }),
    });
    expect(res.status).toBe(201);
    return res.headers.get('x-subject-token') as string;
  };
  /** The service's own token requests, from Keystone's request log (its User-Agent is diskconv-glance). */
  const tokenRequests = async (): Promise<number> =>
    (await readFile(join(ksDir, 'uwsgi.log'), 'utf8')).split('\n').filter((l) => /^POST \/v3\/auth\/tokens 201 diskconv-glance/.test(l)).length;

  beforeAll(async () => {
    ksDir = await mkdtemp(join(tmpdir(), 'diskconv-keystone-'));
    const { stdout } = await promisify(execFile)(KEYSTONE_DEV, ['up', ksDir], { timeout: 240_000 });
    os = Object.fromEntries(stdout.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    glance = await startGlance({ keystone: { url: os.OS_AUTH_URL as string, password: os.OS_PASSWORD as string } });
    // A user of the service's own (admin on the admin project), so revoking its tokens leaves Glance's alone.
    adminToken = await passwordToken('admin', os.OS_PASSWORD as string);
    const project = ((await (await keystone('/projects?name=admin', { token: adminToken })).json()) as { projects: { id: string }[] }).projects[0]!.id;
    const role = ((await (await keystone('/roles?name=admin', { token: adminToken })).json()) as { roles: { id: string }[] }).roles[0]!.id;
    const created = await keystone('/users', { method: 'POST', token: adminToken, body: JSON.stringify({ user: { name: 'diskconv', password: 'diskconv-pw', domain_id: 'default' } }) });
    expect(created.status).toBe(201);
    userId = ((await created.json()) as { user: { id: string } }).user.id;
    expect((await keystone(`/projects/${project}/users/${userId}/roles/${role}`, { method: 'PUT', token: adminToken })).status).toBe(204);

    ({ dir, cleanup } = await makeTempDir('diskconv-glance-keystone-'));
    await writeRaw(join(dir, 'base.raw'), 3 * 2 ** 20, 33);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    await qemuImg('convert', '-O', 'raw', join(dir, 'disk.qcow2'), join(dir, 'ref.raw'));
    raw = await digestsOf(join(dir, 'ref.raw'));
    files = await startFileServer(dir);
    svc = await ServiceHarness.create('glance-keystone', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      OS_AUTH_URL: os.OS_AUTH_URL as string,
      OS_USERNAME: 'diskconv',
      OS_PASSWORD: 'diskconv-pw',
      OS_PROJECT_NAME: 'admin',
      OS_USER_DOMAIN_NAME: 'Default',
      OS_PROJECT_DOMAIN_NAME: 'Default',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    await glance?.down();
    if (ksDir) {
      await promisify(execFile)(KEYSTONE_DEV, ['down', ksDir], { timeout: 60_000 }).catch(() => {});
      await rm(ksDir, { recursive: true, force: true });
    }
    await files?.close();
    await cleanup?.();
  });

  const publish = async (name: string): Promise<void> => {
    const done = await runJson(svc, TOKEN, { source: { url: `${files.url}/range/disk.qcow2` }, glance: { name } });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.output?.glance).toMatchObject({ status: 'active', checksum: raw.md5, os_hash_value: raw.sha512 });
    const { status, body } = await glanceApi({ url: glance.url, token: adminToken }, `/v2/images/${String(done.output?.glance?.image_id)}`);
    expect(status).toBe(200);
    expect(body).toMatchObject({ name, status: 'active', checksum: raw.md5 });
  };

  it('a bogus token is refused by this Glance (it really checks with Keystone)', async () => {
    expect((await glanceApi({ url: glance.url, token: 'not-a-token' }, '/v2/images')).status).toBe(401);
    expect((await glanceApi({ url: glance.url, token: adminToken }, '/v2/images')).status).toBe(200);
  });

  it('fetches a token once, keeps it for the next job, and fetches a new one when Glance answers 401', async () => {
    await publish('keystone-1');
    expect(await tokenRequests()).toBe(1);
    await publish('keystone-2');
    expect(await tokenRequests()).toBe(1); // cached
    // Revoke the service's tokens: disabling a user revokes every token issued to it.
    for (const enabled of [false, true]) {
      expect((await keystone(`/users/${userId}`, { method: 'PATCH', token: adminToken, body: JSON.stringify({ user: { enabled } }) })).status).toBe(200);
    }
    // Revocation is by issue time in whole seconds: wait until a freshly issued token of the user is good.
    await waitFor('a new token of the user to be valid', async () => (await glanceApi({ url: glance.url, token: await passwordToken('diskconv', 'diskconv-pw') }, '/v2/images')).status === 200, 30_000, 500);
    await publish('keystone-3');
    expect(await tokenRequests()).toBe(2);
    expect(svc.logs()).not.toContain('GLANCE_REFUSED');
  });
});
