/**
 * What the service asks of an image before converting it: its info, a safety
 * verdict, and how much space its raw output will take. Built on the engine's
 * public API only.
 */
import {
  ImageCorruptError,
  imageInfo,
  isDiskconvError,
  openImage,
  Pacer,
  throwIfAborted,
  type DiskImage,
  type FormatId,
  type QemuInfoJson,
  type RandomAccessSource,
} from '../engine/index.js';

export interface Allocation {
  /** Guest bytes the map says hold data (an upper bound of the output's allocated size). */
  dataBytes: number;
  /** Guest bytes that read as zeros without being stored. */
  zeroBytes: number;
}

/**
 * Walks the image's map (metadata only, no data read) to estimate the allocated
 * size of the raw output, and refuses references past the end of the file before
 * any output is written.
 */
export async function estimateAllocation(image: DiskImage, opened: RandomAccessSource, signal?: AbortSignal): Promise<Allocation> {
  const source = image.readsFrom ?? opened; // an archive with staged members maps into a source of its own
  let dataBytes = 0;
  let zeroBytes = 0;
  let entries = 0;
  const pacer = new Pacer(signal, undefined, 64);
  for await (const entry of image.map(signal)) {
    if ((++entries & 0xfff) === 0) throwIfAborted(signal);
    if (pacer.due()) await pacer.yield();
    if (entry.kind === 'zero') {
      zeroBytes += entry.length;
      continue;
    }
    dataBytes += entry.length;
    const end = entry.kind === 'stored' ? entry.fileOffset + entry.length : entry.fileOffset + 1;
    if (end > source.size) {
      throw new ImageCorruptError(
        `data for guest offset ${entry.offset} at file offset ${entry.fileOffset} lies beyond the end of the file (${source.size} bytes); the image is truncated or corrupt`,
      );
    }
  }
  return { dataBytes, zeroBytes };
}

export interface Inspection {
  safe: boolean;
  format?: FormatId;
  virtual_size?: number;
  /** qemu-img info JSON. */
  info?: QemuInfoJson;
  allocation?: { data_bytes: number; zero_bytes: number };
  /** Why the engine refuses the image (safe = false). */
  error?: { code: string; message: string };
}

/**
 * Opens, describes and maps an image. Deterministic engine refusals become a
 * verdict; anything else (I/O, abort) is thrown.
 */
export async function inspectSource(
  source: RandomAccessSource,
  options: { format?: FormatId | 'auto'; maxVirtualSize: number; signal?: AbortSignal; displayName: string; passphrase?: Uint8Array; scratchDir?: string; scratchOwner?: string },
): Promise<Inspection> {
  let image: DiskImage | undefined;
  try {
    image = await openImage(source, {
      format: options.format ?? 'auto',
      limits: { maxVirtualSize: options.maxVirtualSize },
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.passphrase ? { passphrase: options.passphrase } : {}),
      ...(options.scratchDir !== undefined ? { scratchDir: options.scratchDir } : {}),
      ...(options.scratchOwner !== undefined ? { scratchOwner: options.scratchOwner } : {}),
    });
    const info = { ...(await imageInfo(image, source)), filename: options.displayName };
    const allocation = await estimateAllocation(image, source, options.signal);
    return {
      safe: true,
      format: image.format,
      virtual_size: image.virtualSize,
      info,
      allocation: { data_bytes: allocation.dataBytes, zero_bytes: allocation.zeroBytes },
    };
  } catch (err) {
    if (isDiskconvError(err) && err.deterministic && err.code !== 'ABORTED') {
      return { safe: false, error: { code: err.code, message: scrubMessage(err.message, source.name, options.displayName) } };
    }
    throw err;
  } finally {
    await image?.close().catch(() => {});
  }
}

/** Engine messages name the source; make sure that is the client's name, never a server path. */
export function scrubMessage(message: string, internalName: string, displayName: string): string {
  return internalName && internalName !== displayName ? message.split(internalName).join(displayName) : message;
}
