import { FormatMismatchError, UnsupportedFormatError } from './errors.js';
import type { RandomAccessSource } from './source.js';
import type { FormatDriver, FormatId } from './types.js';
import { qcow2Driver } from './formats/qcow2.js';
import { vmdkDriver } from './formats/vmdk.js';
import { vdiDriver } from './formats/vdi.js';
import { rawDriver } from './formats/raw.js';

/** Probe order matters: raw matches everything and comes last. */
export const DRIVERS: readonly FormatDriver[] = [qcow2Driver, vmdkDriver, vdiDriver, rawDriver];

/** Bytes read for probing: enough for the vdi signature at 0x40 and an ISO 9660 descriptor at 0x8001. */
export const PROBE_BYTES = 64 * 1024;

export function driverFor(id: FormatId): FormatDriver {
  const driver = DRIVERS.find((d) => d.id === id);
  if (!driver) throw new UnsupportedFormatError(`unknown format ${id}`);
  return driver;
}

/** Signatures of formats qemu reads and we do not (yet): refused by name rather than read as raw. */
const FOREIGN_SIGNATURES: ReadonlyArray<{ name: string; test: (head: Uint8Array, tail: Uint8Array | undefined) => boolean }> = [
  { name: 'vpc (vhd)', test: (h, t) => ascii(h, 0, 8) === 'conectix' || (t !== undefined && ascii(t, 0, 8) === 'conectix') },
  { name: 'vhdx', test: (h) => ascii(h, 0, 8) === 'vhdxfile' },
  { name: 'qed', test: (h) => ascii(h, 0, 4) === 'QED\0' },
  { name: 'luks', test: (h) => ascii(h, 0, 6) === 'LUKS\xba\xbe' },
  { name: 'bochs', test: (h) => ascii(h, 0, 22) === 'Bochs Virtual HD Image' },
  { name: 'parallels', test: (h) => ['WithoutFreeSpace', 'WithouFreSpacExt'].includes(ascii(h, 0, 16)) },
  { name: 'cloop', test: (h) => ascii(h, 0, 128).includes('#V2.0 Format') || ascii(h, 0, 128).includes('#V3.0 Format') },
  { name: 'dmg', test: (_h, t) => t !== undefined && ascii(t, 0, 4) === 'koly' },
];

export function ascii(bytes: Uint8Array, offset: number, length: number): string {
  let s = '';
  const end = Math.min(bytes.length, offset + length);
  for (let i = offset; i < end; i++) s += String.fromCharCode(bytes[i] as number);
  return s;
}

export interface ProbeResult {
  format: FormatId;
  driver: FormatDriver;
}

/**
 * Decides the format from the bytes. A declared format must agree with them;
 * foreign formats are refused by name instead of being read as raw.
 */
export async function detectFormat(source: RandomAccessSource, declared?: FormatId, signal?: AbortSignal): Promise<ProbeResult> {
  const head = await source.read(0, Math.min(PROBE_BYTES, source.size), signal);
  const tail = source.size >= 512 ? await source.read(source.size - 512, 512, signal) : undefined;
  const matched = DRIVERS.find((d) => d.id !== 'raw' && d.probe(head, source.size));
  if (!matched) {
    const foreign = FOREIGN_SIGNATURES.find((f) => f.test(head, tail));
    if (foreign) {
      throw new UnsupportedFormatError(`${source.name}: ${foreign.name} images are not supported (supported: qcow2, vmdk, vdi, raw)`);
    }
  }
  const detected = matched ?? rawDriver;
  if (declared && declared !== detected.id) {
    throw new FormatMismatchError(`${source.name}: declared format ${declared} but the bytes are ${detected.id}`);
  }
  return { format: detected.id, driver: detected };
}
