/**
 * Tar (POSIX ustar, pax and GNU) read as an index of members, for OVA
 * appliances and multi-file bundles. Only the headers are read; a member's
 * bytes stay where they are and are read in place (tar stores them verbatim).
 *
 * Hostile-archive rules, each a typed error: a member whose name is absolute,
 * climbs with `..` or is empty; link members (symbolic or hard), devices and
 * fifos; two members with one name; a member running past the end of the
 * archive; bad header checksums; GNU sparse members; more members, or longer
 * pax/long-name records, than the limits allow.
 */
import { ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { ascii } from '../bytes.js';
import { enforceLimit, type Limits } from '../limits.js';
import { readExact, type RandomAccessSource } from '../source.js';

const BLOCK = 512;

export interface TarMember {
  /** Normalized name: '/'-separated, no '.', '..' or empty segments. */
  name: string;
  /** Where the member's bytes start in the archive (a multiple of 512). */
  offset: number;
  size: number;
  /**
   * A zip member stored compressed: `offset` is where its compressed bytes start
   * in the archive, `size` its declared uncompressed size. Read only once staged
   * (archive/index.ts), never through a window of the archive.
   */
  packed?: { method: 'deflate'; compressedSize: number; crc32: number };
}

export interface TarIndex {
  /** Regular-file members in archive order. */
  members: TarMember[];
  byName: Map<string, TarMember>;
}

/** POSIX ustar ("ustar\0") or GNU ("ustar  \0") magic at offset 257 of the first header. */
export function isTar(head: Uint8Array): boolean {
  if (head.length < BLOCK) return false;
  const magic = ascii(head, 257, 6);
  if (magic !== 'ustar\0' && magic !== 'ustar ') return false;
  return checksumOk(head.subarray(0, BLOCK));
}

function checksumOk(block: Uint8Array): boolean {
  const stored = parseOctal(block, 148, 8);
  if (stored === undefined) return false;
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : (block[i] as number);
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

/** An octal field (NUL/space terminated), or undefined when it is not one. */
function parseOctal(block: Uint8Array, offset: number, length: number): number | undefined {
  let text = ascii(block, offset, length);
  const nul = text.indexOf('\0');
  if (nul >= 0) text = text.slice(0, nul);
  text = text.trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) return undefined;
  const value = parseInt(text, 8);
  return Number.isSafeInteger(value) ? value : undefined;
}

/** A size field: octal, or GNU's base-256 (high bit of the first byte set). */
function parseSize(block: Uint8Array, where: string): number {
  const first = block[124] as number;
  if (first & 0x80) {
    if (first !== 0x80) throw new ImageCorruptError(`${where}: negative or oversized base-256 size`);
    let value = 0;
    for (let i = 125; i < 136; i++) {
      value = value * 256 + (block[i] as number);
      if (!Number.isSafeInteger(value)) throw new ImageCorruptError(`${where}: size out of range`);
    }
    return value;
  }
  const value = parseOctal(block, 124, 12);
  if (value === undefined) throw new ImageCorruptError(`${where}: size field is not an octal number`);
  return value;
}

function cString(block: Uint8Array, offset: number, length: number): string {
  const end = block.subarray(offset, offset + length).indexOf(0);
  return Buffer.from(block.subarray(offset, end < 0 ? offset + length : offset + end)).toString('utf8');
}

/**
 * A member name made safe to look up, or a refusal: absolute paths, `..`,
 * backslashes, NUL and empty names are refused; `.` and empty segments dropped.
 */
export function normalizeMemberName(raw: string, where: string): string {
  if (raw.includes('\0')) throw new UnsafeImageError(`${where}: member name contains a NUL byte`);
  if (raw.startsWith('/')) throw new UnsafeImageError(`${where}: member name "${shown(raw)}" is an absolute path; archives are read only by relative member names`);
  if (raw.includes('\\')) throw new UnsafeImageError(`${where}: member name "${shown(raw)}" contains a backslash`);
  const parts: string[] = [];
  for (const seg of raw.split('/')) {
    if (seg === '' || seg === '.') continue;
    if (seg === '..') throw new UnsafeImageError(`${where}: member name "${shown(raw)}" climbs out of the archive with ".."`);
    parts.push(seg);
  }
  if (parts.length === 0) throw new UnsafeImageError(`${where}: member name "${shown(raw)}" is empty`);
  return parts.join('/');
}

export function shown(name: string): string {
  // eslint-disable-next-line no-control-regex
  const clean = name.replace(/[\x00-\x1f\x7f]/g, '?');
  return clean.length > 120 ? `${clean.slice(0, 117)}...` : clean;
}

/** pax records: "LEN key=value\n" repeated. */
function parsePax(bytes: Uint8Array, where: string): Map<string, string> {
  const out = new Map<string, string>();
  let p = 0;
  while (p < bytes.length) {
    if (bytes[p] === 0) break; // padding
    const space = bytes.indexOf(0x20, p);
    if (space < 0 || space - p > 20) throw new ImageCorruptError(`${where}: malformed pax record at byte ${p}`);
    const lengthText = ascii(bytes, p, space - p);
    if (!/^[0-9]+$/.test(lengthText)) throw new ImageCorruptError(`${where}: malformed pax record length "${shown(lengthText)}"`);
    const length = parseInt(lengthText, 10);
    if (length <= space - p + 1 || p + length > bytes.length || bytes[p + length - 1] !== 0x0a) {
      throw new ImageCorruptError(`${where}: pax record at byte ${p} has a bad length ${length}`);
    }
    const record = Buffer.from(bytes.subarray(space + 1, p + length - 1)).toString('utf8');
    const eq = record.indexOf('=');
    if (eq <= 0) throw new ImageCorruptError(`${where}: pax record without key=value`);
    out.set(record.slice(0, eq), record.slice(eq + 1));
    p += length;
  }
  return out;
}

/**
 * Reads every header of a tar archive. Directories and pax global headers are
 * skipped; regular files are indexed; everything else is refused.
 */
export async function indexTar(source: RandomAccessSource, limits: Limits, signal?: AbortSignal): Promise<TarIndex> {
  const members: TarMember[] = [];
  const byName = new Map<string, TarMember>();
  const seen = new Set<string>(); // every name, directories included
  let pos = 0;
  let headers = 0;
  let longName: string | undefined;
  let pax: Map<string, string> | undefined;
  const name = source.name;
  for (;;) {
    throwIfAborted(signal);
    if (pos === source.size) break; // end without the two zero blocks: tolerated, as GNU tar does
    if (pos + BLOCK > source.size) throw new ImageCorruptError(`${name}: tar archive truncated inside the header at offset ${pos}`);
    const block = await readExact(source, pos, BLOCK, `${name}: tar header`, signal);
    if (block.every((b) => b === 0)) break; // end-of-archive marker
    headers++;
    enforceLimit('maxArchiveMembers', headers, limits, `${name}: tar headers`);
    const where = `${name}: tar header at offset ${pos}`;
    if (!checksumOk(block)) throw new ImageCorruptError(`${where}: bad header checksum`);
    const type = String.fromCharCode(block[156] as number);
    const size = parseSize(block, where);
    const dataOffset = pos + BLOCK;
    if (dataOffset + size > source.size) {
      throw new ImageCorruptError(`${where}: member of ${size} bytes runs past the end of the archive (${source.size} bytes)`);
    }
    const next = dataOffset + Math.ceil(size / BLOCK) * BLOCK;
    if (type === 'x' || type === 'L' || type === 'g') {
      enforceLimit('maxArchiveTextBytes', size, limits, `${where}: ${type === 'L' ? 'GNU long name' : 'pax header'}`);
      const bytes = await readExact(source, dataOffset, size, `${where}: extended header`, signal);
      if (type === 'L') longName = cString(bytes, 0, bytes.length);
      else if (type === 'x') pax = parsePax(bytes, where);
      // 'g' (global pax) only sets defaults we do not use.
      pos = next;
      continue;
    }
    const paxPath = pax?.get('path');
    const paxSize = pax?.get('size');
    let rawName = paxPath ?? longName;
    if (rawName === undefined) {
      rawName = cString(block, 0, 100);
      const prefix = ascii(block, 257, 6) === 'ustar\0' ? cString(block, 345, 155) : '';
      if (prefix !== '') rawName = `${prefix}/${rawName}`;
    }
    longName = undefined;
    pax = undefined;
    let memberSize = size;
    if (paxSize !== undefined) {
      if (!/^[0-9]+$/.test(paxSize) || !Number.isSafeInteger(Number(paxSize))) throw new ImageCorruptError(`${where}: pax size "${shown(paxSize)}" is not a number`);
      memberSize = Number(paxSize);
      if (dataOffset + memberSize > source.size) {
        throw new ImageCorruptError(`${where}: member of ${memberSize} bytes (pax size) runs past the end of the archive (${source.size} bytes)`);
      }
    }
    const memberEnd = dataOffset + Math.ceil(memberSize / BLOCK) * BLOCK;
    const what = `${where} ("${shown(rawName)}")`;
    if (type === '1' || type === '2' || type === 'K') {
      const target = cString(block, 157, 100);
      throw new UnsafeImageError(`${what}: ${type === '2' ? 'symbolic' : 'hard'} link member (to "${shown(target)}"); archives with links are refused, names resolve only to regular members`);
    }
    if (type === '3' || type === '4' || type === '6') throw new UnsafeImageError(`${what}: device or fifo member; archives are refused when they hold one`);
    if (type === 'S') throw new UnsupportedFeatureError(`${what}: GNU sparse members are not supported (make the archive without --sparse)`);
    const member = normalizeMemberName(rawName, where);
    if (seen.has(member)) throw new UnsafeImageError(`${where}: a second member named "${shown(member)}"; archives with duplicate names are refused (which one is meant is ambiguous)`);
    seen.add(member);
    if (type === '5') {
      pos = memberEnd;
      continue;
    }
    if (type !== '0' && type !== '\0' && type !== '7') throw new UnsupportedFeatureError(`${what}: tar member type '${shown(type)}' is not supported`);
    const entry: TarMember = { name: member, offset: dataOffset, size: memberSize };
    members.push(entry);
    byName.set(member, entry);
    pos = paxSize !== undefined ? memberEnd : next;
    if (pos > source.size) throw new ImageCorruptError(`${what}: member padding runs past the end of the archive`);
  }
  if (longName !== undefined || pax !== undefined) throw new ImageCorruptError(`${name}: tar archive ends after an extended header with no member`);
  return { members, byName };
}
