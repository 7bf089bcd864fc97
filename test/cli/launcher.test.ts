/**
 * bin/diskconv, the package's launcher (what `npm install` links as `diskconv`): it runs dist/cli/launch.cjs through
 * the symlink npm makes, passes every argument through unchanged, and starts the image verbs without
 * NODE_EXTRA_CA_CERTS (Node 20 reads that bundle at start-up, before any JavaScript) while the service verbs,
 * which open TLS connections, keep it. Node says when it reads the variable: a path that does not exist
 * draws "Ignoring extra certs from" on stderr.
 */
import { symlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCommand, type CommandResult } from '../helpers/cli.js';
import { makeTempDir, qemuImg } from '../helpers/qemu.js';

const LAUNCHER = fileURLToPath(new URL('../../bin/diskconv', import.meta.url));

// This Node first on PATH, as npm's scripts have it.
const launch = (bin: string, args: string[], env: Record<string, string>): Promise<CommandResult> =>
  runCommand(bin, args, { env: { ...process.env, PATH: `${dirname(process.execPath)}:${process.env.PATH ?? ''}`, ...env }, timeoutMs: 60_000 });

describe('bin/diskconv', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let linked: string;
  let image: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-launcher-'));
    // npm's node_modules/.bin/diskconv: a symlink elsewhere.
    await symlink(LAUNCHER, (linked = join(dir, 'diskconv')));
    image = join(dir, 'a disk with spaces.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, '1M');
  });
  afterAll(async () => cleanup?.());

  it('runs the CLI through a symlink with every argument as given, and the image verbs start without NODE_EXTRA_CA_CERTS', async () => {
    const env = { NODE_EXTRA_CA_CERTS: join(dir, 'no-such-bundle.pem') };
    const info = await launch(linked, ['info', '--output=json', image], env);
    expect(info.code, info.stderr).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ filename: image, format: 'qcow2', 'virtual-size': 2 ** 20 });
    expect(info.stderr).not.toContain('Ignoring extra certs');
    const convert = await launch(linked, ['convert', '-O', 'raw', image, join(dir, 'out put.raw')], env);
    expect(convert.code, convert.stderr).toBe(0);
    expect(convert.stderr).not.toContain('Ignoring extra certs');
    // Exit statuses come through: an unknown verb is a usage error.
    const unknown = await launch(linked, ['no-such-verb'], env);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('Command not found: no-such-verb');
  });

  it('the service verbs keep NODE_EXTRA_CA_CERTS (their S3, URL imports and webhooks may need it)', async () => {
    for (const verb of ['serve', 'worker', 'up']) {
      // An argument makes each refuse at once, after Node has started.
      const r = await launch(LAUNCHER, [verb, 'unexpected'], { NODE_EXTRA_CA_CERTS: join(dir, 'no-such-bundle.pem') });
      expect(r.code, verb).not.toBe(0);
      expect(r.stderr, verb).toContain('Ignoring extra certs');
    }
  });
});
