/**
 * A URL import from a range-capable server downloads the image's data, not its
 * holes: bytes served <= 1.05 x the data the image stores (the qemu-img map's
 * data extents), counted by a loopback server of the test's own. Real API and
 * worker processes, real redis-server; images made by qemu-img and qemu-io.
 * The `reordered` images are written by qemu-io itself from the last guest
 * offset to the first, so their data lies in the file in the reverse of guest
 * order, with qcow2's L2 tables among it and small extents that do not start on
 * a cluster: a read-ahead in the file's byte order fetched 1.28-1.82 x there
 * (it fetched what the reader did not want next, then again when it did).
 */
import { createReadStream } from 'node:fs';
import { execFile } from 'node:child_process';
import { stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { curl, ServiceHarness } from '../helpers/service.js';

const execFileAsync = promisify(execFile);
const TOKEN = 'range-bytes-token-0123456789abcdef';

/** Serves files of `dir` with Range and a strong ETag; counts the body bytes it sends per file. */
async function countingServer(dir: string): Promise<{ port: number; served: Map<string, number>; close: () => Promise<void> }> {
  const served = new Map<string, number>();
  const server: Server = createServer((req, res) => {
    void (async () => {
      const name = (req.url ?? '/').slice(1);
      if (!/^[\w.-]+$/.test(name)) return void res.writeHead(404).end();
      const path = join(dir, name);
      const st = await stat(path).catch(() => undefined);
      if (!st) return void res.writeHead(404).end();
      const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      let start = 0;
      let end = st.size - 1;
      if (m) {
        start = Number(m[1]);
        end = m[2] ? Math.min(Number(m[2]), st.size - 1) : st.size - 1;
        if (start >= st.size) return void res.writeHead(416, { 'content-range': `bytes */${st.size}` }).end();
        res.writeHead(206, { 'accept-ranges': 'bytes', etag: '"fixed"', 'content-range': `bytes ${start}-${end}/${st.size}`, 'content-length': String(end - start + 1) });
      } else {
        res.writeHead(200, { 'accept-ranges': 'bytes', etag: '"fixed"', 'content-length': String(st.size) });
      }
      const body = createReadStream(path, { start, end });
      body.on('data', (c: Buffer | string) => served.set(name, (served.get(name) ?? 0) + c.length));
      body.pipe(res);
    })();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  return { port, served, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

/** Bytes of guest data the image stores: the data extents of `qemu-img map` that lie in the file. */
async function storedDataBytes(path: string): Promise<number> {
  const { stdout } = await qemuImg('map', '--output=json', path);
  const entries = JSON.parse(stdout) as Array<{ length: number; data: boolean; offset?: number }>;
  return entries.filter((e) => e.data && e.offset !== undefined).reduce((sum, e) => sum + e.length, 0);
}

describe('URL import by ranges', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: Awaited<ReturnType<typeof countingServer>>;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-range-bytes-'));
    // 1 GiB virtual, about 26 MiB of data scattered over it: holes dominate.
    const base = join(dir, 'base.qcow2');
    await qemuImg('create', '-f', 'qcow2', base, '1G');
    const writes: string[] = [];
    for (let i = 0; i < 24; i++) writes.push('-c', `write -P ${(i % 250) + 1} ${i * 41 + 3}M 1M`);
    for (let i = 0; i < 64; i++) writes.push('-c', `write -P 0x5a ${(i * 4 + 700) * 1024 + 12}k 36k`);
    await qemuIo(...writes, base);
    await qemuImg('convert', '-O', 'qcow2', base, join(dir, 'disk.qcow2'));
    await qemuImg('convert', '-O', 'vdi', base, join(dir, 'disk.vdi'));
    await qemuImg('convert', '-O', 'vmdk', base, join(dir, 'disk.vmdk'));
    // The same writes from the last to the first, straight into each format: the file holds them in that order.
    for (const format of ['qcow2', 'vdi', 'vmdk']) {
      const path = join(dir, `reordered.${format}`);
      await qemuImg('create', '-f', format, path, '1G');
      const backwards: string[] = [];
      for (let i = writes.length - 2; i >= 0; i -= 2) backwards.push(writes[i] as string, writes[i + 1] as string);
      await qemuIo('-f', format, ...backwards, path);
    }
    // An OVA holding the reordered qcow2: the reader's announcements reach the URL through the tar member.
    const ovf = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="reordered.qcow2"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/></DiskSection>
  <VirtualSystem ovf:id="vm"><Info>vm</Info><Name>vm</Name></VirtualSystem>
</Envelope>
`;
    await writeFile(join(dir, 'app.ovf'), ovf);
    await execFileAsync('tar', ['-cf', join(dir, 'reordered.ova'), '--format=ustar', '-C', dir, 'app.ovf', 'reordered.qcow2']);
    files = await countingServer(dir);
    svc = await ServiceHarness.create('range-bytes', { API_TOKENS: TOKEN, URL_IMPORT_ALLOW: '127.0.0.1', URL_IMPORT_PORTS: String(files.port) });
    await svc.startApi();
    await svc.startWorker();
  }, 120_000);

  afterAll(async () => {
    await svc?.close();
    await files?.close();
    await cleanup?.();
  });

  for (const name of ['disk.qcow2', 'disk.vdi', 'disk.vmdk', 'reordered.qcow2', 'reordered.vdi', 'reordered.vmdk', 'reordered.ova']) {
    it(`${name}: converts identically and fetches <= 1.05 x its stored data`, async () => {
      const served0 = files.served.get(name) ?? 0;
      const path = join(dir, name.endsWith('.ova') ? 'reordered.qcow2' : name);
      const res = await svc.request('/v1/jobs', {
        token: TOKEN,
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ source: { url: `http://127.0.0.1:${files.port}/${name}` } }),
      });
      expect(res.status).toBe(202);
      const { id } = (await res.json()) as { id: string };
      const done = await svc.waitForFinal(id, { token: TOKEN });
      expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
      expect(done.source.mode).toBe('range');
      const out = join(dir, `out-${id}.raw`);
      await curl(['-H', `Authorization: Bearer ${TOKEN}`, '-o', out, `${svc.apiUrl}${done.output?.href}`]);
      expect(await sha256File(out)).toBe(await qemuRawSha256(path, dir));
      const data = await storedDataBytes(path);
      const served = (files.served.get(name) ?? 0) - served0;
      const fileSize = (await stat(join(dir, name))).size;
      expect(data).toBeGreaterThan(20 * 2 ** 20);
      expect(served, `served ${served} bytes of a ${fileSize}-byte file holding ${data} bytes of data`).toBeLessThanOrEqual(1.05 * data);
    }, 120_000);
  }
});
