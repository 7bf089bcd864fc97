/**
 * Opening an image (probe, archive or driver) and what `info`/`check` print: the
 * part of the engine every command needs. Kept apart from index.ts, which also
 * re-exports the service's pieces (wrappers, ranged sources, stream markers), so a
 * CLI command loads only this and the modules it uses; archives (OVA, tar, zip)
 * are imported when an input is one.
 */
import { InvalidArgumentError, UnsafeImageError } from './errors.js';
import { withLimits, type Limits } from './limits.js';
import { DRIVERS, detectFormat } from './probe.js';
import { isTar } from './archive/tar.js';
import { isZip } from './archive/zip.js';
import type { RandomAccessSource } from './source.js';
import type { ArchiveInfo, CheckReport, DiskImage, FormatId, SnapshotSelector } from './types.js';
import { FORMAT_IDS } from './types.js';

export interface OpenImageOptions {
  /** Declared format; 'auto' or undefined probes. A declared format that disagrees with the bytes is refused. */
  format?: FormatId | 'auto';
  limits?: Partial<Limits>;
  snapshot?: SnapshotSelector;
  signal?: AbortSignal;
  /** Key for an encrypted image; never logged or stored. */
  passphrase?: Uint8Array;
  /** For info: open images whose data cannot be read (backing files); see DiskImage.readable(). */
  metadataOnly?: boolean;
  /** An OVA's disk (1-based index, diskId or file name) or a bundle's top member; see src/engine/archive/. */
  disk?: string;
  /** Where an archive's compressed members are staged (default TMPDIR); see src/engine/archive/stage.ts. */
  scratchDir?: string;
  /**
   * Who the scratch folder belongs to (a job id, an inspection key): its name starts with
   * `OWNER.archive-`, so the service's sweep of DATA_DIR/work leaves it alone while that owner runs.
   */
  scratchOwner?: string;
}

export function parseFormat(value: string): FormatId | 'auto' {
  if (value === 'auto' || (FORMAT_IDS as readonly string[]).includes(value)) return value as FormatId | 'auto';
  throw new InvalidArgumentError(`unknown format '${value}' (expected one of auto, ${FORMAT_IDS.join(', ')})`);
}

/** Probes and opens an image through its driver. The caller closes the image, then the source. */
export async function openImage(source: RandomAccessSource, options: OpenImageOptions = {}): Promise<DiskImage> {
  const declared = options.format === 'auto' ? undefined : options.format;
  const common = {
    limits: withLimits(options.limits),
    ...(options.snapshot ? { snapshot: options.snapshot } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
    ...(options.passphrase ? { passphrase: options.passphrase } : {}),
    ...(options.metadataOnly ? { metadataOnly: true } : {}),
  };
  // An OVA or a tar/zip bundle (by its magic, never its name); `-f raw` reads the archive as bytes.
  if (declared !== 'raw') {
    const head = await source.read(0, Math.min(512, source.size), options.signal);
    if (isTar(head) || isZip(head)) {
      const other = DRIVERS.find((d) => d.id !== 'raw' && d.probe(head, source.size));
      if (other) throw new UnsafeImageError(`${source.name}: ambiguous image: an archive header that also carries a ${other.id} signature`);
      const { openArchive } = await import('./archive/index.js');
      return openArchive(source, { ...common, ...(declared ? { format: declared } : {}), ...(options.disk !== undefined ? { disk: options.disk } : {}), ...(options.scratchDir !== undefined ? { scratchDir: options.scratchDir } : {}), ...(options.scratchOwner !== undefined ? { scratchOwner: options.scratchOwner } : {}) });
    }
  }
  if (options.disk !== undefined) throw new InvalidArgumentError(`${source.name}: a disk was chosen (${options.disk}), but the input is not an OVA or a tar bundle`);
  const { driver } = await detectFormat(source, declared, options.signal);
  return driver.open(source, common);
}

/** The fields `qemu-img info --output=json` prints, with qemu's keys. */
export interface QemuInfoJson {
  'virtual-size': number;
  filename: string;
  format: FormatId;
  'actual-size'?: number;
  'dirty-flag': boolean;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: unknown[];
  'format-specific'?: { type: string; data: Record<string, unknown> };
  /** Only for an image read from an OVA or a tar bundle (qemu-img has no such input). */
  archive?: ArchiveInfo;
}

/** qemu's path_combine: a relative backing name is relative to the image's directory. Only a string; nothing is opened. */
export function fullBackingFilename(imageName: string, backing: string): string {
  if (backing.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(backing)) return backing;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? backing : imageName.slice(0, slash + 1) + backing;
}

export async function imageInfo(image: DiskImage, source: RandomAccessSource): Promise<QemuInfoJson> {
  const info = image.info();
  const actual = await source.allocatedSize?.();
  const json: QemuInfoJson = {
    'virtual-size': image.virtualSize,
    filename: source.name,
    format: image.format,
    ...(actual !== undefined ? { 'actual-size': actual } : {}),
    'dirty-flag': info.dirty,
  };
  if (info.clusterSize !== undefined) json['cluster-size'] = info.clusterSize;
  if (info.encrypted) json.encrypted = true;
  if (info.backingFilename !== undefined) {
    json['backing-filename'] = info.backingFilename;
    json['full-backing-filename'] = fullBackingFilename(source.name, info.backingFilename);
    if (info.backingFilenameFormat !== undefined) json['backing-filename-format'] = info.backingFilenameFormat;
  }
  if (info.snapshots && info.snapshots.length > 0) json.snapshots = info.snapshots;
  if (info.formatSpecific) json['format-specific'] = info.formatSpecific;
  if (image.archive) json.archive = image.archive;
  return json;
}

export async function checkImage(image: DiskImage, signal?: AbortSignal): Promise<CheckReport> {
  if (image.check) return image.check(signal);
  return { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
}
