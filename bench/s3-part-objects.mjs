#!/usr/bin/env node
// What following an S3-staged upload costs the bucket (S3_STAGING_OVERLAP, src/store/s3/part-objects.ts), on a
// running Ceph (scripts/ceph-dev.sh up DIR prints the environment this reads). Three ways of staging N parts of
// 8 MiB, rounds alternating:
//   multipart   UploadPart only (the staged path: nothing readable before CompleteMultipartUpload)
//   both        each part PUT as an object of its own and, from the same buffer, UploadPart'd
//   copy        each part PUT as an object, then UploadPartCopy'd into the multipart upload (server-side)
// then CompleteMultipartUpload (and the part objects deleted). Per way: median wall, this process's CPU
// (utime+stime: what the API host spends), the bytes this process sent, and radosgw's and ceph-osd's CPU
// (the bucket's cost), read from /proc by the PIDs in DIR/pids.
//   node bench/s3-part-objects.mjs ENV_FILE [--parts 32] [--rounds 3]
import { createCipheriv } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  CompleteMultipartUploadCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteBucketCommand,
  DeleteObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
  UploadPartCopyCommand,
} from '@aws-sdk/client-s3';

const envFile = process.argv[2];
if (!envFile) throw new Error('usage: node bench/s3-part-objects.mjs ENV_FILE [--parts 32] [--rounds 3]');
const args = new Map();
for (let i = 3; i < process.argv.length; i += 2) args.set(process.argv[i].replace(/^--/, ''), process.argv[i + 1]);
const MiB = 2 ** 20;
const PART = 8 * MiB;
const parts = Number(args.get('parts') ?? 32);
const rounds = Number(args.get('rounds') ?? 3);
const env = Object.fromEntries(readFileSync(envFile, 'utf8').split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const ticks = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in seconds (USER_HZ 100)
};
const pidOf = (name) => Number(readFileSync(join(env.CEPH_DEV_DIR, 'pids', `${name}.pid`), 'utf8').trim());
const daemons = { rgw: pidOf('rgw'), osd: pidOf('osd') };
const cpu = () => {
  const u = process.cpuUsage();
  return { self: (u.user + u.system) / 1e6, rgw: ticks(daemons.rgw), osd: ticks(daemons.osd) };
};

const client = new S3Client({
  endpoint: env.S3_ENDPOINT,
  region: env.S3_REGION,
  forcePathStyle: true,
  credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
});
const Bucket = `bench-parts-${process.pid}`;
await client.send(new CreateBucketCommand({ Bucket }));

const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 9), Buffer.alloc(16));
const data = Array.from({ length: parts }, () => cipher.update(Buffer.alloc(PART)));

async function stage(way, round) {
  const Key = `input/${way}-${round}`;
  const { UploadId } = await client.send(new CreateMultipartUploadCommand({ Bucket, Key }));
  const done = [];
  let sent = 0;
  // Two parts in flight, as the API's staging write has.
  let next = 0;
  const lane = async () => {
    for (;;) {
      const n = next++;
      if (n >= parts) return;
      const PartNumber = n + 1;
      const partKey = `${Key}.parts/${n}`;
      if (way === 'multipart') {
        const r = await client.send(new UploadPartCommand({ Bucket, Key, UploadId, PartNumber, Body: data[n] }));
        sent += PART;
        done[n] = { PartNumber, ETag: r.ETag };
      } else if (way === 'both') {
        const [, r] = await Promise.all([
          client.send(new PutObjectCommand({ Bucket, Key: partKey, Body: data[n] })),
          client.send(new UploadPartCommand({ Bucket, Key, UploadId, PartNumber, Body: data[n] })),
        ]);
        sent += 2 * PART;
        done[n] = { PartNumber, ETag: r.ETag };
      } else {
        await client.send(new PutObjectCommand({ Bucket, Key: partKey, Body: data[n] }));
        sent += PART;
        const r = await client.send(new UploadPartCopyCommand({ Bucket, Key, UploadId, PartNumber, CopySource: `${Bucket}/${partKey}` }));
        done[n] = { PartNumber, ETag: r.CopyPartResult?.ETag };
      }
    }
  };
  await Promise.all([lane(), lane()]);
  await client.send(new CompleteMultipartUploadCommand({ Bucket, Key, UploadId, MultipartUpload: { Parts: done } }));
  if (way !== 'multipart') for (let n = 0; n < parts; n++) await client.send(new DeleteObjectCommand({ Bucket, Key: `${Key}.parts/${n}` }));
  return sent;
}

const ways = ['multipart', 'both', 'copy'];
const rows = Object.fromEntries(ways.map((w) => [w, []]));
const loads = [loadavg()];
for (let r = 0; r < rounds; r++) {
  for (const way of r % 2 ? [...ways].reverse() : ways) {
    const c0 = cpu();
    const t0 = performance.now();
    const sent = await stage(way, r);
    const wall = (performance.now() - t0) / 1000;
    const c1 = cpu();
    rows[way].push({ wall, self: c1.self - c0.self, rgw: c1.rgw - c0.rgw, osd: c1.osd - c0.osd, sent });
  }
  loads.push(loadavg());
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`${parts} parts of 8 MiB (${(parts * 8)} MiB), ${rounds} rounds alternating; load averages ${loads.join(' | ')}`);
console.log('| way | wall s (median) | API CPU s | radosgw CPU s | ceph-osd CPU s | bytes sent by the API |');
console.log('|---|---|---|---|---|---|');
for (const way of ways) {
  const xs = rows[way];
  const f = (k) => median(xs.map((x) => x[k])).toFixed(2);
  console.log(`| ${way} | ${f('wall')} (${xs.map((x) => x.wall.toFixed(2)).join(', ')}) | ${f('self')} | ${f('rgw')} | ${f('osd')} | ${(xs[0].sent / MiB).toFixed(0)} MiB |`);
}
const left = await client.send(new ListObjectsV2Command({ Bucket }));
for (const o of left.Contents ?? []) await client.send(new DeleteObjectCommand({ Bucket, Key: o.Key }));
await client.send(new DeleteBucketCommand({ Bucket }));
