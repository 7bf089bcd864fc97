/**
 * The native decoder (native/codec: libdeflate and libzstd on the libuv
 * threadpool, src/engine/native-decoder.ts) only vouches for clean decodes and
 * hands everything else back to the JavaScript decoders. So decode() must give
 * exactly what it gives with the native decoder switched off: the same bytes,
 * or the same refusal with the same words, for clean clusters and damaged ones
 * alike, for every codec.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { deflateRawSync, deflateSync, constants as zc } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { decode, decoderStats, setNativeDecoding } from '../../src/engine/decompress.js';
import type { Codec } from '../../src/engine/types.js';
import { mixedContent, seededBytes } from '../helpers/qemu.js';
import { zstdFrame, zstdTool } from '../helpers/zstd.js';

const built = existsSync(join(import.meta.dirname, '..', '..', 'native', 'codec', 'build', 'Release', 'codec.node'));

type Outcome = { bytes: string } | { error: string; code: unknown; name: string };

async function outcome(native: boolean, codec: Codec, input: Uint8Array, decodedLength: number): Promise<Outcome> {
  setNativeDecoding(native);
  try {
    const out = await decode(codec, input, decodedLength, 'cluster at 0x42', Buffer.alloc(decodedLength + 4096, 0xee));
    return { bytes: Buffer.from(out).toString('base64') };
  } catch (err) {
    const e = err as Error & { code?: unknown };
    return { error: e.message, code: e.code, name: e.name };
  } finally {
    setNativeDecoding(true);
  }
}

/** A VMDK grain: LBA, size, then the zlib stream. */
function grain(stream: Uint8Array, size = stream.length): Uint8Array {
  const head = Buffer.alloc(12);
  head.writeUInt32LE(size, 8);
  return Buffer.concat([head, stream]);
}

function damaged(bytes: Uint8Array, seed: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  const flips = seededBytes(64, seed);
  for (let i = 0; i < 16; i++) {
    const copy = Buffer.from(bytes);
    const at = ((flips[i * 2] as number) * 257 + (flips[i * 2 + 1] as number)) % copy.length;
    copy[at] = (copy[at] as number) ^ (1 << (i % 8));
    out.push(copy);
  }
  out.push(Buffer.from(bytes).subarray(0, Math.floor(bytes.length / 2)));
  out.push(Buffer.from(bytes).fill(0xff, 0, 16));
  return out;
}

afterEach(() => setNativeDecoding(true));

describe.skipIf(!built)('native decoder: the same answer as the JavaScript decoders', () => {
  const cluster = 65536;
  const data = mixedContent(cluster, 7);

  it('decodes clean clusters natively (none handed back)', async () => {
    const before = decoderStats();
    const cases: Array<[Codec, Uint8Array, number]> = [[ 'deflate', deflateRawSync(data), cluster ], [ 'vmdk-grain', grain(deflateSync(data)), cluster ]];
    if (zstdTool) cases.push(['zstd', zstdFrame(data), cluster]);
    for (const [codec, input, length] of cases) {
      const got = await outcome(true, codec, input, length);
      expect(got, codec).toEqual({ bytes: Buffer.from(data).toString('base64') });
    }
    const after = decoderStats();
    expect(after.offThread - before.offThread).toBe(cases.length);
    expect(after.inline - before.inline).toBe(0);
  });

  const deflateCases = (): Array<[string, Uint8Array, number]> => {
    const stream = deflateRawSync(data);
    return [
      ['clean, sector padding after', Buffer.concat([stream, seededBytes(400, 2)]), cluster],
      ['a stream past the cluster (qemu keeps the cluster)', deflateRawSync(Buffer.concat([data, data])), cluster],
      ['a stream that ends before the cluster is full', deflateRawSync(data.subarray(0, 1000)), cluster],
      ['stored blocks', deflateRawSync(seededBytes(cluster, 3), { level: 0 }), cluster],
      ['a sync-flushed stream without a final block', deflateRawSync(data, { finishFlush: zc.Z_SYNC_FLUSH }), cluster],
      ['nothing but 0xff', Buffer.alloc(512, 0xff), cluster],
      ['one byte', Buffer.from([0x03]), cluster],
      ...damaged(stream, 11).map((d, i): [string, Uint8Array, number] => [`damaged ${i}`, d, cluster]),
    ];
  };
  for (const [name, input, length] of deflateCases()) {
    it(`qcow2 zlib: ${name}`, async () => {
      expect(await outcome(true, 'deflate', input, length)).toEqual(await outcome(false, 'deflate', input, length));
    });
  }

  const grainCases = (): Array<[string, Uint8Array, number]> => {
    const stream = deflateSync(data);
    return [
      ['clean', grain(stream), cluster],
      ['clean, bytes after the stream', grain(Buffer.concat([stream, seededBytes(100, 4)])), cluster],
      ['a last grain shorter than the grain', grain(deflateSync(data.subarray(0, 5000))), cluster],
      ['a stream longer than the grain', grain(deflateSync(Buffer.concat([data, data.subarray(0, 10)]))), cluster],
      ['a size past the bytes there', grain(stream, stream.length + 1), cluster],
      ['size 0', grain(stream, 0), cluster],
      ['a header only', Buffer.alloc(12), cluster],
      ['a truncated header', Buffer.alloc(7), cluster],
      ['an empty stream', grain(deflateSync(Buffer.alloc(0))), cluster],
      ['a bad Adler-32', ((): Uint8Array => {
        const s = Buffer.from(stream);
        s[s.length - 1] = (s[s.length - 1] as number) ^ 1;
        return grain(s);
      })(), cluster],
      ...damaged(stream, 12).map((d, i): [string, Uint8Array, number] => [`damaged ${i}`, grain(d), cluster]),
    ];
  };
  for (const [name, input, length] of grainCases()) {
    it(`VMDK grain: ${name}`, async () => {
      expect(await outcome(true, 'vmdk-grain', input, length)).toEqual(await outcome(false, 'vmdk-grain', input, length));
    });
  }

  it.skipIf(!zstdTool)('qcow2 zstd: clean, padded, several frames, short, long, checksummed, damaged, large windows', async () => {
    const frame = zstdFrame(data);
    const half = data.subarray(0, cluster / 2);
    const cases: Array<[string, Uint8Array]> = [
      ['clean', frame],
      ['padded', Buffer.concat([frame, seededBytes(300, 5)])],
      ['two frames', Buffer.concat([zstdFrame(half), zstdFrame(data.subarray(cluster / 2))])],
      ['without a content size', zstdFrame(data, ['-3', '--no-content-size'])],
      ['checksummed', zstdFrame(data, ['-3', '--check'])],
      ['a frame short of the cluster', zstdFrame(half)],
      ['a frame past the cluster', zstdFrame(Buffer.concat([data, half]))],
      ['a long window (2^24)', zstdFrame(data, ['-6', '--long=24', '--no-content-size'])],
      ['nothing but 0xff', Buffer.alloc(512, 0xff)],
      ...damaged(frame, 13).map((d, i): [string, Uint8Array] => [`damaged ${i}`, d]),
      ...damaged(zstdFrame(data, ['-3', '--check']), 14).map((d, i): [string, Uint8Array] => [`checksummed, damaged ${i}`, d]),
    ];
    for (const [name, input] of cases) {
      expect(await outcome(true, 'zstd', input, cluster), name).toEqual(await outcome(false, 'zstd', input, cluster));
    }
  });

  it('many clusters at once (one call per core) come back in their places', async () => {
    const inputs = Array.from({ length: 200 }, (_, i) => mixedContent(4096, 100 + i));
    const outs = await Promise.all(inputs.map((d) => decode('deflate', deflateRawSync(d), 4096, 'x')));
    outs.forEach((out, i) => expect(Buffer.from(out).equals(Buffer.from(inputs[i] as Uint8Array)), `cluster ${i}`).toBe(true));
  });

  it("a caller's mistake is a TypeError, not IMAGE_CORRUPT, as without it", async () => {
    for (const native of [true, false]) {
      setNativeDecoding(native);
      const err = await decode('deflate', { length: 3 } as unknown as Uint8Array, 4096, 'x').then(() => undefined, (e: unknown) => e);
      expect(err, String(native)).toBeInstanceOf(TypeError);
    }
  });
});
