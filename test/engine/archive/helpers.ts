/** Test helpers for archives: a hand-written tar writer (independent of the parser) and image digests. */
import { createHash } from 'node:crypto';
import { hashZeros, openImage, readExtents, FileSource, BufferSource, type OpenImageOptions, type RandomAccessSource } from '../../../src/engine/index.js';

export interface RawTarEntry {
  name: string;
  data?: Uint8Array;
  /** Tar type flag: '0' file (default), '1' hard link, '2' symlink, '5' directory, 'x' pax, 'L' GNU long name, 'S' GNU sparse. */
  type?: string;
  linkname?: string;
  /** Lie about the size in the header. */
  size?: number;
  /** Break the checksum. */
  badChecksum?: boolean;
  /** ustar prefix field. */
  prefix?: string;
}

function octal(value: number, width: number): string {
  return value.toString(8).padStart(width - 1, '0') + '\0';
}

/** One ustar header block, written from POSIX.1-1988's layout. */
export function tarHeader(e: RawTarEntry, size: number): Buffer {
  const h = Buffer.alloc(512);
  h.write(e.name, 0, 100, 'latin1');
  h.write(octal(0o644, 8), 100, 'ascii');
  h.write(octal(0, 8), 108, 'ascii');
  h.write(octal(0, 8), 116, 'ascii');
  h.write(octal(e.size ?? size, 12), 124, 'ascii');
  h.write(octal(0, 12), 136, 'ascii');
  h.write('        ', 148, 'ascii');
  h.write(e.type ?? '0', 156, 'ascii');
  if (e.linkname) h.write(e.linkname, 157, 100, 'utf8');
  h.write('ustar\0', 257, 'ascii');
  h.write('00', 263, 'ascii');
  if (e.prefix) h.write(e.prefix, 345, 155, 'utf8');
  let sum = 0;
  for (const b of h) sum += b;
  if (e.badChecksum) sum += 1;
  h.write(octal(sum, 7) + ' ', 148, 'ascii');
  return h;
}

/** A tar archive of the entries, each padded to 512 bytes, ended by two zero blocks. */
export function makeTar(entries: RawTarEntry[], { end = true } = {}): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const data = Buffer.from(e.data ?? new Uint8Array(0));
    parts.push(tarHeader(e, data.length), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  if (end) parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

/** sha256 of what the engine makes of the image: the raw disk, holes included. */
export async function imageSha256(source: RandomAccessSource, options: OpenImageOptions = {}): Promise<{ sha256: string; virtualSize: number; format: string }> {
  const image = await openImage(source, options);
  try {
    const hash = createHash('sha256');
    for await (const e of readExtents(image, source)) {
      if (e.kind === 'data') hash.update(e.data);
      else await hashZeros(hash, e.length);
    }
    return { sha256: hash.digest('hex'), virtualSize: image.virtualSize, format: image.format };
  } finally {
    await image.close();
  }
}

export async function fileSha256(path: string, options: OpenImageOptions = {}): Promise<{ sha256: string; virtualSize: number; format: string }> {
  const source = await FileSource.open(path);
  try {
    return await imageSha256(source, options);
  } finally {
    await source.close();
  }
}

/** The typed error (code and message) opening and reading `bytes` ends in, or 'ok'. */
export async function outcomeOf(bytes: Uint8Array, options: OpenImageOptions = {}): Promise<{ code: string; message: string }> {
  try {
    await imageSha256(new BufferSource(bytes, 'hostile.tar'), options);
    return { code: 'ok', message: '' };
  } catch (err) {
    const e = err as { code?: unknown; message?: unknown };
    return { code: typeof e.code === 'string' ? e.code : `uncaught ${String(err)}`, message: String(e.message) };
  }
}

/**
 * A VHDX parent locator metadata item ("VHDX Format Specification" 2.6.2.6): the
 * VHDX locator type GUID, a reserved u16, the entry count, 12-byte entries (key
 * offset, value offset, key length, value length) and the UTF-16LE keys and values.
 */
export function vhdxParentLocator(pairs: Record<string, string>): Buffer {
  const type = Buffer.from('b7ef4ab09ed1814ab78925b8e9445913', 'hex');
  const keys = Object.entries(pairs);
  const head = Buffer.alloc(20 + 12 * keys.length);
  type.copy(head, 0);
  head.writeUInt16LE(keys.length, 18);
  const blobs: Buffer[] = [];
  let at = head.length;
  keys.forEach(([k, v], i) => {
    const kb = Buffer.from(k, 'utf16le');
    const vb = Buffer.from(v, 'utf16le');
    head.writeUInt32LE(at, 20 + 12 * i);
    head.writeUInt32LE(at + kb.length, 20 + 12 * i + 4);
    head.writeUInt16LE(kb.length, 20 + 12 * i + 8);
    head.writeUInt16LE(vb.length, 20 + 12 * i + 10);
    blobs.push(kb, vb);
    at += kb.length + vb.length;
  });
  return Buffer.concat([head, ...blobs]);
}
