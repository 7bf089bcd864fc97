/**
 * Seeded mutators for the fuzzer: bit flips, byte sets, truncations at structure
 * boundaries and at random points, and extreme values written into the header
 * fields and table entries of each format (field tables in
 * test/fixtures/hostile/layout.ts, taken from the specifications).
 *
 * A case is fully determined by (seed image, run seed, case index): the same
 * triple always yields the same bytes, so a failure can be replayed from its
 * numbers as well as from the bytes saved next to it.
 */
import {
  FIELD_TABLES,
  ImageBytes,
  VMDK,
  qcow2CompressedEntry,
  qcow2Layout,
  vdiLayout,
  vhdxFixChecksums,
  vhdxLayout,
  vmdkLayout,
  vpcFixChecksums,
  vpcLayout,
  type Field,
} from '../fixtures/hostile/layout.js';

export type SeedFormat = 'qcow2' | 'vmdk' | 'vdi' | 'vpc' | 'vhdx' | 'raw';

export interface SeedImage {
  /** Short name for reports, e.g. "qcow2-v3-zstd". */
  name: string;
  format: SeedFormat;
  bytes: Buffer;
}

/** What a mutator did, in words a reader can check against the bytes. */
export type Mutation =
  | { kind: 'bitflip'; offset: number; bit: number }
  | { kind: 'byteset'; offset: number; value: number }
  | { kind: 'truncate'; length: number; at: 'boundary' | 'random' }
  | { kind: 'field'; field: string; offset: number; width: number; value: string }
  | { kind: 'entry'; table: string; offset: number; width: number; value: string };

export interface FuzzCase {
  seed: string;
  index: number;
  bytes: Buffer;
  mutations: Mutation[];
  /** Declared format passed to openImage, or undefined to probe. */
  declared?: SeedFormat;
  /** The checksums the format keeps (VHD footer, VHDX CRC-32C) were recomputed after mutating, so the mutations reach past them. */
  checksumsFixed?: boolean;
}

/** mulberry32: small, fast, good enough to spread mutations; seeded per case. */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
}

/** Mixes the run seed and the case index into one case seed (FNV-1a over both). */
export function caseSeed(runSeed: number, index: number): number {
  let h = 0x811c9dc5;
  for (const v of [runSeed, index]) {
    for (let i = 0; i < 4; i++) {
      h ^= (v >>> (i * 8)) & 0xff;
      h = Math.imul(h, 0x01000193);
    }
  }
  return h >>> 0;
}

/**
 * What a table entry counts in, so it can be pointed at another structure:
 * qcow2 L1/L2 entries hold byte offsets (flags in the top and bottom bits),
 * vmdk GD/GT and VHD BAT entries sector numbers, vdi block map entries block indexes,
 * VHDX BAT entries a MiB offset above a 3-bit state.
 */
export type EntryUnit = 'qcow2-offset' | 'sectors' | 'blocks' | 'vhdx-bat';

/** Structure of a seed image: where its boundaries and table entries are. Computed once per seed. */
export interface SeedShape {
  fields: readonly Field[];
  boundaries: number[];
  /** Table entries worth hitting with extreme values: L1/L2, GD/GT, block map. */
  entries: Array<{ table: string; offset: number; width: 4 | 8; endian: 'be' | 'le'; unit: EntryUnit }>;
  /** Where the metadata lives: mutations are biased towards these byte ranges. */
  hotRanges: Array<[number, number]>;
}

export function seedShape(seed: SeedImage): SeedShape {
  const img = new ImageBytes(seed.bytes);
  const size = seed.bytes.length;
  const clamp = (ranges: Array<[number, number]>): Array<[number, number]> =>
    ranges.map(([a, b]): [number, number] => [Math.max(0, a), Math.min(size, b)]).filter(([a, b]) => b > a);
  try {
    switch (seed.format) {
      case 'qcow2': {
        const l = qcow2Layout(img);
        const entries: SeedShape['entries'] = [];
        for (let i = 0; i < Math.min(l.l1Size, 64); i++) entries.push({ table: 'L1', offset: l.l1Offset + i * 8, width: 8, endian: 'be', unit: 'qcow2-offset' });
        for (const e of [...l.dataEntries.slice(0, 48), ...l.compressedEntries.slice(0, 48)]) entries.push({ table: 'L2', offset: e, width: 8, endian: 'be', unit: 'qcow2-offset' });
        const hot: Array<[number, number]> = [[0, Math.min(l.clusterSize, 4096)], [l.l1Offset, l.l1Offset + l.l1Size * 8], [l.refcountTableOffset, l.refcountTableOffset + 512]];
        for (const l2 of l.l2Offsets) hot.push([l2, l2 + Math.min(l.clusterSize, 4096)]);
        if (l.nbSnapshots > 0) hot.push([l.snapshotsOffset, l.snapshotsOffset + 1024]);
        // Compressed payloads: the deflate and zstd decoders are parsers too.
        for (const e of l.compressedEntries.slice(0, 8)) {
          const { offset, sectors } = qcow2CompressedEntry(img.getUint(e, 8, 'be'), l.clusterBits);
          hot.push([offset, offset + Math.min(sectors * 512, 4096)]);
        }
        return { fields: FIELD_TABLES.qcow2, boundaries: l.boundaries, entries, hotRanges: clamp(hot) };
      }
      case 'vmdk': {
        const footer = img.getField(VMDK.gdOffset) === 0xffffffffffffffffn;
        const l = vmdkLayout(img);
        const entries: SeedShape['entries'] = [];
        for (let i = 0; i < Math.min(l.gdEntries, 16); i++) entries.push({ table: 'GD', offset: l.gdOffset + i * 4, width: 4, endian: 'le', unit: 'sectors' });
        for (const e of l.grainEntries.slice(0, 64)) entries.push({ table: 'GT', offset: e, width: 4, endian: 'le', unit: 'sectors' });
        const hot: Array<[number, number]> = [[0, 512], [l.descriptorOffset, l.descriptorOffset + 1024], [l.gdOffset, l.gdOffset + 512]];
        if (l.rgdOffset) hot.push([l.rgdOffset, l.rgdOffset + 512]);
        for (const gt of l.gtOffsets) hot.push([gt, gt + l.numGTEsPerGT * 4]);
        if (footer) hot.push([size - 1536, size]);
        // Grain markers of stream-optimized images, and the start of their zlib streams.
        for (const e of l.grainEntries.slice(0, 8)) {
          const at = Number(img.getUint(e, 4, 'le')) * 512;
          hot.push([at, at + 16], [at + 12, at + 12 + 2048]);
        }
        return { fields: FIELD_TABLES.vmdk, boundaries: l.boundaries, entries, hotRanges: clamp(hot) };
      }
      case 'vdi': {
        const l = vdiLayout(img);
        const entries: SeedShape['entries'] = [];
        for (let i = 0; i < Math.min(l.blocksInImage, 64); i++) entries.push({ table: 'bmap', offset: l.offsetBmap + i * 4, width: 4, endian: 'le', unit: 'blocks' });
        return { fields: FIELD_TABLES.vdi, boundaries: l.boundaries, entries, hotRanges: clamp([[0, 512], [l.offsetBmap, l.offsetBmap + l.blocksInImage * 4]]) };
      }
      case 'vpc': {
        // A fixed VHD: only its footer, at the end, is metadata.
        if (img.buf.toString('latin1', 0, 8) !== 'conectix') return { fields: [], boundaries: [size - 512], entries: [], hotRanges: clamp([[size - 512, size]]) };
        const l = vpcLayout(img);
        const entries: SeedShape['entries'] = l.allocatedEntries.slice(0, 64).map((offset) => ({ table: 'BAT', offset, width: 4, endian: 'be', unit: 'sectors' }));
        for (let i = 0; i < Math.min(l.maxTableEntries, 8); i++) entries.push({ table: 'BAT', offset: l.batOffset + 4 * i, width: 4, endian: 'be', unit: 'sectors' });
        const hot: Array<[number, number]> = [[0, 1024 + 64], [l.batOffset, l.batOffset + l.maxTableEntries * 4], [size - 512, size]];
        return { fields: FIELD_TABLES.vpc, boundaries: l.boundaries, entries, hotRanges: clamp(hot) };
      }
      case 'vhdx': {
        const l = vhdxLayout(img);
        const entries: SeedShape['entries'] = l.payloadEntries.slice(0, 64).map((offset) => ({ table: 'BAT', offset, width: 8, endian: 'le', unit: 'vhdx-bat' }));
        // Metadata items are where the layout puts them: their fields are found per seed.
        const item = (name: string, offset: number | undefined, width: 4 | 8, kind: Field['kind']): Field[] => (offset === undefined ? [] : [{ name, offset, width, endian: 'le', kind }]);
        const fields: Field[] = [
          ...FIELD_TABLES.vhdx,
          ...item('file_parameters.block_size', l.items.fileParameters, 4, 'size'),
          ...item('file_parameters.flags', l.items.fileParameters === undefined ? undefined : l.items.fileParameters + 4, 4, 'flags'),
          ...item('virtual_disk_size', l.items.virtualDiskSize, 8, 'size'),
          ...item('logical_sector_size', l.items.logicalSectorSize, 4, 'size'),
          { name: 'metadata.entry_count', offset: l.metaOffset + 10, width: 2, endian: 'le', kind: 'count' },
          { name: 'metadata.entry0.offset', offset: l.metaOffset + 32 + 16, width: 4, endian: 'le', kind: 'offset' },
        ];
        const hot: Array<[number, number]> = [[0x10000, 0x10000 + 80], [0x20000, 0x20000 + 80], [0x30000, 0x30000 + 80], [l.metaOffset, l.metaOffset + 256], [l.batOffset, l.batOffset + 512], [l.logOffset, l.logOffset + 128]];
        for (const v of Object.values(l.items)) if (v !== undefined) hot.push([v, v + 8]);
        return { fields, boundaries: l.boundaries, entries, hotRanges: clamp(hot) };
      }
      case 'raw':
        return { fields: [], boundaries: [512, 4096, 0x8000], entries: [], hotRanges: clamp([[0, 1024], [0x8000, 0x9800]]) };
    }
  } catch {
    // A seed we cannot parse (a fuzzer-found corpus image): mutate its first sectors and anywhere.
  }
  return { fields: seed.format === 'raw' ? [] : FIELD_TABLES[seed.format], boundaries: [512, 4096], entries: [], hotRanges: clamp([[0, 4096]]) };
}

/** Values that break size/offset/count arithmetic: zero, one, sign and width edges, and the file's own size. */
function extremeValues(width: number, original: bigint, fileSize: number): bigint[] {
  const all = (1n << BigInt(width * 8)) - 1n;
  const values = [0n, 1n, 0x7fffffffn, 0xffffffffn, 0x80000000n, 0x100000000n, 1n << 62n, 1n << 63n, all, BigInt(fileSize), BigInt(fileSize + 1), original + 1n, original - 1n, original * 2n, original << 20n, BigInt(fileSize) / 512n + 1n];
  return values.map((v) => BigInt.asUintN(width * 8, v));
}

/**
 * Points an entry at another structure (a header, a table, another entry's
 * target): aliasing and overlap that no single-field bound catches. qcow2
 * entries keep their flag bits so the entry still looks allocated.
 */
function retarget(rng: Rng, unit: EntryUnit, original: bigint, shape: SeedShape): bigint {
  const target = shape.boundaries.length > 0 ? rng.pick([0, ...shape.boundaries]) : 0;
  switch (unit) {
    case 'qcow2-offset': {
      const flags = original & ~0x00fffffffffffe00n;
      return flags | (BigInt(target) & 0x00fffffffffffe00n);
    }
    case 'sectors':
      return BigInt(Math.floor(target / 512));
    case 'blocks':
      return BigInt(rng.int(8));
    case 'vhdx-bat':
      return (original & 7n) | ((BigInt(target) >> 20n) << 20n);
  }
}

function hotOffset(rng: Rng, shape: SeedShape, size: number): number {
  const [start, end] = shape.hotRanges.length > 0 && rng.chance(0.85) ? rng.pick(shape.hotRanges) : [0, size];
  return start + rng.int(Math.max(1, end - start));
}

const MUTATORS = ['bitflip', 'byteset', 'truncate', 'field', 'entry'] as const;

/** One mutation applied in place to `img`. */
function mutateOnce(rng: Rng, img: ImageBytes, shape: SeedShape): Mutation | undefined {
  if (img.length === 0) return undefined;
  let kind = rng.pick(MUTATORS);
  if (kind === 'field' && shape.fields.length === 0) kind = 'bitflip';
  if (kind === 'entry' && shape.entries.length === 0) kind = 'byteset';
  switch (kind) {
    case 'bitflip': {
      const offset = hotOffset(rng, shape, img.length);
      const bit = rng.int(8);
      img.buf[offset] = ((img.buf[offset] as number) ^ (1 << bit)) & 0xff;
      return { kind, offset, bit };
    }
    case 'byteset': {
      const offset = hotOffset(rng, shape, img.length);
      const value = rng.chance(0.5) ? rng.pick([0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff]) : rng.int(256);
      img.buf[offset] = value;
      return { kind, offset, value };
    }
    case 'truncate': {
      const atBoundary = shape.boundaries.length > 0 && rng.chance(0.7);
      const base = atBoundary ? rng.pick(shape.boundaries) + rng.pick([0, 0, 1, -1, 8, -8, 512]) : rng.int(img.length);
      const length = Math.max(0, Math.min(img.length - 1, base));
      img.truncate(length);
      return { kind, length, at: atBoundary ? 'boundary' : 'random' };
    }
    case 'field': {
      const field = rng.pick(shape.fields);
      // Magic and version fields are hit less: breaking them only tests the probe.
      if ((field.kind === 'magic' || field.kind === 'version') && rng.chance(0.7)) return mutateOnce(rng, img, shape);
      const value = rng.pick(extremeValues(field.width, img.getField(field), img.length));
      img.setField(field, value);
      return { kind, field: field.name, offset: field.offset, width: field.width, value: `0x${value.toString(16)}` };
    }
    case 'entry': {
      const entry = rng.pick(shape.entries);
      const original = img.getUint(entry.offset, entry.width, entry.endian);
      const roll = rng.next();
      const value =
        roll < 0.3
          ? BigInt.asUintN(entry.width * 8, original ^ (1n << BigInt(rng.int(entry.width * 8))))
          : roll < 0.6
            ? retarget(rng, entry.unit, original, shape)
            : rng.pick(extremeValues(entry.width, original, img.length));
      img.setUint(entry.offset, entry.width, entry.endian, value);
      return { kind, table: entry.table, offset: entry.offset, width: entry.width, value: `0x${value.toString(16)}` };
    }
  }
}

const CHECKSUM_FIXERS: Partial<Record<SeedFormat, (img: ImageBytes) => void>> = { vpc: vpcFixChecksums, vhdx: vhdxFixChecksums };

/** Builds case `index` of a run: mutations of one seed, chosen by the case's own PRNG. */
export function makeCase(seeds: readonly SeedImage[], shapes: readonly SeedShape[], runSeed: number, index: number): FuzzCase {
  const rng = new Rng(caseSeed(runSeed, index));
  const which = index % seeds.length;
  const seed = seeds[which] as SeedImage;
  const shape = shapes[which] as SeedShape;
  const img = new ImageBytes(Buffer.from(seed.bytes));
  const mutations: Mutation[] = [];
  // Mostly one to three mutations; sometimes a burst of up to ten (AFL's "havoc").
  const count = rng.chance(0.2) ? 4 + rng.int(7) : 1 + rng.int(3);
  for (let i = 0; i < count; i++) {
    const m = mutateOnce(rng, img, shape);
    if (m) mutations.push(m);
    if (m?.kind === 'truncate') break; // later offsets would mostly fall past the end
  }
  const declared = seed.format !== 'raw' && rng.chance(0.1) ? seed.format : undefined;
  // VHD footers and VHDX headers/region table carry checksums that stop most mutations at
  // open; usually recompute them so the mutation is judged on its own.
  const fixer = CHECKSUM_FIXERS[seed.format];
  const checksumsFixed = fixer !== undefined && rng.chance(0.75);
  if (checksumsFixed) fixer(img);
  return { seed: seed.name, index, bytes: img.buf, mutations, ...(declared ? { declared } : {}), ...(checksumsFixed ? { checksumsFixed } : {}) };
}

export function describeMutations(mutations: readonly Mutation[]): string {
  return mutations
    .map((m) => {
      switch (m.kind) {
        case 'bitflip':
          return `flip bit ${m.bit} of byte 0x${m.offset.toString(16)}`;
        case 'byteset':
          return `set byte 0x${m.offset.toString(16)} to 0x${m.value.toString(16)}`;
        case 'truncate':
          return `truncate to ${m.length} bytes (${m.at})`;
        case 'field':
          return `set ${m.field} (0x${m.offset.toString(16)}, ${m.width} bytes) to ${m.value}`;
        case 'entry':
          return `set ${m.table} entry at 0x${m.offset.toString(16)} to ${m.value}`;
      }
    })
    .join('; ');
}
