/**
 * `npm run fuzz -- [--seconds N] [--cases N] [--seed S] [--out DIR] [--timeout MS] [--only NAME,NAME] [--no-differential]`
 * runs the mutation fuzzer for as long as asked and writes every failing case
 * (crash, hang, memory) to DIR (default ./fuzz-findings) as NAME.bin plus
 * NAME.json (seed image, mutations, error, how to replay). --only keeps the seed
 * images whose names contain one of the given words (e.g. --only zstd,stream).
 * Every converted case is also converted by qemu-img and must give the same
 * bytes (differential.ts); --no-differential turns that off.
 *
 * `npm run fuzz -- --replay FILE [--format F]` runs one saved case in this
 * process and prints its result with the full stack.
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { FormatId } from '../../src/engine/index.js';
import { makeTempDir } from '../helpers/qemu.js';
import { runCase } from './case.js';
import { DEFAULT_BOUNDS, runFuzz, type RunSummary } from './harness.js';
import { describeMutations } from './mutate.js';
import { buildSeeds } from './seeds.js';

function option(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function report(s: RunSummary): string {
  const refused = Object.entries(s.refused)
    .sort((a, b) => b[1] - a[1])
    .map(([code, n]) => `${code} ${n}`)
    .join(', ');
  return `${s.cases} cases: ${s.converted} converted (qemu-img same bytes ${s.qemuSame}, qemu-img refuses ${s.qemuRefuses.length}); refused: ${refused || 'none'}; findings: ${s.findings.length}; slowest ${s.slowestMs.toFixed(0)} ms; peak RSS ${(s.peakRss / 2 ** 20).toFixed(0)} MiB`;
}

const replay = option('--replay');
if (replay) {
  const format = option('--format') as FormatId | undefined;
  const result = await runCase(await readFile(replay), format);
  process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  process.exitCode = result.outcome === 'crash' ? 1 : 0;
} else {
  const seconds = Number(option('--seconds') ?? (option('--cases') ? Infinity : 60));
  const cases = option('--cases') !== undefined ? Number(option('--cases')) : undefined;
  const runSeed = Number(option('--seed') ?? Date.now() % 2 ** 31);
  const findingsDir = resolve(option('--out') ?? 'fuzz-findings');
  const caseTimeoutMs = Number(option('--timeout') ?? DEFAULT_BOUNDS.caseTimeoutMs);
  const { dir, cleanup } = await makeTempDir('diskconv-fuzz-seeds-');
  try {
    const only = option('--only')?.split(',').filter(Boolean);
    const seeds = (await buildSeeds(dir)).filter((s) => !only || only.some((word) => s.name.includes(word)));
    if (seeds.length === 0) throw new Error(`--only ${only?.join(',')} matches no seed image`);
    process.stdout.write(`fuzz: seed ${runSeed}, ${seeds.length} seed images (${seeds.map((s) => s.name).join(', ')}), ${Number.isFinite(seconds) ? `${seconds} s` : `${cases} cases`}\n`);
    const summary = await runFuzz({
      seeds,
      runSeed,
      seconds: Number.isFinite(seconds) ? seconds : undefined,
      cases,
      findingsDir,
      ...(process.argv.includes('--no-differential') ? {} : { differential: { dir } }),
      bounds: { ...DEFAULT_BOUNDS, caseTimeoutMs },
      onProgress: (s) => process.stdout.write(`  ${report(s)}\n`),
    });
    process.stdout.write(`${report(summary)}\n`);
    for (const f of summary.findings) {
      process.stdout.write(
        `FINDING ${f.verdict.kind} seed image ${f.fuzzCase.seed}, case ${f.fuzzCase.index}: ${describeMutations(f.fuzzCase.mutations)}\n  ${f.verdict.detail.split('\n').slice(0, 3).join('\n  ')}\n  saved: ${f.saved}\n`,
      );
    }
    for (const q of summary.qemuRefuses) {
      process.stdout.write(`QEMU-REFUSES ${q.fuzzCase.seed}, case ${q.fuzzCase.index}: ${describeMutations(q.fuzzCase.mutations)}\n  qemu-img: ${q.qemuError}\n`);
    }
    process.exitCode = summary.findings.length > 0 ? 1 : 0;
  } finally {
    await cleanup();
  }
}
