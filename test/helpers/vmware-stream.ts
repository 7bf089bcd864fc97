/**
 * Stream-optimized VMDKs laid out the way VMware writes them (grain markers, grain
 * tables after their grains, the grain directory and a footer at the end, the
 * header saying GD_AT_END), built from the format specification, since qemu-img
 * only writes the other layout (directory at the start). Shared by the format's
 * tests and the service's marker-walking tests.
 */
import { deflateSync } from 'node:zlib';

const S = 512;
const GD_AT_END = 0xffffffffffffffffn;

export interface StreamOptions {
  grainSectors?: number;
  /** Compress the last, partial grain padded to a whole grain (VMware) instead of only its bytes (qemu). */
  lastGrainWhole?: boolean;
  /** Descriptor text; `${capacity}` and `${name}` are filled in. */
  descriptor?: string;
  /** Adjusts a grain marker before it is written (grain index, marker bytes). */
  editGrain?: (grain: number, marker: Buffer) => Buffer;
}

export const DEFAULT_DESCRIPTOR = `# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=1c2b3a49
parentCID=ffffffff
isNativeSnapshot="no"
createType="streamOptimized"

# Extent description
RW \${capacity} SPARSE "\${name}"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "1"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "0b5c2f1e9c8f4a3e0b5c2f1e9c8f4a3e"
ddb.uuid = "60 00 C2 91 2e 0a 6e 53-a2 f1 7c 0d 0c 1e 7e 51"
ddb.virtualHWVersion = "10"
`;

function header(capacity: number, grainSectors: number, descSectors: number, gdOffset: bigint): Buffer {
  const h = Buffer.alloc(S);
  h.write('KDMV', 0, 'latin1');
  h.writeUInt32LE(3, 4); // version
  h.writeUInt32LE(0x30001, 8); // newline detection, compressed grains, markers
  h.writeBigUInt64LE(BigInt(capacity), 12);
  h.writeBigUInt64LE(BigInt(grainSectors), 20);
  h.writeBigUInt64LE(1n, 28); // descriptor at sector 1
  h.writeBigUInt64LE(BigInt(descSectors), 36);
  h.writeUInt32LE(512, 44); // grain table entries
  h.writeBigUInt64LE(0n, 48); // no redundant directory
  h.writeBigUInt64LE(gdOffset, 56);
  h.writeBigUInt64LE(128n, 64); // overhead: data from 64 KiB
  h.write('\n \r\n', 73, 'latin1');
  h.writeUInt16LE(1, 77); // deflate
  return h;
}

function marker(value: bigint, type: number): Buffer {
  const m = Buffer.alloc(S);
  m.writeBigUInt64LE(value, 0);
  m.writeUInt32LE(0, 8);
  m.writeUInt32LE(type, 12);
  return m;
}

const padToSector = (b: Buffer): Buffer => (b.length % S ? Buffer.concat([b, Buffer.alloc(S - (b.length % S))]) : b);

/** Writes `content` (whole sectors) as a VMware-style stream-optimized VMDK. */
export function buildStream(content: Buffer, name: string, options: StreamOptions = {}): Buffer {
  const grainSectors = options.grainSectors ?? 128;
  const grainBytes = grainSectors * S;
  const capacity = content.length / S;
  if (!Number.isInteger(capacity)) throw new Error('content must be whole sectors');
  const descText = (options.descriptor ?? DEFAULT_DESCRIPTOR).replace('${capacity}', String(capacity)).replace('${name}', name);
  const desc = padToSector(Buffer.from(descText, 'latin1'));
  const descSectors = desc.length / S;
  const parts: Buffer[] = [header(capacity, grainSectors, descSectors, GD_AT_END), desc];
  let at = S + desc.length;
  const push = (b: Buffer): number => {
    const sector = at / S;
    parts.push(b);
    at += b.length;
    return sector;
  };
  push(Buffer.alloc(128 * S - at));

  const grainCount = Math.ceil(content.length / grainBytes);
  const tableCount = Math.ceil(grainCount / 512);
  const directory = Buffer.alloc(tableCount * 4);
  for (let t = 0; t < tableCount; t++) {
    const table = Buffer.alloc(512 * 4);
    let used = false;
    for (let i = 0; i < 512 && t * 512 + i < grainCount; i++) {
      const g = t * 512 + i;
      let data = content.subarray(g * grainBytes, Math.min(content.length, (g + 1) * grainBytes));
      if (data.every((b) => b === 0)) continue;
      if (options.lastGrainWhole && data.length < grainBytes) data = Buffer.concat([data, Buffer.alloc(grainBytes - data.length)]);
      const compressed = deflateSync(data);
      let m: Buffer = Buffer.alloc(12 + compressed.length);
      m.writeBigUInt64LE(BigInt(g * grainSectors), 0);
      m.writeUInt32LE(compressed.length, 8);
      compressed.copy(m, 12);
      if (options.editGrain) m = options.editGrain(g, m);
      table.writeUInt32LE(push(padToSector(m)), i * 4);
      used = true;
    }
    if (!used) continue; // grain directory entry 0: the whole table reads as zeros
    push(marker(4n, 1));
    directory.writeUInt32LE(push(table), t * 4);
  }
  push(marker(BigInt(Math.ceil(directory.length / S)), 2));
  const gdSector = push(padToSector(directory));
  push(marker(1n, 3));
  push(header(capacity, grainSectors, descSectors, BigInt(gdSector)));
  push(marker(0n, 0));
  return Buffer.concat(parts);
}

