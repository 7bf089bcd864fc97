/**
 * Every image of the shared real-world corpus, one test per MANIFEST.tsv row:
 * the same bytes and info as qemu-img where we support the image, otherwise a
 * typed refusal on one stderr line, always within a time limit and a heap cap.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { pickInfo } from '../helpers/qemu.js';
import {
  CORPUS_ROOT,
  corpusPresent,
  decompress,
  expectationFor,
  isCompressed,
  locate,
  rawShaSidecar,
  readManifest,
  readSha256Sidecar,
  runDiskconvIn,
  sha256Of,
  type CorpusRow,
} from '../helpers/corpus.js';

/** Per CLI run: the slowest row (a 1 GiB image, or a 16 GiB sparse one) converts in a few seconds. */
const CLI_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 3 * CLI_TIMEOUT_MS;

const present = corpusPresent();
const rows: CorpusRow[] = present ? readManifest() : [];
let tempRoot = '';

/**
 * Info keys that describe the machine the sidecar was made on, not the image:
 * - filename: qemu prints the path it was given; the sidecar keeps only the base
 *   name, so we check ours is the path we passed and has the same base name.
 * - actual-size: allocated bytes of the file on the disk where qemu-img ran
 *   (st_blocks * 512); copies of the corpus allocate differently, so ours must be
 *   st_blocks * 512 of the file here, as qemu-img would print it here.
 * Everything else (virtual-size, format, cluster-size, dirty-flag, encrypted,
 * backing-filename, snapshots, format-specific, including extent file names,
 * which qemu prints relative to the corpus root where we run) must be equal.
 */
const HOST_KEYS = ['filename', 'actual-size'];
const withoutHostKeys = (info: Record<string, unknown>): Record<string, unknown> =>
  Object.fromEntries(Object.entries(pickInfo(info)).filter(([k]) => !HOST_KEYS.includes(k)));

const outputPath = (row: CorpusRow): string => join(tempRoot, 'out', `${row.file.replace(/[/\\]/g, '__')}.raw`);

describe.skipIf(!present)(`real-world corpus (${CORPUS_ROOT})`, () => {
  beforeAll(async () => {
    tempRoot = await mkdtemp(join(tmpdir(), 'diskconv-corpus-'));
    await Promise.all(rows.filter(isCompressed).map((row) => decompress(row, tempRoot)));
  });
  afterAll(async () => {
    if (tempRoot) await rm(tempRoot, { recursive: true, force: true });
  });

  for (const row of rows) {
    const expectation = expectationFor(row);
    const title =
      expectation.kind === 'same'
        ? `${row.file} [${row.format}: ${row.subformat}]: same bytes and info as qemu-img`
        : `${row.file} [${row.format}: ${row.subformat}]: refused with ${expectation.codes.join('|')} (${expectation.why})`;

    it(
      title,
      async () => {
        const located = locate(row, tempRoot);
        const out = outputPath(row);
        await rm(out, { force: true });
        await mkdir(join(tempRoot, 'out'), { recursive: true });

        if (expectation.kind === 'refuse') {
          for (const args of [
            ['info', located.relPath],
            ['convert', '-O', 'raw', located.relPath, out],
          ]) {
            const run = await runDiskconvIn(located.cwd, args, CLI_TIMEOUT_MS);
            const what = `diskconv ${args[0]} ${located.relPath}: exit ${run.code}, stderr ${JSON.stringify(run.stderr)}`;
            expect(run.timedOut, `${what}: timed out`).toBe(false);
            expect(run.code, `${what}: expected a refusal`).toBe(1);
            expect(run.stdout, what).toBe('');
            // One clear line: `diskconv: CODE: message`, no stack trace.
            const lines = run.stderr.split('\n').filter((l) => l !== '');
            expect(lines, what).toHaveLength(1);
            const match = /^diskconv: ([A-Z_]+): (\S.*)$/.exec(lines[0] ?? '');
            expect(match, what).not.toBeNull();
            expect(expectation.codes, what).toContain(match?.[1]);
            expect(existsSync(out), `${what}: left an output file`).toBe(false);
          }
          return;
        }

        const sidecar = rawShaSidecar(located);
        if (!sidecar) throw new Error(`${row.file}: no .raw.sha256 or .raw-first64M*.sha256 sidecar`);
        const conv = await runDiskconvIn(located.cwd, ['convert', '-O', 'raw', located.relPath, out], CLI_TIMEOUT_MS);
        const what = `diskconv convert ${located.relPath}: exit ${conv.code}, stderr ${JSON.stringify(conv.stderr)}`;
        expect(conv.timedOut, `${what}: timed out`).toBe(false);
        expect(conv.code, what).toBe(0);
        expect(conv.stderr, what).toBe('');
        if (row.virtualSize !== undefined) expect((await stat(out)).size, 'output size = virtual size').toBe(row.virtualSize);
        // Over 2 GiB the sidecar holds the sha256 of the first 64 MiB only.
        expect(await sha256Of(out, sidecar.bytes), `sha256 of ${sidecar.bytes ? 'the first 64 MiB of ' : ''}our output vs ${basename(sidecar.path)}`).toBe(
          readSha256Sidecar(sidecar.path),
        );
        await rm(out, { force: true });

        const info = await runDiskconvIn(located.cwd, ['info', '--output=json', located.relPath], CLI_TIMEOUT_MS);
        expect(info.code, `diskconv info: ${info.stderr}`).toBe(0);
        const ours = JSON.parse(info.stdout) as Record<string, unknown>;
        const theirs = JSON.parse(readFileSync(`${located.sidecarBase}.info.json`, 'utf8')) as Record<string, unknown>;
        expect(ours.filename).toBe(located.relPath);
        expect(basename(String(ours.filename))).toBe(basename(String(theirs.filename)));
        const allocated = (await stat(join(located.cwd, located.relPath))).blocks * 512;
        expect(ours['actual-size'], 'actual-size: st_blocks * 512 of the file here').toBe(allocated);
        expect(withoutHostKeys(ours)).toEqual(withoutHostKeys(theirs));
      },
      TEST_TIMEOUT_MS,
    );
  }
});

if (!present) {
  describe('real-world corpus', () => {
    // CI runs with ../shared beside the clone: a missing corpus there fails the run instead of skipping 59 tests.
    if (process.env.CI === 'true') it(`the corpus is at ${CORPUS_ROOT} in CI`, () => expect(present, 'MANIFEST.tsv absent').toBe(true));
    else it.skip(`skipped: no corpus at ${CORPUS_ROOT} (MANIFEST.tsv absent)`, () => {});
  });
}
