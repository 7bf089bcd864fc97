/**
 * URL imports from a server that cannot be read by ranges convert while the
 * download grows (src/net/http-source.ts `follow`, src/queue/upload-stream.ts's
 * GrowingFileSource): real `diskconv serve` + `diskconv worker`, a loopback
 * server that holds back the end of the body until the test has seen the job
 * converting (no timing assertions: the server waits for the job's progress),
 * qemu-img as the reference. A download that fails after the conversion began
 * fails the attempt cleanly, and leaves nothing in DATA_DIR/work.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';
import { routes, startServer, type Handler, type TestServer } from '../net/servers.js';

const TOKEN = 'follow-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];

/** A body sent up to `holdAt` bytes, then held until `release()` (the rest) or `drop()` (the connection reset). */
interface Gate {
  handler: Handler;
  /** Resolves once the server has sent every byte before holdAt. */
  held: Promise<void>;
  release(): void;
  drop(): void;
  /** Requests this route answered. */
  requests: number;
}

function gated(body: Buffer, holdAt: number, extraHeaders: Record<string, string> = {}): Gate {
  let onHeld!: () => void;
  const held = new Promise<void>((r) => (onHeld = r));
  let waiting: ((how: 'release' | 'drop') => void) | undefined;
  let decided: 'release' | 'drop' | undefined;
  const gate: Gate = {
    held,
    requests: 0,
    release: () => {
      decided = 'release';
      waiting?.('release');
    },
    drop: () => {
      decided = 'drop';
      waiting?.('drop');
    },
    handler: (_req, res: ServerResponse) => {
      gate.requests++;
      // Whole bodies only: no Accept-Ranges, no ETag, whatever the request asks.
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(body.length), ...extraHeaders });
      if (gate.requests > 1) {
        res.end(body);
        return;
      }
      res.write(body.subarray(0, holdAt), () => {
        onHeld();
        const go = (how: 'release' | 'drop'): void => {
          if (how === 'release') res.end(body.subarray(holdAt));
          else res.socket?.destroy();
        };
        if (decided) go(decided);
        else waiting = go;
      });
    },
  };
  return gate;
}

describe('URL import from a server without ranges: converted while the download grows', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let server: TestServer;
  let image: { bytes: Buffer; sha256: string; reference: string };
  const gates: Record<string, Gate> = {};

  const createJob = async (path: string, extra: Record<string, unknown> = {}): Promise<JobJson> =>
    JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url: `${server.origin}${path}` }, ...extra }), `${svc.apiUrl}/v1/jobs`])) as JobJson;

  /** Files of this job's downloads left in the worker's scratch directory. */
  const downloads = async (id: string): Promise<string[]> => (await readdir(join(svc.dataDir, 'work')).catch(() => [] as string[])).filter((n) => n.startsWith(id));

  /** The job converting, with bytes done, while the server still holds back the end of the body. */
  const convertingBeforeTheEnd = async (id: string, gate: Gate): Promise<JobJson> => {
    await gate.held;
    return svc.waitForJob(id, (j) => j.progress.phase === 'converting' && j.progress.bytes_done > 0, { token: TOKEN, timeoutMs: 60_000 });
  };

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-url-follow-'));
    const raw = join(dir, 'base.raw');
    await writeRaw(raw, 48 * 2 ** 20, 21);
    const qcow2 = join(dir, 'disk.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
    const bytes = await readFile(qcow2);
    image = { bytes, sha256: createHash('sha256').update(bytes).digest('hex'), reference: await qemuRawSha256(qcow2, dir) };
    // Held at 3/4 of the file: the clusters before it are converted while the rest waits.
    const holdAt = Math.floor((bytes.length * 3) / 4);
    for (const name of ['ok', 'drop', 'checksum']) gates[name] = gated(bytes, holdAt);
    server = await startServer(
      routes(Object.fromEntries(Object.entries(gates).map(([name, g]) => [`/${name}/disk.qcow2`, g.handler]))),
    );
    svc = await ServiceHarness.create('url-follow', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '256M',
      URL_IMPORT_ALLOW: '127.0.0.1',
      URL_IMPORT_PORTS: `80,443,${server.port}`,
      JOB_ATTEMPTS: '1',
      PROGRESS_INTERVAL_MS: '50',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    for (const g of Object.values(gates)) g.release();
    await svc?.close();
    await server?.close();
    await cleanup?.();
  });

  it('converts while the body still arrives and succeeds once it is whole, byte-identical, with its sha256', async () => {
    const gate = gates.ok as Gate;
    const created = await createJob('/ok/disk.qcow2');
    const converting = await convertingBeforeTheEnd(created.id, gate);
    expect(converting.state).toBe('running');
    // No sha256 before the last byte: the download is not whole.
    expect(converting.source.sha256).toBeUndefined();
    gate.release();
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.source).toMatchObject({ kind: 'url', mode: 'staged', size: image.bytes.length, sha256: image.sha256 });
    const out = join(dir, `out-${created.id}.raw`);
    await curl([...AUTH, '-o', out, `${svc.apiUrl}${done.output?.href}`]);
    expect(await sha256File(out)).toBe(image.reference);
    expect(done.output?.sha256).toBe(image.reference);
    expect(gate.requests).toBe(1);
    expect(await downloads(created.id)).toEqual([]);
  });

  it('fails the attempt with SOURCE_UNAVAILABLE when the connection drops after the conversion began, leaving no download behind', async () => {
    const gate = gates.drop as Gate;
    const created = await createJob('/drop/disk.qcow2');
    await convertingBeforeTheEnd(created.id, gate);
    gate.drop();
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('SOURCE_UNAVAILABLE');
    expect(done.output).toBeNull();
    expect(await downloads(created.id)).toEqual([]);
    const outputs = await readdir(join(svc.dataDir, 'store', 'output')).catch(() => [] as string[]);
    expect(outputs.filter((n) => n.startsWith(created.id))).toEqual([]);
  });

  it('fails with CHECKSUM_MISMATCH when the whole download does not hash to expected_sha256, after converting along', async () => {
    const gate = gates.checksum as Gate;
    const created = await createJob('/checksum/disk.qcow2', { expected_sha256: 'ab'.repeat(32) });
    await convertingBeforeTheEnd(created.id, gate);
    gate.release();
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('CHECKSUM_MISMATCH');
    expect(done.output).toBeNull();
    expect(await downloads(created.id)).toEqual([]);
  });

  it('the worker logged no internal error', async () => {
    await waitFor('the logs', async () => svc.logs().length > 0);
    expect(svc.logs()).not.toMatch(/"level":50/);
  });
});
