/**
 * The page's passphrase field, its Idempotency-Key and a Glance publishing
 * error, in Debian's chromium (playwright-core) against a real API, worker and
 * redis-server: a LUKS qcow2 converts with the passphrase typed into the form,
 * which travels in the request body only (never a URL, never sessionStorage or
 * localStorage); a submission whose answer is lost and is sent again, and a
 * double click, make one job each; GLANCE_URL on a closed port makes a
 * GLANCE_UNAVAILABLE job the page explains in words. Screenshots go to test-results/web/.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Browser, Page, Request } from 'playwright-core';
import { hasChromium, launchChromium } from '../helpers/chromium.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN = 'web-form-token-0123456789abcdef0';
const PASSPHRASE = 'page secret \u00e9 7f3c';
const SHOTS = resolve('test-results/web');

function runAllowingFailure(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((done) => {
    const child = execFile(cmd, args, (_err, _stdout, stderr) => done({ code: child.exitCode ?? 1, stderr }));
  });
}

describe.skipIf(!hasChromium)('the page: passphrase, Idempotency-Key, Glance errors', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let browser: Browser;
  let luksRaw = '';
  let plainRaw = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-web-form-'));
    await mkdir(SHOTS, { recursive: true });
    await writeRaw(join(dir, 'small.raw'), 2 * 2 ** 20, 41);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'small.raw'), join(dir, 'disk.qcow2'));
    plainRaw = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    await writeFile(join(dir, 'plain.raw'), mixedContent(2 * 2 ** 20, 42));
    const secret = ['--object', `secret,id=sec0,data=${PASSPHRASE}`];
    let made = { code: 1, stderr: '' };
    // qemu-img times its PBKDF2 and can fail to on a loaded machine: retry (as test/e2e/encrypted.test.ts does).
    for (let attempt = 0; attempt < 6 && made.code !== 0; attempt++) {
      if (attempt > 0) await new Promise((done) => setTimeout(done, 250 * attempt));
      made = await runAllowingFailure('qemu-img', ['convert', ...secret, '-f', 'raw', '-O', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', join(dir, 'plain.raw'), join(dir, 'luks.qcow2')]);
    }
    expect(made.code, made.stderr).toBe(0);
    await qemuImg('convert', ...secret, '--image-opts', `driver=qcow2,file.filename=${join(dir, 'luks.qcow2')},encrypt.key-secret=sec0`, '-O', 'raw', join(dir, 'luks.ref'));
    luksRaw = await sha256File(join(dir, 'luks.ref'));
    // Glance configured on a port nothing listens on: publishing can only fail, once, at once.
    const closed = await freePort();
    svc = await ServiceHarness.create('web-form', {
      API_TOKENS: TOKEN,
      GLANCE_URL: `http://127.0.0.1:${closed}`,
      GLANCE_TOKEN: 'no-glance-listens-here',
      GLANCE_PUBLISH_ATTEMPTS: '1',
      GLANCE_PUBLISH_BACKOFF_MS: '0',
    });
    await svc.startApi();
    await svc.startWorker();
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await svc?.close();
    await cleanup?.();
  });

  async function openPage(): Promise<{ page: Page; requests: Request[] }> {
    const context = await browser.newContext({ viewport: { width: 1100, height: 1000 } });
    const page = await context.newPage();
    const requests: Request[] = [];
    page.on('request', (r) => requests.push(r));
    await page.goto(svc.apiUrl);
    await page.getByLabel('API token').fill(TOKEN);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.getByRole('heading', { name: 'New conversion' }).waitFor();
    return { page, requests };
  }
  const job = (page: Page, name: string) => page.getByRole('listitem', { name });
  const jobsNamed = async (filename: string): Promise<JobJson[]> => {
    const list = (await (await svc.request('/v1/jobs?limit=100', { token: TOKEN })).json()) as { jobs: JobJson[] };
    return list.jobs.filter((j) => j.source.filename === filename);
  };

  it('a passphrase typed into the form unlocks a LUKS qcow2; it goes in the request body only, never a URL or the browser storage', async () => {
    const { page, requests } = await openPage();
    const field = page.getByLabel('Passphrase (encrypted images only)');
    expect(await field.getAttribute('type')).toBe('password');
    await field.fill(PASSPHRASE);
    await page.getByLabel('Image file').setInputFiles(join(dir, 'luks.qcow2'));
    await page.screenshot({ path: join(SHOTS, 'passphrase-form.png'), fullPage: true });
    await page.getByRole('button', { name: 'Convert' }).click();
    await job(page, 'luks.qcow2').getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    const [done] = await jobsNamed('luks.qcow2');
    expect(done?.output?.sha256).toBe(luksRaw);
    await page.screenshot({ path: join(SHOTS, 'passphrase-converted.png'), fullPage: true });

    // It reached the service (the image unlocked) in the one POST /v1/jobs, whose body it was in; in no URL the page asked for.
    const posts = requests.filter((r) => r.method() === 'POST' && new URL(r.url()).pathname === '/v1/jobs');
    expect(posts).toHaveLength(1);
    const encoded = [PASSPHRASE, encodeURIComponent(PASSPHRASE), Buffer.from(PASSPHRASE).toString('base64')];
    for (const r of requests) for (const e of encoded) expect(r.url()).not.toContain(e);
    // Kept nowhere by the page: not in sessionStorage (the token alone is), not in localStorage, not in the field once sent.
    const storage = await page.evaluate<string>('JSON.stringify({ session: Object.entries(sessionStorage), local: Object.entries(localStorage) })');
    expect(storage).not.toContain(PASSPHRASE);
    expect(await page.evaluate<string[]>('Object.keys(sessionStorage)')).toEqual(['diskconv.token']);
    expect(await field.inputValue()).toBe('');
    // Nor does the service show it back.
    expect((await job(page, 'luks.qcow2').textContent()) ?? '').not.toContain(PASSPHRASE);
    await page.context().close();
  });

  it('a submission whose answer is lost and is sent again makes one job (the same Idempotency-Key); so does a double click', async () => {
    const { page, requests } = await openPage();
    await page.getByLabel('Image file').setInputFiles({ name: 'retried.qcow2', mimeType: 'application/octet-stream', buffer: await readFile(join(dir, 'disk.qcow2')) });
    // The first POST reaches the service (which creates the job) but its answer never reaches the page.
    let lost = 0;
    let status = 0;
    await page.route('**/v1/jobs', async (route) => {
      if (route.request().method() !== 'POST' || lost > 0) return route.continue();
      lost++;
      status = (await route.fetch()).status();
      await route.abort('connectionreset');
    });
    await page.getByRole('button', { name: 'Convert' }).click();
    await page.getByRole('alert').filter({ hasText: 'the connection failed' }).waitFor();
    expect(status).toBe(202);
    expect(await jobsNamed('retried.qcow2')).toHaveLength(1);
    await page.screenshot({ path: join(SHOTS, 'idempotency-lost-answer.png'), fullPage: true });
    // The person sends the same form again.
    await page.getByRole('button', { name: 'Convert' }).click();
    await page.getByRole('status').filter({ hasText: 'Job created for retried.qcow2' }).waitFor();
    const posts = requests.filter((r) => r.method() === 'POST' && new URL(r.url()).pathname === '/v1/jobs');
    expect(posts).toHaveLength(2);
    const keys = posts.map((r) => r.headers()['idempotency-key']);
    expect(keys[0]).toMatch(/^[0-9a-f]{32}$/);
    expect(keys[1]).toBe(keys[0]);
    expect((await posts[1]?.response())?.headers()['idempotent-replayed']).toBe('true');
    const jobs = await jobsNamed('retried.qcow2');
    expect(jobs).toHaveLength(1);
    await job(page, 'retried.qcow2').getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    expect(await page.getByRole('listitem', { name: 'retried.qcow2' }).count()).toBe(1);
    await page.unroute('**/v1/jobs');

    // A double click on Convert: one job, and the next form (a new file) gets a key of its own.
    await page.getByLabel('Image file').setInputFiles({ name: 'twice.qcow2', mimeType: 'application/octet-stream', buffer: await readFile(join(dir, 'disk.qcow2')) });
    await page.getByRole('button', { name: 'Convert' }).dblclick();
    await page.getByRole('status').filter({ hasText: 'Job created for twice.qcow2' }).waitFor();
    await job(page, 'twice.qcow2').getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    expect(await jobsNamed('twice.qcow2')).toHaveLength(1);
    const later = requests.filter((r) => r.method() === 'POST' && new URL(r.url()).pathname === '/v1/jobs').slice(2);
    expect(later.length).toBeGreaterThanOrEqual(1);
    for (const r of later) expect(r.headers()['idempotency-key']).not.toBe(keys[0]);
    expect(new Set(later.map((r) => r.headers()['idempotency-key'])).size).toBe(1);
    await page.context().close();
  });

  it('a Glance that cannot be reached is told in words: GLANCE_UNAVAILABLE, and the converted image is still there', async () => {
    const { page } = await openPage();
    await page.getByLabel('Publish the raw image into Glance').check();
    await page.getByLabel('Image name').fill('never-published');
    await page.getByLabel('Image file').setInputFiles({ name: 'to-glance.qcow2', mimeType: 'application/octet-stream', buffer: await readFile(join(dir, 'disk.qcow2')) });
    await page.getByRole('button', { name: 'Convert' }).click();
    const item = job(page, 'to-glance.qcow2');
    const alert = item.getByRole('alert');
    await alert.waitFor({ timeout: 120_000 });
    const words = (await alert.textContent()) ?? '';
    expect(words).toContain('GLANCE_UNAVAILABLE');
    expect(words).toContain('Glance could not be reached; the service retried and gave up.');
    expect(words).toContain('The converted image can still be downloaded here.');
    // Nothing claims the image reached Glance.
    const all = (await item.textContent()) ?? '';
    expect(all).not.toContain('(uploaded)');
    expect(all).toContain('not published');
    const [record] = await jobsNamed('to-glance.qcow2');
    expect(record?.error?.code).toBe('GLANCE_UNAVAILABLE');
    expect(record?.output?.sha256).toBe(plainRaw);
    // What the words promise: a download link for the converted image.
    const link = item.getByRole('link', { name: /^Download to-glance\.qcow2\.raw$/ });
    await waitFor('the signed download link', async () => (await link.getAttribute('href'))?.includes('sig='));
    const href = (await link.getAttribute('href')) as string;
    const res = await fetch(new URL(href, svc.apiUrl));
    expect(res.status).toBe(200);
    expect(createHash('sha256').update(Buffer.from(await res.arrayBuffer())).digest('hex')).toBe(plainRaw);
    await page.screenshot({ path: join(SHOTS, 'glance-unavailable.png'), fullPage: true });
    await page.context().close();
  });
});

