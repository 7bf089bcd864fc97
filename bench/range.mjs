#!/usr/bin/env node
// What a URL import by range requests fetches (issue 8: bytes fetched <= 1.05 x the image's allocated data,
// and a 100 MB/s link used at its rate). A loopback HTTP server (its own process) serves each image with
// Accept-Ranges and an ETag, optionally paced by one token bucket (--rate bytes/s, 0 = unpaced), and logs
// every range it sends; a second process converts the URL as the worker does (openUrlSource, openImage,
// estimateAllocation, convertToRaw with sha256 into a raw file). Reported per image: bytes sent and requests,
// bytes sent more than once, bytes outside every mapped data range of `qemu-img map` (metadata or waste),
// transfer seconds and rate, the converter's CPU seconds and peak RSS, and whether the output is
// identical to qemu-img's.
//
// Images (4 GiB virtual by default, --size): `service`, the layout of bench/service.mjs (1 MiB of random
// data every 3.7 MiB, 4 KiB- but not cluster-aligned, and a 64 KiB piece beside every third), and `bench`,
// the layout of bench/run.mjs (bench/disk.mjs: long runs and fragmented small extents), each converted by
// qemu-img to qcow2, vdi (dynamic) and vmdk (monolithicSparse).
//
// Usage: node bench/range.mjs [--size 4G] [--rate 100000000] [--layouts service,bench] [--formats qcow2,vdi,vmdk]
//                             [--dist DIR (a dist/ to measure, default ../dist)] [--ahead BYTES (the range source's aheadBytes)]
//                             [--images FILE,FILE (these instead)] [--keep DIR] [--md FILE] [--log DIR]
import { execFileSync, fork } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { closeSync, createReadStream, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { makeSource } from './disk.mjs';

const MiB = 2 ** 20;
const here = dirname(fileURLToPath(import.meta.url));
const args = new Map();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const parseSize = (s) => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
};
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


// ---------------------------------------------------------------------------
// The server (a process of its own, so pacing does not share a thread with the converter).
function serve() {
  const files = JSON.parse(args.get('files'));
  const state = { rate: Number(args.get('rate')), allowance: 0, at: Date.now(), log: [], sent: 0, requests: 0, first: 0, last: 0 };
  const CHUNK = 64 * 1024;
  const take = async (n) => {
    for (;;) {
      const r = state.rate;
      if (!r) return;
      const now = Date.now();
      state.allowance = Math.min(Math.max(r / 10, CHUNK), state.allowance + ((now - state.at) * r) / 1000);
      state.at = now;
      if (state.allowance >= n) {
        state.allowance -= n;
        return;
      }
      await sleep(Math.max(1, Math.ceil(((n - state.allowance) * 1000) / r)));
    }
  };
  const fds = Object.fromEntries(Object.entries(files).map(([name, path]) => [name, { fd: openSync(path, 'r'), size: statSync(path).size }]));
  const server = createServer((req, res) => {
    const file = fds[(req.url ?? '/').slice(1)];
    if (!file) return res.writeHead(404).end();
    state.requests++;
    if (!state.first) state.first = Date.now();
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    let start = 0;
    let end = file.size;
    const headers = { 'accept-ranges': 'bytes', etag: '"range-bench"', 'content-type': 'application/octet-stream' };
    let status = 200;
    if (m) {
      start = Number(m[1]);
      end = m[2] ? Math.min(file.size, Number(m[2]) + 1) : file.size;
      if (start >= file.size) return res.writeHead(416, { 'content-range': `bytes */${file.size}` }).end();
      status = 206;
      headers['content-range'] = `bytes ${start}-${end - 1}/${file.size}`;
    }
    headers['content-length'] = String(end - start);
    res.writeHead(status, headers);
    const entry = [start, start, Date.now()];
    state.log.push(entry);
    let closed = false;
    res.on('close', () => (closed = true));
    void (async () => {
      for (let at = start; at < end && !closed; ) {
        const n = Math.min(CHUNK, end - at);
        await take(n);
        const buf = Buffer.allocUnsafe(n);
        readSync(file.fd, buf, 0, n, at);
        at += n;
        state.sent += n;
        entry[1] = at;
        if (!res.write(buf) && !closed) {
          await new Promise((r) => {
            const go = () => {
              res.off('drain', go);
              res.off('close', go);
              r();
            };
            res.on('drain', go);
            res.on('close', go);
          });
        }
      }
      if (!closed) res.end(() => (state.last = entry[3] = Date.now()));
    })();
  });
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
  process.on('message', (msg) => {
    if (msg.reset) Object.assign(state, { rate: msg.rate ?? state.rate, allowance: 0, at: Date.now(), log: [], sent: 0, requests: 0, first: 0, last: 0 });
    if (msg.report) process.send({ report: { sent: state.sent, requests: state.requests, first: state.first, last: state.last, log: state.log } });
    if (msg.stop) {
      server.closeAllConnections();
      server.close(() => process.exit(0));
    }
  });
}

// ---------------------------------------------------------------------------
// The converter: what the worker does with a range-capable URL.
async function convert() {
  const dist = resolve(args.get('dist'));
  const net = await import(pathToFileURL(join(dist, 'net', 'index.js')).href);
  const engine = await import(pathToFileURL(join(dist, 'engine', 'index.js')).href);
  const inspect = await import(pathToFileURL(join(dist, 'queue', 'inspect.js')).href);
  const url = args.get('url');
  const port = Number(new URL(url).port);
  const policy = { ...net.DEFAULT_URL_POLICY, allow: ['127.0.0.1'], allowedPorts: [port] };
  // Where the memory is at its peak: sampled every 20 ms.
  const peak = { rss: 0, arrayBuffers: 0, heapTotal: 0 };
  const sampler = setInterval(() => {
    const m = process.memoryUsage();
    if (m.rss > peak.rss) Object.assign(peak, { rss: m.rss, arrayBuffers: m.arrayBuffers, heapTotal: m.heapTotal });
  }, 20);
  const t0 = Date.now();
  const cpu0 = process.cpuUsage();
  const rangeTuning = args.get('ahead') ? { aheadBytes: parseSize(args.get('ahead')) } : {};
  const opened = await net.openUrlSource(url, policy, { stagingPath: join(args.get('out') + '.staged'), rangeTuning });
  if (opened.mode !== 'range') throw new Error(`opened in mode ${opened.mode}`);
  const image = await engine.openImage(opened.source, { format: 'auto' });
  await inspect.estimateAllocation(image, opened.source);
  const sink = await engine.RawFileSink.create(args.get('out'));
  const result = await engine.convertToRaw(image, opened.source, sink, { sha256: true });
  const done = Date.now();
  const cpu = process.cpuUsage(cpu0);
  const stats = opened.source.stats;
  await image.close?.();
  await opened.close();
  clearInterval(sampler);
  const hwm = Number(/VmHWM:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) / 1024;
  process.send({ done, t0, sha256: result.sha256, cpuSeconds: (cpu.user + cpu.system) / 1e6, peakRssMiB: hwm, atPeak: { rssMiB: peak.rss / MiB, arrayBuffersMiB: peak.arrayBuffers / MiB, heapMiB: peak.heapTotal / MiB }, stats });
}

// ---------------------------------------------------------------------------
// The images, the runs, the analysis.
function makeServiceLayout(path, size) {
  const fd = openSync(path, 'w');
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 9), Buffer.alloc(16));
  const zeros = Buffer.alloc(MiB);
  for (let at = 0, i = 0; at + MiB <= size; at += 3.7 * MiB - ((3.7 * MiB) % 4096), i++) {
    writeSync(fd, cipher.update(zeros), 0, MiB, at);
    if (i % 3 === 0 && at + 2 * MiB + 65536 <= size) writeSync(fd, cipher.update(zeros.subarray(0, 65536)), 0, 65536, at + 2 * MiB + 4096);
  }
  closeSync(fd);
  execFileSync('truncate', ['-s', String(size), path]);
}

const FORMAT_ARGS = { qcow2: ['-O', 'qcow2'], vdi: ['-O', 'vdi'], vmdk: ['-O', 'vmdk', '-o', 'subformat=monolithicSparse'] };

/** The file ranges [start, end) that `qemu-img map` says hold guest data, merged and sorted. */
function mappedFileRanges(path) {
  const entries = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', path], { maxBuffer: 1 << 28 }).toString());
  const ranges = entries.filter((e) => e.data && e.offset !== undefined).map((e) => [e.offset, e.offset + e.length]);
  return mergeRanges(ranges);
}
function mergeRanges(ranges) {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out = [];
  for (const [s, e] of sorted) {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}
const total = (ranges) => ranges.reduce((n, [s, e]) => n + (e - s), 0);
/** Bytes of `ranges` (merged) that fall inside `within` (merged). */
function overlap(ranges, within) {
  let n = 0;
  let j = 0;
  for (const [s, e] of ranges) {
    while (j < within.length && within[j][1] <= s) j++;
    for (let k = j; k < within.length && within[k][0] < e; k++) n += Math.min(e, within[k][1]) - Math.max(s, within[k][0]);
  }
  return n;
}

async function main() {
  const size = parseSize(args.get('size') ?? '4G');
  const rate = Number(args.get('rate') ?? 0);
  const layouts = (args.get('layouts') ?? 'service,bench').split(',');
  const formats = (args.get('formats') ?? 'qcow2,vdi,vmdk').split(',');
  const dist = resolve(args.get('dist') ?? join(here, '..', 'dist'));
  const dir = args.get('keep') ?? join(tmpdir(), `diskconv-bench-range-${process.pid}`);
  const logDir = args.get('log');
  mkdirSync(dir, { recursive: true });
  const images = [];
  // --images: given image files instead (the reference is qemu-img's raw output).
  for (const path of args.get('images')?.split(',') ?? []) {
    const out = join(dir, 'reference.raw');
    execFileSync('qemu-img', ['convert', '-O', 'raw', path, out]);
    const hash = createHash('sha256');
    for await (const chunk of createReadStream(out, { highWaterMark: 4 * MiB })) hash.update(chunk);
    rmSync(out);
    images.push({ name: path.split('/').pop(), path, reference: hash.digest('hex') });
  }
  for (const layout of args.get('images') ? [] : layouts) {
    const raw = join(dir, `${layout}-${size}.raw`);
    if (!existsSync(raw)) (layout === 'service' ? makeServiceLayout : makeSource)(raw, size);
    for (const format of formats) {
      const path = join(dir, `${layout}-${size}.${format}`);
      if (!existsSync(path)) execFileSync('qemu-img', ['convert', '-f', 'raw', ...FORMAT_ARGS[format], raw, path]);
      const refPath = join(dir, `${layout}-${size}.${format}.sha256`);
      if (!existsSync(refPath)) {
        const hash = createHash('sha256');
        for await (const chunk of createReadStream(raw, { highWaterMark: 4 * MiB })) hash.update(chunk);
        writeFileSync(refPath, hash.digest('hex'));
      }
      images.push({ name: `${layout}.${format}`, path, reference: readFileSync(refPath, 'utf8') });
    }
  }
  const server = fork(fileURLToPath(import.meta.url), ['--role', 'serve', '--rate', String(rate), '--files', JSON.stringify(Object.fromEntries(images.map((i) => [i.name, i.path])))]);
  const port = await new Promise((r) => server.once('message', (m) => r(m.port)));
  const ask = () => new Promise((r) => { server.once('message', (m) => r(m.report)); server.send({ report: true }); });
  const rows = [];
  for (const image of images) {
    server.send({ reset: true });
    const out = join(dir, 'out.raw');
    const before = loadavg();
    const child = fork(fileURLToPath(import.meta.url), ['--role', 'convert', '--dist', dist, '--url', `http://127.0.0.1:${port}/${image.name}`, '--out', out, ...(args.get('ahead') ? ['--ahead', args.get('ahead')] : [])]);
    const result = await new Promise((r, j) => {
      child.once('message', r);
      child.once('exit', (code) => code && j(new Error(`converter exited ${code}`)));
    });
    await new Promise((r) => child.once('exit', r));
    rmSync(out, { force: true });
    const report = await ask();
    const fileSize = statSync(image.path).size;
    const mapped = mappedFileRanges(image.path);
    const fetched = report.log.map(([s, e]) => [s, e]);
    const union = mergeRanges(fetched);
    const row = {
      image: image.name,
      fileMiB: fileSize / MiB,
      mappedMiB: total(mapped) / MiB,
      sentMiB: report.sent / MiB,
      requests: report.requests,
      perFile: report.sent / fileSize,
      perMapped: report.sent / total(mapped),
      duplicateMiB: (report.sent - total(union)) / MiB,
      outsideMappedMiB: (total(union) - overlap(union, mapped)) / MiB,
      neverFetchedMappedMiB: (total(mapped) - overlap(union, mapped)) / MiB,
      transferSeconds: (report.last - report.first) / 1000,
      rateMBps: report.sent / 1e6 / ((report.last - report.first) / 1000),
      lastByteToDoneSeconds: (result.done - report.last) / 1000,
      cpuSeconds: result.cpuSeconds,
      peakRssMiB: result.peakRssMiB,
      atPeak: result.atPeak,
      identical: result.sha256 === image.reference,
      load: `${before} -> ${loadavg()}`,
    };
    rows.push(row);
    console.log(JSON.stringify(row));
    if (logDir) {
      mkdirSync(logDir, { recursive: true });
      writeFileSync(join(logDir, `${image.name}.ranges.json`), JSON.stringify({ mapped, log: report.log }));
    }
  }
  server.send({ stop: true });
  const f = (n, d = 1) => n.toFixed(d);
  const md = [
    `| image | file MiB | mapped data MiB | sent MiB | requests | sent / file | sent / mapped | sent twice MiB | outside mapped MiB | transfer s | MB/s | last byte to done s | CPU s | peak RSS MiB | identical | load |`,
    `|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|`,
    ...rows.map((r) => `| ${r.image} | ${f(r.fileMiB)} | ${f(r.mappedMiB)} | ${f(r.sentMiB)} | ${r.requests} | ${f(r.perFile, 3)} | ${f(r.perMapped, 3)} | ${f(r.duplicateMiB)} | ${f(r.outsideMappedMiB)} | ${f(r.transferSeconds, 2)} | ${f(r.rateMBps)} | ${f(r.lastByteToDoneSeconds, 2)} | ${f(r.cpuSeconds, 2)} | ${f(r.peakRssMiB, 0)} | ${r.identical ? 'yes' : '**no**'} | ${r.load} |`),
  ].join('\n');
  console.log(`\nrate ${rate ? `${rate / 1e6} MB/s` : 'unpaced'}, ${size / 2 ** 30} GiB virtual, dist ${dist}\n${md}`);
  if (args.get('md')) writeFileSync(args.get('md'), md + '\n');
  if (!args.get('keep')) rmSync(dir, { recursive: true, force: true });
}

if (args.get('role') === 'serve') serve();
else if (args.get('role') === 'convert') await convert();
else await main();
