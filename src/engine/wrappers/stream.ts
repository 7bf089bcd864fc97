/**
 * Unwrapping a stream as it arrives (an upload, a download): the first bytes
 * say whether a gzip/xz/bzip2/zstd wrapper is there (by magic, never by name);
 * wrapped bytes go through the bounded decompressor into `output`, anything
 * else is copied as it is. Nothing is buffered beyond the few sniffed bytes.
 */
import { Readable, Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { decompressTo, detectWrapper, WRAPPER_PROBE_BYTES, type DecompressOptions, type WrapperFormat } from './index.js';

export interface SniffedStream {
  /** The wrapper the first bytes announce, if any. */
  format: WrapperFormat | undefined;
  /** Every byte of the input, the sniffed ones included. */
  stream: Readable;
}

/**
 * Reads the first WRAPPER_PROBE_BYTES bytes of `chunks` (fewer when it ends
 * first) and returns a stream that yields all of them again. An error of the
 * input is thrown by the returned stream, exactly as the input threw it.
 */
export async function sniffWrapper(chunks: AsyncIterable<Uint8Array>): Promise<SniffedStream> {
  const it = chunks[Symbol.asyncIterator]();
  const head: Uint8Array[] = [];
  let headBytes = 0;
  let ended = false;
  try {
    while (headBytes < WRAPPER_PROBE_BYTES) {
      const next = await it.next();
      if (next.done) {
        ended = true;
        break;
      }
      head.push(next.value);
      headBytes += next.value.length;
    }
  } catch (err) {
    await it.return?.().catch(() => {});
    throw err;
  }
  const first = Buffer.concat(head);
  async function* all(): AsyncGenerator<Uint8Array> {
    let finished = ended;
    try {
      if (first.length > 0) yield first;
      while (!finished) {
        const next = await it.next();
        if (next.done) finished = true;
        else yield next.value;
      }
    } finally {
      // Stopped early (the consumer failed): let the input go too.
      if (!finished) await it.return?.().catch(() => {});
    }
  }
  return { format: detectWrapper(first), stream: Readable.from(all(), { objectMode: false }) };
}

export interface UnwrapResult {
  /** The wrapper found (and removed), if any. */
  wrapper: WrapperFormat | undefined;
  /** Bytes written to `output`: the inner image's size. */
  bytes: number;
}

/**
 * Copies `input` into `output`, decompressing it on the way when it is wrapped:
 * at most `options.maxBytes` of decompressed output (LIMIT_EXCEEDED past it), a
 * truncated or corrupt wrapper is IMAGE_CORRUPT. Unwrapped input is copied
 * unbounded here: the caller bounds what it reads.
 */
export async function unwrapStream(input: AsyncIterable<Uint8Array>, output: Writable, options: DecompressOptions): Promise<UnwrapResult> {
  const { format, stream } = await sniffWrapper(input);
  if (format) return { wrapper: format, bytes: await decompressTo(format, stream, output, options) };
  let bytes = 0;
  const count = new Transform({
    transform(chunk: Buffer, _enc, done) {
      bytes += chunk.length;
      done(null, chunk);
    },
  });
  await pipeline(stream, count, output, ...((options.signal ? [{ signal: options.signal }] : []) as []));
  return { wrapper: undefined, bytes };
}
