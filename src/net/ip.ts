/**
 * IP address and CIDR parsing to bytes, strict: IPv4 only in canonical dotted
 * decimal (no octal, hex, short or decimal forms), IPv6 per RFC 4291 text form
 * with an optional embedded dotted IPv4 and an optional zone (ignored).
 */

export type IpBytes = { family: 4; bytes: Uint8Array } | { family: 6; bytes: Uint8Array };

export interface Cidr {
  family: 4 | 6;
  /** Network address with host bits cleared. */
  bytes: Uint8Array;
  prefix: number;
}

const DEC_OCTET = /^(0|[1-9][0-9]{0,2})$/;
const HEX_GROUP = /^[0-9a-fA-F]{1,4}$/;

/** Canonical dotted-decimal IPv4 only: four parts, 0-255, no leading zeros. */
export function parseIPv4(text: string): Uint8Array | undefined {
  const parts = text.split('.');
  if (parts.length !== 4) return undefined;
  const out = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    const part = parts[i] as string;
    if (!DEC_OCTET.test(part)) return undefined;
    const value = Number(part);
    if (value > 255) return undefined;
    out[i] = value;
  }
  return out;
}

export function parseIPv6(input: string): Uint8Array | undefined {
  let text = input;
  const zone = text.indexOf('%');
  if (zone >= 0) {
    if (zone === text.length - 1) return undefined;
    text = text.slice(0, zone);
  }
  if (text.length < 2 || text.length > 45) return undefined;
  const out = new Uint8Array(16);
  // An embedded dotted IPv4 takes the last two groups.
  const lastColon = text.lastIndexOf(':');
  if (lastColon < 0) return undefined;
  let embedded: Uint8Array | undefined;
  if (text.includes('.', lastColon)) {
    embedded = parseIPv4(text.slice(lastColon + 1));
    if (!embedded) return undefined;
    text = `${text.slice(0, lastColon + 1)}0:0`;
  }
  const compress = text.indexOf('::');
  if (compress !== text.lastIndexOf('::')) return undefined;
  const groupsOf = (s: string): number[] | undefined => {
    if (s === '') return [];
    const groups: number[] = [];
    for (const g of s.split(':')) {
      if (!HEX_GROUP.test(g)) return undefined;
      groups.push(parseInt(g, 16));
    }
    return groups;
  };
  let groups: number[];
  if (compress >= 0) {
    const head = groupsOf(text.slice(0, compress));
    const tail = groupsOf(text.slice(compress + 2));
    if (!head || !tail || head.length + tail.length > 7) return undefined;
    groups = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  } else {
    const all = groupsOf(text);
    if (!all || all.length !== 8) return undefined;
    groups = all;
  }
  groups.forEach((g, i) => {
    out[2 * i] = g >> 8;
    out[2 * i + 1] = g & 0xff;
  });
  if (embedded) out.set(embedded, 12);
  return out;
}

/** Parses an IPv4 (canonical dotted decimal) or IPv6 address; brackets around IPv6 are accepted. */
export function parseIp(text: string): IpBytes | undefined {
  const v4 = parseIPv4(text);
  if (v4) return { family: 4, bytes: v4 };
  const bare = text.startsWith('[') && text.endsWith(']') ? text.slice(1, -1) : text;
  const v6 = parseIPv6(bare);
  if (v6) return { family: 6, bytes: v6 };
  return undefined;
}

/** `a.b.c.d/n`, `v6/n`, or a bare address (a /32 or /128). */
export function parseCidr(text: string): Cidr | undefined {
  const slash = text.indexOf('/');
  const addressText = slash >= 0 ? text.slice(0, slash) : text;
  const ip = parseIp(addressText);
  if (!ip) return undefined;
  const bits = ip.family === 4 ? 32 : 128;
  let prefix = bits;
  if (slash >= 0) {
    const prefixText = text.slice(slash + 1);
    if (!/^(0|[1-9][0-9]{0,2})$/.test(prefixText)) return undefined;
    prefix = Number(prefixText);
    if (prefix > bits) return undefined;
  }
  return { family: ip.family, bytes: maskBytes(ip.bytes, prefix), prefix };
}

function maskBytes(bytes: Uint8Array, prefix: number): Uint8Array {
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) {
    const keep = Math.max(0, Math.min(8, prefix - 8 * i));
    out[i] = (bytes[i] as number) & ((0xff << (8 - keep)) & 0xff);
  }
  return out;
}

/** True when the address lies in the network (same family only). */
export function cidrContains(cidr: Cidr, ip: IpBytes): boolean {
  if (cidr.family !== ip.family) return false;
  const masked = maskBytes(ip.bytes, cidr.prefix);
  return masked.every((b, i) => b === cidr.bytes[i]);
}

/** Prefix match on raw bytes: `bytes` starts with the first `prefix` bits of `network`. */
export function inPrefix(bytes: Uint8Array, network: readonly number[], prefix: number): boolean {
  for (let bit = 0; bit < prefix; bit += 8) {
    const keep = Math.min(8, prefix - bit);
    const mask = (0xff << (8 - keep)) & 0xff;
    const i = bit / 8;
    if (((bytes[i] as number) & mask) !== ((network[i] ?? 0) & mask)) return false;
  }
  return true;
}

export function formatIPv4(bytes: Uint8Array): string {
  return Array.from(bytes.subarray(0, 4)).join('.');
}
