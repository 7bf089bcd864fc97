/**
 * Zip archives (PKWARE APPNOTE 6.3, with ZIP64) read as an index of members,
 * for bundles and OVAs uploaded as zip. Like tar members, stored zip members
 * are verbatim bytes, read in place; deflated members (method 8) are indexed
 * with their compressed range, declared size and CRC-32, and inflated into a
 * bounded scratch file when used (stage.ts), their sizes and CRC checked.
 *
 * Hostile rules, each a typed error: the central directory and every member
 * must lie inside the archive and before the directory, local and central
 * headers must agree (name, sizes), members may not overlap (the overlapping
 * zip bomb), a stored member's compressed and uncompressed sizes must be equal,
 * compression methods other than stored and deflate are refused,
 * names follow tar's rules (no absolute paths, `..`, duplicates), symbolic
 * links, encryption and multi-disk archives are refused.
 */
import { ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { enforceLimit, type Limits } from '../limits.js';
import { readExact, type RandomAccessSource } from '../source.js';
import { normalizeMemberName, shown, type TarIndex, type TarMember } from './tar.js';

const LOCAL = 0x04034b50;
const CENTRAL = 0x02014b50;
const EOCD = 0x06054b50;
const ZIP64_EOCD = 0x06064b50;
const ZIP64_LOCATOR = 0x07064b50;
const MAX_EOCD_SEARCH = 22 + 0xffff;

/** A local file header at offset 0 ("PK\3\4"). */
export function isZip(head: Uint8Array): boolean {
  return head.length >= 30 && head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04;
}

const view = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

function u64(v: DataView, at: number, what: string): number {
  const value = v.getBigUint64(at, true);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageCorruptError(`${what} is out of range`);
  return Number(value);
}

export async function indexZip(source: RandomAccessSource, limits: Limits, signal?: AbortSignal): Promise<TarIndex> {
  const name = source.name;
  const tailLength = Math.min(source.size, MAX_EOCD_SEARCH);
  const tail = await readExact(source, source.size - tailLength, tailLength, `${name}: zip end of central directory`, signal);
  let at = -1;
  for (let i = tail.length - 22; i >= 0; i--) {
    if (view(tail).getUint32(i, true) === EOCD) {
      at = i;
      break;
    }
  }
  if (at < 0) throw new ImageCorruptError(`${name}: zip archive without an end of central directory record (truncated?)`);
  const eocdOffset = source.size - tailLength + at;
  const e = view(tail.subarray(at, at + 22));
  if (e.getUint16(4, true) !== 0 || e.getUint16(6, true) !== 0) throw new UnsupportedFeatureError(`${name}: multi-disk (split) zip archives are not supported`);
  let entries = e.getUint16(10, true);
  let cdSize = e.getUint32(12, true);
  let cdOffset = e.getUint32(16, true);
  if (entries === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
    if (eocdOffset < 20) throw new ImageCorruptError(`${name}: ZIP64 values without a ZIP64 locator`);
    const loc = view(await readExact(source, eocdOffset - 20, 20, `${name}: ZIP64 locator`, signal));
    if (loc.getUint32(0, true) !== ZIP64_LOCATOR) throw new ImageCorruptError(`${name}: ZIP64 values without a ZIP64 locator`);
    const z64 = u64(loc, 8, `${name}: ZIP64 end record offset`);
    const rec = view(await readExact(source, z64, 56, `${name}: ZIP64 end of central directory`, signal));
    if (rec.getUint32(0, true) !== ZIP64_EOCD) throw new ImageCorruptError(`${name}: bad ZIP64 end of central directory signature`);
    entries = u64(rec, 32, `${name}: ZIP64 entry count`);
    cdSize = u64(rec, 40, `${name}: ZIP64 central directory size`);
    cdOffset = u64(rec, 48, `${name}: ZIP64 central directory offset`);
  }
  enforceLimit('maxArchiveMembers', entries, limits, `${name}: zip entries`);
  if (cdOffset + cdSize > eocdOffset) throw new ImageCorruptError(`${name}: the zip central directory (${cdSize} bytes at ${cdOffset}) runs past its end record`);
  enforceLimit('maxArchiveTextBytes', cdSize, limits, `${name}: zip central directory`);
  const cd = await readExact(source, cdOffset, cdSize, `${name}: zip central directory`, signal);
  const cv = view(cd);

  const members: TarMember[] = [];
  const byName = new Map<string, TarMember>();
  const seen = new Set<string>();
  let p = 0;
  for (let i = 0; i < entries; i++) {
    throwIfAborted(signal);
    const where = `${name}: zip central directory entry ${i}`;
    if (p + 46 > cd.length || cv.getUint32(p, true) !== CENTRAL) throw new ImageCorruptError(`${where}: bad signature or truncated`);
    const madeBy = cv.getUint16(p + 4, true) >> 8;
    const flags = cv.getUint16(p + 8, true);
    const method = cv.getUint16(p + 10, true);
    const crc = cv.getUint32(p + 16, true);
    let csize = cv.getUint32(p + 20, true);
    let usize = cv.getUint32(p + 24, true);
    const nameLength = cv.getUint16(p + 28, true);
    const extraLength = cv.getUint16(p + 30, true);
    const commentLength = cv.getUint16(p + 32, true);
    const external = cv.getUint32(p + 38, true);
    let local = cv.getUint32(p + 42, true);
    const end = p + 46 + nameLength + extraLength + commentLength;
    if (end > cd.length) throw new ImageCorruptError(`${where}: runs past the central directory`);
    const rawNameBytes = cd.subarray(p + 46, p + 46 + nameLength);
    const rawName = Buffer.from(rawNameBytes).toString(flags & 0x800 ? 'utf8' : 'latin1');
    // ZIP64 extended information: the fields whose 32-bit value is all ones, in this order.
    for (let x = p + 46 + nameLength; x + 4 <= p + 46 + nameLength + extraLength; ) {
      const id = cv.getUint16(x, true);
      const size = cv.getUint16(x + 2, true);
      if (id === 0x0001) {
        let f = x + 4;
        const take = (): number => {
          if (f + 8 > x + 4 + size) throw new ImageCorruptError(`${where}: short ZIP64 extra field`);
          const value = u64(cv, f, `${where}: ZIP64 field`);
          f += 8;
          return value;
        };
        if (usize === 0xffffffff) usize = take();
        if (csize === 0xffffffff) csize = take();
        if (local === 0xffffffff) local = take();
      }
      x += 4 + size;
    }
    p = end;
    const what = `${where} ("${shown(rawName)}")`;
    if (madeBy === 3 && ((external >>> 16) & 0o170000) === 0o120000) {
      throw new UnsafeImageError(`${what}: symbolic link member; archives with links are refused, names resolve only to regular members`);
    }
    const member = normalizeMemberName(rawName, where);
    if (seen.has(member)) throw new UnsafeImageError(`${where}: a second member named "${shown(member)}"; archives with duplicate names are refused`);
    seen.add(member);
    if (rawName.endsWith('/')) continue; // a directory
    if (flags & 0x1) throw new UnsupportedFeatureError(`${what}: encrypted zip members are not supported`);
    if (method !== 0 && method !== 8) throw new UnsupportedFeatureError(`${what}: zip compression method ${method} is not supported (only stored and deflated members are read)`);
    if (method === 0 && csize !== usize) throw new ImageCorruptError(`${what}: a stored member whose sizes disagree (${csize} stored, ${usize} uncompressed)`);
    const lh = view(await readExact(source, local, 30, `${what}: local header`, signal));
    if (lh.getUint32(0, true) !== LOCAL) throw new ImageCorruptError(`${what}: no local header at offset ${local}`);
    const localNameLength = lh.getUint16(26, true);
    const dataOffset = local + 30 + localNameLength + lh.getUint16(28, true);
    const localName = await readExact(source, local + 30, localNameLength, `${what}: local name`, signal);
    if (!Buffer.from(localName).equals(Buffer.from(rawNameBytes))) throw new ImageCorruptError(`${what}: the local header names another file`);
    const localFlags = lh.getUint16(6, true);
    const localSize = lh.getUint32(18, true);
    const localUsize = lh.getUint32(22, true);
    if (lh.getUint16(8, true) !== method) throw new ImageCorruptError(`${what}: the local header gives compression method ${lh.getUint16(8, true)}, the central directory ${method}`);
    // Sizes may be deferred to a data descriptor (flag 3) or to ZIP64 (all ones); otherwise they must agree.
    if (!(localFlags & 0x8) && localSize !== 0xffffffff && localSize !== csize) {
      throw new ImageCorruptError(`${what}: the local header gives ${localSize} bytes, the central directory ${csize}`);
    }
    if (!(localFlags & 0x8) && localUsize !== 0xffffffff && localUsize !== usize) {
      throw new ImageCorruptError(`${what}: the local header gives ${localUsize} uncompressed bytes, the central directory ${usize}`);
    }
    if (dataOffset + csize > cdOffset) throw new ImageCorruptError(`${what}: member of ${csize} bytes runs past the start of the central directory`);
    const entry: TarMember = method === 8 ? { name: member, offset: dataOffset, size: usize, packed: { method: 'deflate', compressedSize: csize, crc32: crc } } : { name: member, offset: dataOffset, size: csize };
    members.push(entry);
    byName.set(member, entry);
  }
  // Overlapping members (one byte range served as several files) are refused.
  const span = (m: TarMember): number => m.packed?.compressedSize ?? m.size;
  const sorted = [...members].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1] as TarMember;
    const cur = sorted[i] as TarMember;
    if (cur.offset < prev.offset + span(prev)) throw new UnsafeImageError(`${name}: zip members "${shown(prev.name)}" and "${shown(cur.name)}" overlap`);
  }
  return { members, byName };
}
