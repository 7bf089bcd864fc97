/**
 * Compressed wrappers around a whole image (`disk.qcow2.xz`, `disk.raw.gz`):
 * recognised by their magic bytes, never by a file name, and decompressed as a
 * stream with a bound on the bytes they may produce.
 *
 *   gzip   node:zlib (every member of a multi-member file)
 *   zstd   node:zlib where Node has it (>= 22.15), else Debian's `zstd -dc`
 *   xz     Debian's `xz -dc`
 *   bzip2  Debian's `bzip2 -dc`
 *
 * xz and bzip2 run as child processes: the npm libraries for them either load the
 * whole input into memory (no streaming API) or are unmaintained pure-JS ports,
 * while xz-utils and bzip2 are the reference implementations, stream, check their
 * own integrity (CRC), and are installed by .ci/run. They read stdin and write
 * stdout: no path is ever handed to them.
 *
 * A truncated or corrupt stream is IMAGE_CORRUPT (never a short image); output
 * beyond the bound is LIMIT_EXCEEDED (a decompression bomb).
 */
import { spawn } from 'node:child_process';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import * as zlib from 'node:zlib';
import { ImageCorruptError, LimitExceededError } from '../errors.js';

export { detectWrapper, WRAPPER_FORMATS, WRAPPER_PROBE_BYTES, type WrapperFormat } from './detect.js';
import type { WrapperFormat } from './detect.js';

export interface DecompressOptions {
  /** Most bytes the stream may produce (MAX_VIRTUAL_SIZE, free space). */
  maxBytes: number;
  /** Name of the limit for LIMIT_EXCEEDED. */
  limitName?: string;
  signal?: AbortSignal;
}

/** Counts output and fails past the bound: a bomb stops as soon as it crosses it. */
class Bound extends Transform {
  bytes = 0;
  constructor(
    private readonly max: number,
    private readonly limitName: string,
    private readonly format: WrapperFormat,
  ) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.max) {
      done(new LimitExceededError(this.limitName, this.bytes, this.max, `${this.format} wrapper decompresses to more bytes than allowed`));
      return;
    }
    done(null, chunk);
  }
}

/** Command lines of the tools that decompress as child processes. */
const TOOLS: Record<WrapperFormat, [string, string[]] | undefined> = {
  gzip: undefined,
  zstd: ['zstd', ['-dc', '-q']],
  xz: ['xz', ['-dc', '-q']],
  bzip2: ['bzip2', ['-dc', '-q']],
};

/** Runs a decompressor as a child: stdin from `input`, stdout through `bound` into `output`; a failing exit is IMAGE_CORRUPT. */
async function throughChild(format: WrapperFormat, command: string, args: string[], input: Readable, bound: Transform, output: NodeJS.WritableStream, signal?: AbortSignal): Promise<void> {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => {
    if (stderr.length < 4096) stderr += c.toString();
  });
  const exited = new Promise<void>((resolve, reject) => {
    child.once('error', (err) => reject(new ImageCorruptError(`${format} wrapper: cannot run ${command}: ${err.message}`)));
    child.once('close', (code, sig) => {
      if (code === 0) resolve();
      else {
        const why = (stderr.trim().split('\n').pop() ?? '').replace(/^.*\(stdin\): /, '') || `exit ${code ?? sig}`;
        reject(new ImageCorruptError(`${format} wrapper is truncated or corrupt (${command}: ${why})`));
      }
    });
  });
  const kill = (): void => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  signal?.addEventListener('abort', kill, { once: true });
  // The tool may stop reading early (corrupt input, or killed): its exit status says why, not the EPIPE.
  const feed = pipeline(input, child.stdin).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE' || err.code === 'ERR_STREAM_DESTROYED' || err.code === 'ERR_STREAM_PREMATURE_CLOSE') return;
    kill();
    throw err;
  });
  const drain = pipeline(child.stdout, bound, output).catch((err: unknown) => {
    kill();
    throw err;
  });
  try {
    // A bomb fails drain first; a corrupt stream fails the exit first; either way the child is gone.
    await Promise.all([drain, exited, feed]);
  } finally {
    kill();
    signal?.removeEventListener('abort', kill);
  }
}

function hasZlibZstd(): boolean {
  return typeof (zlib as unknown as { createZstdDecompress?: unknown }).createZstdDecompress === 'function';
}

function asCorrupt(err: unknown, format: WrapperFormat): unknown {
  if (err instanceof ImageCorruptError || err instanceof LimitExceededError) return err;
  const e = err as { code?: unknown; message?: unknown; name?: unknown };
  if (typeof e.code === 'string' && (e.code.startsWith('Z_') || e.code.startsWith('ERR_ZSTD') || e.code === 'ERR_ZLIB_INITIALIZATION_FAILED')) {
    return new ImageCorruptError(`${format} wrapper is truncated or corrupt (${String(e.message)})`);
  }
  return err;
}

/**
 * Decompresses `input` (whose first bytes are a `format` wrapper) into `output`,
 * at most `maxBytes`; returns the bytes produced. A stream that ends early is IMAGE_CORRUPT.
 */
export async function decompressTo(format: WrapperFormat, input: Readable, output: NodeJS.WritableStream, options: DecompressOptions): Promise<number> {
  const bound = new Bound(options.maxBytes, options.limitName ?? 'maxVirtualSize', format);
  const extra = options.signal ? [{ signal: options.signal }] : [];
  try {
    if (format === 'gzip') await pipeline(input, zlib.createGunzip(), bound, output, ...(extra as []));
    else if (format === 'zstd' && hasZlibZstd()) {
      const zstd = (zlib as unknown as { createZstdDecompress(): Transform }).createZstdDecompress();
      await pipeline(input, zstd, bound, output, ...(extra as []));
    } else {
      const [command, args] = TOOLS[format] as [string, string[]];
      await throughChild(format, command, args, input, bound, output, options.signal);
    }
  } catch (err) {
    throw asCorrupt(err, format);
  }
  if (bound.bytes === 0) throw new ImageCorruptError(`${format} wrapper holds no data`);
  return bound.bytes;
}
