#!/usr/bin/env node
// The kernel's cost of writing into new page-cache pages, alone: 6 runs of pwrite of 512 MiB
// (4 MiB calls, one ordinary buffer) into a new file, printing the system CPU of the writes.
// `rm`: each run's file replaces the previous one's; `keep`: all six are kept until the end.
// On the 2-core Firecracker VMs (virtio-balloon free page reporting) runs are bimodal,
// about 140 ms or 1,300 ms whatever the buffer (WebAssembly.Memory, SharedArrayBuffer,
// malloc): the write-side copy that profiles show as copy_folio_from_iter_atomic is paid
// by whichever process first touches fresh guest pages, qemu-img as much as diskconv.
// Usage: node bench/write-cost.mjs [rm|keep] [DIR]
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const mode = process.argv[2] ?? 'rm';
const dir = mkdtempSync(join(process.argv[3] ?? tmpdir(), 'diskconv-write-cost-'));
const total = 512 * 2 ** 20;
const chunk = 4 * 2 ** 20;
const buf = Buffer.alloc(16 * 2 ** 20, 0x5a);
const out = [];
try {
  for (let run = 0; run < 6; run++) {
    const path = join(dir, mode === 'keep' ? `out${run}.raw` : 'out.raw');
    rmSync(path, { force: true });
    const fd = openSync(path, 'w');
    let sys = 0;
    for (let off = 0; off < total; off += chunk) {
      const before = process.cpuUsage();
      writeSync(fd, buf, off % buf.length, chunk, off);
      sys += process.cpuUsage(before).system;
    }
    closeSync(fd);
    out.push(`${run}: ${(sys / 1000).toFixed(0)} ms`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(`${mode}: write sys per 512 MiB: ${out.join(' | ')}`);
