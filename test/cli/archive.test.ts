/**
 * The CLI on OVA appliances and tar bundles: `convert` byte-identical to
 * qemu-img on the extracted disk, `info` listing the disks, `--disk`, and the
 * strace canary: names inside the archive's images are never opened on the
 * host, even when files of those names lie right beside the archive.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile, execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, qemuImg, qemuIo, run, sha256File } from '../helpers/qemu.js';
import { CLI, runDiskconv } from '../helpers/cli.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);
/** Known when the tests are collected, so a missing strace shows as a skip (and fails under CI). */
const strace = ((): boolean => {
  try {
    execFileSync('strace', ['-V'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

function traced(log: string, args: string[], env: Record<string, string> = {}): Promise<void> {
  return new Promise((resolve) => {
    execFile('strace', ['-f', '-e', 'trace=%file', '-o', log, process.execPath, CLI, ...args], { timeout: 60_000, env: { ...process.env, ...env } }, () => resolve());
  });
}

const OVF = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="f1" ovf:href="canary-disk1.vmdk"/>
    <File ovf:id="f2" ovf:href="canary-disk2.vmdk"/>
  </References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:diskId="boot" ovf:fileRef="f1" ovf:capacity="8388608"/>
    <Disk ovf:diskId="data" ovf:fileRef="f2" ovf:capacity="12582912"/>
  </DiskSection>
</Envelope>
`;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-cli-archive-'));
  await writeFile(path('a.raw'), mixedContent(8 * MiB, 11));
  await writeFile(path('b.raw'), mixedContent(12 * MiB, 12));
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', path('a.raw'), path('canary-disk1.vmdk'));
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', path('b.raw'), path('canary-disk2.vmdk'));
  await writeFile(path('app.ovf'), OVF);
  await run('tar', ['-cf', path('app.ova'), '-C', dir, 'app.ovf', 'canary-disk1.vmdk', 'canary-disk2.vmdk']);
  // A chain: the overlay names its backing file by a relative name; a file of that name lies beside the tar.
  await qemuImg('create', '-q', '-f', 'qcow2', path('canary-base.qcow2'), '16M');
  await qemuIo('-c', 'write -P 0x31 0 3M', path('canary-base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'canary-base.qcow2', '-F', 'qcow2', path('top.qcow2'));
  await qemuIo('-c', 'write -P 0x32 1M 1M', path('top.qcow2'));
  await run('tar', ['-cf', path('chain.tar'), '-C', dir, 'top.qcow2', 'canary-base.qcow2']);
  // The same chain with deflated zip members, and the OVA with its first disk gzip'd and its second in chunks:
  // what is staged goes to TMPDIR under names of our own, never a member's name.
  await run('sh', ['-c', `cd "${dir}" && zip -q chain.zip top.qcow2 canary-base.qcow2`]);
  await mkdir(path('packed'));
  await run('sh', ['-c', `cd "${dir}" && gzip -c canary-disk1.vmdk > packed/canary-disk1.vmdk && split -b 1M -d -a 9 canary-disk2.vmdk packed/canary-disk2.vmdk.`]);
  await writeFile(path('packed/app.ovf'), OVF.replace('ovf:href="canary-disk1.vmdk"', 'ovf:href="canary-disk1.vmdk" ovf:compression="gzip"').replace('ovf:href="canary-disk2.vmdk"', `ovf:href="canary-disk2.vmdk" ovf:chunkSize="${MiB}"`));
  const chunks = (await readdir(path('packed'))).filter((n) => n.startsWith('canary-disk2.vmdk.')).sort();
  await run('tar', ['-cf', path('packed.ova'), '-C', path('packed'), 'app.ovf', 'canary-disk1.vmdk', ...chunks]);
}, 120_000);
afterAll(async () => cleanup());

describe('diskconv on archives', () => {
  it('convert appliance.ova out.raw equals qemu-img on the extracted first disk; --disk 2 the second', async () => {
    await run('mkdir', [path('x')]);
    await run('tar', ['-xf', path('app.ova'), '-C', path('x')]);
    for (const [n, disk] of [[1, 'canary-disk1.vmdk'], [2, 'canary-disk2.vmdk']] as const) {
      await qemuImg('convert', '-O', 'raw', path(`x/${disk}`), path(`ref${n}.raw`));
      const args = n === 1 ? [] : ['--disk', '2'];
      const r = await runDiskconv(['convert', ...args, '-O', 'raw', path('app.ova'), path(`out${n}.raw`)]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(await sha256File(path(`out${n}.raw`))).toBe(await sha256File(path(`ref${n}.raw`)));
    }
    const chain = await runDiskconv(['convert', '-O', 'raw', path('chain.tar'), path('chain.raw')]);
    expect(chain.code, chain.stderr).toBe(0);
    await qemuImg('convert', '-O', 'raw', path('top.qcow2'), path('chain.ref'));
    expect(await sha256File(path('chain.raw'))).toBe(await sha256File(path('chain.ref')));
  }, 120_000);

  it('info --output=json lists the OVF disks; a wrong --disk is a usage-level error naming them', async () => {
    const r = await runDiskconv(['info', '--output=json', path('app.ova')]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as { format: string; 'virtual-size': number; archive: { kind: string; disk: number; disks: Array<{ 'disk-id': string; file: string }> } };
    expect(info.format).toBe('vmdk');
    expect(info['virtual-size']).toBe(8 * MiB);
    expect(info.archive.kind).toBe('ova');
    expect(info.archive.disks.map((d) => [d['disk-id'], d.file])).toEqual([
      ['boot', 'canary-disk1.vmdk'],
      ['data', 'canary-disk2.vmdk'],
    ]);
    const two = JSON.parse((await runDiskconv(['info', '--output=json', '--disk', 'data', path('app.ova')])).stdout) as { 'virtual-size': number };
    expect(two['virtual-size']).toBe(12 * MiB);
    const bad = await runDiskconv(['convert', '--disk', '7', '-O', 'raw', path('app.ova'), path('bad.raw')]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/INVALID_ARGUMENT.*no disk "7".*boot.*data/);
  }, 60_000);

  it.skipIf(!strace && !process.env.CI)('strace: only the archive is opened, never a file an image names, even one lying beside it', async () => {
    if (!strace) throw new Error('strace is needed for this test in CI');
    for (const [archive, args] of [
      ['app.ova', ['convert', '-O', 'raw']],
      ['app.ova', ['info']],
      ['chain.tar', ['convert', '-O', 'raw']],
      ['chain.tar', ['info']],
    ] as const) {
      const log = path(`${archive}.${args[0]}.strace`);
      const out = path(`${archive}.${args[0]}.raw`);
      await traced(log, [...args, path(archive), ...(args[0] === 'convert' ? [out] : [])]);
      const calls = await readFile(log, 'latin1');
      expect(calls, archive).toContain(path(archive));
      expect(calls, `${archive} ${args[0]}: a member's name was opened on the host`).not.toContain('canary');
    }
    // Deflated zip members and gzip'd or chunked OVF files: staged only into TMPDIR's scratch folder, removed after.
    const tmp = path('tmp');
    await mkdir(tmp);
    for (const [archive, args] of [
      ['chain.zip', ['convert', '-O', 'raw']],
      ['chain.zip', ['info']],
      ['packed.ova', ['convert', '-O', 'raw']],
      ['packed.ova', ['convert', '--disk', '2', '-O', 'raw']],
      ['packed.ova', ['info']],
    ] as const) {
      const log = path(`${archive}.${args.join('')}.strace`);
      const out = path(`${archive}.${args.length}.raw`);
      await traced(log, [...args, path(archive), ...(args[0] === 'convert' ? [out] : [])], { TMPDIR: tmp });
      const calls = await readFile(log, 'latin1');
      expect(calls, archive).toContain(path(archive));
      if (archive === 'chain.zip' || args.length === 3) expect(calls, `${archive} ${args.join(' ')}: staged in TMPDIR`).toContain(`${tmp}/diskconv-archive-`);
      expect(calls, `${archive} ${args.join(' ')}: a member's name was opened on the host`).not.toContain('canary');
      expect(await readdir(tmp), `${archive} ${args.join(' ')}: scratch removed`).toEqual([]);
    }
    // Absolute and climbing backing names that exist on the host: refused, and never looked up.
    for (const backing of [path('canary-base.qcow2'), '../canary-base.qcow2']) {
      await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', 'qcow2', path('evil.qcow2'), '16M');
      await run('tar', ['-cf', path('evil.tar'), '-C', dir, 'evil.qcow2']);
      const log = path('evil.strace');
      await traced(log, ['convert', '-O', 'raw', path('evil.tar'), path('evil.raw')]);
      const calls = await readFile(log, 'latin1');
      expect(calls).toContain(path('evil.tar'));
      expect(calls, backing).not.toContain('canary');
      const r = await runDiskconv(['convert', '-O', 'raw', path('evil.tar'), path('evil.raw')]);
      expect(r.stderr).toMatch(/UNSAFE_IMAGE/);
    }
  }, 120_000);
});

describe('info of a VMDK child in a bundle equals qemu-img info of the child in place', () => {
  // qemu-img info prints "backing file format: vmdk" for every VMDK child (vmdk_parent_open names the
  // format with the parentFileNameHint), split (twoGbMaxExtentSparse) or monolithic, parent present or not.
  // The bundle's own names are mapped to the files in place: the tar's path for the child's, the tar's
  // folder for its members' (extent filenames); disk size and the archive listing have no qemu equivalent.
  const cases = [
    { name: 'split', child: 'vc-split.vmdk', files: ['vc-split.vmdk', 'vc-split-s001.vmdk', 'vc-base.vmdk'], opts: ['-o', 'subformat=twoGbMaxExtentSparse'] },
    { name: 'monolithic', child: 'vc-mono.vmdk', files: ['vc-mono.vmdk', 'vc-base.vmdk'], opts: [] },
  ] as const;
  beforeAll(async () => {
    await qemuImg('create', '-q', '-f', 'vmdk', path('vc-base.vmdk'), '64M');
    await qemuIo('-f', 'vmdk', '-c', 'write -P 0x61 0 1M', path('vc-base.vmdk'));
    for (const c of cases) {
      await qemuImg('create', '-q', '-f', 'vmdk', ...c.opts, '-b', 'vc-base.vmdk', '-F', 'vmdk', path(c.child));
      await qemuIo('-f', 'vmdk', '-c', 'write -P 0x62 2M 1M', path(c.child));
      await run('tar', ['-cf', path(`${c.child}.tar`), '-C', dir, ...c.files]);
    }
  }, 60_000);
  const inPlace = (text: string, c: (typeof cases)[number]): string => text.replaceAll(`${path(`${c.child}.tar`)}/`, `${dir}/`).replaceAll(path(`${c.child}.tar`), path(c.child));

  it.each(cases)('$name child, human output', async (c) => {
    const ours = await runDiskconv(['info', path(`${c.child}.tar`)]);
    expect(ours.stderr).toBe('');
    const theirs = await qemuImg('info', path(c.child));
    const drop = (t: string): string => t.split('\n').filter((l) => !l.startsWith('disk size: ')).join('\n');
    expect(theirs.stdout).toMatch(/^backing file format: vmdk$/m);
    expect(drop(inPlace(ours.stdout, c))).toBe(drop(theirs.stdout));
  });

  it.each(cases)('$name child, --output=json: the same keys in the same order', async (c) => {
    const ours = await runDiskconv(['info', '--output=json', path(`${c.child}.tar`)]);
    expect(ours.stderr).toBe('');
    const theirs = await qemuImg('info', '--output=json', path(c.child));
    const drop = (t: string): unknown => {
      const o = JSON.parse(t) as Record<string, unknown>;
      delete o['actual-size'];
      delete o.archive;
      return o;
    };
    expect((JSON.parse(theirs.stdout) as Record<string, unknown>)['backing-filename-format']).toBe('vmdk');
    expect(JSON.stringify(drop(inPlace(ours.stdout, c)), null, 1)).toBe(JSON.stringify(drop(theirs.stdout), null, 1));
  });
});
