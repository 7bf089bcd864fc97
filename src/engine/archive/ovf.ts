/**
 * The part of an OVF descriptor (DMTF DSP0243) that says which files are disks:
 * `References/File` (id, href, size, compression, chunkSize) and
 * `DiskSection/Disk` (diskId, fileRef, capacity, format), in document order.
 *
 * A small, bounded XML reading, not a general parser: no DTD (a DOCTYPE or
 * ENTITY declaration is refused, so no entity can expand or name an outside
 * resource), only the five predefined entities and character references,
 * bounded element depth and count. Namespace prefixes are dropped: OVF 1.x and
 * 2.x and VMware's/VirtualBox's prefixes all read the same.
 */
import { ImageCorruptError, UnsafeImageError } from '../errors.js';
import { shown } from './tar.js';

export interface OvfFile {
  id: string;
  href: string;
  size?: number;
  compression?: string;
  chunkSize?: number;
}

export interface OvfDisk {
  diskId: string;
  fileRef?: string;
  capacity?: string;
  capacityAllocationUnits?: string;
  format?: string;
}

export interface OvfDescriptor {
  files: OvfFile[];
  disks: OvfDisk[];
}

const MAX_DEPTH = 64;
const MAX_ELEMENTS = 100_000;

const PREDEFINED: Record<string, string> = { lt: '<', gt: '>', amp: '&', apos: "'", quot: '"' };

function decodeEntities(text: string, where: string): string {
  return text.replace(/&([^;&\s]{0,12});/g, (_m, ref: string) => {
    if (ref.startsWith('#x') || ref.startsWith('#X')) {
      const code = parseInt(ref.slice(2), 16);
      if (!/^[0-9a-fA-F]+$/.test(ref.slice(2)) || code > 0x10ffff) throw new ImageCorruptError(`${where}: bad character reference &${shown(ref)};`);
      return String.fromCodePoint(code);
    }
    if (ref.startsWith('#')) {
      const code = parseInt(ref.slice(1), 10);
      if (!/^[0-9]+$/.test(ref.slice(1)) || code > 0x10ffff) throw new ImageCorruptError(`${where}: bad character reference &${shown(ref)};`);
      return String.fromCodePoint(code);
    }
    const value = PREDEFINED[ref];
    if (value === undefined) throw new UnsafeImageError(`${where}: entity reference &${shown(ref)}; is not one of XML's predefined entities (OVF descriptors with entities are refused)`);
    return value;
  });
}

function localName(qname: string): string {
  const colon = qname.indexOf(':');
  return colon < 0 ? qname : qname.slice(colon + 1);
}

/** Parses the OVF text; `where` names it in messages. */
export function parseOvf(text: string, where: string): OvfDescriptor {
  if (/<!DOCTYPE/i.test(text) || /<!ENTITY/i.test(text)) {
    throw new UnsafeImageError(`${where}: the OVF descriptor has a DOCTYPE or ENTITY declaration; descriptors with a DTD are refused (no entity is expanded or fetched)`);
  }
  const files: OvfFile[] = [];
  const disks: OvfDisk[] = [];
  const stack: string[] = [];
  let elements = 0;
  let p = 0;
  let sawRoot = false;
  while (p < text.length) {
    const lt = text.indexOf('<', p);
    // Character data is not used, but its references are checked like attributes'.
    decodeEntities(text.slice(p, lt < 0 ? text.length : lt), where);
    if (lt < 0) break;
    if (text.startsWith('<!--', lt)) {
      const end = text.indexOf('-->', lt + 4);
      if (end < 0) throw new ImageCorruptError(`${where}: unterminated comment`);
      p = end + 3;
      continue;
    }
    if (text.startsWith('<![CDATA[', lt)) {
      const end = text.indexOf(']]>', lt + 9);
      if (end < 0) throw new ImageCorruptError(`${where}: unterminated CDATA section`);
      p = end + 3;
      continue;
    }
    if (text.startsWith('<?', lt)) {
      const end = text.indexOf('?>', lt + 2);
      if (end < 0) throw new ImageCorruptError(`${where}: unterminated processing instruction`);
      p = end + 2;
      continue;
    }
    if (text.startsWith('<!', lt)) throw new ImageCorruptError(`${where}: unexpected markup declaration at character ${lt}`);
    const gt = findTagEnd(text, lt + 1);
    if (gt < 0) throw new ImageCorruptError(`${where}: unterminated tag at character ${lt}`);
    const body = text.slice(lt + 1, gt);
    p = gt + 1;
    if (body.startsWith('/')) {
      const closing = body.slice(1).trim();
      const open = stack.pop();
      if (open !== closing) throw new ImageCorruptError(`${where}: </${shown(closing)}> closes <${shown(open ?? '(nothing)')}>`);
      continue;
    }
    const selfClosing = body.endsWith('/');
    const inner = selfClosing ? body.slice(0, -1) : body;
    const m = /^([A-Za-z_][\w.:-]*)/.exec(inner);
    if (!m) throw new ImageCorruptError(`${where}: malformed tag at character ${lt}`);
    const qname = m[1] as string;
    if (stack.length === 0) {
      if (sawRoot) throw new ImageCorruptError(`${where}: more than one root element`);
      sawRoot = true;
    }
    if (++elements > MAX_ELEMENTS) throw new ImageCorruptError(`${where}: more than ${MAX_ELEMENTS} elements`);
    const attrs = parseAttributes(inner.slice(qname.length), where);
    const name = localName(qname);
    const parent = stack.length > 0 ? localName(stack[stack.length - 1] as string) : undefined;
    if (name === 'File' && parent === 'References') files.push(fileOf(attrs, where));
    if (name === 'Disk' && parent === 'DiskSection') disks.push(diskOf(attrs, where));
    if (!selfClosing) {
      stack.push(qname);
      if (stack.length > MAX_DEPTH) throw new ImageCorruptError(`${where}: elements nested deeper than ${MAX_DEPTH}`);
    }
  }
  if (!sawRoot) throw new ImageCorruptError(`${where}: the OVF descriptor has no root element`);
  if (stack.length > 0) throw new ImageCorruptError(`${where}: <${shown(stack[stack.length - 1] as string)}> is never closed`);
  return { files, disks };
}

/** The `>` ending a tag, skipping quoted attribute values. */
function findTagEnd(text: string, from: number): number {
  let quote: string | undefined;
  for (let i = from; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = undefined;
    } else if (c === '"' || c === "'") quote = c;
    else if (c === '>') return i;
    else if (c === '<') return -1;
  }
  return -1;
}

function parseAttributes(text: string, where: string): Map<string, string> {
  const attrs = new Map<string, string>();
  const re = /\s*([A-Za-z_][\w.:-]*)\s*=\s*("([^"]*)"|'([^']*)')/y;
  let p = 0;
  for (;;) {
    re.lastIndex = p;
    const m = re.exec(text);
    if (!m) break;
    const key = localName(m[1] as string);
    const value = decodeEntities(m[3] ?? m[4] ?? '', where);
    // xmlns declarations and namespaced duplicates: the first one of a local name wins.
    if (!(m[1] as string).startsWith('xmlns') && !attrs.has(key)) attrs.set(key, value);
    p = re.lastIndex;
  }
  if (text.slice(p).trim() !== '') throw new ImageCorruptError(`${where}: malformed attributes "${shown(text.slice(p).trim())}"`);
  return attrs;
}

function optionalInt(attrs: Map<string, string>, key: string, where: string): number | undefined {
  const v = attrs.get(key);
  if (v === undefined) return undefined;
  if (!/^\s*[0-9]{1,16}\s*$/.test(v)) throw new ImageCorruptError(`${where}: ${key}="${shown(v)}" is not a number`);
  return Number(v);
}

function fileOf(attrs: Map<string, string>, where: string): OvfFile {
  const id = attrs.get('id');
  const href = attrs.get('href');
  if (id === undefined || href === undefined) throw new ImageCorruptError(`${where}: a References/File element without ovf:id or ovf:href`);
  const size = optionalInt(attrs, 'size', where);
  const chunkSize = optionalInt(attrs, 'chunkSize', where);
  const compression = attrs.get('compression');
  return { id, href, ...(size !== undefined ? { size } : {}), ...(chunkSize !== undefined ? { chunkSize } : {}), ...(compression !== undefined ? { compression } : {}) };
}

function diskOf(attrs: Map<string, string>, where: string): OvfDisk {
  const diskId = attrs.get('diskId');
  if (diskId === undefined) throw new ImageCorruptError(`${where}: a DiskSection/Disk element without ovf:diskId`);
  const out: OvfDisk = { diskId };
  for (const key of ['fileRef', 'capacity', 'capacityAllocationUnits', 'format'] as const) {
    const v = attrs.get(key);
    if (v !== undefined) out[key] = v;
  }
  return out;
}
