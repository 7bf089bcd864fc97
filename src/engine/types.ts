import type { Limits } from './limits.js';
import type { RandomAccessSource } from './source.js';
import type { SectorCipher } from './crypto/sector-cipher.js';

export type { SectorCipher } from './crypto/sector-cipher.js';

export type FormatId = 'raw' | 'qcow2' | 'vmdk' | 'vdi' | 'vpc' | 'vhdx';
export const FORMAT_IDS: readonly FormatId[] = ['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx', 'raw'];

/** How a guest byte range is stored: produced by drivers from metadata alone, without reading data. */
export type MapEntry =
  | {
      kind: 'zero';
      offset: number;
      length: number;
      /**
       * Why it reads as zeros; the reader ignores it, `map` and `compare -s` show it
       * (src/cli/block-status.ts). `unallocated` (the default): nothing is stored
       * here, a backing file or parent would supply it; `zeroed`: the metadata marks
       * it zero (qcow2 zero flag, vmdk zeroed grain); `hole`: the file itself has a
       * hole here (raw, fixed VHD).
       */
      status?: ZeroStatus;
      /** Host bytes still allocated to it (a zeroed qcow2 cluster that kept its cluster), or where a hole lies in the file. */
      fileOffset?: number;
    }
  /**
   * `length` guest bytes stored at `fileOffset`: verbatim, or encrypted in whole
   * sectors when `cipher` is set (the reader reads whole sectors and decrypts).
   */
  | {
      kind: 'stored';
      offset: number;
      length: number;
      fileOffset: number;
      cipher?: SectorCipher;
      /**
       * Allocated when the image was made, not when written (a static VDI): the file
       * may have holes under it, which `map` shows as qemu does (data that reads as zeros).
       */
      preallocated?: boolean;
    }
  /**
   * A compressed cluster/grain: read `readLength` bytes at `fileOffset` (an upper
   * bound; reads are clamped at end of file), decode them with `codec` into
   * `decodedLength` bytes, and take `length` bytes starting at `decodedOffset`.
   */
  | {
      kind: 'compressed';
      offset: number;
      length: number;
      fileOffset: number;
      readLength: number;
      codec: Codec;
      decodedLength: number;
      decodedOffset: number;
    };

export type ZeroStatus = 'unallocated' | 'zeroed' | 'hole';

/**
 * deflate: raw deflate (qcow2 zlib type), output must fill decodedLength;
 * zstd: one or more zstd frames (qcow2 zstd type);
 * vmdk-grain: a 12-byte grain header (u64 lba, u32 size) then a zlib stream of `size` bytes;
 *   `decodedLength` is the grain size, an upper bound (a last grain may decode shorter; the reader
 *   checks the bytes it takes are there).
 */
export type Codec = 'deflate' | 'zstd' | 'vmdk-grain';

/** A guest range an overlay does not hold itself: its backing image's data shows through there. */
export type LayerEntry = MapEntry | { kind: 'backing'; offset: number; length: number };

/** What an archive (OVA, tar bundle) held and which of it the image is. */
export interface ArchiveInfo {
  kind: 'ova' | 'tar' | 'zip';
  /** The disks an OVF names, in its DiskSection order (1-based index). */
  disks?: Array<{ index: number; 'disk-id': string; file?: string; size?: number; capacity?: string; format?: string }>;
  /** Index of the disk converted (OVA). */
  disk?: number;
  /** Members the image is made of, top first (an overlay, then its backing files; a VMDK descriptor, then its extents). */
  members: string[];
  /** Whether an OVA manifest (.mf) was found and every digest in it checked. */
  manifest?: 'verified' | 'absent';
}

/** What converters and writers consume: guest-ordered, contiguous, covering [0, virtualSize). */
export type Extent =
  | {
      kind: 'data';
      offset: number;
      length: number;
      data: Uint8Array;
      /**
       * The bytes are already in the output (ReadOptions.directWrite: compressed
       * clusters written by the thread that decoded them); `data` is then empty.
       * Only a sink that asked for direct writes ever sees this.
       */
      written?: true;
    }
  | { kind: 'zero'; offset: number; length: number };

/** Snapshot as `qemu-img info --output=json` prints it. */
export interface QemuSnapshotJson {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** What a driver knows about its image; `info()` in index.ts turns it into qemu's JSON. */
export interface FormatInfo {
  clusterSize?: number;
  dirty: boolean;
  encrypted?: boolean;
  backingFilename?: string;
  /** The backing file's format as the image names it (qcow2's backing format extension). */
  backingFilenameFormat?: string;
  snapshots?: QemuSnapshotJson[];
  formatSpecific?: { type: string; data: Record<string, unknown> };
  /**
   * What a child names its parent by (not printed): a VHD footer's unique id, a
   * VHDX header's data write GUID, as lowercase hex; a VMDK's CID is in formatSpecific.
   */
  identity?: string;
  /** A VHDX's logical sector size (not printed): a differencing child must have its parent's. */
  logicalSectorSize?: number;
}

/**
 * How a differencing image (VHD type 4, VHDX with a parent, a VMDK child) names its
 * parent, for a bundle that resolves it among its own members only.
 */
export interface ParentLink {
  /**
   * Names to try, in order. `path`: a path relative to the child's folder, as qemu
   * resolves a backing name (absolute, URL or `..` refused); `locator`: a name from a
   * VHD/VHDX parent locator: a relative path is tried as a path inside the archive
   * (never with `..`), an absolute one only by its last component in the child's folder.
   */
  names: Array<{ name: string; how: 'path' | 'locator'; from: string }>;
  /** The parent's format when the child implies one (a VHD's parent is a VHD). */
  format?: FormatId;
  /** Why `parent` is not the image this child was made from, or undefined when it is. */
  mismatch(parent: DiskImage): string | undefined;
}

export interface CheckReport {
  /** Metadata inconsistencies (qemu's "corruptions"). */
  corruptions: number;
  /** Clusters allocated but referenced by nothing (qemu's "leaks"). */
  leaks: number;
  /** Errors that stopped the check itself. */
  checkErrors: number;
  /** One human line per finding. */
  messages: string[];
  /** Extra qemu-style fields, e.g. image-end-offset, total-clusters, allocated-clusters. */
  fields: Record<string, number>;
}

export interface DiskImage {
  readonly format: FormatId;
  readonly virtualSize: number;
  /**
   * Guest-ordered map, contiguous from 0 to virtualSize; built from metadata only.
   * Entries may be small (one cluster); the reader coalesces them.
   */
  map(signal?: AbortSignal): AsyncIterable<MapEntry>;
  info(): FormatInfo;
  /**
   * Throws the typed reason the guest data cannot be read (the image depends on a
   * backing file, opened with `metadataOnly`); absent or returning means readable.
   * map() and check() throw the same error, so nothing reads such an image by accident
   * (go-qcow2reader's Readable(): metadata stays inspectable where data is not).
   */
  readable?(): void;
  /**
   * Present on images opened with `backingSupplied`: the map in which ranges the
   * image does not hold are 'backing' entries (its backing file's data); the caller,
   * which found that file, fills them. map() still refuses such an image.
   */
  layerMap?(signal?: AbortSignal): AsyncIterable<LayerEntry>;
  /** Present on differencing images opened with `backingSupplied`: how they name their parent. */
  readonly parent?: ParentLink;
  /** Set on images read out of an archive: which members, which disk. */
  readonly archive?: ArchiveInfo;
  /**
   * Set when the map's file offsets point into another source than the one the
   * image was opened from: an archive with members staged or joined beside it
   * (src/engine/archive/joined-source.ts). Readers read data from it instead.
   */
  readonly readsFrom?: RandomAccessSource;
  /** Metadata consistency check; absent where the format has nothing to check beyond open(). */
  check?(signal?: AbortSignal): Promise<CheckReport>;
  close(): Promise<void>;
}

export interface SnapshotSelector {
  name?: string;
  id?: string;
}

export interface OpenOptions {
  limits: Limits;
  /** Present the state of an internal snapshot instead of the active image (qcow2). */
  snapshot?: SnapshotSelector;
  signal?: AbortSignal;
  /** Key for an encrypted image (qcow2 LUKS or legacy AES); never logged or stored. */
  passphrase?: Uint8Array;
  /**
   * Opened to show metadata only (`info`): an image whose data depends on another
   * file (a qcow2 backing file) opens, and refuses map()/check() through readable().
   * The named file is never opened either way.
   */
  metadataOnly?: boolean;
  /**
   * The caller resolves the backing file itself (a member of the same bundle,
   * src/engine/archive/): the image opens, names its backing file in info(), and
   * serves layerMap(); map() and check() still refuse, and nothing named is opened here.
   */
  backingSupplied?: boolean;
}

export interface FormatDriver {
  readonly id: FormatId;
  /** True when the first bytes carry this format's signature. Never throws. */
  probe(head: Uint8Array, size: number): boolean;
  /** Validates the header and opens the image; throws typed errors. Never opens another file. */
  open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage>;
}
