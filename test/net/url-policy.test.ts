import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../../src/engine/errors.js';
import { UrlFetchError, UrlRefusedError } from '../../src/net/errors.js';
import {
  DEFAULT_URL_POLICY,
  checkRedirect,
  checkUrl,
  isForbiddenAddress,
  parseAllowList,
  parsePortList,
  validateUrlPolicy,
  type UrlPolicy,
} from '../../src/net/url-policy.js';

const policy = (over: Partial<UrlPolicy> = {}): UrlPolicy => ({ ...DEFAULT_URL_POLICY, ...over });

/** 'ok' or the UrlRefusedError reason. */
async function outcome(url: string, p: UrlPolicy = policy()): Promise<string> {
  try {
    await checkUrl(url, p);
    return 'ok';
  } catch (err) {
    if (err instanceof UrlRefusedError) {
      expect(err.code).toBe('URL_REFUSED');
      expect(err.deterministic).toBe(true);
      return err.reason;
    }
    throw err;
  }
}

describe('isForbiddenAddress', () => {
  const table: Array<[string, string | undefined]> = [
    // IPv4
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['10.0.0.1', 'private'],
    ['10.255.255.255', 'private'],
    ['172.16.0.1', 'private'],
    ['172.31.255.255', 'private'],
    ['172.32.0.1', undefined],
    ['172.15.255.255', undefined],
    ['192.168.0.1', 'private'],
    ['169.254.169.254', 'link-local'],
    ['169.254.0.1', 'link-local'],
    ['100.64.0.1', 'cgnat'],
    ['100.127.255.255', 'cgnat'],
    ['100.128.0.0', undefined],
    ['100.63.255.255', undefined],
    ['0.0.0.0', 'unspecified'],
    ['0.1.2.3', 'this-network'],
    ['255.255.255.255', 'broadcast'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['240.0.0.1', 'reserved'],
    ['192.0.0.170', 'reserved'],
    ['192.88.99.1', 'reserved'],
    ['198.18.0.1', 'benchmarking'],
    ['198.19.255.255', 'benchmarking'],
    ['198.20.0.1', undefined],
    ['192.0.2.1', 'documentation'],
    ['198.51.100.1', 'documentation'],
    ['203.0.113.1', 'documentation'],
    ['8.8.8.8', undefined],
    ['1.1.1.1', undefined],
    // IPv6
    ['::1', 'loopback'],
    ['::', 'unspecified'],
    ['0:0:0:0:0:0:0:1', 'loopback'],
    ['::ffff:127.0.0.1', 'ipv4-mapped'],
    ['::ffff:7f00:1', 'ipv4-mapped'],
    ['::ffff:8.8.8.8', 'ipv4-mapped'],
    ['::127.0.0.1', 'ipv4-compatible'],
    ['::8.8.8.8', 'ipv4-compatible'],
    ['fc00::1', 'unique-local'],
    ['fd12:3456:789a::1', 'unique-local'],
    ['fe80::1', 'link-local'],
    ['fe80::1%eth0', 'link-local'],
    ['febf:ffff::1', 'link-local'],
    ['fec0::1', 'site-local'],
    ['ff02::1', 'multicast'],
    ['ff05::1:3', 'multicast'],
    ['64:ff9b::7f00:1', 'nat64:loopback'],
    ['64:ff9b::a9fe:a9fe', 'nat64:link-local'],
    ['64:ff9b::10.0.0.1', 'nat64:private'],
    ['64:ff9b::808:808', undefined],
    ['64:ff9b:1::1', 'nat64-local'],
    ['2002:7f00:1::1', '6to4:loopback'],
    ['2002:a9fe:a9fe::', '6to4:link-local'],
    ['2002:c0a8:101::1', '6to4:private'],
    ['2002:808:808::1', undefined],
    ['2001::1', 'teredo'],
    ['2001:0:4136:e378:8000:63bf:3fff:fdd2', 'teredo'],
    ['2001:2::1', 'benchmarking'],
    ['2001:db8::1', 'documentation'],
    ['3fff::1', 'documentation'],
    ['100::1', 'reserved'],
    ['::2', 'ipv4-compatible'],
    ['4000::1', 'reserved'],
    ['2606:4700:4700::1111', undefined],
    ['2a00:1450:4001:80b::200e', undefined],
    // Not addresses (and not canonical IPv4): never treated as fetchable
    ['127.1', 'not-an-address'],
    ['0x7f.0.0.1', 'not-an-address'],
    ['0177.0.0.1', 'not-an-address'],
    ['2130706433', 'not-an-address'],
    ['localhost', 'not-an-address'],
    ['1::2::3', 'not-an-address'],
    ['', 'not-an-address'],
  ];
  for (const [address, reason] of table) {
    it(`${address || "''"} -> ${reason ?? 'public'}`, () => {
      expect(isForbiddenAddress(address)).toBe(reason);
    });
  }
});

describe('checkUrl: SSRF table with the default policy', () => {
  const table: Array<[string, string]> = [
    // loopback, by name and by address
    ['http://127.0.0.1/', 'loopback'],
    ['http://127.0.0.1:80/disk.qcow2', 'loopback'],
    ['https://127.0.0.1/', 'loopback'],
    ['http://localhost/', 'loopback'],
    ['http://LocalHost/', 'loopback'],
    ['http://[::1]/', 'loopback'],
    ['http://[0:0:0:0:0:0:0:1]/', 'loopback'],
    // numeric IPv4 spellings, refused whatever they stand for
    ['http://2130706433/', 'ipv4-spelling'],
    ['http://0x7f.1/', 'ipv4-spelling'],
    ['http://0x7f000001/', 'ipv4-spelling'],
    ['http://0x7F.0x0.0x0.0x1/', 'ipv4-spelling'],
    ['http://017700000001/', 'ipv4-spelling'],
    ['http://0177.0.0.1/', 'ipv4-spelling'],
    ['http://0177.1/', 'ipv4-spelling'],
    ['http://127.1/', 'ipv4-spelling'],
    ['http://127.0.1/', 'ipv4-spelling'],
    ['http://127.000.000.001/', 'ipv4-spelling'],
    ['http://127.0.0.1./', 'ipv4-spelling'],
    ['http://%31%32%37.0.0.1/', 'ipv4-spelling'],
    ['http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/', 'ipv4-spelling'],
    ['http://0/', 'ipv4-spelling'],
    ['http://134744072/', 'ipv4-spelling'], // 8.8.8.8, public, but still a numeric spelling
    ['http://0x08080808/', 'ipv4-spelling'],
    ['http:\\\\0x7f.1\\', 'ipv4-spelling'],
    ['http:0x7f.1/', 'ipv4-spelling'],
    ['  http://0x7f.1/\n', 'ipv4-spelling'],
    // address classes
    ['http://0.0.0.0/', 'unspecified'],
    ['http://0.1.2.3/', 'this-network'],
    ['http://10.0.0.1/', 'private'],
    ['http://172.16.0.1/', 'private'],
    ['http://172.31.255.255/', 'private'],
    ['http://192.168.1.1/', 'private'],
    ['http://169.254.169.254/latest/meta-data/', 'link-local'],
    ['http://100.64.0.1/', 'cgnat'],
    ['http://255.255.255.255/', 'broadcast'],
    ['http://224.0.0.1/', 'multicast'],
    ['http://240.0.0.1/', 'reserved'],
    ['http://198.18.0.1/', 'benchmarking'],
    ['http://192.0.2.1/', 'documentation'],
    ['http://[::]/', 'unspecified'],
    ['http://[::ffff:127.0.0.1]/', 'ipv4-mapped'],
    ['http://[::ffff:7f00:1]/', 'ipv4-mapped'],
    ['http://[::ffff:169.254.169.254]/', 'ipv4-mapped'],
    ['http://[::ffff:8.8.8.8]/', 'ipv4-mapped'],
    ['http://[::127.0.0.1]/', 'ipv4-compatible'],
    ['http://[fc00::1]/', 'unique-local'],
    ['http://[fd00:ec2::254]/', 'unique-local'],
    ['http://[fe80::1]/', 'link-local'],
    ['http://[ff02::1]/', 'multicast'],
    ['http://[64:ff9b::7f00:1]/', 'nat64:loopback'],
    ['http://[64:ff9b::a9fe:a9fe]/', 'nat64:link-local'],
    ['http://[2002:7f00:1::1]/', '6to4:loopback'],
    ['http://[2002:a00:1::1]/', '6to4:private'],
    ['http://[2001::1]/', 'teredo'],
    // public literals pass (no DNS needed)
    ['http://8.8.8.8/', 'ok'],
    ['https://8.8.8.8/disk.qcow2?sig=abc', 'ok'],
    ['http://172.32.0.1/', 'ok'],
    ['http://100.128.0.1/', 'ok'],
    ['http://[2606:4700:4700::1111]/', 'ok'],
    ['http://[64:ff9b::808:808]/', 'ok'],
    ['http://[2002:808:808::1]/', 'ok'],
    ['HTTP://8.8.8.8:80/', 'ok'],
    ['https://8.8.8.8:443/', 'ok'],
    ['http://8.8.8.8:443/', 'ok'],
    ['http://8.8.8.8\\@127.0.0.1/', 'ok'], // WHATWG: '\' ends the host; the request goes to 8.8.8.8
    ['http://127.0.0.1#@8.8.8.8/', 'loopback'], // the fragment does not move the host
    ['http://127.0.0.1?@8.8.8.8/', 'loopback'],
    // schemes
    ['file:///etc/passwd', 'scheme'],
    ['file://localhost/etc/passwd', 'scheme'],
    ['ftp://8.8.8.8/disk.qcow2', 'scheme'],
    ['gopher://8.8.8.8:70/_GET', 'scheme'],
    ['data:application/octet-stream;base64,AAAA', 'scheme'],
    ['javascript:alert(1)', 'scheme'],
    ['ws://8.8.8.8/', 'scheme'],
    ['dict://8.8.8.8:11211/stat', 'scheme'],
    // user-info
    ['http://user:pass@8.8.8.8/', 'userinfo'],
    ['http://user@8.8.8.8/', 'userinfo'],
    ['http://@8.8.8.8/', 'userinfo'],
    ['http://:@8.8.8.8/', 'userinfo'],
    ['http://8.8.8.8@127.0.0.1/', 'userinfo'],
    ['http://8.8.8.8:80@127.0.0.1/', 'userinfo'],
    // ports
    ['http://8.8.8.8:8080/', 'port'],
    ['http://8.8.8.8:22/', 'port'],
    ['https://8.8.8.8:6379/', 'port'],
    ['http://8.8.8.8:0/', 'port'],
    // not URLs
    ['not a url', 'invalid'],
    ['http://', 'invalid'],
    ['http://1.2.3.4.5/', 'invalid'],
    ['http://8.8.8.8:65536/', 'invalid'],
    ['//8.8.8.8/', 'invalid'],
    [`http://8.8.8.8/${'a'.repeat(17000)}`, 'too-long'],
  ];
  for (const [url, expected] of table) {
    it(`${JSON.stringify(url.length > 80 ? `${url.slice(0, 40)}...` : url)} -> ${expected}`, async () => {
      expect(await outcome(url)).toBe(expected);
    });
  }

  it('returns the address to connect to', async () => {
    const checked = await checkUrl('https://8.8.8.8/disk.qcow2', policy());
    expect(checked).toMatchObject({ address: '8.8.8.8', family: 4 });
    expect(checked.url.href).toBe('https://8.8.8.8/disk.qcow2');
    const v6 = await checkUrl('http://[2606:4700:4700::1111]/', policy());
    expect(v6).toMatchObject({ address: '2606:4700:4700::1111', family: 6 });
  });

  it('reports a host that does not exist as URL_FETCH_FAILED, not as refused', async () => {
    const err = await checkUrl('http://no-such-host.invalid/', policy()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UrlFetchError);
    expect((err as UrlFetchError).code).toBe('URL_FETCH_FAILED');
  });
});

describe('checkUrl: allow entries and ports', () => {
  const table: Array<[allow: string[], url: string, expected: string]> = [
    [['127.0.0.1'], 'http://127.0.0.1/', 'ok'],
    [['127.0.0.1'], 'http://127.0.0.1:8080/', 'ok'], // an allowed address may use any port
    [['127.0.0.1'], 'http://localhost:8080/', 'ok'], // localhost resolves to the allowed address
    [['127.0.0.1'], 'http://127.0.0.2/', 'loopback'],
    [['127.0.0.1'], 'http://0x7f.1/', 'ipv4-spelling'], // spelling rule holds for allowed addresses too
    [['127.0.0.1'], 'http://2130706433/', 'ipv4-spelling'],
    [['127.0.0.1'], 'http://[::1]/', 'loopback'],
    [['127.0.0.1'], 'http://[::ffff:127.0.0.1]/', 'ipv4-mapped'],
    [['127.0.0.1'], 'http://8.8.8.8:8080/', 'port'], // the exemption is for allowed destinations only
    [['127.0.0.1'], 'http://user@127.0.0.1/', 'userinfo'],
    [['127.0.0.1'], 'file:///etc/passwd', 'scheme'],
    [['127.0.0.0/8'], 'http://127.0.0.2:9000/', 'ok'],
    [['127.0.0.0/8'], 'http://10.0.0.1/', 'private'],
    [['10.0.0.0/8', '192.168.0.0/16'], 'http://10.1.2.3/', 'ok'],
    [['10.0.0.0/8', '192.168.0.0/16'], 'http://192.168.7.7:8443/', 'ok'],
    [['10.0.0.0/8', '192.168.0.0/16'], 'http://172.16.0.1/', 'private'],
    [['10.0.0.1/8'], 'http://10.200.0.1/', 'ok'], // host bits are masked
    [['localhost'], 'http://localhost:8080/', 'ok'],
    [['LOCALHOST.'], 'http://localhost/', 'ok'],
    [['localhost'], 'http://127.0.0.1/', 'loopback'], // the name is allowed, not its address
    [['127.0.0.1:8080'], 'http://127.0.0.1:8080/', 'ok'],
    [['127.0.0.1:8080'], 'http://127.0.0.1:8081/', 'loopback'],
    [['127.0.0.1:8080'], 'http://127.0.0.1/', 'loopback'],
    [['localhost:8080'], 'http://localhost:8080/', 'ok'],
    [['localhost:8080'], 'http://localhost:9090/', 'loopback'],
    [['::1'], 'http://[::1]:8080/', 'ok'],
    [['[::1]:8080'], 'http://[::1]:8080/', 'ok'],
    [['[::1]:8080'], 'http://[::1]:8081/', 'loopback'],
    [['fd00::/8'], 'http://[fd00::5]/', 'ok'],
    [['fd00::/8'], 'http://[fc00::5]/', 'unique-local'],
    [['169.254.169.254'], 'http://169.254.169.254/latest/meta-data/', 'ok'],
    [['8.8.8.8'], 'http://8.8.8.8:8080/', 'ok'], // allow-listing a public address opens its ports
  ];
  for (const [allow, url, expected] of table) {
    it(`allow ${JSON.stringify(allow)}: ${url} -> ${expected}`, async () => {
      expect(await outcome(url, policy({ allow }))).toBe(expected);
    });
  }

  it('honours allowedPorts', async () => {
    expect(await outcome('http://8.8.8.8:8080/', policy({ allowedPorts: [8080] }))).toBe('ok');
    expect(await outcome('http://8.8.8.8/', policy({ allowedPorts: [8080] }))).toBe('port');
    expect(await outcome('http://127.0.0.1:8080/', policy({ allowedPorts: [8080] }))).toBe('loopback');
  });

  it('re-checks redirect targets relative to the URL that answered', async () => {
    const base = new URL('https://8.8.8.8/a/b');
    const p = policy();
    await expect(checkRedirect('/c', base, p)).resolves.toMatchObject({ address: '8.8.8.8' });
    await expect(checkRedirect('https://1.1.1.1/x', base, p)).resolves.toMatchObject({ address: '1.1.1.1' });
    const reasons = async (location: string): Promise<string> =>
      checkRedirect(location, base, p).then(
        () => 'ok',
        (e: unknown) => (e as UrlRefusedError).reason,
      );
    expect(await reasons('//127.0.0.1/x')).toBe('loopback');
    expect(await reasons('\\\\0x7f.1\\x')).toBe('ipv4-spelling');
    expect(await reasons('https:0x7f.1/x')).toBe('ok'); // same scheme and no slashes: a relative path on 8.8.8.8
    const fromHttp = (location: string): Promise<string> =>
      checkRedirect(location, new URL('http://8.8.8.8/a/b'), p).then(
        () => 'ok',
        (e: unknown) => (e as UrlRefusedError).reason,
      );
    expect(await fromHttp('https:0x7f.1/x')).toBe('ipv4-spelling'); // another scheme: an authority follows
    expect(await fromHttp('http:0x7f.1/x')).toBe('ok');
    expect(await fromHttp('https://8.8.8.8/x')).toBe('ok'); // upgrade is fine
    expect(await reasons('http://8.8.8.8/x')).toBe('scheme-downgrade');
    expect(await reasons('file:///etc/passwd')).toBe('scheme');
    expect(await reasons('https://u:p@8.8.8.8/')).toBe('userinfo');
    expect(await reasons('//[::1]/')).toBe('loopback');
  });
});

describe('policy configuration', () => {
  it('parses URL_IMPORT_ALLOW and URL_IMPORT_PORTS', () => {
    expect(parseAllowList('127.0.0.1, 10.0.0.0/8 mirror.internal:8080,[::1]:8443  fd00::/8')).toEqual([
      '127.0.0.1',
      '10.0.0.0/8',
      'mirror.internal:8080',
      '[::1]:8443',
      'fd00::/8',
    ]);
    expect(parseAllowList('')).toEqual([]);
    expect(parsePortList('80,443 8080')).toEqual([80, 443, 8080]);
  });

  for (const bad of ['http://x/', '0x7f.1', '127.1', '2130706433', '10.0.0.0/33', 'host:99999', 'host:0', '[::1', '[::1]x', 'a b/c', '1::2::3/64']) {
    it(`refuses allow entry ${JSON.stringify(bad)} naming the variable`, () => {
      expect(() => parseAllowList(bad)).toThrowError(InvalidArgumentError);
      expect(() => parseAllowList(bad)).toThrowError(/URL_IMPORT_ALLOW/);
    });
  }

  it('refuses bad ports and policies', () => {
    expect(() => parsePortList('80,http')).toThrowError(/URL_IMPORT_PORTS/);
    expect(() => parsePortList('')).toThrowError(/URL_IMPORT_PORTS/);
    expect(() => validateUrlPolicy(policy({ idleTimeoutMs: 0 }))).toThrowError(/idleTimeoutMs/);
    expect(() => validateUrlPolicy(policy({ maxBytes: -1 }))).toThrowError(/maxBytes/);
    expect(() => validateUrlPolicy(policy({ allowedPorts: [70000] }))).toThrowError(/allowedPorts/);
    expect(() => validateUrlPolicy(policy({ maxRedirects: 1.5 }))).toThrowError(/maxRedirects/);
    expect(() => validateUrlPolicy(policy())).not.toThrow();
  });
});
