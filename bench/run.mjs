#!/usr/bin/env node
// Benchmarks diskconv convert against qemu-img convert on the same images, side by side in one run.
// Prints wall-time and CPU-time ratios (diskconv / qemu-img; below 1.00 means we are faster) and peak memory.
// Usage: npm run bench [-- --size-mib 1024 --runs 3 --only qcow2-zlib,vmdk-stream --keep DIR]
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync, openSync, writeSync, closeSync, readFileSync, existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = new Map();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const sizeMiB = Number(args.get('size-mib') ?? 1024);
const runs = Number(args.get('runs') ?? 3);
const only = args.get('only')?.split(',');
const CLI = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
const dir = args.get('keep') ?? mkdtempSync(join(tmpdir(), 'diskconv-bench-'));
mkdirSync(dir, { recursive: true });

/** Guest content like a real disk: 40% random, 30% text-like, 30% zeros, in 1 MiB runs. */
function makeSource(path, bytes) {
  const fd = openSync(path, 'w');
  const chunk = 1 << 20;
  let x = 12345;
  const rnd = Buffer.alloc(chunk);
  const text = Buffer.alloc(chunk, 'the quick brown fox jumps over the lazy dog 0123456789\n');
  for (let off = 0, i = 0; off < bytes; off += chunk, i++) {
    const kind = (i * 7) % 10;
    if (kind < 4) {
      for (let j = 0; j < chunk; j += 4) {
        x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
        rnd.writeUInt32LE(x, j);
      }
      writeSync(fd, rnd, 0, chunk, off);
    } else if (kind < 7) {
      writeSync(fd, text, 0, chunk, off);
    } // else leave a hole
  }
  closeSync(fd);
  execFileSync('truncate', ['-s', String(bytes), path]);
}

const CASES = [
  ['raw', ['-O', 'raw']],
  ['qcow2', ['-O', 'qcow2']],
  ['qcow2-zlib', ['-O', 'qcow2', '-c', '-o', 'compression_type=zlib']],
  ['qcow2-zstd', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']],
  ['qcow2-l2ext', ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k']],
  ['vmdk-sparse', ['-O', 'vmdk', '-o', 'subformat=monolithicSparse']],
  ['vmdk-stream', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
  ['vdi', ['-O', 'vdi']],
].filter(([name]) => !only || only.includes(name));

/**
 * Runs a command under /usr/bin/time: wall seconds, user+sys CPU seconds (the
 * fair figure when other work loads the machine), and peak RSS in MiB.
 */
function timed(cmd, argv) {
  const report = join(dir, 'time.txt');
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn('/usr/bin/time', ['-f', '%U %S %M', '-o', report, cmd, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.on('exit', (code) => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code !== 0) return reject(new Error(`${cmd} ${argv.join(' ')} exited ${code}: ${stderr}`));
      const [user, sys, maxKiB] = readFileSync(report, 'utf8').trim().split('\n').pop().split(/\s+/).map(Number);
      resolve({ secs, user, sys, cpu: user + sys, peakMiB: maxKiB / 1024 });
    });
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const sha = (p) => execFileSync('sha256sum', [p]).toString().split(' ')[0];

const source = join(dir, 'source.raw');
console.log(`diskconv bench: ${sizeMiB} MiB guest, ${runs} runs each, median wall time; dir ${dir}`);
// With --keep, images from an earlier run of the same size are reused.
const reuse = args.get('keep') && existsSync(source) && statSync(source).size === sizeMiB * 2 ** 20;
if (!reuse) makeSource(source, sizeMiB * 2 ** 20);
console.log('wall = median wall seconds; cpu = median user+sys seconds (user/sys); best = fastest run (wall, cpu); ratios are diskconv / qemu-img, below 1.00 we are faster');
console.log(
  `${'case'.padEnd(13)} ${'qemu wall'.padStart(9)} ${'ours wall'.padStart(9)} ${'ratio'.padStart(6)} ${'qemu cpu (u/s)'.padStart(19)} ${'ours cpu (u/s)'.padStart(19)} ${'ratio'.padStart(6)} ${'qemu best'.padStart(11)} ${'ours best'.padStart(11)} ${'qemu MiB'.padStart(9)} ${'ours MiB'.padStart(9)}  same`,
);
const best = (xs) => `${Math.min(...xs.map((x) => x.secs)).toFixed(2)} ${Math.min(...xs.map((x) => x.cpu)).toFixed(2)}`;
const cpuCell = (xs) => {
  const m = xs.find((x) => x.cpu === median(xs.map((y) => y.cpu)));
  return `${m.cpu.toFixed(2)} (${m.user.toFixed(2)}/${m.sys.toFixed(2)})`;
};
const rows = [];
for (const [name, opts] of CASES) {
  const image = join(dir, `${name}.img`);
  if (!reuse || !existsSync(image)) execFileSync('qemu-img', ['convert', '-f', 'raw', ...opts, source, image]);
  const q = [], d = [];
  for (let r = 0; r < runs; r++) {
    // Alternate order so neither tool always gets the warmer page cache.
    const pair = r % 2 === 0 ? ['q', 'd'] : ['d', 'q'];
    for (const who of pair) {
      const out = join(dir, `${name}.${who}.raw`);
      rmSync(out, { force: true });
      // Write back the previous run's output first, so its writeback does not land in this run.
      execFileSync('sync');
      const res = who === 'q'
        ? await timed('qemu-img', ['convert', '-O', 'raw', image, out])
        : await timed(process.execPath, [CLI, 'convert', '-O', 'raw', image, out]);
      (who === 'q' ? q : d).push(res);
    }
  }
  const same = sha(join(dir, `${name}.q.raw`)) === sha(join(dir, `${name}.d.raw`));
  const qs = median(q.map((x) => x.secs)), ds = median(d.map((x) => x.secs));
  const qc = median(q.map((x) => x.cpu)), dc = median(d.map((x) => x.cpu));
  const qPeak = Math.max(...q.map((x) => x.peakMiB)), dPeak = Math.max(...d.map((x) => x.peakMiB));
  rows.push({
    name, qemuSeconds: qs, diskconvSeconds: ds, ratio: ds / qs,
    qemuCpuSeconds: qc, diskconvCpuSeconds: dc, cpuRatio: dc / qc,
    qemuRuns: q, diskconvRuns: d, qemuPeakMiB: qPeak, diskconvPeakMiB: dPeak, identical: same,
  });
  console.log(
    `${name.padEnd(13)} ${qs.toFixed(3).padStart(9)} ${ds.toFixed(3).padStart(9)} ${(ds / qs).toFixed(2).padStart(6)} ${cpuCell(q).padStart(19)} ${cpuCell(d).padStart(19)} ${(dc / qc).toFixed(2).padStart(6)} ${best(q).padStart(11)} ${best(d).padStart(11)} ${qPeak.toFixed(0).padStart(9)} ${dPeak.toFixed(0).padStart(9)}  ${same ? 'yes' : 'NO'}`,
  );
  for (const f of [join(dir, `${name}.q.raw`), join(dir, `${name}.d.raw`)]) rmSync(f, { force: true });
  if (!args.get('keep')) rmSync(image, { force: true });
}
writeFileSync(join(dir, 'results.json'), JSON.stringify(rows, null, 2));
if (!args.get('keep')) rmSync(dir, { recursive: true, force: true });
if (rows.some((r) => !r.identical)) process.exitCode = 1;
