/**
 * VMDK child disks (`qemu-img create -f vmdk -b parent.vmdk -F vmdk`: a
 * monolithicSparse with parentCID and parentFileNameHint in its embedded
 * descriptor) in a tar or zip bundle with their parent: flattened as qemu-img
 * convert flattens the same files in place. Alone, a child is refused.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { BufferSource, FileSource, checkImage, imageInfo, openImage } from '../../../src/engine/index.js';
import { fileSha256, makeTar, outcomeOf } from './helpers.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

async function reference(image: string): Promise<string> {
  const out = path(`${image.replace(/\//g, '_')}.ref.raw`);
  await qemuImg('convert', '-O', 'raw', path(image), out);
  return sha256File(out);
}
const tar = async (name: string, files: string[]): Promise<string> => {
  await run('tar', ['-cf', path(name), '-C', dir, ...files]);
  return path(name);
};
const zip = async (name: string, files: string[]): Promise<string> => {
  await run('sh', ['-c', `cd "${dir}" && zip -q -0 ${name} ${files.join(' ')}`]);
  return path(name);
};

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vmdk-child-'));
  // base (24 MiB) <- mid (32 MiB) <- top (32 MiB): data, zero writes and grains left to the parent.
  await qemuImg('create', '-q', '-f', 'vmdk', path('base.vmdk'), '24M');
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x12 22M 2M', path('base.vmdk'));
  await qemuImg('create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', path('mid.vmdk'), '32M');
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x21 1M 1M', '-c', 'write -z 4M 1M', '-c', 'write -P 0x22 30M 1M', path('mid.vmdk'));
  await qemuImg('create', '-q', '-f', 'vmdk', '-b', 'mid.vmdk', '-F', 'vmdk', path('top.vmdk'), '32M');
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x31 1536k 64k', '-c', 'write -P 0x32 7M 4k', '-c', 'write -P 0x33 23M 1M', path('top.vmdk'));
  // A child of a streamOptimized parent.
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', path('base.vmdk'), path('stream.vmdk'));
  await qemuImg('create', '-q', '-f', 'vmdk', '-b', 'stream.vmdk', '-F', 'vmdk', path('over-stream.vmdk'));
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x41 2M 3M', path('over-stream.vmdk'));
}, 120_000);
afterAll(async () => cleanup());

describe('VMDK child disks in a bundle', () => {
  it('a three-disk chain (tar and zip, any member order) equals qemu-img convert of the top in place', async () => {
    const ref = await reference('top.vmdk');
    for (const bundle of [
      await tar('chain.tar', ['top.vmdk', 'mid.vmdk', 'base.vmdk']),
      await tar('chain2.tar', ['base.vmdk', 'top.vmdk', 'mid.vmdk']),
      await zip('chain.zip', ['mid.vmdk', 'base.vmdk', 'top.vmdk']),
    ]) {
      const got = await fileSha256(bundle);
      expect(got.format, bundle).toBe('vmdk');
      expect(got.virtualSize).toBe(32 * MiB);
      expect(got.sha256, bundle).toBe(ref);
    }
    // The middle of the chain chosen with --disk: equal to qemu-img on mid.vmdk.
    expect((await fileSha256(path('chain.tar'), { disk: 'mid.vmdk' })).sha256).toBe(await reference('mid.vmdk'));
  }, 120_000);

  it('a child of a streamOptimized parent', async () => {
    const got = await fileSha256(await tar('stream.tar', ['over-stream.vmdk', 'stream.vmdk']));
    expect(got.sha256).toBe(await reference('over-stream.vmdk'));
  }, 60_000);

  it('info names the backing file and lists the chain', async () => {
    const source = await FileSource.open(path('chain.tar'));
    try {
      const image = await openImage(source, { metadataOnly: true });
      const info = await imageInfo(image, source);
      expect(info.archive?.members).toEqual(['top.vmdk', 'mid.vmdk', 'base.vmdk']);
      expect(info['backing-filename']).toBe('mid.vmdk');
      await image.close();
    } finally {
      await source.close();
    }
  });

  it('check of a bundle checks every layer, each finding naming its member', async () => {
    const checked = async (file: string): Promise<Awaited<ReturnType<typeof checkImage>>> => {
      const source = await FileSource.open(file);
      try {
        const image = await openImage(source, {});
        try {
          return await checkImage(image);
        } finally {
          await image.close();
        }
      } finally {
        await source.close();
      }
    };
    const good = await checked(await tar('check.tar', ['top.vmdk', 'mid.vmdk', 'base.vmdk']));
    expect(good).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, messages: [] });
    // The base's first grain table entry pointed past the end of its file: convert would fail, check names it.
    await run('mkdir', ['-p', path('bad')]);
    for (const f of ['top.vmdk', 'mid.vmdk', 'base.vmdk']) await run('cp', [path(f), path(`bad/${f}`)]);
    const base = await readFile(path('bad/base.vmdk'));
    const gd = Number(base.readBigUInt64LE(56)) * 512;
    const gt = base.readUInt32LE(gd) * 512;
    base.writeUInt32LE(0x7ffffff0, gt);
    await writeFile(path('bad/base.vmdk'), base);
    const bad = await checked(await tar('bad.tar', ['bad/top.vmdk', 'bad/mid.vmdk', 'bad/base.vmdk']));
    expect(bad.corruptions, bad.messages.join("\n")).toBeGreaterThan(0);
    expect(bad.messages.join('\n')).toMatch(/bad\.tar\/bad\/base\.vmdk: ERROR: grain for guest offset 0 .*after the end of the file/m);
    const cli = await run('node', ['dist/cli.js', 'check', path('check.tar')]);
    expect(cli.stdout).toMatch(/No errors were found on the image/);
  }, 60_000);

  it('alone, missing its parent, with a changed parent or a parent out of the archive: typed refusals', async () => {
    const alone = await readFile(path('top.vmdk'));
    const a = await outcomeOf(alone);
    expect(a.code).toBe('UNSAFE_IMAGE');
    expect(a.message).toMatch(/parentFileNameHint="mid\.vmdk".*bundle/);

    const missing = await outcomeOf(await readFile(await tar('nomid.tar', ['top.vmdk', 'base.vmdk'])), { disk: 'top.vmdk' });
    expect(missing.code).toBe('UNSAFE_IMAGE');
    expect(missing.message).toMatch(/"mid\.vmdk" is not a member/);

    // The parent rewritten after the child was made: its CID changes, and qemu refuses the child's reads.
    // qemu writes CIDs with "%x", unpadded: a CID below 0x10000000 has fewer than 8 digits, so the CID line is
    // found as a whole line (a search for 8 digits once matched "parentCID=ffffffff" instead, 1 run in 16).
    // The new CID and the copy's name keep their lengths, so no byte of the images moves.
    await run('cp', [path('mid.vmdk'), path('mid-changed.vmdk')]);
    await run('cp', [path('base.vmdk'), path('bcpy.vmdk')]);
    const changed = await readFile(path('bcpy.vmdk'), 'latin1');
    const cid = /^CID=([0-9a-f]{1,8})$/m.exec(changed)?.[1];
    expect(cid, 'the parent has a CID line').toBeDefined();
    const old = cid as string;
    const other = old.slice(0, -1) + ((parseInt(old.slice(-1), 16) + 1) % 16).toString(16);
    const rewritten = changed.replace(`\nCID=${old}\n`, `\nCID=${other}\n`);
    expect(rewritten.length).toBe(changed.length);
    expect(/^parentCID=ffffffff$/m.test(rewritten), 'the parent is still no child').toBe(true);
    await writeFile(path('bcpy.vmdk'), rewritten, 'latin1');
    const text = await readFile(path('mid-changed.vmdk'), 'latin1');
    expect(/^parentCID=([0-9a-f]{1,8})$/m.exec(text)?.[1], "the child's parentCID is the parent's CID").toBe(old);
    await writeFile(path('mid-changed.vmdk'), text.replace('parentFileNameHint="base.vmdk"', 'parentFileNameHint="bcpy.vmdk"'), 'latin1');
    const bad = await outcomeOf(await readFile(await tar('changed.tar', ['mid-changed.vmdk', 'bcpy.vmdk'])));
    expect(bad.code).toBe('UNSAFE_IMAGE');
    expect(bad.message).toMatch(new RegExp(`not this image's parent: the child's parentCID is ${old.padStart(8, '0')} but the parent's CID is ${other.padStart(8, '0')}`));

    // Hints that are host paths or climb out: refused, never opened.
    for (const [hint, pattern] of [
      [path('base.vmdk'), /absolute path/],
      ['../base.vmdk', /climbs/],
      ['nbd://127.0.0.1/x', /URL/],
    ] as const) {
      const t = await readFile(path('mid.vmdk'), 'latin1');
      // Same length as the original hint keeps the embedded descriptor's size; qemu pads it anyway.
      await writeFile(path('evil.vmdk'), t.replace('parentFileNameHint="base.vmdk"', `parentFileNameHint="${hint}"`), 'latin1');
      const r = await outcomeOf(await readFile(await tar('evil.tar', ['evil.vmdk', 'base.vmdk'])), { disk: 'evil.vmdk' });
      expect(r.code, hint).toBe('UNSAFE_IMAGE');
      expect(r.message, hint).toMatch(pattern);
    }
  }, 60_000);

  it('a child that names itself, and two children naming each other, are loops', async () => {
    const t = await readFile(path('top.vmdk'), 'latin1');
    const self = Buffer.from(t.replace('parentFileNameHint="mid.vmdk"', 'parentFileNameHint="top.vmdk"'), 'latin1');
    const r = await outcomeOf(makeTar([{ name: 'top.vmdk', data: self }]), { disk: 'top.vmdk' });
    expect(r.code).toBe('UNSAFE_IMAGE');
    expect(r.message).toMatch(/loops/);
    const m = await readFile(path('mid.vmdk'), 'latin1');
    const a = Buffer.from(t.replace('parentFileNameHint="mid.vmdk"', 'parentFileNameHint="b.vmdk"'), 'latin1');
    const b = Buffer.from(m.replace('parentFileNameHint="base.vmdk"', 'parentFileNameHint="a.vmdk"'), 'latin1');
    const pair = makeTar([{ name: 'a.vmdk', data: a }, { name: 'b.vmdk', data: b }]);
    const loop = await outcomeOf(pair);
    expect(loop.code).toBe('UNSAFE_IMAGE');
    expect(loop.message).toMatch(/loop/);
    const image = await openImage(new BufferSource(pair, 'pair.tar'), { disk: 'a.vmdk' }).catch((e: Error) => e);
    expect(image).toBeInstanceOf(Error);
    expect(String((image as Error).message)).toMatch(/loops.*a\.vmdk.*b\.vmdk.*a\.vmdk/);
  });

  it('a split child (twoGbMaxExtentSparse made with -b) over a monolithic or a split parent, data across 2 GiB: equals qemu-img; check, info, refusals', async () => {
    const size = `${2048 + 16}M`;
    // Parents: monolithicSparse and twoGbMaxExtentSparse, data on both sides of the 2 GiB extent boundary.
    await qemuImg('create', '-q', '-f', 'vmdk', path('bigbase.vmdk'), size);
    await qemuIo('-f', 'vmdk', '-c', 'write -P 0x51 0 4M', '-c', 'write -P 0x52 2046M 4M', '-c', 'write -P 0x53 2060M 1M', path('bigbase.vmdk'));
    await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path('splitbase.vmdk'), size);
    await qemuIo('-f', 'vmdk', '-c', 'write -P 0x61 0 3M', '-c', 'write -P 0x62 2047M 2M', path('splitbase.vmdk'));
    for (const [child, parent, parentFiles] of [
      ['schild.vmdk', 'bigbase.vmdk', ['bigbase.vmdk']],
      ['sschild.vmdk', 'splitbase.vmdk', ['splitbase.vmdk', 'splitbase-s001.vmdk', 'splitbase-s002.vmdk']],
    ] as const) {
      await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', '-b', parent, '-F', 'vmdk', path(child));
      await qemuIo('-f', 'vmdk', '-c', 'write -P 0x71 1M 1M', '-c', 'write -P 0x72 2047M 64k', '-c', 'write -z 2048M 512k', path(child));
      const text = await readFile(path(child), 'latin1');
      expect(text).toMatch(new RegExp(`parentFileNameHint="${parent.replace('.', '\\.')}"`));
      expect(text).toMatch(/createType="twoGbMaxExtentSparse"/);
      const base = child.replace('.vmdk', '');
      const files = [child, `${base}-s001.vmdk`, `${base}-s002.vmdk`, ...parentFiles];
      const ref = await reference(child);
      for (const bundle of [await tar(`${base}.tar`, files), await tar(`${base}-rev.tar`, [...files].reverse())]) {
        const got = await fileSha256(bundle);
        expect(got.format, bundle).toBe('vmdk');
        expect(got.virtualSize).toBe((2048 + 16) * MiB);
        expect(got.sha256, bundle).toBe(ref);
      }
      await run('sh', ['-c', `cd "${dir}" && zip -q ${base}.zip ${files.join(' ')}`]);
      expect((await fileSha256(path(`${base}.zip`))).sha256, `${base}.zip (deflated)`).toBe(ref);
      expect((await fileSha256(path(`${base}.tar`), { disk: child })).sha256).toBe(ref);
      // qemu-img on the child's descriptor alone is not the disk: the parent shows through.
      expect(ref).not.toBe(await reference(parent));

      const source = await FileSource.open(path(`${base}.tar`));
      try {
        const image = await openImage(source);
        try {
          const info = await imageInfo(image, source);
          expect(info['backing-filename']).toBe(parent);
          expect(info.archive?.members.slice(0, 3)).toEqual(files.slice(0, 3));
          expect(info.archive?.members).toContain(parentFiles[0]);
          expect(await checkImage(image)).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, messages: [] });
        } finally {
          await image.close();
        }
      } finally {
        await source.close();
      }
    }
    // Alone (without its parent), a split child is refused naming the parent; with a parent whose CID changed, too.
    const alone = await outcomeOf(await readFile(await tar('schild-alone.tar', ['schild.vmdk', 'schild-s001.vmdk', 'schild-s002.vmdk'])));
    expect(alone.code).toBe('UNSAFE_IMAGE');
    expect(alone.message).toMatch(/"bigbase\.vmdk" is not a member/);
    const parentText = await readFile(path('bigbase.vmdk'), 'latin1');
    const old = /^CID=([0-9a-f]{1,8})$/m.exec(parentText)?.[1] as string;
    const other = old.slice(0, -1) + ((parseInt(old.slice(-1), 16) + 1) % 16).toString(16);
    await run('mkdir', ['-p', path('cidchanged')]);
    for (const f of ['schild.vmdk', 'schild-s001.vmdk', 'schild-s002.vmdk']) await run('cp', [path(f), path(`cidchanged/${f}`)]);
    await writeFile(path('cidchanged/bigbase.vmdk'), parentText.replace(`\nCID=${old}\n`, `\nCID=${other}\n`), 'latin1');
    const changed = await outcomeOf(await readFile(await tar('cidchanged.tar', ['cidchanged/schild.vmdk', 'cidchanged/schild-s001.vmdk', 'cidchanged/schild-s002.vmdk', 'cidchanged/bigbase.vmdk'])));
    expect(changed.code).toBe('UNSAFE_IMAGE');
    expect(changed.message).toMatch(new RegExp(`not this image's parent: the child's parentCID is ${old.padStart(8, '0')} but the parent's CID is ${other.padStart(8, '0')}`));
    // A hint out of the archive: refused, never opened.
    const t = await readFile(path('schild.vmdk'), 'latin1');
    await run('mkdir', ['-p', path('abs')]);
    for (const f of ['schild-s001.vmdk', 'schild-s002.vmdk', 'bigbase.vmdk']) await run('cp', [path(f), path(`abs/${f}`)]);
    await writeFile(path('abs/schild.vmdk'), t.replace('parentFileNameHint="bigbase.vmdk"', `parentFileNameHint="${path('bigbase.vmdk')}"`), 'latin1');
    const abs = await outcomeOf(await readFile(await tar('abs.tar', ['abs/schild.vmdk', 'abs/schild-s001.vmdk', 'abs/schild-s002.vmdk', 'abs/bigbase.vmdk'])), { disk: 'abs/schild.vmdk' });
    expect(abs.code).toBe('UNSAFE_IMAGE');
    expect(abs.message).toMatch(/absolute path/);
  }, 240_000);
});
