import { ImageCorruptError, LimitExceededError } from './errors.js';

/**
 * Budgets for everything an image can make us allocate or loop over. Every size,
 * count or offset read from a file is checked against one of these before use.
 */
export interface Limits {
  /** Largest virtual disk we accept (bytes). */
  maxVirtualSize: number;
  /** Largest qcow2 L1 table / vmdk grain directory / vdi block map / VHD and VHDX BAT (bytes); QEMU uses 32 MiB for L1. */
  maxTopTableBytes: number;
  /** Largest qcow2 snapshot table (bytes) and snapshot count. */
  maxSnapshotTableBytes: number;
  maxSnapshots: number;
  /** Largest embedded vmdk descriptor (bytes). */
  maxDescriptorBytes: number;
  /** Largest qcow2 header (header_length plus extensions, bytes). */
  maxHeaderBytes: number;
  /** Largest VHDX log read to decide whether it needs replay (bytes); read only when the log is active. */
  maxLogBytes: number;
  /** PBKDF2 iterations one unlock of an encrypted image may spend, over all key slots (a hostile header cannot make us spin). */
  maxPbkdf2Iterations: number;
  /** Bytes of second-level tables (L2 / grain tables) kept in cache. */
  tableCacheBytes: number;
  /** Members an archive (OVA, tar bundle) may hold; each costs a header read. */
  maxArchiveMembers: number;
  /** Largest OVF descriptor, manifest, pax or GNU long-name record read from an archive (bytes). */
  maxArchiveTextBytes: number;
  /** Images in one chain (an overlay, its backing file, that one's...) or extents of one split VMDK. */
  maxChainDepth: number;
}

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxVirtualSize: 64 * 2 ** 40, // 64 TiB
  maxTopTableBytes: 32 * 2 ** 20,
  maxSnapshotTableBytes: 64 * 2 ** 20,
  maxSnapshots: 65536,
  maxDescriptorBytes: 2 ** 20,
  maxHeaderBytes: 2 ** 20,
  tableCacheBytes: 32 * 2 ** 20,
  maxLogBytes: 64 * 2 ** 20,
  // qemu's default iter-time of 2 s gives a few million on fast machines; 8 slots of that stay inside.
  maxPbkdf2Iterations: 2 ** 25,
  maxArchiveMembers: 4096,
  maxArchiveTextBytes: 4 * 2 ** 20,
  maxChainDepth: 16,
});

export function withLimits(overrides?: Partial<Limits>): Limits {
  return { ...DEFAULT_LIMITS, ...overrides };
}

/** Throws LIMIT_EXCEEDED when value > maximum. */
export function enforceLimit(limit: keyof Limits, value: number | bigint, limits: Limits, what: string): void {
  const maximum = limits[limit];
  if (value > maximum) throw new LimitExceededError(limit, value, maximum, what);
}

/**
 * Converts a 64-bit on-disk value to a JS number, refusing anything past 2^53
 * (no real disk is that large; a bigger value is a corrupt or hostile field).
 */
export function toSafeNumber(value: bigint, what: string): number {
  if (value < 0n || value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ImageCorruptError(`${what} is out of range: ${value}`);
  }
  return Number(value);
}
