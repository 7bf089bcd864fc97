/**
 * The web page in a real browser: Debian's chromium driven by playwright-core
 * (never a downloaded browser), against a real API, worker and redis-server as
 * separate processes. Elements are found by role and label, as a person using a
 * screen reader would find them. Screenshots go to test-results/web/.
 */
import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { hasChromium, launchChromium } from '../helpers/chromium.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFileServer, type FileServer } from '../e2e/http-files.js';
import { makeTempDir, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor } from '../helpers/service.js';

const TOKEN = 'web-page-token-0123456789abcdef';
const SHOTS = resolve('test-results/web');

describe.skipIf(!hasChromium)('the web page in chromium', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: FileServer;
  let browser: Browser;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-web-'));
    await mkdir(SHOTS, { recursive: true });
    await writeRaw(join(dir, 'small.raw'), 3 * 2 ** 20, 21);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'small.raw'), join(dir, 'disk.qcow2'));
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', join(dir, 'small.raw'), join(dir, 'remote.vmdk'));
    // Large enough to still be converting when the page cancels it (the worker reads 2 MiB/s).
    await writeRaw(join(dir, 'big.raw'), 48 * 2 ** 20, 22);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'big.raw'), join(dir, 'slow.qcow2'));
    // A qcow2 naming a backing file: refused, never opened.
    await qemuImg('create', '-f', 'qcow2', '-b', join(dir, 'disk.qcow2'), '-F', 'qcow2', join(dir, 'backed.qcow2'));

    files = await startFileServer(dir);
    svc = await ServiceHarness.create('web', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      WORKER_READ_BYTES_PER_SECOND: '2M',
      SSE_HEARTBEAT_SECONDS: '2',
    });
    await svc.startApi();
    await svc.startWorker();
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await files?.close();
    await svc?.close();
    await cleanup?.();
  });

  async function openPage(options: { token?: string; width?: number } = {}): Promise<Page> {
    const context = await browser.newContext({ acceptDownloads: true, viewport: { width: options.width ?? 1100, height: 900 } });
    const page = await context.newPage();
    await page.goto(svc.apiUrl);
    await page.getByLabel('API token').fill(options.token ?? TOKEN);
    await page.getByRole('button', { name: 'Use token' }).click();
    if ((options.token ?? TOKEN) === TOKEN) await page.getByRole('heading', { name: 'New conversion' }).waitFor();
    return page;
  }

  const job = (page: Page, name: string) => page.getByRole('listitem', { name });
  const waitForState = (page: Page, name: string, state: string, timeout = 60_000) =>
    job(page, name).getByLabel(`State: ${state}`).waitFor({ timeout });

  it('serves the page with a strict CSP, nosniff and no framing', async () => {
    const res = await fetch(svc.apiUrl);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const csp = res.headers.get('content-security-policy') ?? '';
    expect(csp).toContain("script-src 'self'");
    expect(csp).toContain("frame-ancestors 'none'");
    expect(csp).not.toContain('unsafe-inline');
    expect(res.headers.get('x-content-type-options')).toBe('nosniff');
    const html = await res.text();
    expect(html).not.toMatch(/<script>(?!<\/script>)|<script(?![^>]*\bsrc=)[^>]*>|\son\w+=|https?:\/\/(?!example\.org)/);
  });

  it('a wrong token is told clearly, the right one is kept for the tab and never put in a URL', async () => {
    const page = await openPage({ token: 'not-the-token-0000000000000000' });
    const alert = page.getByRole('alert').filter({ hasText: 'not accepted' });
    await alert.waitFor();
    expect(await alert.textContent()).toContain('That token was not accepted');
    await page.screenshot({ path: join(SHOTS, 'wrong-token.png'), fullPage: true });
    await page.getByLabel('API token').fill(TOKEN);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.getByRole('heading', { name: 'New conversion' }).waitFor();
    expect(await page.evaluate("sessionStorage.getItem('diskconv.token')")).toBe(TOKEN);
    expect(page.url()).not.toContain(TOKEN);
    await page.context().close();
  });

  it('uploads a qcow2 through the file input, follows it to succeeded, and downloads what qemu-img writes', async () => {
    const page = await openPage();
    const requests: string[] = [];
    page.on('request', (r) => requests.push(r.url()));
    await page.getByLabel('Image file').setInputFiles(join(dir, 'disk.qcow2'));
    await page.getByRole('button', { name: 'Convert' }).click();
    await job(page, 'disk.qcow2').waitFor();
    // The upload went through XHR with progress events; its bar ends full.
    const upload = page.getByRole('progressbar', { name: 'Upload progress' });
    // Polled from here, not by page.waitForFunction: a string predicate is eval'd in the page, which its CSP forbids.
    await waitFor('the upload bar to be full', async () => (await upload.getAttribute('value')) === '100');
    expect(await upload.getAttribute('value')).toBe('100');
    await page.screenshot({ path: join(SHOTS, 'converting.png'), fullPage: true });
    await waitForState(page, 'disk.qcow2', 'succeeded');
    const item = job(page, 'disk.qcow2');
    const text = (await item.textContent()) ?? '';
    expect(text).toContain('qcow2');
    expect(text).toContain('3 MiB (3145728 bytes)');
    const expected = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    expect(text).toContain(expected);

    const link = item.getByRole('link', { name: 'Download disk.qcow2.raw' });
    await waitFor('the signed download link', async () => (await link.getAttribute('href'))?.includes('sig='));
    const href = (await link.getAttribute('href')) ?? '';
    expect(href).toMatch(/^\/v1\/jobs\/[\w-]{22}\/output\?expires=\d+&sig=[\w-]+$/);
    await page.screenshot({ path: join(SHOTS, 'succeeded.png'), fullPage: true });
    const [download] = await Promise.all([page.waitForEvent('download'), link.click()]);
    const saved = join(dir, 'downloaded.raw');
    await download.saveAs(saved);
    expect(await sha256File(saved)).toBe(expected);
    // The page progress came over the event stream, and the token never went into a URL.
    expect(requests.some((u) => /\/v1\/jobs\/[\w-]{22}\/events$/.test(u))).toBe(true);
    expect(requests.filter((u) => u.includes(TOKEN))).toEqual([]);
    await page.context().close();
  });

  it('cancels a running job', async () => {
    const page = await openPage();
    await page.getByLabel('Image file').setInputFiles(join(dir, 'slow.qcow2'));
    await page.getByRole('button', { name: 'Convert' }).click();
    await waitForState(page, 'slow.qcow2', 'running');
    await waitFor('the conversion to be under way', async () => /converting/.test((await page.locator('li .progress-text').first().textContent()) ?? ''));
    await page.screenshot({ path: join(SHOTS, 'running.png'), fullPage: true });
    await job(page, 'slow.qcow2').getByRole('button', { name: 'Cancel slow.qcow2' }).click();
    await waitForState(page, 'slow.qcow2', 'cancelled', 10_000);
    const id = (await job(page, 'slow.qcow2').getAttribute('id'))?.replace(/^job-/, '') ?? '';
    expect((await svc.getJob(id, TOKEN)).state).toBe('cancelled');
    await page.context().close();
  });

  it('inspects before converting, and an unsafe image shows its code and what it means', async () => {
    const page = await openPage();
    await page.getByLabel('Image file').setInputFiles(join(dir, 'backed.qcow2'));
    await page.getByRole('button', { name: 'Inspect' }).click();
    const inspection = page.getByRole('region', { name: 'Inspection' });
    await inspection.getByText('UNSAFE_IMAGE').waitFor();
    const verdict = (await inspection.textContent()) ?? '';
    expect(verdict).toContain('refused for safety');
    expect(verdict).toContain('backing file');
    await page.screenshot({ path: join(SHOTS, 'inspect-unsafe.png'), fullPage: true });

    await page.getByLabel('Image file').setInputFiles(join(dir, 'disk.qcow2'));
    await page.getByRole('button', { name: 'Inspect' }).click();
    await inspection.getByText('Safe to convert').waitFor();
    expect(await inspection.textContent()).toContain('3 MiB (3145728 bytes)');

    await page.getByLabel('Image file').setInputFiles(join(dir, 'backed.qcow2'));
    await page.getByRole('button', { name: 'Convert' }).click();
    await waitForState(page, 'backed.qcow2', 'failed');
    const alert = job(page, 'backed.qcow2').getByRole('alert');
    const text = (await alert.textContent()) ?? '';
    expect(text).toContain('UNSAFE_IMAGE');
    expect(text).toContain('refused for safety');
    await page.screenshot({ path: join(SHOTS, 'unsafe.png'), fullPage: true });
    await page.context().close();
  });

  it('imports from a URL with an expected sha256', async () => {
    const page = await openPage();
    const fileSha = await sha256File(join(dir, 'remote.vmdk'));
    const url = `${files.url}/range/remote.vmdk`;
    await page.getByLabel('Image URL').fill(url);
    await page.getByLabel('Expected sha256 (optional)').fill(fileSha);
    await page.getByRole('button', { name: 'Convert' }).click();
    await waitForState(page, url, 'succeeded');
    const text = (await job(page, url).textContent()) ?? '';
    expect(text).toContain('vmdk');
    expect(text).toContain(await qemuRawSha256(join(dir, 'remote.vmdk'), dir));

    // A disallowed address is refused at once, in words.
    await page.getByLabel('Image URL').fill('http://169.254.169.254/latest/meta-data');
    await page.getByLabel('Expected sha256 (optional)').fill('');
    await page.getByRole('button', { name: 'Convert' }).click();
    const alert = page.getByRole('alert').filter({ hasText: 'URL_REFUSED' });
    await alert.waitFor();
    expect(await alert.textContent()).toContain('may not fetch this URL');
    await page.screenshot({ path: join(SHOTS, 'url-refused.png'), fullPage: true });
    await page.context().close();
  });

  it('is usable by keyboard and readable on a phone-sized window', async () => {
    const page = await openPage({ width: 375 });
    // Tab order reaches the file input, then the URL field, the options and the buttons.
    const reached: string[] = [];
    await page.locator('body').focus();
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press('Tab');
      reached.push(String(await page.evaluate("document.activeElement?.id || document.activeElement?.tagName || ''")));
    }
    for (const id of ['file', 'url', 'source-format', 'sha256', 'convert', 'inspect']) expect(reached).toContain(id);
    // Nothing wider than the window.
    const overflow = Number(await page.evaluate('document.documentElement.scrollWidth - window.innerWidth'));
    expect(overflow).toBeLessThanOrEqual(0);
    await page.screenshot({ path: join(SHOTS, 'phone.png'), fullPage: true });
    await page.context().close();
  });
});
