import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { checkListenExposure, CONFIG_VARIABLES, ConfigError, isLoopbackHost, loadConfig, parseByteSize } from '../../src/config.js';
import { parse } from 'yaml';
import { execFile } from 'node:child_process';
import { CLI } from '../helpers/cli.js';

describe('configuration', () => {
  it('has documented defaults', () => {
    const c = loadConfig({});
    expect(c).toMatchObject({
      host: '127.0.0.1',
      port: 8080,
      redisUrl: undefined,
      dataDir: resolve('./data'),
      apiTokens: [],
      workerConcurrency: 1,
      maxUploadBytes: 64 * 2 ** 30,
      maxVirtualSize: 4 * 2 ** 40,
      urlImport: { allow: [], ports: [80, 443], connectTimeoutMs: 10_000, idleTimeoutMs: 30_000, maxRedirects: 5 },
      retention: { resultTtlSeconds: 86400 },
      queueName: 'diskconv',
      logLevel: 'info',
    });
  });

  it('reads every variable', () => {
    const c = loadConfig({
      HOST: '0.0.0.0',
      PORT: '9000',
      REDIS_URL: 'redis://redis:6379/2',
      DATA_DIR: '/srv/diskconv',
      API_TOKENS: ' aaaaaaaaaaaaaaaa , bbbbbbbbbbbbbbbb ',
      WORKER_CONCURRENCY: '4',
      MAX_UPLOAD_BYTES: '10GiB',
      MAX_VIRTUAL_SIZE: '2T',
      URL_IMPORT_ALLOW: '127.0.0.1,10.0.0.0/8',
      URL_IMPORT_PORTS: '80,443,8080',
      URL_CONNECT_TIMEOUT_MS: '500',
      URL_IDLE_TIMEOUT_MS: '600',
      RESULT_TTL_SECONDS: '60',
      RATE_LIMIT_JOBS: '5',
      LOG_LEVEL: 'debug',
      QUEUE_NAME: 'q-1',
      WORKER_READ_BYTES_PER_SECOND: '4M',
    });
    expect(c).toMatchObject({
      host: '0.0.0.0',
      port: 9000,
      redisUrl: 'redis://redis:6379/2',
      dataDir: '/srv/diskconv',
      apiTokens: ['aaaaaaaaaaaaaaaa', 'bbbbbbbbbbbbbbbb'],
      workerConcurrency: 4,
      maxUploadBytes: 10 * 2 ** 30,
      maxVirtualSize: 2 * 2 ** 40,
      urlImport: { allow: ['127.0.0.1', '10.0.0.0/8'], ports: [80, 443, 8080], connectTimeoutMs: 500, idleTimeoutMs: 600 },
      retention: { resultTtlSeconds: 60 },
      rateLimit: { jobs: 5 },
      logLevel: 'debug',
      queueName: 'q-1',
      worker: { readBytesPerSecond: 4 * 2 ** 20 },
    });
  });

  it.each([
    ['PORT', 'eighty'],
    ['PORT', '70000'],
    ['REDIS_URL', 'http://localhost:6379'],
    ['API_TOKENS', 'short'],
    ['WORKER_CONCURRENCY', '0'],
    ['MAX_UPLOAD_BYTES', '10 parsecs'],
    ['MAX_VIRTUAL_SIZE', '-1'],
    ['URL_IMPORT_ALLOW', 'not a cidr/99'],
    ['URL_IMPORT_PORTS', '80,http'],
    ['LOG_LEVEL', 'loud'],
    ['QUEUE_NAME', 'a/b'],
    ['TRUST_PROXY', 'maybe'],
  ])('refuses %s=%s with a message naming the variable', (name, value) => {
    expect(() => loadConfig({ [name]: value })).toThrow(ConfigError);
    expect(() => loadConfig({ [name]: value })).toThrow(new RegExp(name));
  });

  it('is documented: every variable has a row in the README table', async () => {
    const readme = await readFile(new URL('../../README.md', import.meta.url), 'utf8');
    const missing = CONFIG_VARIABLES.filter((v) => !readme.includes(`| \`${v}\` |`));
    expect(missing).toEqual([]);
  });

  it('reads OUTPUT_HASHES and the Glance variables', () => {
    expect(loadConfig({}).outputHashes).toEqual([]);
    expect(loadConfig({}).glance).toBeUndefined();
    expect(loadConfig({ OUTPUT_HASHES: 'MD5, sha512,sha256,md5' }).outputHashes).toEqual(['md5', 'sha512']);
    expect(() => loadConfig({ OUTPUT_HASHES: 'crc32' })).toThrow(/OUTPUT_HASHES/);
    expect(loadConfig({ GLANCE_URL: 'http://glance:9292/v2/', GLANCE_TOKEN: 't', GLANCE_RBD_POOLS: 'images, vms' }).glance).toMatchObject({
      url: 'http://glance:9292',
      auth: { kind: 'token', token: 't' },
      method: 'direct',
      rbdPools: ['images', 'vms'],
      publishAttempts: 5,
      connectTimeoutMs: 10_000,
      idleTimeoutMs: 30_000,
    });
    const keystone = loadConfig({
      GLANCE_URL: 'https://glance.example',
      OS_AUTH_URL: 'https://keystone.example/v3',
      OS_USERNAME: 'diskconv',
      OS_PASSWORD: 'secret',
      OS_PROJECT_NAME: 'images',
      GLANCE_METHOD: 'import',
    }).glance;
    expect(keystone).toMatchObject({ method: 'import', auth: { kind: 'password', username: 'diskconv', projectName: 'images', userDomainName: 'Default', projectDomainName: 'Default' } });
    expect(() => loadConfig({ GLANCE_URL: 'http://glance:9292' })).toThrow(/GLANCE_TOKEN, or OS_AUTH_URL/);
    expect(() => loadConfig({ GLANCE_URL: 'glance:9292', GLANCE_TOKEN: 't' })).toThrow(/GLANCE_URL/);
    expect(() => loadConfig({ GLANCE_URL: 'http://g', GLANCE_TOKEN: 't', GLANCE_METHOD: 'copy' })).toThrow(/GLANCE_METHOD/);
  });

  it('parses byte sizes in binary units', () => {
    expect(parseByteSize('1024')).toBe(1024);
    expect(parseByteSize('1k')).toBe(1024);
    expect(parseByteSize('64G')).toBe(64 * 2 ** 30);
    expect(parseByteSize('1.5MiB')).toBe(1.5 * 2 ** 20);
    expect(parseByteSize('1TB')).toBe(2 ** 40);
    expect(parseByteSize('lots')).toBeUndefined();
  });

  it('stops start-up with the variable named', async () => {
    const run = (env: Record<string, string>) =>
      new Promise<{ code: number; stderr: string }>((done) => {
        execFile(process.execPath, [CLI, 'serve'], { env: { PATH: process.env.PATH ?? '', ...env }, timeout: 20_000 }, (err, _stdout, stderr) =>
          done({ code: err ? Number(err.code ?? 1) : 0, stderr }),
        );
      });
    const badPort = await run({ PORT: 'abc', REDIS_URL: 'redis://127.0.0.1:1' });
    expect(badPort.code).toBe(1);
    expect(badPort.stderr).toMatch(/CONFIG_INVALID: invalid configuration: PORT: /);
    const noRedis = await run({});
    expect(noRedis.code).toBe(1);
    expect(noRedis.stderr).toMatch(/REDIS_URL is required/);
  });

  describe('ALLOW_ANONYMOUS: no open API on a reachable address by accident (issue 11)', () => {
    it('tells loopback from the rest', () => {
      for (const h of ['127.0.0.1', '127.3.2.1', '::1', '[::1]', 'localhost', 'LOCALHOST.', '::ffff:127.0.0.1']) expect(isLoopbackHost(h), h).toBe(true);
      for (const h of ['0.0.0.0', '::', '[::]', '10.0.0.5', '192.168.1.2', 'api.example.org', '128.0.0.1', '::ffff:10.0.0.1', '127.0.0.1.example.org']) expect(isLoopbackHost(h), h).toBe(false);
    });

    it('refuses a non-loopback HOST without API_TOKENS unless ALLOW_ANONYMOUS=true', () => {
      expect(loadConfig({}).allowAnonymous).toBe(false);
      expect(() => checkListenExposure(loadConfig({ HOST: '0.0.0.0' }))).toThrow(ConfigError);
      expect(() => checkListenExposure(loadConfig({ HOST: '0.0.0.0' }))).toThrow(/HOST=0\.0\.0\.0.*API_TOKENS.*ALLOW_ANONYMOUS=true/);
      expect(() => checkListenExposure(loadConfig({ HOST: '::' }))).toThrow(ConfigError);
      expect(() => checkListenExposure(loadConfig({ HOST: '0.0.0.0', ALLOW_ANONYMOUS: 'false' }))).toThrow(ConfigError);
      expect(() => checkListenExposure(loadConfig({ HOST: '0.0.0.0', ALLOW_ANONYMOUS: 'true' }))).not.toThrow();
      expect(() => checkListenExposure(loadConfig({ HOST: '0.0.0.0', API_TOKENS: 'aaaaaaaaaaaaaaaa' }))).not.toThrow();
      expect(() => checkListenExposure(loadConfig({}))).not.toThrow(); // 127.0.0.1 by default
      expect(() => checkListenExposure(loadConfig({ HOST: '::1' }))).not.toThrow();
      expect(() => loadConfig({ ALLOW_ANONYMOUS: 'perhaps' })).toThrow(/ALLOW_ANONYMOUS/);
    });

    it('serve stops at start-up with the message, before it opens anything; ALLOW_ANONYMOUS=true lets it start', async () => {
      const run = (env: Record<string, string>, timeout = 20_000) =>
        new Promise<{ code: number | string; stderr: string }>((done) => {
          execFile(process.execPath, [CLI, 'serve'], { env: { PATH: process.env.PATH ?? '', ...env }, timeout }, (err, _stdout, stderr) =>
            done({ code: err ? (err.killed ? 'killed' : Number(err.code ?? 1)) : 0, stderr }),
          );
        });
      // Redis is unreachable on purpose: the refusal comes first, without waiting for it.
      const open = await run({ HOST: '0.0.0.0', PORT: '0', REDIS_URL: 'redis://127.0.0.1:1' });
      expect(open.code).toBe(1);
      expect(open.stderr).toMatch(/CONFIG_INVALID: invalid configuration: HOST=0\.0\.0\.0 is reachable from other hosts and API_TOKENS is empty/);
      expect(open.stderr).toMatch(/ALLOW_ANONYMOUS=true/);
      // With it, start-up goes past the check (and then waits on the unreachable Redis until killed).
      const allowed = await run({ HOST: '0.0.0.0', PORT: '0', REDIS_URL: 'redis://127.0.0.1:1', ALLOW_ANONYMOUS: 'true', LOG_LEVEL: 'silent' }, 4000);
      expect(allowed.stderr).not.toMatch(/CONFIG_INVALID/);
    });

    it('docker-compose publishes the API only with a token the operator sets, never a literal one', async () => {
      const compose = parse(await readFile(new URL('../../docker-compose.yml', import.meta.url), 'utf8')) as {
        services: Record<string, { command?: string[]; environment?: Record<string, string> }>;
      };
      const apis = Object.entries(compose.services).filter(([, svc]) => svc.command?.[0] === 'serve');
      expect(apis.length).toBeGreaterThan(0);
      for (const [name, svc] of apis) {
        const env = svc.environment ?? {};
        expect(env.HOST, name).toBe('0.0.0.0');
        // `${API_TOKENS:?message}`: compose refuses to start without it, and says where to set it.
        expect(env.API_TOKENS, name).toMatch(/^\$\{API_TOKENS:\?[^}]*\.env[^}]*\}$/);
        expect(env.ALLOW_ANONYMOUS ?? 'false', name).toMatch(/^(false|)$/);
      }
    });
  });
});
