/**
 * The page's RBD output targets and Glance fields in Debian's chromium
 * (playwright-core), against a real API, worker, redis-server, the run's test
 * Ceph and test Glance: an allowed RBD pool chosen in the form writes the image
 * there (its export equals qemu-img's conversion), the Glance fields publish an
 * image with that name and visibility and the page shows output.glance and the
 * md5/sha512 Glance recorded (a Glance refusal could not be provoked here:
 * the test Glance's project may publish public images). Screenshots go to test-results/web/.
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { hasChromium, launchChromium } from '../helpers/chromium.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { glanceApi, haveGlance, useGlance, type TestGlance } from '../helpers/glance.js';
import { makeTempDir, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN = 'web-targets-token-0123456789abcdef';
const SHOTS = resolve('test-results/web');

describe.skipIf(!hasChromium || !cephAvailable || !haveGlance)('the page: RBD pools and Glance fields', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let ceph: CephEnv;
  let glance: TestGlance;
  let browser: Browser;
  let rawSha = '';
  let rawMd5 = '';
  let rawSha512 = '';
  const rbdImages: string[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-web-targets-'));
    await mkdir(SHOTS, { recursive: true });
    await writeRaw(join(dir, 'base.raw'), 3 * 2 ** 20, 61);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    rawSha = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    const raw = await readFile(join(dir, 'base.raw'));
    rawMd5 = createHash('md5').update(raw).digest('hex');
    rawSha512 = createHash('sha512').update(raw).digest('hex');
    ceph = await useCeph();
    glance = await useGlance();
    svc = await ServiceHarness.create('web-targets', {
      API_TOKENS: TOKEN,
      RBD_POOLS: 'rbd',
      CEPH_CONF: ceph.CEPH_CONF,
      CEPH_ARGS: ceph.CEPH_ARGS,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_STORE: 'fs',
      GLANCE_PUBLISH_BACKOFF_MS: '200',
    });
    await svc.startApi();
    await svc.startWorker();
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await svc?.close();
    await removeRbdImages(ceph, rbdImages);
    await cleanup?.();
  });

  async function openPage(): Promise<Page> {
    const context = await browser.newContext({ viewport: { width: 1100, height: 1000 } });
    const page = await context.newPage();
    await page.goto(svc.apiUrl);
    await page.getByLabel('API token').fill(TOKEN);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.getByRole('heading', { name: 'New conversion' }).waitFor();
    return page;
  }
  const job = (page: Page, name: string) => page.getByRole('listitem', { name });
  const seen = new Set<string>();
  /** The job the page just created: the one not seen before. */
  const onlyJob = (): Promise<JobJson> =>
    waitFor('the new job', async () => {
      const list = (await (await svc.request('/v1/jobs?limit=100', { token: TOKEN })).json()) as { jobs: JobJson[] };
      const fresh = list.jobs.find((j) => !seen.has(j.id));
      if (fresh) seen.add(fresh.id);
      return fresh;
    });

  it('offers the allowed RBD pool as an output target, and the job writes its image there', async () => {
    const page = await openPage();
    const target = page.getByLabel('Output target');
    expect(await target.locator('option').allTextContents()).toEqual(['This service (download)', 'Ceph RBD pool rbd']);
    await target.selectOption({ label: 'Ceph RBD pool rbd' });
    await page.getByLabel('Image file').setInputFiles(join(dir, 'disk.qcow2'));
    await page.getByRole('button', { name: 'Convert' }).click();
    await job(page, 'disk.qcow2').getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    const done = await onlyJob();
    rbdImages.push(done.id);
    const text = (await job(page, 'disk.qcow2').textContent()) ?? '';
    expect(text).toContain(`Ceph RBD rbd/${done.id}@snap`);
    expect(text).toContain(`rbd://${ceph.CEPH_FSID}/rbd/${done.id}/snap`);
    expect(text).toContain(rawSha);
    // Nothing to download from the service: the image is in the pool.
    expect(await job(page, 'disk.qcow2').getByRole('link').count()).toBe(0);
    await page.screenshot({ path: join(SHOTS, 'rbd-target.png'), fullPage: true });
    const out = join(dir, 'export.raw');
    await cephCli(ceph, 'rbd', ['export', '--no-progress', `rbd/${done.id}@snap`, out]);
    expect(await sha256File(out)).toBe(rawSha);
    await page.context().close();
  });

  it('names the RBD image as typed into the form: the field shows for an RBD target only, and the image gets that name', async () => {
    const page = await openPage();
    const nameField = page.getByLabel('Name of the RBD image (optional)');
    expect(await nameField.isVisible()).toBe(false); // the store is chosen
    await page.getByLabel('Output target').selectOption({ label: 'Ceph RBD pool rbd' });
    await nameField.waitFor();
    // A name Ceph would take as an option is refused by the page before anything is sent.
    await nameField.fill('-bad');
    await page.getByLabel('Image file').setInputFiles(join(dir, 'disk.qcow2'));
    await page.getByRole('button', { name: 'Convert' }).click();
    await page.getByRole('alert').filter({ hasText: 'VALIDATION_FAILED' }).waitFor();
    const name = `page-named-${process.pid}`;
    rbdImages.push(name);
    await nameField.fill(name);
    await page.screenshot({ path: join(SHOTS, 'rbd-image-name.png'), fullPage: true });
    await page.getByRole('button', { name: 'Convert' }).click();
    await page.getByRole('status').filter({ hasText: 'Job created for disk.qcow2' }).waitFor();
    const created = await onlyJob();
    const item = page.locator(`#job-${created.id}`);
    await item.getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    expect((await item.textContent()) ?? '').toContain(`Ceph RBD rbd/${name}@snap`);
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.output?.sha256).toBe(rawSha);
    const out = join(dir, 'named.raw');
    await cephCli(ceph, 'rbd', ['export', '--no-progress', `rbd/${name}@snap`, out]);
    expect(await sha256File(out)).toBe(rawSha);
    // Back to the store: the field goes, and nothing of it is sent.
    await page.getByLabel('Output target').selectOption({ label: 'This service (download)' });
    expect(await nameField.isVisible()).toBe(false);
    await page.context().close();
  });

  it('publishes into Glance with the name and visibility given, and shows output.glance with md5 and sha512', async () => {
    const page = await openPage();
    const name = `diskconv-page-${process.pid}`;
    await page.getByLabel('Publish the raw image into Glance').check();
    await page.getByLabel('Image name').fill(name);
    await page.getByLabel('Visibility').selectOption('private');
    await page.getByLabel('Image file').setInputFiles(join(dir, 'disk.qcow2'));
    await page.screenshot({ path: join(SHOTS, 'glance-form.png'), fullPage: true });
    await page.getByRole('button', { name: 'Convert' }).click();
    const created = await onlyJob();
    const item = page.locator(`#job-${created.id}`);
    await item.getByLabel('State: succeeded').waitFor({ timeout: 120_000 });
    const done = (await svc.waitForFinal(created.id, { token: TOKEN })) as JobJson & { output: { glance?: { image_id: string } } };
    const imageId = done.output?.glance?.image_id as string;
    expect(imageId, JSON.stringify(done)).toBeDefined();
    expect(imageId).toMatch(/^[0-9a-f-]{36}$/);
    // The page shows the job after its last event; give it the final record.
    await page.getByRole('button', { name: 'Refresh' }).click();
    await item.getByText(imageId).waitFor();
    const text = (await item.textContent()) ?? '';
    expect(text).toContain(`name ${name}, visibility private`);
    expect(text).toContain(imageId);
    expect(text).toContain('active (uploaded)');
    expect(text).toContain(rawMd5);
    expect(text).toContain(rawSha512);
    await page.screenshot({ path: join(SHOTS, 'glance-published.png'), fullPage: true });
    const { status, body } = await glanceApi(glance, `/v2/images/${imageId}`);
    expect(status).toBe(200);
    expect(body).toMatchObject({ name, visibility: 'private', status: 'active', checksum: rawMd5, os_hash_value: rawSha512 });
    await page.context().close();
  });

});
