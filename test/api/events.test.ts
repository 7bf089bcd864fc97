/**
 * GET /v1/jobs/{id}/events with real processes: a worker reports through Redis,
 * and an API process other than the one that created the job serves the stream.
 */
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, spawnDiskconv, waitFor, type JobJson, type ServiceProcess } from '../helpers/service.js';
import { readSse, type SseEvent } from '../helpers/sse.js';

const TOKEN_A = 'events-token-aaaaaaaaaaaaaaaa';
const TOKEN_B = 'events-token-bbbbbbbbbbbbbbbb';
const auth = (t: string): Record<string, string> => ({ authorization: `Bearer ${t}` });

describe('job events (SSE) across API processes', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let apiB: ServiceProcess;
  let urlB = '';
  let image: Buffer;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-events-'));
    await writeRaw(join(dir, 'base.raw'), 12 * 2 ** 20, 5);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    image = await readFile(join(dir, 'disk.qcow2'));
    svc = await ServiceHarness.create('events', {
      API_TOKENS: `${TOKEN_A},${TOKEN_B}`,
      SSE_HEARTBEAT_SECONDS: '1',
      // About three seconds per conversion: long enough to watch.
      WORKER_READ_BYTES_PER_SECOND: '4M',
    });
    await svc.startApi();
    const port = await freePort();
    apiB = spawnDiskconv('api-b', 'serve', svc.env({ PORT: String(port) }));
    svc.processes.push(apiB);
    urlB = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${urlB}/readyz`)).status === 200, 20_000);
    await svc.startWorker();
  });
  afterAll(async () => {
    await svc?.close();
    await cleanup?.();
  });

  async function createJob(token = TOKEN_A): Promise<JobJson> {
    const res = await svc.request('/v1/jobs?filename=disk.qcow2', { method: 'POST', token, body: image, headers: { 'content-type': 'application/octet-stream' } });
    expect(res.status).toBe(202);
    return (await res.json()) as JobJson;
  }

  const data = (e: SseEvent): Record<string, unknown> => JSON.parse(e.data) as Record<string, unknown>;

  it('streams state and progress events from another API process and ends after the terminal state', async () => {
    const job = await createJob();
    const stream = await readSse(`${urlB}/v1/jobs/${job.id}/events`, auth(TOKEN_A));
    expect(stream.status).toBe(200);
    expect(stream.contentType).toMatch(/^text\/event-stream/);
    const states = stream.events.filter((e) => e.event === 'state').map((e) => data(e).state);
    expect(['queued', 'running']).toContain(states[0]); // the stream starts with the current state
    expect(states).toContain('running');
    expect(states.at(-1)).toBe('succeeded');
    expect(stream.events.at(-1)?.event).toBe('state');
    const final = data(stream.events.at(-1) as SseEvent).job as JobJson;
    expect(final.output?.sha256).toMatch(/^[0-9a-f]{64}$/);

    const converting = stream.events.filter((e) => e.event === 'progress').map(data).filter((p) => p.phase === 'converting');
    expect(converting.length).toBeGreaterThan(1);
    for (const p of converting) {
      expect(Object.keys(p).sort()).toEqual(['bytes_done', 'bytes_total', 'percent', 'phase']);
      expect(p.bytes_total).toBe(12 * 2 ** 20);
    }
    const done = converting.map((p) => p.bytes_done as number);
    expect(done).toEqual([...done].sort((a, b) => a - b));
    // Every event but the opening snapshot's progress has an id, strictly increasing (Redis stream ids).
    expect(stream.events[0]?.event).toBe('progress');
    expect(stream.events[0]?.id).toBeUndefined();
    const ids = stream.events.slice(1).map((e) => e.id ?? '');
    expect(ids.every((id) => /^\d+-\d+$/.test(id))).toBe(true);
    const num = (id: string): [number, number] => id.split('-').map(Number) as [number, number];
    for (let i = 1; i < ids.length; i++) {
      const [a, b] = [num(ids[i - 1] as string), num(ids[i] as string)];
      expect(a[0] < b[0] || (a[0] === b[0] && a[1] < b[1])).toBe(true);
    }
    // The conversion took longer than the one-second heartbeat.
    expect(stream.comments).toContain('heartbeat');
  });

  it('resumes after Last-Event-ID with exactly the events that followed it', async () => {
    const job = await createJob();
    // Read until the job runs (an event with an id: the stream's opening snapshot has none, and an upload
    // converted while it arrives is already converting when it opens), then drop the connection.
    const first = await readSse(`${urlB}/v1/jobs/${job.id}/events`, auth(TOKEN_A), (e) => e.id !== undefined && e.event === 'progress' && data(e).phase === 'converting');
    const last = first.events.at(-1) as SseEvent;
    const rest = await readSse(`${svc.apiUrl}/v1/jobs/${job.id}/events`, { ...auth(TOKEN_A), 'last-event-id': last.id as string });
    expect(rest.events.length).toBeGreaterThan(0);
    expect(rest.events.map((e) => e.id)).not.toContain(last.id);
    const states = rest.events.filter((e) => e.event === 'state').map((e) => data(e).state);
    expect(states).not.toContain('queued');
    expect(states.at(-1)).toBe('succeeded');
    // Resuming after the end gets the final state once and the stream closes.
    const after = await readSse(`${urlB}/v1/jobs/${job.id}/events`, { ...auth(TOKEN_A), 'last-event-id': rest.events.at(-1)?.id as string });
    expect(after.events.map((e) => [e.event, data(e).state])).toEqual([['state', 'succeeded']]);
  });

  it('a finished job: the current state, then the end; a cancelled job ends its stream', async () => {
    const job = await createJob();
    await svc.waitForFinal(job.id, { token: TOKEN_A });
    const s = await readSse(`${urlB}/v1/jobs/${job.id}/events`, auth(TOKEN_A));
    expect(s.events.map((e) => e.event)).toEqual(['progress', 'state']);
    expect(data(s.events[1] as SseEvent).state).toBe('succeeded');

    const running = await createJob();
    const watching = readSse(`${urlB}/v1/jobs/${running.id}/events`, auth(TOKEN_A));
    await svc.waitForJob(running.id, (j) => j.state === 'running', { token: TOKEN_A });
    expect((await svc.request(`/v1/jobs/${running.id}`, { method: 'DELETE', token: TOKEN_A })).status).toBe(200);
    const c = await watching;
    expect(c.events.filter((e) => e.event === 'state').map((e) => data(e).state).at(-1)).toBe('cancelled');
    // The last progress event, just before that state, is the terminal phase (issue 11), as is the job's.
    expect(c.events.at(-2)?.event).toBe('progress');
    expect(data(c.events.at(-2) as SseEvent)).toMatchObject({ phase: 'cancelled', ended_in: expect.any(String) });
    expect((data(c.events.at(-1) as SseEvent).job as JobJson).progress.phase).toBe('cancelled');
  });

  it('has the auth and tenant rules of GET /v1/jobs/{id}', async () => {
    const job = await createJob();
    expect((await readSse(`${urlB}/v1/jobs/${job.id}/events`)).status).toBe(401);
    expect((await readSse(`${urlB}/v1/jobs/${job.id}/events`, auth(TOKEN_B))).status).toBe(404);
    expect((await readSse(`${urlB}/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA/events`, auth(TOKEN_A))).status).toBe(404);
    await svc.waitForFinal(job.id, { token: TOKEN_A });
  });
});
