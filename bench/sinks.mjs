#!/usr/bin/env node
// The S3 and RBD sinks with and without the engine's batched writes (ExtentSink.writeBatch), on a running Ceph
// (scripts/ceph-dev.sh up DIR prints the environment this reads: CEPH_CONF, CEPH_ARGS, S3_ENDPOINT, keys).
// Not part of `npm run bench` (a Ceph takes a minute to start). Rounds alternate A/B; per case the median wall
// and the CPU of this process (the converter and the sink; rbd import-diff's own CPU is reported apart).
// A sink without a writeBatch of its own runs write() in both rows (so the two rows then measure the noise).
// 2026-12-01, load 7.7-11, 240 MiB of data in a 1 GiB qcow2, 3 rounds, with writeBatch tried for both sinks (one
// buffer per batch: 'w' records for RBD, neighbouring data extents for S3): S3 9.05 s write / 10.30 s writeBatch
// (CPU 5.10 / 5.53 s), RBD 2.17 / 2.34 s (CPU 1.40 / 1.40 s): no gain, so neither sink has it. S3's CPU is mostly
// sha256 (ours over the whole 1 GiB object, zeros included, and SigV4's of every part) and garbage from copies.
//   node bench/sinks.mjs ENV_FILE [--data 512] [--rounds 3] [--only s3|rbd]   (--data in MiB)
import { execFileSync } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CreateBucketCommand, DeleteBucketCommand, DeleteObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { convertToRaw, FileSource, openImage } from '../dist/engine/index.js';
import { RbdDestinations } from '../dist/store/rbd/destinations.js';
import { S3OutputStore } from '../dist/store/s3/output.js';

const envFile = process.argv[2];
if (!envFile) throw new Error('usage: node bench/sinks.mjs ENV_FILE [--data 512M] [--rounds 3]');
const args = new Map();
for (let i = 3; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const MiB = 2 ** 20;
const dataBytes = Number.parseInt(args.get('data') ?? '512', 10) * MiB;
const rounds = Number(args.get('rounds') ?? 3);
const kinds = (args.get('only') ?? 's3,rbd').split(',');
const env = Object.fromEntries(readFileSync(envFile, 'utf8').split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
Object.assign(process.env, { CEPH_CONF: env.CEPH_CONF, CEPH_ARGS: env.CEPH_ARGS, AWS_ACCESS_KEY_ID: env.AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: env.AWS_SECRET_ACCESS_KEY });
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

// A qcow2 with `dataBytes` of incompressible data in 1 MiB runs, one every 4 MiB, and some 64 KiB runs between.
const dir = mkdtempSync(join(tmpdir(), 'diskconv-bench-sinks-'));
const raw = join(dir, 'base.raw');
const virtual = dataBytes * 4;
const fd = openSync(raw, 'w');
const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 3), Buffer.alloc(16));
for (let at = 0; at < virtual; at += 4 * MiB) {
  writeSync(fd, cipher.update(Buffer.alloc(MiB - 128 * 1024)), 0, MiB - 128 * 1024, at);
  writeSync(fd, cipher.update(Buffer.alloc(64 * 1024)), 0, 64 * 1024, at + 2 * MiB + 4096);
}
closeSync(fd);
execFileSync('truncate', ['-s', String(virtual), raw]);
const qcow2 = join(dir, 'disk.qcow2');
execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
rmSync(raw);

const s3Client = new S3Client({
  endpoint: env.S3_ENDPOINT,
  region: env.S3_REGION,
  forcePathStyle: true,
  credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
});
const bucket = `bench-sinks-${process.pid}`;
await s3Client.send(new CreateBucketCommand({ Bucket: bucket }));
const s3 = new S3OutputStore(s3Client, { bucket, prefix: '', endpoint: env.S3_ENDPOINT, region: env.S3_REGION, forcePathStyle: true, requestTimeoutMs: 120_000 });
const rbd = new RbdDestinations({ pools: ['rbd'], commandTimeoutMs: 120_000 });

/** The writer as the engine sees it, with or without writeBatch. */
function asSink(writer, batched) {
  if (batched) return writer;
  return { write: (e) => writer.write(e), finish: (n) => writer.finish(n), abort: () => writer.abort() };
}

const childCpu = () => {
  const t = readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  return (Number(t[13]) + Number(t[14])) / 100; // cutime + cstime (waited-for children), seconds
};

async function once(kind, batched, n) {
  const source = await FileSource.open(qcow2, 'disk.qcow2');
  const image = await openImage(source, { format: 'auto' });
  const name = `bench-${process.pid}-${kind}-${batched ? 'b' : 'u'}-${n}`;
  const cpu0 = process.cpuUsage();
  const child0 = childCpu();
  const t0 = performance.now();
  const writer = kind === 's3' ? await s3.create(name, image.virtualSize) : await rbd.create({ target: 'rbd', pool: 'rbd', image: name }, image.virtualSize, name);
  await convertToRaw(image, source, asSink(writer, batched), { sha256: true });
  const stored = await writer.commit();
  const wall = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const child = childCpu() - child0;
  await image.close();
  await source.close();
  if (kind === 's3') await s3.delete(name);
  else await rbd.remove(stored);
  return { wall, cpu: (cpu.user + cpu.system) / 1e6, child };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const results = {};
const load = [loadavg()];
for (let r = 0; r < rounds; r++) {
  for (const kind of kinds) {
    for (const batched of r % 2 === 0 ? [false, true] : [true, false]) {
      const key = `${kind} ${batched ? 'B (writeBatch where the sink has it)' : 'A (write)'}`;
      (results[key] ??= []).push(await once(kind, batched, r));
    }
  }
  load.push(loadavg());
}
load.push(loadavg());
console.log(`# S3 and RBD sinks, ${dataBytes / MiB} MiB of data in a ${virtual / MiB} MiB qcow2, ${rounds} rounds (load ${load[0]} -> ${load.at(-1)})`);
console.log('| sink | wall s (median) | our CPU s (median) | rbd CPU s (median) | MB/s of data |');
console.log('|---|---|---|---|---|');
for (const [key, runs] of Object.entries(results)) {
  const wall = median(runs.map((x) => x.wall));
  console.log(`| ${key} | ${wall.toFixed(2)} | ${median(runs.map((x) => x.cpu)).toFixed(2)} | ${median(runs.map((x) => x.child)).toFixed(2)} | ${(dataBytes / 1e6 / wall).toFixed(0)} |`);
}
const { Contents } = await s3Client.send(new ListObjectsV2Command({ Bucket: bucket }));
for (const o of Contents ?? []) await s3Client.send(new DeleteObjectCommand({ Bucket: bucket, Key: o.Key }));
await s3Client.send(new DeleteBucketCommand({ Bucket: bucket }));
s3Client.destroy();
rmSync(dir, { recursive: true, force: true });
