#!/usr/bin/env node
// An octet-stream upload staged in the bucket (STORE_URL=s3://..., a running Ceph: scripts/ceph-dev.sh up DIR
// prints the environment this reads), paced at --rate bytes/s by this process, with S3_STAGING_OVERLAP on
// (converted while it arrives, from the parts' own objects) and off (staged whole, then converted). Two API
// processes on one Redis and bucket, one with each setting, and one worker (its own DATA_DIR; it follows
// whichever way the mark says); rounds alternate. Per run: the transfer, the last byte (the client's last write
// flushed) to the 202 and to the job's `succeeded`, and the CPU of radosgw and ceph-osd over the run (the
// bucket's cost), read from /proc by the PIDs in DIR/pids, and the worker's peak RSS while it converts (VmHWM of
// /proc/PID/status, reset through clear_refs before each upload) and CPU (utime+stime, as the API's).
//   node bench/s3-overlap.mjs ENV_FILE [--rate 50000000] [--rounds 3] [--data 256] [--virtual 1024]   (MiB of data in a qcow2 of that virtual size)
//     [--builds NAME=CLI,NAME=CLI]   A/B: each build (a dist/cli.js) gets its own two APIs and worker (own queue) on the
//                                    same Redis and bucket; every round runs each build in both modes, order alternating
//     [--modes overlap,staged]       which of the two settings to run
// BENCH_S3_WORKER_ARGS: node flags for the workers (e.g. `--import /tmp/sampler.mjs`); BENCH_S3_WORKER_ARGS_<NAME>: for
// build NAME's worker only, instead (one CLI under two names with different flags, e.g. --max-semi-space-size=4);
// BENCH_S3_WORKER_ENV_<NAME>: `K=V K=V` added to build NAME's worker's environment (e.g. MALLOC_MMAP_THRESHOLD_=131072).
import { execFileSync, spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { CreateBucketCommand, DeleteBucketCommand, DeleteObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';

const envFile = process.argv[2];
if (!envFile) throw new Error('usage: node bench/s3-overlap.mjs ENV_FILE [--rate 50000000] [--rounds 3] [--data 256]');
const args = new Map();
for (let i = 3; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const MiB = 2 ** 20;
const rate = Number(args.get('rate') ?? 50_000_000);
const rounds = Number(args.get('rounds') ?? 3);
const dataMiB = Number(args.get('data') ?? 256);
const virtualMiB = Number(args.get('virtual') ?? 1024);
const here = dirname(fileURLToPath(import.meta.url));
const builds = (args.get('builds') ?? `current=${join(here, '..', 'dist', 'cli.js')}`).split(',').map((b) => {
  const at = b.indexOf('=');
  return { name: b.slice(0, at), cli: b.slice(at + 1) };
});
const modes = (args.get('modes') ?? 'overlap,staged').split(',');
const workerEnv = (name) => Object.fromEntries((process.env[`BENCH_S3_WORKER_ENV_${name}`] ?? '').split(' ').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
const workerArgs = (name) => (process.env[`BENCH_S3_WORKER_ARGS_${name}`] ?? process.env.BENCH_S3_WORKER_ARGS ?? '').split(' ').filter(Boolean);
const TOKEN = 'bench-s3-overlap-token-0123456789abcdef';
const env = Object.fromEntries(readFileSync(envFile, 'utf8').split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const ticks = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
};
const pidOf = (name) => Number(readFileSync(join(env.CEPH_DEV_DIR, 'pids', `${name}.pid`), 'utf8').trim());
const bucketCpu = () => ticks(pidOf('rgw')) + ticks(pidOf('osd'));

const freePort = () =>
  new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

// The image: a `virtualMiB`-virtual qcow2 as qemu-img writes it, `dataMiB` of incompressible data in 1 MiB runs spread over it.
const dir = mkdtempSync(join(tmpdir(), 'diskconv-bench-s3-overlap-'));
const raw = join(dir, 'base.raw');
const virtual = virtualMiB * MiB;
const step = Math.floor(virtual / dataMiB / MiB) * MiB;
const fd = openSync(raw, 'w');
const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 5), Buffer.alloc(16));
for (let at = 0; at + MiB <= virtual && at / step < dataMiB; at += step) writeSync(fd, cipher.update(Buffer.alloc(MiB)), 0, MiB, at);
closeSync(fd);
execFileSync('truncate', ['-s', String(virtual), raw]);
const qcow2 = join(dir, 'disk.qcow2');
execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
rmSync(raw);
const image = readFileSync(qcow2);

const client = new S3Client({
  endpoint: env.S3_ENDPOINT,
  region: env.S3_REGION,
  forcePathStyle: true,
  credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
});
const Bucket = `bench-s3-overlap-${process.pid}`;
await client.send(new CreateBucketCommand({ Bucket }));

const children = [];
function start(name, argv, extra) {
  const child = spawn(process.execPath, argv, { env: { PATH: process.env.PATH, HOME: process.env.HOME ?? '/tmp', ...extra }, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const keep = (c) => {
    if (log.length < 1 << 20) log += c.toString();
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  children.push(child);
  return { child, log: () => log, name };
}

const redisPort = await freePort();
mkdirSync(join(dir, 'redis'));
const redis = spawn('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', join(dir, 'redis')], { stdio: 'ignore' });
children.push(redis);
for (let i = 0; i < 100; i++) {
  try {
    if (execFileSync('redis-cli', ['-p', String(redisPort), 'ping']).toString().trim() === 'PONG') break;
  } catch {
    await sleep(50);
  }
}
const base = {
  REDIS_URL: `redis://127.0.0.1:${redisPort}`,
  HOST: '127.0.0.1',
  API_TOKENS: TOKEN,
  LOG_LEVEL: 'info',
  PROGRESS_INTERVAL_MS: '250',
  MAX_UPLOAD_BYTES: String(4 * virtual),
  STORE_URL: `s3://${Bucket}/`,
  S3_ENDPOINT: env.S3_ENDPOINT,
  S3_REGION: env.S3_REGION,
  S3_FORCE_PATH_STYLE: 'true',
  AWS_ACCESS_KEY_ID: env.AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY: env.AWS_SECRET_ACCESS_KEY,
};
for (const build of builds) {
  const own = { ...base, QUEUE_NAME: `bench-${process.pid}-${build.name}` };
  build.apis = {};
  for (const [mode, on] of [['overlap', 'true'], ['staged', 'false']]) {
    const port = await freePort();
    build.apis[mode] = {
      url: `http://127.0.0.1:${port}`,
      proc: start(`api-${build.name}-${mode}`, [build.cli, 'serve'], { ...own, DATA_DIR: join(dir, `api-${build.name}-${mode}`), PORT: String(port), S3_STAGING_OVERLAP: on }),
    };
  }
  build.worker = start(`worker-${build.name}`, [...workerArgs(build.name), build.cli, 'worker'], { ...own, ...workerEnv(build.name), DATA_DIR: join(dir, `worker-${build.name}`) });
}
for (let i = 0; ; i++) {
  const apis = builds.flatMap((b) => Object.values(b.apis));
  const ok = (await Promise.all(apis.map((a) => fetch(`${a.url}/readyz`).then((r) => r.status === 200, () => false)))).every(Boolean);
  if (ok && builds.every((b) => b.worker.log().includes('worker ready'))) break;
  if (i > 300) {
    for (const c of children) c.kill('SIGTERM');
    throw new Error(`the service did not start:\n${apis.map((a) => a.proc.log()).join('\n')}\n${builds.map((b) => b.worker.log()).join('\n')}`);
  }
  await sleep(100);
}

/** The worker's peak RSS (VmHWM) reset to its RSS now: true when the kernel took it. */
function resetPeak(pid) {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}
function peakMiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? NaN) / 1024;
}

/** One upload at `rate`; times in seconds from the start. */
async function upload(url) {
  const t0 = performance.now();
  const req = httpRequest(`${url}/v1/jobs?filename=disk.qcow2`, {
    method: 'POST',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/octet-stream', 'content-length': String(image.length) },
  });
  const answered = new Promise((resolve, reject) => {
    req.on('response', (res) => {
      let text = '';
      res.on('data', (c) => (text += c));
      res.on('end', () => resolve({ at: performance.now(), status: res.statusCode, body: text }));
    });
    req.on('error', reject);
  });
  const CHUNK = 256 * 1024;
  for (let sent = 0; sent < image.length; ) {
    const end = Math.min(image.length, sent + CHUNK);
    const ok = req.write(image.subarray(sent, end));
    sent = end;
    if (!ok) await new Promise((r) => req.once('drain', r));
    const due = t0 + (sent / rate) * 1000;
    const wait = due - performance.now();
    if (wait > 1) await sleep(wait);
  }
  await new Promise((r) => req.end(r));
  const lastByte = performance.now();
  const answer = await answered;
  if (answer.status !== 202) throw new Error(`upload answered ${answer.status}: ${answer.body}`);
  const id = JSON.parse(answer.body).id;
  let job;
  for (;;) {
    job = await (await fetch(`${url}/v1/jobs/${id}`, { headers: { authorization: `Bearer ${TOKEN}` } })).json();
    if (job.state === 'succeeded' || job.state === 'failed') break;
    await sleep(20);
  }
  const done = performance.now();
  if (job.state !== 'succeeded') throw new Error(`job failed: ${JSON.stringify(job.error)}`);
  // The run's objects go now: the test Ceph's memstore OSD holds a few GiB, and a full OSD blocks every write.
  await fetch(`${url}/v1/jobs/${id}`, { method: 'DELETE', headers: { authorization: `Bearer ${TOKEN}` } });
  return { transfer: (lastByte - t0) / 1000, answered: (answer.at - lastByte) / 1000, succeeded: (done - lastByte) / 1000, sha: job.output.sha256, sourceSha: job.source.sha256 };
}

const imageSha = createHash('sha256').update(image).digest('hex');
const runs = builds.flatMap((b) => modes.map((mode) => ({ build: b, mode, key: `${b.name} ${mode}` })));
const results = Object.fromEntries(runs.map((r) => [r.key, []]));
const loads = [loadavg()];
for (let r = 0; r < rounds; r++) {
  for (const { build, mode, key } of r % 2 ? [...runs].reverse() : runs) {
    const c0 = bucketCpu();
    const pid = build.worker.child.pid;
    const reset = resetPeak(pid);
    const w0 = ticks(pid);
    const a0 = ticks(build.apis[mode].proc.child.pid);
    let run;
    try {
      run = await upload(build.apis[mode].url);
    } catch (err) {
      // The processes' last words, then none left behind.
      for (const p of [...Object.values(build.apis).map((a) => a.proc), build.worker]) console.error(`--- ${p.name}:\n${p.log().slice(-4000)}`);
      for (const c of children) c.kill('SIGTERM');
      throw err;
    }
    run.bucketCpu = bucketCpu() - c0;
    run.workerPeakMiB = peakMiB(pid);
    run.workerCpu = ticks(pid) - w0;
    run.apiCpu = ticks(build.apis[mode].proc.child.pid) - a0;
    if (!reset) run.peakSinceStart = true;
    run.load = loadavg();
    if (run.sourceSha !== imageSha) throw new Error(`source.sha256 ${run.sourceSha}, expected ${imageSha}`);
    results[key].push(run);
    console.error(key, JSON.stringify(run));
  }
  loads.push(loadavg());
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const shas = new Set(Object.values(results).flatMap((xs) => xs.map((x) => x.sha)));
console.log(`${(image.length / MiB).toFixed(0)} MiB qcow2 (${virtualMiB} MiB virtual, ${dataMiB} MiB data), paced at ${(rate / 1e6).toFixed(0)} MB/s, ${rounds} rounds alternating; outputs ${shas.size === 1 ? 'identical' : 'DIFFER'}; load averages ${loads.join(' | ')}`);
console.log('| build | S3_STAGING_OVERLAP | transfer s | last byte -> 202 s | last byte -> succeeded s (median; runs) | worker peak RSS MiB (median; runs) | worker CPU s | API CPU s | radosgw+ceph-osd CPU s per upload (median) |');
console.log('|---|---|---|---|---|---|---|---|---|');
for (const { build, mode, key } of runs) {
  const xs = results[key];
  console.log(
    `| ${build.name} | ${mode === 'overlap' ? 'true' : 'false'} | ${median(xs.map((x) => x.transfer)).toFixed(2)} | ${median(xs.map((x) => x.answered)).toFixed(2)} | **${median(xs.map((x) => x.succeeded)).toFixed(2)}** (${xs.map((x) => x.succeeded.toFixed(2)).join(', ')}) | **${median(xs.map((x) => x.workerPeakMiB)).toFixed(0)}** (${xs.map((x) => x.workerPeakMiB.toFixed(0)).join(', ')}${xs.some((x) => x.peakSinceStart) ? '; since start: clear_refs refused' : ''}) | ${median(xs.map((x) => x.workerCpu)).toFixed(2)} | ${median(xs.map((x) => x.apiCpu)).toFixed(2)} | ${median(xs.map((x) => x.bucketCpu)).toFixed(2)} |`,
  );
}
for (const build of builds) {
  const converted = build.worker.log().split('\n').filter((l) => l.includes('"converted"')).map((l) => JSON.parse(l).timings);
  console.log(`${build.name} worker timings (ms):`, JSON.stringify(converted));
}

for (const c of children) c.kill('SIGTERM');
await sleep(500);
let token;
do {
  const res = await client.send(new ListObjectsV2Command({ Bucket, ...(token ? { ContinuationToken: token } : {}) }));
  for (const o of res.Contents ?? []) await client.send(new DeleteObjectCommand({ Bucket, Key: o.Key }));
  token = res.IsTruncated ? res.NextContinuationToken : undefined;
} while (token);
await client.send(new DeleteBucketCommand({ Bucket })).catch((err) => console.error('bucket left:', err.message));
rmSync(dir, { recursive: true, force: true });
