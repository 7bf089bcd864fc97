import { FormatMismatchError, UnsafeImageError, UnsupportedFormatError } from './errors.js';
import { ascii } from './bytes.js';
import type { RandomAccessSource } from './source.js';
import type { DiskImage, FormatDriver, FormatId, OpenOptions } from './types.js';
import { rawDriver } from './formats/raw.js';
import { isQcow2, isVdi, isVhdFooter, isVhdx, isVmdk, isVpc } from './formats/signatures.js';

/**
 * A driver whose module is imported when an image of its format is opened: the
 * probe (formats/signatures.ts, the same function the driver's own probe is)
 * needs none of it, so probing a qcow2 loads no vmdk, vdi, vpc or vhdx code.
 */
function lazyDriver(id: FormatId, probe: FormatDriver['probe'], load: () => Promise<FormatDriver>): FormatDriver {
  let driver: Promise<FormatDriver> | undefined;
  return {
    id,
    probe,
    open: async (source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> => (await (driver ??= load())).open(source, options),
  };
}

/** Probe order matters: raw matches everything and comes last. */
export const DRIVERS: readonly FormatDriver[] = [
  lazyDriver('qcow2', isQcow2, async () => (await import('./formats/qcow2.js')).qcow2Driver),
  lazyDriver('vmdk', isVmdk, async () => (await import('./formats/vmdk.js')).vmdkDriver),
  lazyDriver('vdi', isVdi, async () => (await import('./formats/vdi.js')).vdiDriver),
  lazyDriver('vpc', isVpc, async () => (await import('./formats/vpc.js')).vpcDriver),
  lazyDriver('vhdx', isVhdx, async () => (await import('./formats/vhdx/index.js')).vhdxDriver),
  rawDriver,
];

/** Bytes read for probing: enough for the vdi signature at 0x40 and ISO 9660 descriptors up to 0x9006. */
export const PROBE_BYTES = 64 * 1024;

export function driverFor(id: FormatId): FormatDriver {
  const driver = DRIVERS.find((d) => d.id === id);
  if (!driver) throw new UnsupportedFormatError(`unknown format ${id}`);
  return driver;
}

/** Signatures of formats qemu reads and we do not (yet): refused by name rather than read as raw. */
const FOREIGN_SIGNATURES: ReadonlyArray<{ name: string; test: (head: Uint8Array, tail: Uint8Array | undefined) => boolean }> = [
  { name: 'qed', test: (h) => ascii(h, 0, 4) === 'QED\0' },
  { name: 'luks', test: (h) => ascii(h, 0, 6) === 'LUKS\xba\xbe' },
  { name: 'bochs', test: (h) => ascii(h, 0, 22) === 'Bochs Virtual HD Image' },
  { name: 'parallels', test: (h) => ['WithoutFreeSpace', 'WithouFreSpacExt'].includes(ascii(h, 0, 16)) },
  { name: 'cloop', test: (h) => ascii(h, 0, 128).includes('#V2.0 Format') || ascii(h, 0, 128).includes('#V3.0 Format') },
  { name: 'dmg', test: (_h, t) => t !== undefined && ascii(t, 0, 4) === 'koly' },
];

/**
 * ECMA-119 / ECMA-167 volume structure descriptors start at 2048-byte sector 16;
 * ISO 9660 puts CD001 there, UDF puts BEA01 there and NSR02/NSR03 one or two
 * sectors later (oslo only looks at 0x8001 and misses a UDF whose first
 * descriptor is BEA01).
 */
const VOLUME_DESCRIPTOR_OFFSETS = [0x8001, 0x8801, 0x9001];
const VOLUME_DESCRIPTOR_IDS = ['CD001', 'CDW02', 'BEA01', 'NSR02', 'NSR03', 'TEA01', 'BOOT2'];

/**
 * What raw disks legitimately carry: optical media and partition tables. On a
 * raw disk they are just content; on top of a qcow2/vmdk/vdi header they make
 * the bytes mean two things to two readers (oslo's "multiple formats detected").
 * The MBR test is the bare 0x55AA boot signature, as oslo's: a container
 * header has no business carrying one, plausible partition table or not.
 */
const RAW_CONTENT_SIGNATURES: ReadonlyArray<{ name: string; test: (head: Uint8Array) => boolean }> = [
  {
    name: 'an ISO 9660/UDF volume descriptor',
    test: (h) => VOLUME_DESCRIPTOR_OFFSETS.some((off) => VOLUME_DESCRIPTOR_IDS.includes(ascii(h, off, 5))),
  },
  { name: 'an MBR boot signature at 510', test: (h) => h[510] === 0x55 && h[511] === 0xaa },
  { name: 'a GPT header at 512', test: (h) => ascii(h, 512, 8) === 'EFI PART' },
];


export interface ProbeResult {
  format: FormatId;
  driver: FormatDriver;
}

/**
 * Decides the format from the bytes. Bytes that carry a qcow2/vmdk/vdi/vpc/vhdx
 * signature and any other signature are refused as ambiguous; a declared format
 * must agree with the bytes; foreign formats are refused by name instead of
 * being read as raw.
 */
export async function detectFormat(source: RandomAccessSource, declared?: FormatId, signal?: AbortSignal): Promise<ProbeResult> {
  const head = await source.read(0, Math.min(PROBE_BYTES, source.size), signal);
  const matched = DRIVERS.filter((d) => d.id !== 'raw' && d.probe(head, source.size));
  const [first] = matched;
  // The tail only when no header matched: a source still arriving (an upload converted as it
  // comes, src/queue/upload-stream.ts) would wait for its last bytes before anything else.
  const tail = !first && source.size >= 512 ? await source.read(source.size - 512, 512, signal) : undefined;
  if (first) {
    // Only signatures in the head count: a footer-style signature (a fixed VHD's
    // conectix, dmg's koly) can be the last guest sector of a converted disk, and
    // qemu does not probe by it either.
    const others = [
      ...matched.slice(1).map((d) => `a ${d.id} signature`),
      ...FOREIGN_SIGNATURES.filter((f) => f.test(head, undefined)).map((f) => `a ${f.name} signature`),
      ...RAW_CONTENT_SIGNATURES.filter((s) => s.test(head)).map((s) => s.name),
    ];
    if (others.length > 0) {
      throw new UnsafeImageError(
        `${source.name}: ambiguous image: a ${first.id} header that also carries ${others.join(' and ')}; another reader could take it for something else`,
      );
    }
  }
  const detected = first?.id ?? FOREIGN_SIGNATURES.find((f) => f.test(head, tail))?.name ?? 'raw';
  // A fixed VHD has its footer only at the end: qemu probes it as raw (so do we),
  // and reads it as a VHD when told so.
  if (declared === 'vpc' && detected === 'raw' && isVhdFooter(tail)) return { format: 'vpc', driver: driverFor('vpc') };
  if (declared && declared !== detected) {
    throw new FormatMismatchError(`${source.name}: declared format ${declared} but the bytes are ${detected}`);
  }
  if (!first && detected !== 'raw') {
    throw new UnsupportedFormatError(`${source.name}: ${detected} images are not supported (supported: qcow2, vmdk, vdi, vpc, vhdx, raw)`);
  }
  return { format: first?.id ?? 'raw', driver: first ?? rawDriver };
}
