/**
 * Each format's probe: whether the first bytes carry its signature, from the
 * bytes alone (never throws). Kept apart from the drivers so that probing loads
 * none of them (probe.ts imports a driver when an image of its format is opened):
 * a qcow2 conversion never loads the vmdk, vhdx or vpc readers, part of the CLI's
 * start-up (bench/results/2026-12-02-session6-uncompressed.md).
 */
import { ascii } from '../bytes.js';

/** qcow2: "QFI\xfb". */
export function isQcow2(head: Uint8Array): boolean {
  return head.length >= 4 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb;
}

/** VMDK hosted sparse extent: "KDMV". */
export const VMDK_SPARSE_MAGIC = 0x4b444d56;
/** ESX 2.x vmfsSparse: "COWD". */
export const VMDK_VMFS_SPARSE_MAGIC = 0x434f5744;

/** VMDK: a sparse extent's magic (KDMV or COWD), or a text descriptor file. */
export function isVmdk(head: Uint8Array): boolean {
  if (head.length >= 4) {
    const magic = ((head[0] as number) * 2 ** 24 + ((head[1] as number) << 16) + ((head[2] as number) << 8) + (head[3] as number)) >>> 0;
    if (magic === VMDK_SPARSE_MAGIC || magic === VMDK_VMFS_SPARSE_MAGIC) return true;
  }
  return looksLikeDescriptorFile(head);
}

/**
 * qemu's vmdk_probe for text descriptors: comment lines and blank lines, then
 * `version=1|2|3`. A file starting with VMware's "# Disk DescriptorFile" banner
 * is a descriptor too.
 */
export function looksLikeDescriptorFile(head: Uint8Array): boolean {
  const banner = '# Disk DescriptorFile';
  if (head.length >= banner.length && ascii(head, 0, banner.length) === banner) return true;
  let p = 0;
  const end = head.length;
  while (p < end) {
    const c = head[p];
    if (c === 0x23 /* # */) {
      while (p < end && head[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (c === 0x20 /* space */) {
      while (p < end && head[p] === 0x20) p++;
      if (p < end && head[p] === 0x0d) p++;
      if (p === end || head[p] !== 0x0a) return false;
      p++;
      continue;
    }
    for (const version of ['1', '2', '3']) {
      for (const eol of ['\n', '\r\n']) {
        const line = `version=${version}${eol}`;
        if (end - p >= line.length && ascii(head, p, line.length) === line) return true;
      }
    }
    return false;
  }
  return false;
}

/** VDI: 0xbeda107f (little-endian) at 0x40. */
export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_SIGNATURE_OFFSET = 0x40;

export function isVdi(head: Uint8Array): boolean {
  if (head.length < VDI_SIGNATURE_OFFSET + 4) return false;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return view.getUint32(VDI_SIGNATURE_OFFSET, true) === VDI_SIGNATURE;
}

/** A VHD footer's cookie. */
export const VHD_COOKIE = 'conectix';

/** VHD (vpc): a footer copy at 0 (dynamic and differencing disks); qemu probes only there. */
export function isVpc(head: Uint8Array): boolean {
  return ascii(head, 0, 8) === VHD_COOKIE;
}

/** A VHD footer (the last 512 bytes of a fixed VHD). */
export function isVhdFooter(bytes: Uint8Array | undefined): boolean {
  return bytes !== undefined && ascii(bytes, 0, 8) === VHD_COOKIE;
}

/** VHDX: the file type identifier "vhdxfile" at 0. */
export const VHDX_FILE_SIGNATURE = 'vhdxfile';

export function isVhdx(head: Uint8Array): boolean {
  return ascii(head, 0, VHDX_FILE_SIGNATURE.length) === VHDX_FILE_SIGNATURE;
}
