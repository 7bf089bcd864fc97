/**
 * Seed images for the fuzzer, made by qemu-img at setup: every format and
 * variant the engine reads, small so that most mutations land in metadata. The
 * fuzzer-found images of ../shared/corpus join them when that folder exists.
 */
import { access, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, qemuImg, qemuIo } from '../helpers/qemu.js';
import { CORPUS_ROOT } from '../helpers/corpus.js';
import type { SeedFormat, SeedImage } from './mutate.js';

const MIB = 2 ** 20;

/** ../shared/corpus relative to the repository root (one definition, in test/helpers/corpus.ts). */
export const CORPUS_DIR = CORPUS_ROOT;

/** Images a fuzzer (AFL) or truncation produced, from the shared corpus; all are refused by qemu-img. */
export const CORPUS_FUZZER_IMAGES: ReadonlyArray<{ path: string; format: SeedFormat }> = [
  { path: 'qemu-iotests/afl5.img', format: 'vpc' },
  { path: 'qemu-iotests/afl9.vmdk', format: 'vmdk' },
  { path: 'go-vmdk-parser/vmdk-invalid.img', format: 'vmdk' },
];

export async function corpusAvailable(): Promise<boolean> {
  return access(join(CORPUS_DIR, 'MANIFEST.tsv')).then(
    () => true,
    () => false,
  );
}

export async function buildSeeds(dir: string, options: { corpus?: boolean } = {}): Promise<SeedImage[]> {
  const raw = join(dir, 'seed.raw');
  // 1 MiB plus an odd tail: not a multiple of any cluster size.
  await writeFile(raw, mixedContent(MIB + 3 * 512, 77));
  const seeds: Array<{ name: string; format: SeedFormat; file: string; args: string[] }> = [
    { name: 'qcow2-v2', format: 'qcow2', file: 'v2.qcow2', args: ['-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4096'] },
    { name: 'qcow2-v3', format: 'qcow2', file: 'v3.qcow2', args: ['-O', 'qcow2', '-o', 'cluster_size=65536'] },
    { name: 'qcow2-v3-512', format: 'qcow2', file: 'v3-512.qcow2', args: ['-O', 'qcow2', '-o', 'cluster_size=512'] },
    { name: 'qcow2-zlib', format: 'qcow2', file: 'zlib.qcow2', args: ['-c', '-O', 'qcow2', '-o', 'cluster_size=4096'] },
    { name: 'qcow2-zstd', format: 'qcow2', file: 'zstd.qcow2', args: ['-c', '-O', 'qcow2', '-o', 'cluster_size=4096,compression_type=zstd'] },
    { name: 'qcow2-extended-l2', format: 'qcow2', file: 'ext.qcow2', args: ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=65536'] },
    { name: 'vmdk-sparse', format: 'vmdk', file: 'sparse.vmdk', args: ['-O', 'vmdk', '-o', 'subformat=monolithicSparse'] },
    { name: 'vmdk-stream', format: 'vmdk', file: 'stream.vmdk', args: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'] },
    { name: 'vdi-dynamic', format: 'vdi', file: 'dynamic.vdi', args: ['-O', 'vdi'] },
    { name: 'vdi-static', format: 'vdi', file: 'static.vdi', args: ['-O', 'vdi', '-o', 'static=on'] },
    { name: 'vpc-dynamic', format: 'vpc', file: 'dynamic.vhd', args: ['-O', 'vpc', '-o', 'subformat=dynamic'] },
    { name: 'vpc-fixed', format: 'vpc', file: 'fixed.vhd', args: ['-O', 'vpc', '-o', 'subformat=fixed,force_size=on'] },
    { name: 'vhdx-dynamic', format: 'vhdx', file: 'dynamic.vhdx', args: ['-O', 'vhdx', '-o', 'block_size=1M'] },
    { name: 'vhdx-fixed', format: 'vhdx', file: 'fixed.vhdx', args: ['-O', 'vhdx', '-o', 'block_size=1M,subformat=fixed'] },
  ];
  for (const s of seeds) await qemuImg('convert', '-f', 'raw', ...s.args, raw, join(dir, s.file));

  // A snapshot, then new writes (including zero clusters) so active and snapshot tables differ.
  const snap = join(dir, 'snap.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, snap);
  await qemuImg('snapshot', '-c', 'first', snap);
  await qemuIo('-f', 'qcow2', '-c', 'write -P 0x5a 8k 12k', '-c', 'write -z 64k 64k', snap).catch(() => undefined);
  seeds.push({ name: 'qcow2-snapshot', format: 'qcow2', file: 'snap.qcow2', args: [] });

  const images: SeedImage[] = [];
  for (const s of seeds) images.push({ name: s.name, format: s.format, bytes: await readFile(join(dir, s.file)) });
  images.push({ name: 'raw', format: 'raw', bytes: await readFile(raw) });

  if (options.corpus !== false && (await corpusAvailable())) {
    for (const c of CORPUS_FUZZER_IMAGES) {
      const bytes = await readFile(join(CORPUS_DIR, c.path)).catch(() => undefined);
      if (bytes) images.push({ name: `corpus:${c.path}`, format: c.format, bytes });
    }
  }
  return images;
}
