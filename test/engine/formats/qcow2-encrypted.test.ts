/**
 * Encrypted qcow2 with its key: LUKS with every cipher/mode/ivgen/hash qemu-img
 * here can make and node:crypto can decrypt, and legacy AES; each converted by
 * the CLI with --passphrase-file must equal qemu-img's own decryption
 * (`qemu-img convert --object secret ... --image-opts`), and `info` must equal
 * qemu-img's without a key. The fixtures are written by qemu-io at scattered
 * guest offsets, so host and guest sector numbers differ: an IV taken from the
 * wrong one fails.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { FileSource, LimitExceededError, openImage } from '../../../src/engine/index.js';

const MiB = 2 ** 20;
const PASSPHRASE = 'correct horse battery staple \u00e4';
const SIZE = 3 * MiB + 512 * 7;

let dir: string;
let cleanup: () => Promise<void>;
let passFile: string;
let wrongFile: string;

function runAllowingFailure(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

const secret = (pw = PASSPHRASE) => ['--object', `secret,id=sec0,data=${pw}`];
const imageOpts = (path: string) => ['--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`];

/**
 * qemu-img times its key derivation and can fail to on a busy machine
 * ("Unable to get accurate CPU usage"): retry with a back-off (see e285a49).
 */
async function retryQemu(args: string[]): Promise<{ code: number; stderr: string }> {
  let res = { code: 1, stderr: '' };
  for (let attempt = 0; attempt < 6; attempt++) {
    if (attempt > 0) await new Promise((done) => setTimeout(done, 250 * attempt));
    res = await runAllowingFailure('qemu-img', args);
    if (res.code === 0 || !/accurate CPU usage|Unable to get/i.test(res.stderr)) break;
  }
  return res;
}

/** A LUKS (or AES) qcow2 from mixed content, rewritten by qemu-io so host order differs from guest order. */
async function makeEncrypted(path: string, encryptOptions: string, seed: number): Promise<{ code: number; stderr: string }> {
  const raw = `${path}.src.raw`;
  await writeFile(raw, mixedContent(SIZE, seed));
  const made = await retryQemu(['convert', ...secret(), '-f', 'raw', '-O', 'qcow2', '-o', `${encryptOptions},encrypt.key-secret=sec0`, raw, path]);
  if (made.code !== 0) return made;
  const io = await runAllowingFailure('qemu-io', [
    ...secret(),
    ...imageOpts(path),
    '-c', 'write -P 0x5a 1536k 8k',
    '-c', 'write -P 0xa5 3m 3k',
    '-c', 'write -z 64k 64k',
  ]);
  return { code: io.code, stderr: io.stdout + io.stderr };
}

async function reference(path: string): Promise<string> {
  const out = `${path}.ref.raw`;
  await qemuImg('convert', ...secret(), ...imageOpts(path), '-O', 'raw', out);
  return sha256File(out);
}

interface LuksCase {
  cipher: string;
  mode: string;
  ivgen: string;
  hash: string;
}

const HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'];

/**
 * Each fixture costs qemu-img a PBKDF2 timing run of about a second, so the matrix is
 * every mode x IV generator for aes-256, every mode for aes-128, the modes qemu can
 * make for aes-192 (xts only), and every hash on one cipher.
 */
const cases: LuksCase[] = [];
for (const mode of ['xts', 'cbc', 'ctr', 'ecb']) for (const ivgen of ['plain', 'plain64', 'essiv']) cases.push({ cipher: 'aes-256', mode, ivgen, hash: 'sha256' });
for (const mode of ['xts', 'cbc', 'ctr', 'ecb']) cases.push({ cipher: 'aes-128', mode, ivgen: 'plain64', hash: 'sha1' });
cases.push({ cipher: 'aes-128', mode: 'cbc', ivgen: 'essiv', hash: 'sha512' });
for (const ivgen of ['plain', 'plain64', 'essiv']) cases.push({ cipher: 'aes-192', mode: 'xts', ivgen, hash: 'sha256' });
for (const hash of HASHES) if (hash !== 'sha256' && hash !== 'sha1') cases.push({ cipher: 'aes-256', mode: 'xts', ivgen: 'plain64', hash });

const luksOptions = (c: LuksCase) =>
  `encrypt.format=luks,encrypt.cipher-alg=${c.cipher},encrypt.cipher-mode=${c.mode},encrypt.ivgen-alg=${c.ivgen},encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=${c.hash},encrypt.iter-time=10`;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-crypt-'));
  passFile = join(dir, 'pass');
  await writeFile(passFile, PASSPHRASE);
  wrongFile = join(dir, 'wrong');
  await writeFile(wrongFile, `${PASSPHRASE}\n`); // a trailing newline is part of the passphrase, as qemu's file=
});
afterAll(async () => {
  await cleanup?.();
});

describe('LUKS qcow2: every cipher, mode, IV generator and hash qemu-img makes', () => {

  it.each(cases)('$cipher-$mode-$ivgen hash $hash', async (c) => {
    const name = `${c.cipher}-${c.mode}-${c.ivgen}-${c.hash}`;
    const path = join(dir, `${name}.qcow2`);
    const res = await makeEncrypted(path, luksOptions(c), cases.indexOf(c) + 1);
    expect(res.code, `${name}: ${res.stderr}`).toBe(0);
    const info = await runDiskconv(['info', '--output=json', path]);
    expect(info.code, info.stderr).toBe(0);
    expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(path)));

    const out = join(dir, `${name}.out`);
    const conv = await runDiskconv(['convert', '--passphrase-file', passFile, '-O', 'raw', path, out]);
    expect(conv.stderr).toBe('');
    expect(conv.code).toBe(0);
    expect(await sha256File(out)).toBe(await reference(path));

    const check = await runDiskconv(['check', '--passphrase-file', passFile, '--output=json', path]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  });
});

describe('LUKS qcow2: what is refused', () => {
  let luks: string;
  beforeAll(async () => {
    luks = join(dir, 'default-luks.qcow2');
    const res = await makeEncrypted(luks, 'encrypt.format=luks,encrypt.iter-time=10', 99);
    expect(res.code, res.stderr).toBe(0);
  });

  it('a wrong passphrase is WRONG_PASSPHRASE and leaves no output', async () => {
    const out = join(dir, 'wrong.out');
    const conv = await runDiskconv(['convert', '--passphrase-file', wrongFile, '-O', 'raw', luks, out]);
    expect(conv.code).not.toBe(0);
    expect(conv.stderr).toContain('WRONG_PASSPHRASE:');
    expect(conv.stderr).not.toContain(PASSPHRASE);
    await expect(stat(out)).rejects.toThrow();
    const info = await runDiskconv(['info', '--passphrase-file', wrongFile, luks]);
    expect(info.stderr).toContain('WRONG_PASSPHRASE:');
  });

  it('no passphrase: info and check work, convert is UNSUPPORTED_FEATURE saying a passphrase is needed', async () => {
    const out = join(dir, 'nokey.out');
    const conv = await runDiskconv(['convert', '-O', 'raw', luks, out]);
    expect(conv.code).not.toBe(0);
    expect(conv.stderr).toMatch(/UNSUPPORTED_FEATURE: .*a passphrase is needed/);
    await expect(stat(out)).rejects.toThrow();
    expect((await runDiskconv(['info', luks])).code).toBe(0);
    // check needs no key (metadata only); the crypto header's clusters are counted, so no leaks.
    const check = await runDiskconv(['check', '--output=json', luks]);
    expect(check.code, check.stdout).toBe(0);
    const qemuCheck = await runAllowingFailure('qemu-img', ['check', '--output=json', ...secret(), ...imageOpts(luks)]);
    expect(JSON.parse(check.stdout)['image-end-offset']).toBe(JSON.parse(qemuCheck.stdout)['image-end-offset']);
  });

  it.each(['twofish-128', 'serpent-256', 'cast5-128'])('cipher %s, which node:crypto lacks, is UNSUPPORTED_FEATURE naming it', async (cipher) => {
    const path = join(dir, `${cipher}.qcow2`);
    const mode = cipher.startsWith('cast5') ? 'cbc' : 'xts';
    const res = await makeEncrypted(path, `encrypt.format=luks,encrypt.cipher-alg=${cipher},encrypt.cipher-mode=${mode},encrypt.ivgen-alg=plain64,encrypt.iter-time=10`, 5);
    expect(res.code, res.stderr).toBe(0);
    const info = await runDiskconv(['info', '--output=json', path]);
    expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(path)));
    const conv = await runDiskconv(['convert', '--passphrase-file', passFile, '-O', 'raw', path, join(dir, `${cipher}.out`)]);
    expect(conv.stderr).toContain('UNSUPPORTED_FEATURE:');
    expect(conv.stderr).toContain(cipher);
  });

  it('a hostile PBKDF2 iteration count is LIMIT_EXCEEDED before any derivation', async () => {
    const bytes = await readFile(luks);
    const info = (await qemuInfo(luks)) as { 'format-specific': { data: { encrypt: { slots: Array<{ 'key-offset': number }> } } } };
    expect(info['format-specific'].data.encrypt.slots.length).toBe(8);
    // The crypto header extension names the LUKS header's offset; slot 0's iterations are at +208+4.
    const luksAt = bytes.indexOf(Buffer.from('LUKS\xba\xbe', 'latin1'));
    expect(luksAt).toBeGreaterThan(0);
    const hostile = join(dir, 'hostile-iters.qcow2');
    const copy = Buffer.from(bytes);
    copy.writeUInt32BE(0xffffffff, luksAt + 208 + 4);
    await writeFile(hostile, copy);
    const source = await FileSource.open(hostile);
    try {
      await expect(openImage(source, { passphrase: Buffer.from(PASSPHRASE) })).rejects.toBeInstanceOf(LimitExceededError);
    } finally {
      await source.close();
    }
    // Stripes other than 4000 and a key slot past the crypto header are corrupt, refused at open.
    const stripes = Buffer.from(bytes);
    stripes.writeUInt32BE(4001, luksAt + 208 + 44);
    await writeFile(join(dir, 'hostile-stripes.qcow2'), stripes);
    expect((await runDiskconv(['info', join(dir, 'hostile-stripes.qcow2')])).stderr).toMatch(/IMAGE_CORRUPT: .*stripes 4001/);
    const slotFar = Buffer.from(bytes);
    slotFar.writeUInt32BE(0x7fffffff, luksAt + 208 + 40);
    await writeFile(join(dir, 'hostile-slot.qcow2'), slotFar);
    expect((await runDiskconv(['info', join(dir, 'hostile-slot.qcow2')])).stderr).toContain('IMAGE_CORRUPT:');
  });
});

describe('legacy AES qcow2 (crypt_method 1)', () => {
  for (const compat of ['1.1', '0.10']) {
    it(`compat ${compat}: converts equal to qemu-img with the key`, async () => {
      const path = join(dir, `aes-${compat}.qcow2`);
      const res = await makeEncrypted(path, `encrypt.format=aes,compat=${compat}`, 42);
      expect(res.code, res.stderr).toBe(0);
      const info = await runDiskconv(['info', '--output=json', path]);
      expect(info.code, info.stderr).toBe(0);
      expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(path)));
      const out = join(dir, `aes-${compat}.out`);
      const conv = await runDiskconv(['convert', '--passphrase-file', passFile, '-O', 'raw', path, out]);
      expect(conv.stderr).toBe('');
      expect(await sha256File(out)).toBe(await reference(path));
      const nokey = await runDiskconv(['convert', '-O', 'raw', path, `${out}.2`]);
      expect(nokey.stderr).toMatch(/UNSUPPORTED_FEATURE: .*a passphrase is needed/);
    });
  }

  it('a passphrase longer than 16 bytes: only its first 16 count, as in qemu', async () => {
    const path = join(dir, 'aes-long.qcow2');
    const res = await makeEncrypted(path, 'encrypt.format=aes', 43);
    expect(res.code, res.stderr).toBe(0);
    const longer = join(dir, 'longer');
    await writeFile(longer, `${PASSPHRASE.slice(0, 16)}different tail`);
    const out = join(dir, 'aes-long.out');
    expect((await runDiskconv(['convert', '--passphrase-file', longer, '-O', 'raw', path, out])).code).toBe(0);
    expect(await sha256File(out)).toBe(await reference(path));
  });
});

describe('the passphrase file', () => {
  it('an empty or missing file is INVALID_ARGUMENT', async () => {
    const empty = join(dir, 'empty');
    await (await open(empty, 'w')).close();
    expect((await runDiskconv(['info', '--passphrase-file', empty, passFile])).stderr).toContain('INVALID_ARGUMENT:');
    expect((await runDiskconv(['info', '--passphrase-file', join(dir, 'missing'), passFile])).stderr).toContain('INVALID_ARGUMENT:');
  });
});
