/** Opening a source image for a command: the file, the declared format, a snapshot, a passphrase. */
import { readFile } from 'node:fs/promises';
import { FileSource, InvalidArgumentError, openImage, parseFormat, type DiskImage, type FormatId, type SnapshotSelector } from '../engine/index.js';

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
  const passphrase = options.passphraseFile !== undefined ? await readPassphrase(options.passphraseFile) : undefined;
  const source = await FileSource.open(file);
  try {
    const image = await openImage(source, {
      ...(passphrase ? { passphrase } : {}),
      format: options.format,
      ...(options.snapshot ? { snapshot: options.snapshot } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.metadataOnly ? { metadataOnly: true } : {}),
    });
    try {
      return await fn(image, source);
    } finally {
      await image.close();
    }
  } finally {
    await source.close();
  }
}

/** The `--passphrase-file` of parsed arguments, as withImage options. */
export function passphraseFile(args: { get(key: string): string | undefined }): { passphraseFile?: string } {
  const file = args.get('passphrase-file');
  return file !== undefined ? { passphraseFile: file } : {};
}

/** Guest bytes the map says hold data: an upper bound of a sparse output's allocation. Metadata only. */
export async function dataBytesOf(image: DiskImage, signal?: AbortSignal): Promise<number> {
  let data = 0;
  for await (const entry of image.map(signal)) if (entry.kind !== 'zero') data += entry.length;
  return data;
}
