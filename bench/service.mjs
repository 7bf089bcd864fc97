#!/usr/bin/env node
// The service's figures (issue 8), after the engine's (bench/run.mjs): redis-server, `diskconv serve` and
// `diskconv worker` as separate processes on 127.0.0.1, a 4 GiB-virtual qcow2 (about 27 % data, made by
// qemu-img from a deterministic sparse raw file):
//  1. upload with curl (`-T FILE -X POST`, application/octet-stream) at BENCH_SERVICE_RATE bytes/s
//     (100 MB/s by default; `curl --limit-rate`) and unthrottled: seconds from the start of the upload
//     to the job's `succeeded`, and from the last byte's arrival (the staging file reaching the image's size)
//     to `succeeded` (the worker's `converted` log line says where its time went); against the staged path at the same rate (the transfer, then `qemu-img convert -O raw`).
//  2. status polling while a conversion runs: `wrk -c 50 -t 2 -d BENCH_SERVICE_WRK_SECONDS --latency` on
//     GET /v1/jobs/{id} during a throttled upload whose job converts as the bytes arrive: requests/s, p50/p99.
// Settings (flags win): --size / BENCH_SERVICE_SIZE (default BENCH_SIZE or 4G), --rate / BENCH_SERVICE_RATE,
// --wrk-seconds / BENCH_SERVICE_WRK_SECONDS (8), --budget / BENCH_SERVICE_BUDGET (seconds, 240; the cases
// left when it is used up are skipped and say so), --cases / BENCH_SERVICE_CASES (comma-separated, default
// `throttled,multipart,unthrottled,tus,polling`; multipart: `curl -F` at the rate, as the web page sends; tus: POST /v1/uploads, one PATCH with curl at the rate: not overlapped, the
// job is made when the last byte is in; url-range, url-plain: URL imports, below), BENCH_SERVICE=off skips this part.
//  3. URL imports (`url-range`, `url-plain`): a loopback HTTP server in this process sends the image at
//     BENCH_SERVICE_RATE bytes/s (one token bucket for all its answers): `url-range` with Accept-Ranges and an
//     ETag (the worker reads by range requests), `url-plain` without either (the worker downloads it whole and
//     converts the growing download). Transfer is from the POST to the last byte the server sent; the baseline
//     is the whole file at the rate, then `qemu-img convert`.
//  Every case also reports the worker's peak RSS (VmHWM of /proc/PID/status, reset through clear_refs before
//  the case where the kernel allows it). BENCH_SERVICE_CLI: another dist/cli.js to measure (A/B rounds).
// Writes bench/results/service-latest.{md,json}.
import { execFileSync, spawn } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { createServer } from 'node:net';
import { createServer as createHttpServer } from 'node:http';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = new Map();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const setting = (name, env, fallback) => args.get(name) ?? process.env[env] ?? fallback;
if (setting('service', 'BENCH_SERVICE', 'on') === 'off') {
  console.log('service bench: skipped (BENCH_SERVICE=off)');
  process.exit(0);
}
const parseSize = (s) => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
};
const virtualSize = parseSize(setting('size', 'BENCH_SERVICE_SIZE', process.env.BENCH_SIZE ?? '4G'));
const rate = Number(setting('rate', 'BENCH_SERVICE_RATE', 100_000_000));
const wrkSeconds = Number(setting('wrk-seconds', 'BENCH_SERVICE_WRK_SECONDS', 8));
const budget = Number(setting('budget', 'BENCH_SERVICE_BUDGET', 240));
const cases = new Set(setting('cases', 'BENCH_SERVICE_CASES', 'throttled,multipart,unthrottled,tus,url-range,url-plain,polling,polling-url').split(','));
const started = Date.now();
const elapsed = () => (Date.now() - started) / 1000;
const here = dirname(fileURLToPath(import.meta.url));
const CLI = process.env.BENCH_SERVICE_CLI ?? join(here, '..', 'dist', 'cli.js');
const dir = mkdtempSync(join(tmpdir(), 'diskconv-bench-service-'));
const TOKEN = 'bench-service-token-0123456789abcdef';
const MiB = 2 ** 20;
const loadavg = () => execFileSync('cat', ['/proc/loadavg']).toString().split(' ').slice(0, 3).join(' ');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------------------
// The image: 1 MiB runs of incompressible data every ~3.7 MiB, some 64 KiB runs between; the rest holes.
function makeImage() {
  const raw = join(dir, 'base.raw');
  const fd = openSync(raw, 'w');
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 9), Buffer.alloc(16));
  const zeros = Buffer.alloc(MiB);
  let data = 0;
  for (let at = 0, i = 0; at + MiB <= virtualSize; at += 3.7 * MiB - ((3.7 * MiB) % 4096), i++) {
    writeSync(fd, cipher.update(zeros), 0, MiB, at);
    data += MiB;
    if (i % 3 === 0 && at + 2 * MiB + 65536 <= virtualSize) {
      writeSync(fd, cipher.update(zeros.subarray(0, 65536)), 0, 65536, at + 2 * MiB + 4096);
      data += 65536;
    }
  }
  closeSync(fd);
  execFileSync('truncate', ['-s', String(virtualSize), raw]);
  const qcow2 = join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  rmSync(raw);
  return { path: qcow2, size: statSync(qcow2).size, data };
}

// ---------------------------------------------------------------------------
// The service.
const children = [];
function start(name, cmd, argv, env) {
  const child = spawn(cmd, argv, { env: { PATH: process.env.PATH, HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const keep = (c) => {
    if (log.length < 1 << 20) log += c.toString();
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  children.push(child);
  return { child, log: () => log, name };
}
async function stopAll() {
  await Promise.all(
    children.map(
      (c) =>
        new Promise((resolve) => {
          if (c.exitCode !== null || c.signalCode !== null) return resolve();
          const timer = setTimeout(() => c.kill('SIGKILL'), 10_000);
          c.once('exit', () => {
            clearTimeout(timer);
            resolve();
          });
          c.kill('SIGTERM');
        }),
    ),
  );
}

async function startService(urlServer) {
  const redisPort = await freePort();
  const apiPort = await freePort();
  const dataDir = join(dir, 'data');
  mkdirSync(join(dir, 'redis'), { recursive: true });
  start('redis', 'redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', join(dir, 'redis')], {});
  const env = {
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    DATA_DIR: dataDir,
    HOST: '127.0.0.1',
    PORT: String(apiPort),
    API_TOKENS: TOKEN,
    // BENCH_SERVICE_API_LOG_LEVEL: the API's LOG_LEVEL (info is the service's default; warn keeps request lines out).
    LOG_LEVEL: process.env.BENCH_SERVICE_API_LOG_LEVEL ?? 'warn',
    MAX_UPLOAD_BYTES: String(virtualSize * 2),
    QUEUE_NAME: `bench-${process.pid}`,
    // The polling figure is the route's, not the rate limiter's answer.
    RATE_LIMIT_READS: '1000000',
    PROGRESS_INTERVAL_MS: '250',
    // BENCH_SERVICE_STREAM_UPLOADS=false: every upload staged whole first (the tus case then measures the staged path).
    ...(process.env.BENCH_SERVICE_STREAM_UPLOADS ? { STREAM_UPLOADS: process.env.BENCH_SERVICE_STREAM_UPLOADS } : {}),
    // The URL-import cases' loopback server.
    URL_IMPORT_ALLOW: '127.0.0.1',
    URL_IMPORT_PORTS: `80,443,${urlServer.port}`,
  };
  for (let i = 0; i < 100; i++) {
    try {
      if (execFileSync('redis-cli', ['-p', String(redisPort), 'ping']).toString().trim() === 'PONG') break;
    } catch {
      await sleep(50);
    }
  }
  // BENCH_SERVICE_API_ARGS: node flags for the API process (e.g. `--cpu-prof --cpu-prof-dir=/tmp/prof`); BENCH_SERVICE_WORKER_ARGS: for the worker.
  const apiArgs = (process.env.BENCH_SERVICE_API_ARGS ?? '').split(' ').filter(Boolean);
  const api = start('api', process.execPath, [...apiArgs, CLI, 'serve'], env);
  const workerArgs = (process.env.BENCH_SERVICE_WORKER_ARGS ?? '').split(' ').filter(Boolean);
  const worker = start('worker', process.execPath, [...workerArgs, CLI, 'worker'], { ...env, LOG_LEVEL: 'info' });
  const url = `http://127.0.0.1:${apiPort}`;
  for (let i = 0; ; i++) {
    const ok = await fetch(`${url}/readyz`).then((r) => r.status === 200, () => false);
    if (ok && worker.log().includes('worker ready')) break;
    if (i > 300) throw new Error(`the service did not start:\n${api.log()}\n${worker.log()}`);
    await sleep(100);
  }
  return { url, dataDir, worker, api };
}

// ---------------------------------------------------------------------------
// Worker peak RSS: VmHWM, reset before a case by writing 5 to /proc/PID/clear_refs (Linux; root or owner).
function resetPeak(svc) {
  try {
    writeFileSync(`/proc/${svc.worker.child.pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}
function peakMiB(svc) {
  try {
    const status = readFileSync(`/proc/${svc.worker.child.pid}/status`, 'utf8');
    const kib = (name) => Number(new RegExp(`${name}:\\s+(\\d+) kB`).exec(status)?.[1] ?? NaN);
    return { hwm: kib('VmHWM') / 1024, rss: kib('VmRSS') / 1024 };
  } catch {
    return { hwm: NaN, rss: NaN };
  }
}
const peaks = [];
/** Runs one case with the worker's peak RSS measured around it. */
async function withPeak(svc, label, fn) {
  const reset = resetPeak(svc);
  const r = await fn();
  const { hwm } = peakMiB(svc);
  r.workerPeakRssMiB = hwm;
  peaks.push(`${label} ${hwm.toFixed(0)}${reset ? '' : ' (since start: clear_refs refused)'}`);
  return r;
}

// ---------------------------------------------------------------------------
// The URL-import server: /range/disk.qcow2 (Accept-Ranges, ETag: read by ranges), /plain/disk.qcow2 (neither:
// downloaded whole). Every answer draws from one token bucket of `rate` bytes/s; `last` is when the last byte of
// any answer went out, `sent` what went out in all.
function startUrlServer(image) {
  const state = { last: 0, sent: 0, requests: 0, allowance: 0, at: Date.now(), rate };
  const CHUNK = 256 * 1024;
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
  const fd = openSync(image.path, 'r');
  const server = createHttpServer((req, res) => {
    state.requests++;
    const ranged = req.url === '/range/disk.qcow2';
    if (!ranged && req.url !== '/plain/disk.qcow2') return res.writeHead(404).end();
    let start = 0;
    let end = image.size; // exclusive
    const headers = { 'content-type': 'application/octet-stream' };
    if (ranged) Object.assign(headers, { 'accept-ranges': 'bytes', etag: '"bench-v1"' });
    const m = ranged ? /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '') : null;
    const ifRange = req.headers['if-range'];
    let status = 200;
    if (m && (ifRange === undefined || ifRange === '"bench-v1"')) {
      start = Number(m[1]);
      end = m[2] ? Math.min(image.size, Number(m[2]) + 1) : image.size;
      if (start >= image.size) return res.writeHead(416, { 'content-range': `bytes */${image.size}` }).end();
      status = 206;
      headers['content-range'] = `bytes ${start}-${end - 1}/${image.size}`;
    }
    headers['content-length'] = String(end - start);
    res.writeHead(status, headers);
    let closed = false;
    res.on('close', () => (closed = true));
    void (async () => {
      for (let at = start; at < end && !closed; ) {
        const n = Math.min(CHUNK, end - at);
        await take(n);
        const buf = Buffer.allocUnsafe(n);
        readSync(fd, buf, 0, n, at);
        at += n;
        state.sent += n;
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
      if (!closed) res.end(() => (state.last = Date.now()));
    })();
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({
        port: server.address().port,
        state,
        reset(at = rate) {
          Object.assign(state, { last: 0, sent: 0, requests: 0, allowance: 0, at: Date.now(), rate: at });
        },
        close: () => new Promise((r) => {
          server.closeAllConnections();
          server.close(() => r());
          closeSync(fd);
        }),
      }),
    );
  });
}

/** A URL import (POST /v1/jobs with {source:{url}}) from the paced server; returns when the job succeeded. */
async function urlImport(svc, urlServer, mode, { pace = rate, onRunning } = {}) {
  urlServer.reset(pace);
  const t0 = Date.now();
  const res = await fetch(`${svc.url}/v1/jobs`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ source: { url: `http://127.0.0.1:${urlServer.port}/${mode}/disk.qcow2` } }),
  });
  const created = await res.json();
  if (res.status !== 202) throw new Error(`the URL import answered ${res.status}: ${JSON.stringify(created)}`);
  const during = onRunning ? await onRunning(created.id) : undefined;
  const job = await finalJob(svc.url, created.id);
  const done = Date.now();
  if (job.state !== 'succeeded') throw new Error(`the URL import (${mode}) ended ${job.state}: ${JSON.stringify(job.error)}`);
  const last = urlServer.state.last || done;
  return { total: (done - t0) / 1000, afterLastByte: (done - last) / 1000, transfer: (last - t0) / 1000, sent: urlServer.state.sent, requests: urlServer.state.requests, mode: job.source?.mode, id: created.id, worker: await workerTimings(svc, created.id), during };
}

/** The worker's own account of where a job's time went (its `converted` log line). */
async function workerTimings(svc, id) {
  // Logged just after the record says succeeded.
  for (let i = 0; i < 100; i++) {
    for (const line of svc.worker.log().split('\n')) {
      if (!line.includes(id) || !line.includes('"converted"')) continue;
      try {
        return JSON.parse(line).timings;
      } catch {}
    }
    await sleep(20);
  }
  return undefined;
}

const auth = { authorization: `Bearer ${TOKEN}` };
async function getJob(url, id) {
  return (await fetch(`${url}/v1/jobs/${id}`, { headers: auth })).json();
}
/** The job once it has ended, polled every 10 ms so the moment it ends is measured closely. */
async function finalJob(url, id) {
  for (;;) {
    const job = await getJob(url, id);
    if (['succeeded', 'failed', 'cancelled'].includes(job.state)) return job;
    await sleep(10);
  }
}
async function findJob(url) {
  for (;;) {
    const { jobs } = await (await fetch(`${url}/v1/jobs?limit=100`, { headers: auth })).json();
    const live = jobs.find((j) => j.state === 'queued' || j.state === 'running');
    if (live) return live.id;
    await sleep(10);
  }
}

/** curl -T image -X POST; returns when the job succeeded, with the moments that matter. */
async function upload(svc, image, limit, { multipart = false } = {}) {
  const t0 = Date.now();
  const body = multipart
    ? ['-F', 'source_format=auto', '-F', `file=@${image.path};filename=disk.qcow2;type=application/octet-stream`]
    : ['-X', 'POST', '-H', 'Content-Type: application/octet-stream', '-T', image.path];
  const curlArgs = ['-sS', '-o', join(dir, 'answer.json'), '-w', '%{http_code}', '-H', `Authorization: Bearer ${TOKEN}`, ...body];
  if (limit) curlArgs.push('--limit-rate', String(limit));
  curlArgs.push(multipart ? `${svc.url}/v1/jobs` : `${svc.url}/v1/jobs?filename=disk.qcow2`);
  const curl = spawn('curl', curlArgs, { stdio: ['ignore', 'pipe', 'pipe'] });
  let status = '';
  curl.stdout.on('data', (c) => (status += c));
  const curlDone = new Promise((resolve) => curl.once('exit', () => resolve(Date.now())));
  const id = await findJob(svc.url);
  // The last byte's arrival: the staging write reaches the image's size.
  const tmp = join(svc.dataDir, 'store', 'tmp');
  let lastByte;
  const watch = (async () => {
    while (lastByte === undefined) {
      const name = readdirSync(tmp).find((n) => n.startsWith(`input.${id}.`));
      const size = name ? statSync(join(tmp, name), { throwIfNoEntry: false })?.size : undefined;
      if (size === image.size || (name === undefined && statSync(join(svc.dataDir, 'store', 'input', id), { throwIfNoEntry: false }))) lastByte = Date.now();
      else await sleep(5);
    }
  })();
  const job = await finalJob(svc.url, id);
  const done = Date.now();
  await watch.catch(() => {});
  const curlEnd = await curlDone;
  if (job.state !== 'succeeded') throw new Error(`the job ended ${job.state}: ${JSON.stringify(job.error)}`);
  return { total: (done - t0) / 1000, afterLastByte: ((done - (lastByte ?? done)) / 1000), transfer: ((lastByte ?? curlEnd) - t0) / 1000, curlStatus: status, id, worker: await workerTimings(svc, id) };
}

/** A tus upload (POST /v1/uploads, then one PATCH with curl at `limit`); the job exists once the last byte is in. */
async function tusUpload(svc, image, limit) {
  const t0 = Date.now();
  const created = await fetch(`${svc.url}/v1/uploads`, {
    method: 'POST',
    headers: { ...auth, 'tus-resumable': '1.0.0', 'upload-length': String(image.size), 'upload-metadata': `filename ${Buffer.from('disk.qcow2').toString('base64')}` },
  });
  if (created.status !== 201) throw new Error(`tus creation answered ${created.status}: ${await created.text()}`);
  const location = new URL(created.headers.get('location'), svc.url).href;
  const uploadId = location.split('/').pop();
  const headersFile = join(dir, 'tus-headers.txt');
  const curlArgs = ['-sS', '-o', '/dev/null', '-D', headersFile, '-X', 'PATCH', '-H', `Authorization: Bearer ${TOKEN}`, '-H', 'Tus-Resumable: 1.0.0', '-H', 'Upload-Offset: 0', '-H', 'Content-Type: application/offset+octet-stream', '-T', image.path];
  if (limit) curlArgs.push('--limit-rate', String(limit));
  curlArgs.push(location);
  const curl = spawn('curl', curlArgs, { stdio: ['ignore', 'ignore', 'pipe'] });
  const curlDone = new Promise((resolve) => curl.once('exit', () => resolve(Date.now())));
  // The last byte's arrival: tus's file reaches the image's size.
  const tusFile = join(svc.dataDir, 'uploads', uploadId);
  let lastByte;
  while (lastByte === undefined) {
    const size = statSync(tusFile, { throwIfNoEntry: false })?.size;
    if (size === image.size) lastByte = Date.now();
    else if (size === undefined && Date.now() - t0 > 5000 && (await Promise.race([curlDone, sleep(5).then(() => undefined)]))) break;
    else await sleep(5);
  }
  await curlDone;
  const id = /diskconv-job: \/v1\/jobs\/([A-Za-z0-9_-]+)/i.exec(readFileSync(headersFile, 'utf8'))?.[1];
  if (!id) throw new Error(`the last PATCH named no job:\n${readFileSync(headersFile, 'utf8')}`);
  const jobCreated = Date.now();
  const job = await finalJob(svc.url, id);
  const done = Date.now();
  if (job.state !== 'succeeded') throw new Error(`the tus job ended ${job.state}: ${JSON.stringify(job.error)}`);
  return { total: (done - t0) / 1000, afterLastByte: (done - (lastByte ?? done)) / 1000, transfer: ((lastByte ?? jobCreated) - t0) / 1000, jobAfterLastByte: (jobCreated - (lastByte ?? jobCreated)) / 1000, id, worker: await workerTimings(svc, id) };
}

function qemuConvertSeconds(image) {
  const out = join(dir, 'qemu.raw');
  rmSync(out, { force: true });
  execFileSync('sync');
  const t = Date.now();
  execFileSync('qemu-img', ['convert', '-O', 'raw', image.path, out]);
  const s = (Date.now() - t) / 1000;
  rmSync(out, { force: true });
  return s;
}

/** utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15, in clock ticks of 100 Hz). */
function cpuSeconds(pid) {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return NaN;
  }
}

/** wrk on the job, with the API process's CPU per answered request. */
function wrkWithCpu(svc, id) {
  const before = cpuSeconds(svc.api.child.pid);
  const w = wrk(svc.url, id);
  const cpu = cpuSeconds(svc.api.child.pid) - before;
  const requests = w.rps * wrkSeconds;
  return { ...w, apiCpuSeconds: cpu, apiCpuMicrosPerRequest: (cpu * 1e6) / requests, load: loadavg() };
}

function wrk(url, id) {
  const out = execFileSync('wrk', ['-c', '50', '-t', '2', '-d', `${wrkSeconds}s`, '--latency', '-H', `Authorization: Bearer ${TOKEN}`, `${url}/v1/jobs/${id}`], { maxBuffer: 1 << 20 }).toString();
  const num = (re) => Number(re.exec(out)?.[1] ?? NaN);
  const ms = (re) => {
    const m = re.exec(out);
    if (!m) return NaN;
    const v = Number(m[1]);
    return m[2] === 'us' ? v / 1000 : m[2] === 's' ? v * 1000 : v;
  };
  return {
    rps: num(/Requests\/sec:\s+([\d.]+)/),
    p50: ms(/\s50%\s+([\d.]+)(us|ms|s)/),
    p99: ms(/\s99%\s+([\d.]+)(us|ms|s)/),
    non2xx: num(/Non-2xx or 3xx responses:\s+(\d+)/) || 0,
    raw: out,
  };
}

// ---------------------------------------------------------------------------
const results = { date: new Date().toISOString(), virtualSize, rate, wrkSeconds, budget, machine: { cpus: cpus().length, model: cpus()[0]?.model, memGiB: Math.round(totalmem() / 2 ** 30), node: process.version }, loadBefore: loadavg(), cases: {} };
const lines = [];
const notes = [];
const closers = [];
try {
  const image = makeImage();
  results.image = { fileBytes: image.size, dataBytes: image.data };
  console.log(`service bench: qcow2 of ${virtualSize / 2 ** 30} GiB virtual, ${(image.size / MiB).toFixed(0)} MiB file (${elapsed().toFixed(0)} s)`);
  const urlServer = await startUrlServer(image);
  closers.push(() => urlServer.close());
  const svc = await startService(urlServer);
  const left = () => budget <= 0 || elapsed() < budget;

  const qemu = qemuConvertSeconds(image);
  results.cases.qemuConvert = qemu;

  if (!cases.has('throttled')) lines.push('| throttled upload | not asked for (BENCH_SERVICE_CASES) | | | |');
  else if (left()) {
    const r = await withPeak(svc, 'throttled', () => upload(svc, image, rate));
    results.cases.throttled = r;
    if (r.worker) notes.push(`The worker's own account of the throttled job (ms): open and probe ${r.worker.open}, convert ${r.worker.convert}, then waiting for the upload's end ${r.worker.upload_end}, commit (fsync, rename) ${r.worker.commit}, record ${r.worker.record}.`);
    lines.push(`| curl upload at ${(rate / 1e6).toFixed(0)} MB/s | ${r.transfer.toFixed(2)} | ${r.total.toFixed(2)} | ${r.afterLastByte.toFixed(2)} | ${(r.transfer + qemu).toFixed(2)} (${r.transfer.toFixed(2)} + ${qemu.toFixed(2)}) |`);
    console.log(lines.at(-1));
  } else lines.push('| throttled upload | skipped: budget used | | | |');

  if (!cases.has('multipart')) lines.push('| multipart upload | not asked for (BENCH_SERVICE_CASES) | | | |');
  else if (left()) {
    const r = await withPeak(svc, 'multipart', () => upload(svc, image, rate, { multipart: true }));
    results.cases.multipart = r;
    lines.push(`| curl -F (multipart/form-data, as the page sends) at ${(rate / 1e6).toFixed(0)} MB/s | ${r.transfer.toFixed(2)} | ${r.total.toFixed(2)} | ${r.afterLastByte.toFixed(2)} | ${(r.transfer + qemu).toFixed(2)} (${r.transfer.toFixed(2)} + ${qemu.toFixed(2)}) |`);
    console.log(lines.at(-1));
  } else lines.push('| multipart upload | skipped: budget used | | | |');

  if (!cases.has('unthrottled')) lines.push('| unthrottled upload | not asked for (BENCH_SERVICE_CASES) | | | |');
  else if (left()) {
    const r = await withPeak(svc, 'unthrottled', () => upload(svc, image, 0));
    results.cases.unthrottled = r;
    lines.push(`| curl upload, no limit | ${r.transfer.toFixed(2)} | ${r.total.toFixed(2)} | ${r.afterLastByte.toFixed(2)} | ${(r.transfer + qemu).toFixed(2)} (${r.transfer.toFixed(2)} + ${qemu.toFixed(2)}) |`);
    console.log(lines.at(-1));
  } else lines.push('| unthrottled upload | skipped: budget used | | | |');

  if (!cases.has('tus')) lines.push('| tus upload | not asked for (BENCH_SERVICE_CASES) | | | |');
  else if (left()) {
    const r = await withPeak(svc, 'tus', () => tusUpload(svc, image, rate));
    results.cases.tus = r;
    const how = process.env.BENCH_SERVICE_STREAM_UPLOADS === 'false' ? 'STREAM_UPLOADS=false: staged whole, then converted' : 'converted while the PATCH arrives';
    lines.push(`| tus upload (one PATCH) at ${(rate / 1e6).toFixed(0)} MB/s: ${how} | ${r.transfer.toFixed(2)} | ${r.total.toFixed(2)} | ${r.afterLastByte.toFixed(2)} (the final PATCH answered ${r.jobAfterLastByte.toFixed(2)} s after it) | ${(r.transfer + qemu).toFixed(2)} (${r.transfer.toFixed(2)} + ${qemu.toFixed(2)}) |`);
    if (r.worker) notes.push(`The worker's own account of the tus job (ms): open and probe ${r.worker.open}, convert ${r.worker.convert}, then waiting for the upload's end ${r.worker.upload_end}, commit ${r.worker.commit}, record ${r.worker.record}.`);
    console.log(lines.at(-1));
  } else lines.push('| tus upload | skipped: budget used | | | |');

  for (const mode of ['range', 'plain']) {
    const name = `url-${mode}`;
    const label = mode === 'range' ? 'URL import, server with ranges and ETag (read by ranges)' : 'URL import, server without ranges (downloaded whole)';
    if (!cases.has(name)) lines.push(`| ${label} | not asked for (BENCH_SERVICE_CASES) | | | |`);
    else if (left()) {
      const r = await withPeak(svc, name, () => urlImport(svc, urlServer, mode));
      results.cases[name] = r;
      const whole = rate ? image.size / rate : r.transfer;
      lines.push(`| ${label} at ${(rate / 1e6).toFixed(0)} MB/s: ${(r.sent / MiB).toFixed(0)} MiB in ${r.requests} requests, mode ${r.mode} | ${r.transfer.toFixed(2)} | ${r.total.toFixed(2)} | ${r.afterLastByte.toFixed(2)} | ${(whole + qemu).toFixed(2)} (${whole.toFixed(2)} + ${qemu.toFixed(2)}) |`);
      if (r.worker) notes.push(`The worker's account of the ${name} job (ms): open and probe ${r.worker.open}, convert ${r.worker.convert}, waiting for the source's end ${r.worker.upload_end}, commit ${r.worker.commit}, record ${r.worker.record}.`);
      console.log(lines.at(-1));
    } else lines.push(`| ${label} | skipped: budget used | | | |`);
  }

  if (!cases.has('polling')) lines.push('Status polling: not asked for (BENCH_SERVICE_CASES).');
  else if (left()) {
    // A job that converts for the whole measurement: a throttled upload, converted as it arrives.
    const slow = Math.max(1, Math.floor(image.size / (wrkSeconds + 6)));
    const running = upload(svc, image, slow);
    const id = await findJob(svc.url);
    while ((await getJob(svc.url, id)).progress.phase !== 'converting') await sleep(20);
    const w = wrkWithCpu(svc, id);
    const phaseAfter = (await getJob(svc.url, id)).state;
    await running;
    results.cases.polling = { ...w, stateWhenDone: phaseAfter };
    lines.push('');
    lines.push(`Status polling while the job converts (wrk -c 50 -t 2 -d ${wrkSeconds}s, GET /v1/jobs/{id}): **${w.rps.toFixed(0)} req/s**, p50 ${w.p50.toFixed(2)} ms, p99 ${w.p99.toFixed(2)} ms, non-2xx ${w.non2xx}; the job was \`${phaseAfter}\` when wrk ended; API CPU ${w.apiCpuMicrosPerRequest.toFixed(0)} µs per request (the API also receives the upload, about ${(slow / 1e6).toFixed(0)} MB/s); load ${w.load}.`);
    console.log(lines.at(-1));
  } else lines.push('Status polling: skipped (budget used).');

  // The same polling while the worker converts a URL import (from a server without ranges, paced so the job outlasts
  // wrk): the API answers only the polls.
  if (!cases.has('polling-url')) lines.push('Status polling during a URL import: not asked for (BENCH_SERVICE_CASES).');
  else if (left()) {
    const slow = Math.max(1, Math.floor(image.size / (wrkSeconds + 6)));
    let phaseAfter;
    const r = await urlImport(svc, urlServer, 'plain', {
      pace: slow,
      onRunning: async (id) => {
        while ((await getJob(svc.url, id)).progress.phase !== 'converting') await sleep(20);
        const w = wrkWithCpu(svc, id);
        phaseAfter = (await getJob(svc.url, id)).state;
        return w;
      },
    });
    const w = r.during;
    results.cases.pollingUrl = { ...w, stateWhenDone: phaseAfter };
    lines.push('');
    lines.push(`Status polling while the worker converts a URL import (wrk -c 50 -t 2 -d ${wrkSeconds}s): **${w.rps.toFixed(0)} req/s**, p50 ${w.p50.toFixed(2)} ms, p99 ${w.p99.toFixed(2)} ms, non-2xx ${w.non2xx}; the job was \`${phaseAfter}\` when wrk ended; API CPU ${w.apiCpuMicrosPerRequest.toFixed(0)} µs per request; load ${w.load}.`);
    console.log(lines.at(-1));
  } else lines.push('Status polling during a URL import: skipped (budget used).');
} finally {
  for (const close of closers) await close().catch(() => {});
  await stopAll();
  rmSync(dir, { recursive: true, force: true });
}
results.workerPeaks = peaks;
results.loadAfter = loadavg();
results.seconds = Math.round(elapsed());
const md = [
  `# Service figures (${results.date.slice(0, 10)}, load ${results.loadBefore} -> ${results.loadAfter}, ${results.seconds} s)`,
  '',
  `${results.machine.cpus} × ${results.machine.model}, ${results.machine.memGiB} GiB, Node ${results.machine.node}; qcow2 of ${virtualSize / 2 ** 30} GiB virtual, ${(results.image?.fileBytes / MiB).toFixed(0)} MiB file; \`qemu-img convert -O raw\` of it: ${results.cases.qemuConvert?.toFixed(2)} s.`,
  '',
  '| case | transfer s (start to last byte in) | diskconv: start to succeeded s | diskconv: last byte to succeeded s | staged then qemu-img s (transfer + convert) |',
  '|---|---|---|---|---|',
  ...lines,
  '',
  ...notes.flatMap((n) => [n, '']),
  ...(peaks.length ? [`Worker peak RSS while it converts (VmHWM, MiB; target <= 200): ${peaks.join(', ')}.`, ''] : []),
].join('\n');
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results', 'service-latest.json'), JSON.stringify(results, (k, v) => (k === 'raw' ? undefined : v), 2) + '\n');
writeFileSync(join(here, 'results', 'service-latest.md'), md);
console.log(md);
