/**
 * The rate limit's counters (src/api/rate-counters.ts) against a real
 * redis-server: counted in the process first, settled with Redis in batches.
 * One process admits exactly the limit; two admit at most limit × (1 + share)
 * and see each other's counts; then the same through real `diskconv serve`
 * processes (one, and two on one Redis).
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { RateCounters } from '../../src/api/rate-counters.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { ServiceHarness, spawnDiskconv, waitFor } from '../helpers/service.js';

type Counters = RateCounters;
const WINDOW_MS = 60_000;

/** One request through the store: admitted or not (the plugin refuses a count over the limit). */
function admit(counters: Counters, key: string, max: number, windowMs = WINDOW_MS): Promise<boolean> {
  return new Promise((resolve, reject) => counters.incr(key, (err, res) => (err ? reject(err) : resolve((res as { current: number }).current <= max)), windowMs, max));
}

/** `total` requests in bursts of `burst` concurrent ones, spread over the stores in turn; admitted per store. */
async function send(stores: Counters[], key: string, max: number, total: number, burst = 25): Promise<number[]> {
  const admitted = stores.map(() => 0);
  for (let sent = 0; sent < total; ) {
    const round: Array<Promise<void>> = [];
    for (let i = 0; i < burst && sent < total; i++, sent++) {
      const at = sent % stores.length;
      round.push(admit(stores[at] as Counters, key, max).then((ok) => void (ok && admitted[at]!++)));
    }
    await Promise.all(round);
  }
  return admitted;
}

const sum = (xs: number[]): number => xs.reduce((a, b) => a + b, 0);

describe('rate limit counters (real Redis)', () => {
  let redis: TestRedis;
  const clients: Redis[] = [];
  const made: Counters[] = [];
  let n = 0;

  /** A store as one API process has it: its own Redis connection. */
  function apiProcess(localPercent: number, settleMs = 5): Counters {
    const client = new Redis(redis.url, { enableAutoPipelining: true });
    clients.push(client);
    const c = new RateCounters(client, { namespace: 'test:ratelimit:', localPercent, settleMs });
    made.push(c);
    return c;
  }
  /** incr takes the whole Redis key (the plugin's stores add the namespace and route). */
  const freshKey = (): string => `test:ratelimit:k${++n}`;

  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    for (const c of made) await c.close();
    for (const c of clients) c.disconnect();
    await redis?.stop();
  });

  it('one process admits exactly the limit, and Redis holds its count', async () => {
    const one = apiProcess(1);
    const key = freshKey();
    const admitted = await send([one], key, 1000, 1500);
    expect(sum(admitted)).toBe(1000);
    await one.close();
    const check = clients[clients.length - 1] as Redis;
    expect(Number(await check.get(key))).toBeGreaterThanOrEqual(1000);
    expect(await check.pttl(key)).toBeGreaterThan(0);
  });

  it('two processes admit at most limit × (1 + 1 %), each refusing once the shared count is reached', async () => {
    const a = apiProcess(1);
    const b = apiProcess(1);
    const admitted = await send([a, b], freshKey(), 1000, 2000);
    expect(sum(admitted)).toBeGreaterThanOrEqual(1000);
    expect(sum(admitted)).toBeLessThanOrEqual(1010);
    expect(admitted[0]).toBeLessThan(1000);
    expect(admitted[1]).toBeLessThan(1000);
  });

  it("a process starts from the shared count: another process's requests count against it", async () => {
    const a = apiProcess(1);
    const b = apiProcess(1);
    const key = freshKey();
    expect(sum(await send([a], key, 1000, 700))).toBe(700);
    // b has seen none of these requests itself.
    const second = sum(await send([b], key, 1000, 500));
    expect(second).toBeGreaterThanOrEqual(300);
    expect(second).toBeLessThanOrEqual(310);
  });

  it('a count already at the limit in Redis refuses the first request a process sees', async () => {
    const a = apiProcess(1);
    const key = freshKey();
    await (clients[clients.length - 1] as Redis).set(key, '1000', 'PX', WINDOW_MS);
    expect(await admit(a, key, 1000)).toBe(false);
  });

  it('with RATE_LIMIT_LOCAL_PERCENT=0 two processes admit exactly the limit', async () => {
    const a = apiProcess(0);
    const b = apiProcess(0);
    expect(sum(await send([a, b], freshKey(), 300, 600))).toBe(300);
  });

  it('small limits are counted in Redis request by request: two processes admit exactly the limit', async () => {
    // 1 % of 60 is no whole request.
    const a = apiProcess(1);
    const b = apiProcess(1);
    expect(sum(await send([a, b], freshKey(), 60, 200, 10))).toBe(60);
  });

  it('holds a bounded number of counters however many tokens or addresses it sees', async () => {
    const a = apiProcess(1);
    for (let k = 0; k < 24; k++) {
      // 500 new counters at a time, one request each.
      const round = Array.from({ length: 500 }, (_, i) => admit(a, `test:ratelimit:many:${k}:${i}`, 1000));
      expect((await Promise.all(round)).every(Boolean)).toBe(true);
    }
    // One more settle after the last round forgets what is over the bound.
    expect(await admit(a, freshKey(), 1000)).toBe(true);
    expect(a.held).toBeLessThanOrEqual(10_000 + 500);
  });

  it('admits again once the window has ended', async () => {
    const a = apiProcess(1);
    const key = freshKey();
    for (let i = 0; i < 3; i++) expect(await admit(a, key, 3, 500)).toBe(true);
    expect(await admit(a, key, 3, 500)).toBe(false);
    await waitFor('the window to end', () => admit(a, key, 3, 500), 10_000, 50);
  });
});

describe('rate limit through real API processes (one Redis)', () => {
  const TOKENS = ['ratelimit-token-one-0123456789', 'ratelimit-token-two-0123456789', 'ratelimit-token-three-012345678'];
  let svc: ServiceHarness;
  let second = '';

  beforeAll(async () => {
    svc = await ServiceHarness.create('ratelimit', { API_TOKENS: TOKENS.join(','), RATE_LIMIT_READS: '200', LOG_LEVEL: 'warn' });
    await svc.startApi();
    const port = await freePort();
    const api2 = spawnDiskconv('api2', 'serve', svc.env({ PORT: String(port) }));
    svc.processes.push(api2);
    second = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${second}/readyz`)).status === 200, 20_000);
  });
  afterAll(async () => {
    await svc?.close();
  });

  /** `total` GET /v1/jobs, `burst` at a time, over the given APIs in turn: statuses per API. */
  async function poll(apis: string[], token: string, total: number, burst = 20): Promise<Array<Record<number, number>>> {
    const statuses = apis.map(() => ({}) as Record<number, number>);
    for (let sent = 0; sent < total; ) {
      const round: Array<Promise<void>> = [];
      for (let i = 0; i < burst && sent < total; i++, sent++) {
        const at = sent % apis.length;
        round.push(
          fetch(`${apis[at]}/v1/jobs`, { headers: { authorization: `Bearer ${token}` } }).then(async (res) => {
            await res.arrayBuffer();
            const seen = statuses[at] as Record<number, number>;
            seen[res.status] = (seen[res.status] ?? 0) + 1;
          }),
        );
      }
      await Promise.all(round);
    }
    return statuses;
  }

  it('one API process answers exactly RATE_LIMIT_READS, then 429', async () => {
    const [only] = await poll([svc.apiUrl], TOKENS[0] as string, 300);
    expect(only).toEqual({ 200: 200, 429: 100 });
  });

  it('two API processes share the count: at most 200 × 1.01 answered, both refuse past it', async () => {
    const [a, b] = (await poll([svc.apiUrl, second], TOKENS[1] as string, 300)) as [Record<number, number>, Record<number, number>];
    const ok = (a[200] ?? 0) + (b[200] ?? 0);
    expect(ok).toBeGreaterThanOrEqual(200);
    expect(ok).toBeLessThanOrEqual(202);
    expect(a[429]).toBeGreaterThan(0);
    expect(b[429]).toBeGreaterThan(0);
    expect(Object.keys(a).concat(Object.keys(b)).every((s) => s === '200' || s === '429')).toBe(true);
  });

  it("requests on one API count against the other's", async () => {
    const [first] = await poll([svc.apiUrl], TOKENS[2] as string, 150);
    expect(first).toEqual({ 200: 150 });
    const [then] = (await poll([second], TOKENS[2] as string, 100)) as [Record<number, number>];
    expect(then[200]).toBeGreaterThanOrEqual(50);
    expect(then[200]).toBeLessThanOrEqual(52);
  });
});
