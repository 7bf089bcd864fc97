/**
 * The SSRF rules on the real request path: loopback servers stand in for private
 * hosts. A refused URL or redirect must never reach the server it names.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, mixedContent } from '../helpers/qemu.js';
import { UrlRefusedError } from '../../src/net/errors.js';
import { openUrlSource } from '../../src/net/http-source.js';
import { fetchFollowing, sendRequest } from '../../src/net/request.js';
import { DEFAULT_URL_POLICY, type UrlPolicy } from '../../src/net/url-policy.js';
import { fileHandler, redirect, routes, startServer, type Handler, type TestServer } from './servers.js';

const bytes = mixedContent(300_000, 5);
let dir: string;
let cleanup: () => Promise<void>;
let n = 0;
const stagingPath = (): string => join(dir, `staged-${n++}`);

/** The allowed server on 127.0.0.1, and forbidden ones on 127.0.0.2 and ::1 that must see nothing. */
let allowed: TestServer;
let forbidden4: TestServer;
let forbidden6: TestServer;
let locationFor: (path: string) => string | undefined = () => undefined;

const allowPolicy: UrlPolicy = { ...DEFAULT_URL_POLICY, allow: ['127.0.0.1'] };

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-ssrf-'));
  const file = fileHandler(bytes, { ranges: true, etag: '"v1"' });
  const hops: Handler = (req, res, i) => {
    const path = (req.url ?? '').split('?')[0] ?? '';
    const m = /^\/hop\/(\d+)$/.exec(path);
    if (m) {
      // /hop/N is N redirects away from the file.
      const left = Number(m[1]);
      return left === 0 ? file(req, res, i) : redirect(`/hop/${left - 1}`)(req, res, i);
    }
    const target = locationFor(path);
    if (target !== undefined) return redirect(target)(req, res, i);
    return routes({ '/disk.raw': file })(req, res, i);
  };
  allowed = await startServer(hops, '127.0.0.1');
  forbidden4 = await startServer(fileHandler(bytes, { ranges: true, etag: '"v1"' }), '127.0.0.2');
  forbidden6 = await startServer(fileHandler(bytes, { ranges: true, etag: '"v1"' }), '::1');
});

afterAll(async () => {
  await Promise.all([allowed, forbidden4, forbidden6].map((s) => s?.close()));
  await cleanup();
});

async function refusal(url: string, policy: UrlPolicy): Promise<string> {
  const err = await openUrlSource(url, policy, { stagingPath: stagingPath() }).then(
    async (opened) => {
      await opened.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  if (err === undefined) return 'ok';
  if (err instanceof UrlRefusedError) return err.reason;
  throw err;
}

describe('SSRF on the request path', () => {
  it('refuses a loopback server without an allow entry, before connecting', async () => {
    const before = allowed.requests.length;
    expect(await refusal(`${allowed.origin}/disk.raw`, DEFAULT_URL_POLICY)).toBe('port');
    const portOpen = { ...DEFAULT_URL_POLICY, allowedPorts: [allowed.port] };
    expect(await refusal(`${allowed.origin}/disk.raw`, portOpen)).toBe('loopback');
    expect(await refusal(`http://localhost:${allowed.port}/disk.raw`, portOpen)).toBe('loopback');
    expect(await refusal(`http://[::1]:${forbidden6.port}/disk.raw`, { ...DEFAULT_URL_POLICY, allowedPorts: [forbidden6.port] })).toBe('loopback');
    expect(allowed.requests.length).toBe(before);
    expect(forbidden6.requests.length).toBe(0);
  });

  it('accepts it when URL_IMPORT_ALLOW names the address, a CIDR or the host', async () => {
    for (const allow of [['127.0.0.1'], ['127.0.0.0/8'], [`127.0.0.1:${allowed.port}`], ['localhost']]) {
      const url = allow[0] === 'localhost' ? `http://localhost:${allowed.port}/disk.raw` : `${allowed.origin}/disk.raw`;
      const opened = await openUrlSource(url, { ...DEFAULT_URL_POLICY, allow }, { stagingPath: stagingPath() });
      try {
        expect(opened.mode).toBe('range');
        expect(Buffer.from(await opened.source.read(0, bytes.length)).equals(bytes)).toBe(true);
      } finally {
        await opened.close();
      }
    }
    // Host and SNI keep the name while the connection goes to the checked address.
    expect(allowed.requests.at(-1)?.host).toBe(`localhost:${allowed.port}`);
  });

  it('refuses URL forms before any request: user-info, schemes, numeric IPv4 spellings', async () => {
    const before = allowed.requests.length;
    const port = allowed.port;
    const table: Array<[string, string]> = [
      [`http://user:pw@127.0.0.1:${port}/disk.raw`, 'userinfo'],
      [`http://user@127.0.0.1:${port}/disk.raw`, 'userinfo'],
      [`http://@127.0.0.1:${port}/disk.raw`, 'userinfo'],
      ['file:///etc/passwd', 'scheme'],
      [`ftp://127.0.0.1:${port}/disk.raw`, 'scheme'],
      [`gopher://127.0.0.1:${port}/_GET%20/disk.raw`, 'scheme'],
      ['data:application/octet-stream;base64,UUZJ+w==', 'scheme'],
      [`http://2130706433:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://0x7f.1:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://0x7f000001:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://017700000001:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://0177.0.0.1:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://127.1:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://[::ffff:127.0.0.1]:${port}/disk.raw`, 'ipv4-mapped'],
      [`http://127.0.0.2:${forbidden4.port}/disk.raw`, 'loopback'],
    ];
    for (const [url, reason] of table) expect([url, await refusal(url, allowPolicy)]).toEqual([url, reason]);
    expect(allowed.requests.length).toBe(before);
    expect(forbidden4.requests.length).toBe(0);
  });

  it('re-checks every redirect: an allowed server cannot send us to a forbidden one', async () => {
    const port = allowed.port;
    const table: Array<[string, string]> = [
      [`http://127.0.0.2:${forbidden4.port}/disk.raw`, 'loopback'],
      [`http://[::1]:${forbidden6.port}/disk.raw`, 'loopback'],
      [`http://localhost:${port}/disk.raw`, 'ok'], // localhost is 127.0.0.1 here, which is allowed
      ['http://169.254.169.254/latest/meta-data/iam/security-credentials/', 'link-local'],
      ['http://10.0.0.1/', 'private'],
      ['http://[fd00:ec2::254]/', 'unique-local'],
      [`http://[::ffff:127.0.0.2]:${forbidden4.port}/disk.raw`, 'ipv4-mapped'],
      [`http://0x7f.1:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://2130706433:${port}/disk.raw`, 'ipv4-spelling'],
      [`//0x7f.0.0.1:${port}/disk.raw`, 'ipv4-spelling'],
      [`http://user:pw@127.0.0.1:${port}/disk.raw`, 'userinfo'],
      ['file:///etc/passwd', 'scheme'],
      [`gopher://127.0.0.1:${port}/`, 'scheme'],
      ['/disk.raw', 'ok'],
    ];
    for (const [location, reason] of table) {
      locationFor = (path) => (path === '/go' ? location : undefined);
      const outcome = await refusal(`${allowed.origin}/go`, allowPolicy);
      expect([location, outcome]).toEqual([location, reason]);
    }
    expect(forbidden4.requests.length).toBe(0);
    expect(forbidden6.requests.length).toBe(0);
  });

  it(`follows at most maxRedirects redirects (${DEFAULT_URL_POLICY.maxRedirects} by default)`, async () => {
    expect(await refusal(`${allowed.origin}/hop/5`, allowPolicy)).toBe('ok');
    const before = allowed.requests.length;
    expect(await refusal(`${allowed.origin}/hop/6`, allowPolicy)).toBe('too-many-redirects');
    expect(allowed.requests.length - before).toBe(6); // the original and five redirects, not the sixth
    expect(await refusal(`${allowed.origin}/hop/2`, { ...allowPolicy, maxRedirects: 2 })).toBe('ok');
    expect(await refusal(`${allowed.origin}/hop/3`, { ...allowPolicy, maxRedirects: 2 })).toBe('too-many-redirects');
    expect(await refusal(`${allowed.origin}/hop/0`, { ...allowPolicy, maxRedirects: 0 })).toBe('ok');
    expect(await refusal(`${allowed.origin}/hop/1`, { ...allowPolicy, maxRedirects: 0 })).toBe('too-many-redirects');
  });

  it('connects to the checked address: no second DNS lookup for a rebinding name', async () => {
    // A name that resolves nowhere: if anything looked it up again, the request would fail.
    const checked = { url: new URL(`http://rebind.invalid:${allowed.port}/disk.raw`), address: '127.0.0.1', family: 4 as const };
    const exchange = await sendRequest(checked, allowPolicy);
    const body: Buffer[] = [];
    for await (const chunk of exchange.body()) body.push(chunk);
    expect(exchange.status).toBe(200);
    expect(Buffer.concat(body).equals(bytes)).toBe(true);
    expect(allowed.requests.at(-1)?.host).toBe(`rebind.invalid:${allowed.port}`);
    // The redirect loop re-checks (and resolves) the next hop: a Location on that
    // name is looked up, not trusted.
    locationFor = (path) => (path === '/go' ? `http://rebind.invalid:${allowed.port}/disk.raw` : undefined);
    const start = { url: new URL(`${allowed.origin}/go`), address: '127.0.0.1', family: 4 as const };
    await expect(fetchFollowing(start, allowPolicy)).rejects.toMatchObject({ code: 'URL_FETCH_FAILED' });
  });
});
