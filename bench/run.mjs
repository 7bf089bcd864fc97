#!/usr/bin/env node
// diskconv convert against qemu-img convert, side by side in one run (issue 8's benchmark).
//
// A deterministic disk (4 GiB virtual by default, about 30 % data: incompressible,
// compressible text and binary, written zeros, holes, and runs of small extents at
// 4 KiB-aligned starts that are not cluster-aligned) is turned by qemu-img into each
// source format. Per format, rounds of three runs in rotating order: qemu-img's
// default, qemu-img -m 16 -W (out-of-order writes, every core decoding) and
// diskconv; each run after its output was deleted and `sync`, on a warm page
// cache. Reported: median wall and CPU (user+sys) seconds, peak RSS, allocated
// bytes of the output, whether the output is identical to qemu-img's. With
// --flushed (default on), also the flushed pair: qemu-img -t writeback against
// diskconv's own flush (-t writeback, when this build has it); --flushed only runs the flushed pair alone.
//
// Before the timed rounds of each pass, --warmup rounds (default 1) run every mode once, untimed in the
// medians (kept in the JSON as warmupRuns): without them the third tool of the first round was always
// the first to meet the memory that the previous format's deleted files had freed and this VM had
// since handed to its host (free page reporting), and paid for the host to fault it in again
// (diskconv, third in round 1, showed 5-7 s of system time there against 1-3 s in its other rounds,
// bench/results/2026-12-01-session4.json); after a warm-up every timed run reuses the memory its own
// previous output freed just before, as every later round always did.
//
// Usage: npm run bench -- [--size 4G] [--rounds 5] [--flushed-rounds 3] [--budget 450] [--warmup 1]
//                         [--only qcow2,vdi-static] [--keep DIR] [--flushed on|off|only] [--json FILE] [--md FILE]
// The same settings from the environment: BENCH_SIZE, BENCH_ROUNDS, BENCH_FLUSHED_ROUNDS, BENCH_BUDGET, BENCH_WARMUP,
// BENCH_ONLY, BENCH_FLUSHED (flags win). --budget (seconds, 0 = none) bounds the whole run: each source
// format gets an equal share of what is left, and its rounds stop early (never below 3, or --rounds
// if smaller) when its share is used; the rounds actually run are in the table.
// Ratios are diskconv / qemu-img (wall seconds): below 1 means diskconv is faster.
// Writes a markdown table and a JSON file (bench/results/latest.{md,json} by default).
import { spawn, execFileSync, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { layout, makeSource } from './disk.mjs';

const args = new Map();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const parseSize = (s) => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
};
const setting = (name, env, fallback) => args.get(name) ?? process.env[env] ?? fallback;
const virtualSize = parseSize(setting('size', 'BENCH_SIZE', '4G'));
const rounds = Number(setting('rounds', 'BENCH_ROUNDS', 5));
const flushedRounds = Number(setting('flushed-rounds', 'BENCH_FLUSHED_ROUNDS', Math.min(3, rounds)));
const budgetSeconds = Number(setting('budget', 'BENCH_BUDGET', 450));
const only = setting('only', 'BENCH_ONLY', undefined)?.split(',');
const flushedSetting = setting('flushed', 'BENCH_FLUSHED', 'on');
if (!['on', 'off', 'only'].includes(flushedSetting)) throw new Error('--flushed takes on, off or only');
const flushed = flushedSetting !== 'off';
// Only the flushed pair (measuring the flush alone): the unflushed pass is skipped.
const flushedOnly = flushedSetting === 'only';
const warmup = Number(setting('warmup', 'BENCH_WARMUP', 1));
const started = Date.now();
const elapsed = () => (Date.now() - started) / 1000;
if (![rounds, flushedRounds, budgetSeconds, warmup].every((n) => Number.isInteger(n) && n >= 0) || rounds < 1) throw new Error('rounds must be >= 1, flushed-rounds, warmup and budget >= 0 (integers)');
if (flushedOnly && flushedRounds < 1) throw new Error('--flushed only needs --flushed-rounds >= 1');
const here = dirname(fileURLToPath(import.meta.url));
const CLI = join(here, '..', 'dist', 'cli.js');
// What users run: the package's launcher (bin/diskconv, which starts the image verbs without NODE_EXTRA_CA_CERTS),
// with this Node first on PATH; `node dist/cli.js` where a build has no launcher (an older one, for A/B rounds).
const LAUNCHER = join(here, '..', 'bin', 'diskconv');
const launched = existsSync(LAUNCHER);
process.env.PATH = `${dirname(process.execPath)}:${process.env.PATH ?? ''}`;
const jsonOut = args.get('json') ?? join(here, 'results', 'latest.json');
const mdOut = args.get('md') ?? join(here, 'results', 'latest.md');
const dir = args.get('keep') ?? mkdtempSync(join(tmpdir(), 'diskconv-bench-'));
mkdirSync(dir, { recursive: true });

const MiB = 2 ** 20;

// ---------------------------------------------------------------------------
// Runs.

const CASES = [
  ['qcow2', ['-O', 'qcow2']],
  ['qcow2-zlib', ['-O', 'qcow2', '-c', '-o', 'compression_type=zlib']],
  ['qcow2-zstd', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']],
  ['vmdk-sparse', ['-O', 'vmdk', '-o', 'subformat=monolithicSparse']],
  ['vmdk-stream', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
  ['vdi-dynamic', ['-O', 'vdi']],
  ['vdi-static', ['-O', 'vdi', '-o', 'static=on']],
  ['raw-sparse', ['-O', 'raw']],
].filter(([name]) => !only || only.includes(name));
const FORMAT_OF = { qcow2: 'qcow2', vmdk: 'vmdk', vdi: 'vdi', raw: 'raw' };

/**
 * KiB the guest has handed back to its host so far (free page reporting), where this kernel
 * shows it; undefined elsewhere. A run whose new page-cache pages come from reported memory
 * pays for the host to fault them in again, inside the kernel's copy (system time): on these
 * VMs that alone moved one tool's system time from 0.6 to 4 s between rounds (bench/results/2026-12-01-session4-vmdk.md).
 */
const REPORTED = '/sys/module/page_reporting/parameters/reported_kib';
const reportedKiB = () => {
  try {
    return Number(readFileSync(REPORTED, 'utf8'));
  } catch {
    return undefined;
  }
};

/** Runs a command under /usr/bin/time: wall seconds, user and sys CPU seconds, peak RSS in MiB. */
function timed(cmd, argv) {
  const report = join(dir, 'time.txt');
  return new Promise((resolve, reject) => {
    const reported0 = reportedKiB();
    const t0 = process.hrtime.bigint();
    const child = spawn('/usr/bin/time', ['-f', '%U %S %M', '-o', report, cmd, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.on('exit', (code) => {
      const wall = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code !== 0) return reject(new Error(`${cmd} ${argv.join(' ')} exited ${code}: ${stderr}`));
      const [user, sys, maxKiB] = readFileSync(report, 'utf8').trim().split('\n').pop().split(/\s+/).map(Number);
      const reported1 = reportedKiB();
      const reportedMiB = reported0 === undefined || reported1 === undefined ? undefined : (reported1 - reported0) / 1024;
      resolve({ wall, user, sys, cpu: user + sys, rssMiB: maxKiB / 1024, ...(reportedMiB === undefined ? {} : { reportedMiB }) });
    });
  });
}
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const allocated = (p) => statSync(p).blocks * 512;
/** The 1-minute load average, recorded with every figure (the machine may be shared). */
const loadAverage = () => Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
/**
 * Whether two outputs hold the same bytes. Both are sparse files of the virtual
 * size: only ranges where either has data (SEEK_DATA, through diskconv's own
 * native helper when it built) are read; elsewhere both read as zeros. Without
 * the helper every byte is compared.
 */
const seek = await import(join(here, '..', 'dist', 'engine', 'native.js')).then((m) => m.seekHelper(), () => null);
function identical(a, b) {
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  try {
    const size = statSync(a).size;
    if (statSync(b).size !== size) return false;
    const ranges = (fd) => {
      if (!seek) return [0, size];
      const out = [];
      for (let at = 0; at < size; ) {
        const got = seek.dataExtents(fd, at, size, 65536);
        out.push(...got);
        if (got.length < 2 * 65536) break;
        at = got[got.length - 1];
      }
      return out;
    };
    // Union of both files' data ranges.
    const all = [...ranges(fa), ...ranges(fb)];
    const pairs = [];
    for (let i = 0; i < all.length; i += 2) pairs.push([all[i], all[i + 1]]);
    pairs.sort((x, y) => x[0] - y[0]);
    const ba = Buffer.allocUnsafe(16 * MiB);
    const bb = Buffer.allocUnsafe(16 * MiB);
    let done = 0;
    for (const [start, end] of pairs) {
      for (let at = Math.max(start, done); at < end; at += ba.length) {
        const n = Math.min(ba.length, end - at);
        if (readSync(fa, ba, 0, n, at) !== n || readSync(fb, bb, 0, n, at) !== n) return false;
        if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
      }
      done = Math.max(done, end);
    }
    return true;
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

/** Whether this diskconv build takes -t writeback (the CLI's flush option). */
function diskconvHasFlush() {
  const probe = join(dir, 'probe.raw');
  writeFileSync(probe, Buffer.alloc(4096, 1));
  const out = join(dir, 'probe.out');
  rmSync(out, { force: true });
  const ok = spawnSync(process.execPath, [CLI, 'convert', '-f', 'raw', '-O', 'raw', '-t', 'writeback', probe, out]).status === 0;
  rmSync(out, { force: true });
  rmSync(probe, { force: true });
  return ok;
}

const MODES = {
  'qemu-img': (img, fmt, out, flush) => ['qemu-img', ['convert', '-f', fmt, '-O', 'raw', ...(flush ? ['-t', 'writeback'] : []), img, out]],
  'qemu-img -m 16 -W': (img, fmt, out, flush) => ['qemu-img', ['convert', '-f', fmt, '-O', 'raw', '-m', '16', '-W', ...(flush ? ['-t', 'writeback'] : []), img, out]],
  diskconv: (img, fmt, out, flush) => {
    const argv = ['convert', '-f', fmt, '-O', 'raw', ...(flush ? ['-t', 'writeback'] : []), img, out];
    return launched ? [LAUNCHER, argv] : [process.execPath, [CLI, ...argv]];
  },
};

const source = join(dir, 'source.raw');
const reuse = args.get('keep') && existsSync(source) && statSync(source).size === virtualSize;
const dataBytes = reuse ? layout(virtualSize).reduce((n, e) => n + e.length, 0) : makeSource(source, virtualSize);
const machine = {
  cpus: cpus().length,
  cpuModel: cpus()[0]?.model ?? 'unknown',
  memGiB: Math.round(totalmem() / 2 ** 30),
  node: process.version,
  qemuImg: execFileSync('qemu-img', ['--version']).toString().split('\n')[0],
  kernel: execFileSync('uname', ['-r']).toString().trim(),
  filesystem: execFileSync('stat', ['-f', '-c', '%T', dir]).toString().trim(),
  loadAverageAtStart: execFileSync('cat', ['/proc/loadavg']).toString().split(' ').slice(0, 3).join(' '),
  // Node's own start-up here, which every diskconv run pays before its first line of JavaScript: median wall of 5
  // `node -e 0`. NODE_EXTRA_CA_CERTS makes Node 20 parse that whole CA bundle at start (0.07 s CPU, 0.1-0.3 s wall
  // on the shared VM, bench/results/2026-12-02-session6-uncompressed.md); qemu-img does not read it.
  nodeStartupSeconds: Number(
    [0, 1, 2, 3, 4]
      .map(() => {
        const t0 = process.hrtime.bigint();
        spawnSync(process.execPath, ['-e', '0']);
        return Number(process.hrtime.bigint() - t0) / 1e9;
      })
      .sort((a, b) => a - b)[2]
      .toFixed(3),
  ),
  nodeExtraCaCerts: process.env.NODE_EXTRA_CA_CERTS !== undefined && process.env.NODE_EXTRA_CA_CERTS !== '',
  diskconvCommand: launched ? 'bin/diskconv' : 'node dist/cli.js',
};
const hasFlush = flushed && diskconvHasFlush();
console.log(`diskconv bench: ${virtualSize / 2 ** 30} GiB virtual, ${(dataBytes / 2 ** 20).toFixed(0)} MiB data (${((100 * dataBytes) / virtualSize).toFixed(0)} %), ${rounds} rounds; ${dir}`);
console.log(`machine: ${machine.cpus} x ${machine.cpuModel}, ${machine.memGiB} GiB, ${machine.node}, ${machine.qemuImg}, ${machine.filesystem}, load ${machine.loadAverageAtStart}`);
if (flushed && !hasFlush) console.log('this diskconv has no -t writeback: the flushed pair runs qemu-img only');

const results = [];
for (const [caseIndex, [name, opts]] of CASES.entries()) {
  // This format's share of the time left (image creation included).
  const share = budgetSeconds > 0 ? (budgetSeconds - elapsed()) / (CASES.length - caseIndex) : Infinity;
  const caseStarted = elapsed();
  const image = join(dir, `${name}.img`);
  const fmt = FORMAT_OF[name.split('-')[0]];
  if (!reuse || !existsSync(image)) {
    if (name === 'raw-sparse') execFileSync('cp', ['--sparse=always', source, image]);
    else execFileSync('qemu-img', ['convert', '-f', 'raw', ...opts, source, image]);
  }
  // Warm the cache: the image is read once before timing.
  execFileSync('cat', [image], { stdio: ['ignore', 'ignore', 'inherit'], maxBuffer: 0 });
  const row = { name, imageBytes: statSync(image).size, imageAllocated: allocated(image), modes: {} };
  row.rounds = {};
  row.loadAverage = {};
  for (const pass of flushedOnly ? [true] : flushed && flushedRounds > 0 ? [false, true] : [false]) {
    const modes = Object.keys(MODES).filter((m) => !pass || m !== 'diskconv' || hasFlush);
    const runs = Object.fromEntries(modes.map((m) => [m, []]));
    const warmups = {};
    const outputs = {};
    const wanted = pass ? flushedRounds : rounds;
    // The unflushed pass may use the share less what the flushed pass will need (about as long per round, plus flushing).
    const passEnd = caseStarted + (pass || !flushed || flushedRounds === 0 ? share : share * (rounds / (rounds + 1.5 * flushedRounds)));
    const loadBefore = loadAverage();
    let r = -warmup;
    for (; r < wanted; r++) {
      if (r >= Math.min(3, wanted) && elapsed() > passEnd) break;
      for (let i = 0; i < modes.length; i++) {
        const mode = modes[(((i + r) % modes.length) + modes.length) % modes.length]; // rotate who goes first
        const out = join(dir, `${name}.${mode.replace(/\W+/g, '_')}.raw`);
        rmSync(out, { force: true });
        execFileSync('sync');
        const [cmd, argv] = MODES[mode](image, fmt, out, pass);
        const res = await timed(cmd, argv);
        res.allocated = allocated(out);
        if (r < 0) (warmups[mode] ??= []).push(res);
        else runs[mode].push(res);
        outputs[mode] = out;
      }
    }
    row.rounds[pass ? 'flushed' : 'unflushed'] = r;
    row.loadAverage[pass ? 'flushed' : 'unflushed'] = [loadBefore, loadAverage()];
    const reference = outputs['qemu-img'];
    for (const mode of modes) {
      const xs = runs[mode];
      const key = pass ? `${mode} (flushed)` : mode;
      row.modes[key] = {
        wall: median(xs.map((x) => x.wall)),
        cpu: median(xs.map((x) => x.cpu)),
        // Noise on a shared VM only ever adds time (other tenants, host faults in the kernel's
        // copies), so the best round is the steadier comparison when the medians disagree.
        minWall: Math.min(...xs.map((x) => x.wall)),
        minCpu: Math.min(...xs.map((x) => x.cpu)),
        user: median(xs.map((x) => x.user)),
        sys: median(xs.map((x) => x.sys)),
        rssMiB: Math.max(...xs.map((x) => x.rssMiB)),
        allocated: xs[xs.length - 1].allocated,
        // Each tool's last output against qemu-img's default of the same pass.
        identical: mode === 'qemu-img' ? true : identical(reference, outputs[mode]),
        runs: xs,
        warmupRuns: warmups[mode] ?? [],
      };
    }
    for (const out of Object.values(outputs)) rmSync(out, { force: true });
  }
  results.push(row);
  const m = Object.fromEntries(Object.entries(row.modes).filter(([k]) => k.endsWith(' (flushed)') === flushedOnly).map(([k, v]) => [k.replace(' (flushed)', ''), v]));
  const d = m.diskconv;
  const passName = flushedOnly ? 'flushed' : 'unflushed';
  if (d)
    console.log(
      `${name.padEnd(12)} ${flushedOnly ? 'flushed: ' : ''}qemu ${m['qemu-img'].wall.toFixed(2)} s, -m16 -W ${m['qemu-img -m 16 -W'].wall.toFixed(2)} s, diskconv ${d.wall.toFixed(2)} s ` +
        `(x${(d.wall / m['qemu-img'].wall).toFixed(2)} / x${(d.wall / m['qemu-img -m 16 -W'].wall).toFixed(2)}), cpu ${d.cpu.toFixed(2)} vs ${m['qemu-img'].cpu.toFixed(2)}, ` +
        `rss ${d.rssMiB.toFixed(0)} MiB, ${d.identical ? 'identical' : 'DIFFERS'}; ${row.rounds[passName]} rounds, load ${row.loadAverage[passName][0]} -> ${row.loadAverage[passName][1]}; ${elapsed().toFixed(0)} s so far`,
    );
  if (!args.get('keep')) rmSync(image, { force: true });
}

// ---------------------------------------------------------------------------
// Report.

const fmtS = (x) => (x === undefined ? '–' : x.toFixed(2));
const ratio = (a, b) => (a && b ? (a.wall / b.wall).toFixed(2) : '–');
const GiB = (b) => (b / 2 ** 30).toFixed(2);
const lines = [];
lines.push(`${virtualSize / 2 ** 30} GiB virtual, ${(dataBytes / 2 ** 20).toFixed(0)} MiB data; median of up to ${rounds} rounds after ${warmup} untimed warm-up round(s) (rotating order, outputs deleted and sync before each run, warm cache); whole run ${(elapsed() / 60).toFixed(1)} min.`);
lines.push(`Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memGiB} GiB RAM, ${machine.filesystem}, Linux ${machine.kernel}, Node ${machine.node}, ${machine.qemuImg}; load average at start ${machine.loadAverageAtStart}. \`node -e 0\` takes ${machine.nodeStartupSeconds} s here (median of 5${machine.nodeExtraCaCerts ? '; NODE_EXTRA_CA_CERTS is set, which Node parses at every start' : ''}).`);
lines.push('Ratios are diskconv / qemu-img wall time: below 1.00 diskconv is faster. "best" is the ratio of the fastest rounds (min wall; min CPU in the cpu column), steadier than the median where the system time of single runs jumps (page-cache pages the host must fault in again).');
lines.push('');
if (!flushedOnly) lines.push('| source | diskconv / qemu-img | diskconv / qemu-img -m 16 -W | best: / qemu-img, / -m 16 -W | qemu-img wall (cpu) | qemu-img -m 16 -W wall (cpu) | diskconv wall (cpu) | cpu ratio (best) | diskconv sys s per round | peak RSS MiB (qemu / -W / ours) | output allocated GiB (qemu / ours) | identical | rounds | load (1 min) |');
if (!flushedOnly) lines.push('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
for (const row of flushedOnly ? [] : results) {
  const q = row.modes['qemu-img'], w = row.modes['qemu-img -m 16 -W'], d = row.modes.diskconv;
  lines.push(
    `| ${row.name} | **${ratio(d, q)}** | **${ratio(d, w)}** | ${(d.minWall / q.minWall).toFixed(2)}, ${(d.minWall / w.minWall).toFixed(2)} | ${fmtS(q.wall)} (${fmtS(q.cpu)}) | ${fmtS(w.wall)} (${fmtS(w.cpu)}) | ${fmtS(d.wall)} (${fmtS(d.cpu)}) | ${(d.cpu / q.cpu).toFixed(2)} (${(d.minCpu / q.minCpu).toFixed(2)}) | ${d.runs.map((x) => x.sys.toFixed(2)).join(' ')} | ${q.rssMiB.toFixed(0)} / ${w.rssMiB.toFixed(0)} / ${d.rssMiB.toFixed(0)} | ${GiB(q.allocated)} / ${GiB(d.allocated)} | ${d.identical && w.identical ? 'yes' : 'NO'} | ${row.rounds.unflushed} | ${row.loadAverage.unflushed.join(' → ')} |`,
  );
}
if (flushed && flushedRounds > 0) {
  lines.push('');
  lines.push('Flushed (qemu-img -t writeback; diskconv -t writeback' + (hasFlush ? '' : ': not in this build') + '):');
  lines.push('');
  lines.push('| source | diskconv / qemu-img | diskconv / qemu-img -m 16 -W | qemu-img | qemu-img -m 16 -W | diskconv | identical | rounds | load (1 min) |');
  lines.push('|---|---|---|---|---|---|---|---|---|');
  for (const row of results) {
    const q = row.modes['qemu-img (flushed)'], w = row.modes['qemu-img -m 16 -W (flushed)'], d = row.modes['diskconv (flushed)'];
    if (!q) continue;
    lines.push(`| ${row.name} | **${ratio(d, q)}** | **${ratio(d, w)}** | ${fmtS(q.wall)} | ${fmtS(w?.wall)} | ${fmtS(d?.wall)} | ${d?.identical && w?.identical ? 'yes' : d ? 'NO' : '–'} | ${row.rounds.flushed} | ${row.loadAverage.flushed.join(' → ')} |`);
  }
}
lines.push('');
const sideKey = flushedOnly ? ' (flushed)' : '';
lines.push(`Side by side (diskconv / qemu-img default${sideKey}, wall): ${results.map((row) => `${row.name} ${ratio(row.modes[`diskconv${sideKey}`], row.modes[`qemu-img${sideKey}`])}`).join(' · ')}`);
lines.push(`Side by side (diskconv / qemu-img -m 16 -W${sideKey}, wall): ${results.map((row) => `${row.name} ${ratio(row.modes[`diskconv${sideKey}`], row.modes[`qemu-img -m 16 -W${sideKey}`])}`).join(' · ')}`);
const md = lines.join('\n') + '\n';
console.log('\n' + md);
mkdirSync(dirname(jsonOut), { recursive: true });
mkdirSync(dirname(mdOut), { recursive: true });
writeFileSync(jsonOut, JSON.stringify({ date: new Date().toISOString(), virtualSize, dataBytes, rounds, warmup, flushedRounds, budgetSeconds, seconds: Math.round(elapsed()), loadAverageAtEnd: readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' '), machine, results }, null, 2) + '\n');
writeFileSync(mdOut, md);
console.log(`wrote ${mdOut} and ${jsonOut}`);
if (!args.get('keep')) rmSync(dir, { recursive: true, force: true });
if (results.some((r) => Object.values(r.modes).some((m) => !m.identical))) process.exitCode = 1;
