/**
 * qemu-img's text output, reproduced byte for byte (qemu 7.2): `info`'s human
 * report (block/qapi.c bdrv_image_info_dump), sizes as size_to_str prints them,
 * the snapshot table (bdrv_snapshot_dump), the "Format specific information"
 * block (dump_qobject), and JSON in the order qemu's QDict iterates its keys.
 */
import type { CheckReport, QemuSnapshotJson } from '../engine/types.js';
import type { QemuInfoJson } from '../engine/open.js';
import { printf2 } from './progress.js';

const SUFFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/**
 * C's `%0.3g` of num/den (den a power of two, so the quotient is an exact
 * binary fraction): three significant digits, ties to even as glibc rounds an
 * exact value, trailing zeros dropped.
 */
function g3(num: bigint, den: bigint): string {
  if (num === 0n) return '0';
  // Exponent X with 10^X <= num/den < 10^(X+1).
  const atLeast = (e: number): boolean => (e >= 0 ? num >= den * 10n ** BigInt(e) : num * 10n ** BigInt(-e) >= den);
  let x = 0;
  while (atLeast(x + 1)) x++;
  while (!atLeast(x)) x--;
  const round = (exp: number): bigint => {
    // digits = round(num/den * 10^(2-exp)) with ties to even.
    const shift = 2 - exp;
    const n = shift >= 0 ? num * 10n ** BigInt(shift) : num;
    const d = shift >= 0 ? den : den * 10n ** BigInt(-shift);
    const q = n / d;
    const r2 = (n % d) * 2n;
    return r2 > d || (r2 === d && q % 2n === 1n) ? q + 1n : q;
  };
  let digits = round(x);
  if (digits === 1000n) {
    x += 1;
    digits = 100n;
  }
  const text = digits.toString();
  if (x < -4 || x >= 3) {
    const mant = `${text[0]}.${text.slice(1)}`.replace(/\.?0+$/, '');
    return `${mant}e${x < 0 ? '-' : '+'}${String(Math.abs(x)).padStart(2, '0')}`;
  }
  const [int, frac] = x >= 0 ? [text.slice(0, x + 1), text.slice(x + 1)] : ['0', `${'0'.repeat(-x - 1)}${text}`];
  const kept = frac.replace(/0+$/, '');
  return kept ? `${int}.${kept}` : int;
}

/** qemu's size_to_str: `40 MiB`, `3.12 MiB`, `196 KiB`, `0 B`; the next unit from 1000 of one. */
export function humanSize(bytes: number): string {
  const val = BigInt(bytes);
  // frexp(val / (1000/1024)): i - 1 = floor(log2(val * 1.024)).
  let i = 0;
  if (bytes > 0) {
    const scaled = (bytes * 1024) / 1000;
    i = Math.floor(Math.log2(scaled)) + 1;
    // Guard log2's rounding at exact powers.
    if (2 ** (i - 1) > scaled) i--;
    else if (2 ** i <= scaled) i++;
  }
  const unit = Math.max(0, Math.min(SUFFIXES.length - 1, Math.floor((i - 1) / 10)));
  return `${g3(val, 1n << BigInt(unit * 10))} ${SUFFIXES[unit]}B`;
}

/** qemu's QDict hash (qobject/qdict.c tdb_hash), which decides the order its keys print in. */
function qdictBucket(key: string): number {
  const b = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) value = (value + (((b[i] as number) << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % 512;
}

/**
 * An object's keys in the order qemu prints them: by hash bucket, and within a
 * bucket the later inserted first (QLIST_INSERT_HEAD). Nested objects too.
 */
export function qemuOrder(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(qemuOrder);
  if (value === null || typeof value !== 'object') return value;
  const entries = Object.entries(value as Record<string, unknown>).map(([k, v], index) => ({ k, v, index, bucket: qdictBucket(k) }));
  entries.sort((a, b) => a.bucket - b.bucket || b.index - a.index);
  return Object.fromEntries(entries.map((e) => [e.k, qemuOrder(e.v)]));
}

/** A string as qemu's JSON writer quotes it: ASCII only, everything else as \\uXXXX. */
function quote(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i] as string;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c < 0x20 || c >= 0x7f) out += `\\u${c.toString(16).padStart(4, '0')}`;
    else out += ch;
  }
  return `${out}"`;
}

/**
 * qemu's pretty JSON (qobject/json-writer.c): JSON.stringify's layout with four
 * spaces, except that an empty list or object still breaks its line (`[` newline `]`).
 */
export function qemuJson(value: unknown, depth = 0): string {
  const pad = (d: number) => `\n${' '.repeat(4 * d)}`;
  if (Array.isArray(value)) return `[${value.map((v) => `${pad(depth + 1)}${qemuJson(v, depth + 1)}`).join(',')}${pad(depth)}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    return `{${entries.map(([k, v]) => `${pad(depth + 1)}${quote(k)}: ${qemuJson(v, depth + 1)}`).join(',')}${pad(depth)}}`;
  }
  if (typeof value === 'string') return quote(value);
  return JSON.stringify(value);
}

/** `qemu-img info --output=json`'s text, byte for byte: its key order and layout. */
export function formatJsonInfo(info: QemuInfoJson): string {
  return qemuJson(qemuOrder(info));
}

/** The members of qemu's ImageCheck (qapi/block-core.json) in their declared order: the order qemu inserts them. */
const IMAGE_CHECK_KEYS = [
  'image-end-offset',
  'corruptions',
  'leaks',
  'corruptions-fixed',
  'leaks-fixed',
  'total-clusters',
  'allocated-clusters',
  'fragmented-clusters',
  'compressed-clusters',
] as const;

/**
 * `qemu-img check --output=json`'s text, byte for byte: the ImageCheck object (an
 * optional member only when non-zero, as qemu-img's collect_image_check sets them)
 * in qemu's QDict order. Only qemu's keys: the findings go to stderr.
 */
export function formatJsonCheck(filename: string, format: string, report: CheckReport): string {
  const counts: Record<string, number | undefined> = { ...report.fields, corruptions: report.corruptions, leaks: report.leaks };
  const json: Record<string, unknown> = { filename, format, 'check-errors': report.checkErrors };
  for (const key of IMAGE_CHECK_KEYS) {
    const value = counts[key];
    if (value) json[key] = value;
  }
  return qemuJson(qemuOrder(json));
}

/** dump_qobject: dicts as `key: value` with dashes as spaces, lists as `[i]:`, four spaces per level. */
function dumpQobject(indent: number, value: unknown, lines: string[], prefix: string): void {
  const pad = ' '.repeat(indent * 4);
  const composite = (v: unknown) => v !== null && typeof v === 'object';
  const scalar = (v: unknown) => (typeof v === 'boolean' ? (v ? 'true' : 'false') : String(v));
  if (Array.isArray(value)) {
    value.forEach((v, i) => {
      if (composite(v)) {
        lines.push(`${prefix}${pad}[${i}]:`);
        dumpQobject(indent + 1, v, lines, '');
      } else lines.push(`${prefix}${pad}[${i}]: ${scalar(v)}`);
      prefix = '';
    });
    return;
  }
  if (composite(value)) {
    for (const [k, v] of Object.entries(qemuOrder(value) as Record<string, unknown>)) {
      const key = k.replace(/-/g, ' ');
      if (composite(v)) {
        lines.push(`${prefix}${pad}${key}:`);
        dumpQobject(indent + 1, v, lines, '');
      } else lines.push(`${prefix}${pad}${key}: ${scalar(v)}`);
      prefix = '';
    }
    return;
  }
  lines.push(`${prefix}${scalar(value)}`);
}

const two = (n: number) => String(n).padStart(2, '0');

/** bdrv_snapshot_dump's date: local time, `%Y-%m-%d %H:%M:%S`. */
function localDate(sec: number): string {
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

function vmClock(sec: number, nsec: number): string {
  const total = BigInt(sec) * 1_000_000_000n + BigInt(nsec);
  const secs = total / 1_000_000_000n;
  const ms = (total / 1_000_000n) % 1000n;
  return `${two(Number(secs / 3600n))}:${two(Number((secs / 60n) % 60n))}:${two(Number(secs % 60n))}.${String(ms).padStart(3, '0')}`;
}

/** `Snapshot list:` and its table, as qemu's dump_snapshots / bdrv_snapshot_dump print it (info and snapshot -l). */
export function snapshotTable(snapshots: readonly QemuSnapshotJson[]): string[] {
  const lines = ['Snapshot list:'];
  lines.push(`${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
  for (const s of snapshots) {
    const icount = s.icount === undefined ? '' : String(s.icount);
    lines.push(
      `${String(s.id).padEnd(9)} ${String(s.name).padEnd(16)} ${humanSize(Number(s['vm-state-size'])).padStart(8)}${localDate(Number(s['date-sec'])).padStart(20)}${vmClock(Number(s['vm-clock-sec']), Number(s['vm-clock-nsec'])).padStart(13)}${icount.padStart(11)}`,
    );
  }
  return lines;
}

/** `qemu-img info`'s human report, byte for byte. */
export function formatHumanInfo(info: QemuInfoJson): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${info['actual-size'] !== undefined ? humanSize(info['actual-size']) : 'unavailable'}`,
  ];
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  const backing = info['backing-filename'];
  if (backing !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${backing}${full === undefined ? ' (cannot determine actual path)' : full !== backing ? ` (actual path: ${full})` : ''}`);
    if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (info.snapshots?.length) lines.push(...snapshotTable(info.snapshots as QemuSnapshotJson[]));
  const fs = info['format-specific'];
  if (fs) {
    lines.push('Format specific information:');
    dumpQobject(1, fs.data, lines, '');
  }
  return lines.join('\n');
}

/**
 * qemu-img check's summary (dump_human_image_check), byte for byte; the
 * findings themselves go to stderr, as qemu's drivers print them there.
 */
export function formatHumanCheck(report: CheckReport): string {
  const lines: string[] = [];
  if (report.corruptions === 0 && report.leaks === 0 && report.checkErrors === 0) lines.push('No errors were found on the image.');
  else {
    if (report.corruptions) lines.push('', `${report.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    if (report.leaks) lines.push('', `${report.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
    if (report.checkErrors) lines.push('', `${report.checkErrors} internal errors have occurred during the check.`);
  }
  const f = report.fields;
  const total = f['total-clusters'] ?? 0;
  const allocated = f['allocated-clusters'] ?? 0;
  if (total !== 0 && allocated !== 0) {
    const pct = (x: number): string => printf2((x * 100) / allocated);
    lines.push(`${allocated}/${total} = ${printf2((allocated * 100) / total)}% allocated, ${pct(f['fragmented-clusters'] ?? 0)}% fragmented, ${pct(f['compressed-clusters'] ?? 0)}% compressed clusters`);
  }
  if (f['image-end-offset']) lines.push(`Image end offset: ${f['image-end-offset']}`);
  return lines.join('\n');
}
