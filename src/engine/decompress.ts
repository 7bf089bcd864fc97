import { promisify } from 'node:util';
import { inflate, inflateRaw, constants as zc } from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { ImageCorruptError } from './errors.js';
import type { Codec } from './types.js';

const inflateAsync = promisify(inflate);
const inflateRawAsync = promisify(inflateRaw);

/**
 * Decodes one compressed cluster or grain. zlib work runs on libuv's thread pool,
 * so many calls in flight decompress in parallel. Output is bounded by
 * `decodedLength`: a stream that would inflate past it is refused (no inflate bombs).
 */
export async function decode(codec: Codec, input: Uint8Array, decodedLength: number, where: string): Promise<Uint8Array> {
  try {
    switch (codec) {
      case 'deflate': {
        // qcow2 stores raw deflate; the stored size is rounded up to sectors, so
        // trailing input is expected. The output must fill the cluster exactly.
        const out = await inflateRawAsync(input, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: decodedLength });
        if (out.length !== decodedLength) throw new Error(`inflated to ${out.length} bytes, expected ${decodedLength}`);
        return out;
      }
      case 'zstd': {
        const out = zstdDecompress(input, new Uint8Array(decodedLength));
        if (out.length !== decodedLength) throw new Error(`zstd output ${out.length} bytes, expected ${decodedLength}`);
        return out;
      }
      case 'vmdk-grain': {
        if (input.length < 12) throw new Error('grain header truncated');
        const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
        const size = view.getUint32(8, true);
        if (size === 0 || 12 + size > input.length) throw new Error(`grain data size ${size} exceeds the bytes available`);
        const out = await inflateAsync(input.subarray(12, 12 + size), { maxOutputLength: decodedLength });
        if (out.length !== decodedLength) throw new Error(`grain inflated to ${out.length} bytes, expected ${decodedLength}`);
        return out;
      }
    }
  } catch (err) {
    if (err instanceof ImageCorruptError) throw err;
    throw new ImageCorruptError(`cannot decompress ${where}: ${(err as Error).message}`, { cause: err });
  }
}
