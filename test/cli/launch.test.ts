/**
 * dist/cli/launch.cjs, the CLI's entry point: the image verbs run from the build's bundle
 * (dist/bundle/image-verbs.cjs) and its V8 code cache, but only while every compiled module the bundle was
 * made from is as it was; otherwise, and for the service verbs, dist/cli/main.js runs. DISKCONV_DEBUG makes
 * the launcher say which ran and why. The stale cases run on a copy of dist/ (timestamps kept), so the
 * build the other tests use is never touched.
 */
import { cp, mkdir, readFile, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCommand, type CommandResult } from '../helpers/cli.js';
import { makeTempDir } from '../helpers/qemu.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Runs node with the launcher's account of what it ran (DISKCONV_DEBUG) on stderr. */
const node = (args: string[]): Promise<CommandResult> => runCommand(process.execPath, args, { env: { ...process.env, DISKCONV_DEBUG: '1' }, timeoutMs: 60_000 });

describe('the CLI launcher', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let image: string;
  /** A copy of the build beside the real package.json, native/ and node_modules/. */
  let copy: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-launch-'));
    image = join(dir, 'disk.raw');
    await writeFile(image, Buffer.alloc(2 ** 20, 7));
    // Each case that uses the copy makes its dist/ afresh (freshCopy).
    await mkdir((copy = join(dir, 'package')));
    for (const entry of ['package.json', 'native', 'node_modules']) await symlink(join(ROOT, entry), join(copy, entry));
  });
  afterAll(async () => cleanup?.());

  /** Puts the copy back as the build made it (each case below changes one thing). */
  async function freshCopy(): Promise<void> {
    await rm(join(copy, 'dist'), { recursive: true, force: true });
    await cp(join(ROOT, 'dist'), join(copy, 'dist'), { recursive: true, preserveTimestamps: true });
  }

  it('runs the image verbs from the bundle and its code cache, with the same results as main.js', async () => {
    for (const entry of [join(ROOT, 'dist', 'cli.js'), join(ROOT, 'dist', 'cli', 'launch.cjs')]) {
      const r = await node([entry, 'info', '--output=json', image]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toContain('image-verbs.cjs (code cache accepted)');
      expect(JSON.parse(r.stdout)).toMatchObject({ filename: image, format: 'raw', 'virtual-size': 2 ** 20 });
    }
    // The bundle's answers are main.js's: compare a verb's output through both paths (the copy, made stale).
    const bundled = await node([join(ROOT, 'dist', 'cli.js'), 'map', '--output=json', image]);
    await freshCopy();
    // Only its modification time moves (same size, same bytes): still stale, as a rebuild of it would be.
    const stale = join(copy, 'dist', 'cli', 'commands', 'map.js');
    const later = new Date(Date.now() + 5000);
    await utimes(stale, later, later);
    const fromMain = await node([join(copy, 'dist', 'cli.js'), 'map', '--output=json', image]);
    expect(fromMain.stderr).toContain('running dist/cli/main.js: dist/cli/commands/map.js changed after the bundle was made');
    expect(bundled.code).toBe(0);
    expect(fromMain.stdout).toBe(bundled.stdout);
  });

  it('an unchanged copy of the build still runs from its bundle (what the cases below change is all that differs)', async () => {
    await freshCopy();
    const r = await node([join(copy, 'dist', 'cli.js'), 'info', image]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`running ${join(copy, 'dist', 'bundle', 'image-verbs.cjs')} (code cache accepted)`);
  });

  it('a compiled module changed after the bundle was made: main.js runs, and the change is what runs', async () => {
    await freshCopy();
    const info = join(copy, 'dist', 'cli', 'commands', 'info.js');
    const text = await readFile(info, 'utf8');
    expect(text).toContain("Show an image's metadata");
    await writeFile(info, text.replace("Show an image's metadata", 'Shows (edited after the bundle) an image metadata'));
    const r = await node([join(copy, 'dist', 'cli.js'), 'info', '--help']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('running dist/cli/main.js: dist/cli/commands/info.js changed after the bundle was made');
    expect(r.stdout).toContain('Shows (edited after the bundle) an image metadata');
  });

  it('no bundle, or a bundle changed after its manifest: main.js runs', async () => {
    await freshCopy();
    const bundle = join(copy, 'dist', 'bundle', 'image-verbs.cjs');
    await writeFile(bundle, (await readFile(bundle, 'utf8')).replace("Show an image's metadata", 'Tampered'));
    let r = await node([join(copy, 'dist', 'cli.js'), 'info', '--help']);
    expect(r.stderr).toContain('running dist/cli/main.js: the bundle changed after its manifest was written');
    expect(r.stdout).toContain("Show an image's metadata");
    await rm(join(copy, 'dist', 'bundle'), { recursive: true });
    r = await node([join(copy, 'dist', 'cli.js'), 'info', '--output=json', image]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('running dist/cli/main.js: no bundle (the build did not make one)');
    expect(JSON.parse(r.stdout)).toMatchObject({ format: 'raw', 'virtual-size': 2 ** 20 });
  });

  it('a code cache V8 rejects, or one made by another Node, is not used, and the bundle still runs', async () => {
    await freshCopy();
    const manifestPath = join(copy, 'dist', 'bundle', 'image-verbs.json');
    const cachePath = join(copy, 'dist', 'bundle', 'image-verbs.cache');
    // Garbage where the cache was, with a manifest that vouches for it: V8 itself must refuse it.
    await writeFile(cachePath, Buffer.alloc(4096, 0x5a));
    const manifest = JSON.parse(await readFile(manifestPath, 'utf8')) as { node: string; cache: unknown };
    const s = await stat(cachePath);
    manifest.cache = { size: s.size, mtimeMs: s.mtimeMs };
    await writeFile(manifestPath, JSON.stringify(manifest));
    let r = await node([join(copy, 'dist', 'cli.js'), 'convert', '-O', 'raw', image, join(dir, 'out.raw')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('image-verbs.cjs (code cache not used)');
    expect((await readFile(join(dir, 'out.raw'))).equals(await readFile(image))).toBe(true);
    manifest.node = 'v0.0.0';
    await writeFile(manifestPath, JSON.stringify(manifest));
    r = await node([join(copy, 'dist', 'cli.js'), 'info', image]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('image-verbs.cjs (code cache not used)');
  });

  it('the service verbs always run main.js', async () => {
    for (const verb of ['serve', 'worker', 'up']) {
      // An unexpected argument makes each refuse at once, after the launcher chose.
      const r = await node([join(ROOT, 'dist', 'cli.js'), verb, 'unexpected']);
      expect(r.code, verb).not.toBe(0);
      expect(r.stderr, verb).not.toContain('image-verbs');
      expect(r.stderr, verb).not.toContain('the service verbs run from dist/cli/main.js');
    }
  });
});
