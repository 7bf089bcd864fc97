/** Opening a source image for a command: the file, the declared format, a snapshot, a passphrase. */
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, open, readFile, rm, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEFAULT_LIMITS } from '../engine/limits.js';
import { detectWrapper, WRAPPER_PROBE_BYTES } from '../engine/wrappers/detect.js';
import { parseImageOpts, parseObjects, type Secrets } from './image-opts.js';
import { FileSource } from '../engine/source.js';
import { InvalidArgumentError } from '../engine/errors.js';
import { openImage, parseFormat } from '../engine/open.js';
import type { DiskImage, FormatId, SnapshotSelector } from '../engine/types.js';

export function declaredFormat(value: string | undefined): FormatId | 'auto' {
  return value === undefined ? 'auto' : parseFormat(value);
}

/** `-l snapshot.name=NAME`, `-l snapshot.id=ID`, or qemu's bare `-l NAME_OR_ID`. */
export function parseSnapshot(value: string): SnapshotSelector {
  const parts = Object.fromEntries(
    value.split(',').map((kv) => {
      const eq = kv.indexOf('=');
      return eq < 0 ? ['', kv] : [kv.slice(0, eq), kv.slice(eq + 1)];
    }),
  ) as Record<string, string>;
  const name = parts['snapshot.name'];
  const id = parts['snapshot.id'];
  if (name !== undefined || id !== undefined) return { ...(name !== undefined ? { name } : {}), ...(id !== undefined ? { id } : {}) };
  if (parts[''] !== undefined) return { name: parts[''], id: parts[''] };
  throw new InvalidArgumentError(`-l expects snapshot.name=NAME or snapshot.id=ID, not '${value}'`);
}

export interface ImageOpenOptions {
  format: FormatId | 'auto';
  snapshot?: SnapshotSelector;
  signal?: AbortSignal;
  /** `--passphrase-file`: read when the image is opened, held in memory only. */
  passphraseFile?: string;
  /** info: open images whose data is refused (backing files) to show their metadata. */
  metadataOnly?: boolean;
  /** `--disk`: an OVA's disk or a tar bundle's top member. */
  disk?: string;
  /** The key itself (an `--object secret` named by `--image-opts`). */
  passphrase?: Uint8Array;
  /** The name info shows for the image (default: the path). */
  displayName?: string;
}

/** The passphrase file's bytes, exactly (never echoed, never copied anywhere). */
async function readPassphrase(file: string): Promise<Uint8Array> {
  const bytes = await readFile(file).catch((err: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`cannot read the passphrase file ${file}: ${err.code ?? err.message}`);
  });
  if (bytes.length === 0) throw new InvalidArgumentError(`the passphrase file ${file} is empty`);
  return bytes;
}

/** Opens FILE, runs fn, closes image and file whatever happens. */
export async function withImage<T>(file: string, options: ImageOpenOptions, fn: (image: DiskImage, source: FileSource) => Promise<T>): Promise<T> {
  const passphrase = options.passphrase ?? (options.passphraseFile !== undefined ? await readPassphrase(options.passphraseFile) : undefined);
  const unwrapped = await unwrap(file, options.signal);
  const source = await FileSource.open(unwrapped.path, options.displayName ?? file).catch(async (err: unknown) => {
    await unwrapped.cleanup();
    throw err;
  });
  try {
    const image = await openImage(source, {
      ...(passphrase ? { passphrase } : {}),
      format: options.format,
      ...(options.snapshot ? { snapshot: options.snapshot } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.metadataOnly ? { metadataOnly: true } : {}),
      ...(options.disk !== undefined ? { disk: options.disk } : {}),
    });
    try {
      return await fn(image, source);
    } finally {
      await image.close();
    }
  } finally {
    await source.close();
    await unwrapped.cleanup();
  }
}

/** Space left free on TMPDIR's filesystem while a wrapper decompresses into it. */
const SCRATCH_RESERVE = 64 * 2 ** 20;

/**
 * A gzip/xz/bzip2/zstd wrapper (by its magic, never its name) is decompressed
 * into a scratch file in TMPDIR (mode 0600, removed afterwards), bounded by the
 * virtual size limit and the free space there: the formats are random access,
 * so the inner image is read from that file. Anything else is read in place.
 */
async function unwrap(file: string, signal?: AbortSignal): Promise<{ path: string; cleanup: () => Promise<void> }> {
  const head = Buffer.alloc(WRAPPER_PROBE_BYTES);
  const fh = await open(file, 'r').catch(() => undefined);
  if (!fh) return { path: file, cleanup: async () => {} }; // FileSource.open reports it
  const { bytesRead } = await fh.read(head, 0, head.length, 0).finally(() => fh.close());
  const format = detectWrapper(head.subarray(0, bytesRead));
  if (!format) return { path: file, cleanup: async () => {} };
  const dir = await mkdtemp(join(tmpdir(), 'diskconv-unwrap-'));
  const cleanup = (): Promise<void> => rm(dir, { recursive: true, force: true });
  try {
    const path = join(dir, 'inner');
    const fs = await statfs(dir);
    const free = Math.max(0, fs.bavail * fs.bsize - SCRATCH_RESERVE);
    const byFree = free < DEFAULT_LIMITS.maxVirtualSize;
    // Imported here: the decompressors (zlib, streams, child processes) are needed only for a wrapped input.
    const { decompressTo } = await import('../engine/wrappers/index.js');
    await decompressTo(format, createReadStream(file), createWriteStream(path, { mode: 0o600 }), {
      maxBytes: byFree ? free : DEFAULT_LIMITS.maxVirtualSize,
      limitName: byFree ? 'free space in TMPDIR' : 'maxVirtualSize',
      ...(signal ? { signal } : {}),
    });
    return { path, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/**
 * An image operand with the options that say how to open it: `-f` (or the
 * format option named `formatKey`), `--passphrase-file`, `--disk`, and
 * `--object`/`--image-opts` (then the operand is qemu's option string).
 */
export async function sourceOf(
  args: { get(key: string): string | undefined; all(key: string): string[]; has(key: string): boolean },
  operand: string,
  formatKey = 'format',
  secrets?: Secrets,
): Promise<{ path: string; options: ImageOpenOptions }> {
  const known = secrets ?? (await parseObjects(args.all('object')));
  const extra = passphraseFile(args);
  if (!args.has('image-opts')) return { path: operand, options: { format: declaredFormat(args.get(formatKey)), ...extra } };
  if (args.get(formatKey) !== undefined) throw new InvalidArgumentError('--image-opts and --format are mutually exclusive');
  const spec = parseImageOpts(operand, known);
  if (spec.passphrase && extra.passphraseFile !== undefined) throw new InvalidArgumentError('--passphrase-file and encrypt.key-secret both give a key; give one');
  return {
    path: spec.path,
    options: { format: spec.format, ...extra, ...(spec.passphrase ? { passphrase: spec.passphrase } : {}), displayName: spec.displayName },
  };
}

/** The `--passphrase-file` (and `--disk`) of parsed arguments, as withImage options. */
export function passphraseFile(args: { get(key: string): string | undefined }): { passphraseFile?: string; disk?: string } {
  const file = args.get('passphrase-file');
  const disk = args.get('disk');
  return { ...(file !== undefined ? { passphraseFile: file } : {}), ...(disk !== undefined ? { disk } : {}) };
}

/** Guest bytes the map says hold data: an upper bound of a sparse output's allocation. Metadata only. */
export async function dataBytesOf(image: DiskImage, signal?: AbortSignal): Promise<number> {
  let data = 0;
  for await (const entry of image.map(signal)) if (entry.kind !== 'zero') data += entry.length;
  return data;
}
