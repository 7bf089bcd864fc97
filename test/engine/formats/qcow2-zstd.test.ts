/**
 * qcow2 zstd clusters as qemu reads them: frames one after another until the
 * cluster is full, anything after that ignored; frames are built by hand here
 * (raw and RLE blocks) so every edge is reachable. libzstd decodes them
 * (node:zlib's on Node >= 22.15, zstd-napi's before), so its messages are the ones checked.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mixedContent, seededBytes } from '../../helpers/qemu.js';
import { decode, decodeZstdCluster, zstdBackend } from '../../../src/engine/decompress.js';
import { xxh64 } from '../../helpers/xxh64.js';

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

function le(value: number, bytes: number): number[] {
  return Array.from({ length: bytes }, (_, i) => Math.floor(value / 256 ** i) & 0xff);
}

function blockHeader(last: boolean, type: number, size: number): number[] {
  return le((last ? 1 : 0) | (type << 1) | (size << 3), 3);
}

/** A frame of raw blocks (at most 128 KiB each); `contentSize` written into the header unless false. */
function rawFrame(data: Uint8Array, options: { contentSize?: boolean; checksum?: boolean } = {}): Uint8Array {
  const withSize = options.contentSize ?? true;
  const out: number[] = [...MAGIC];
  if (withSize) {
    // single segment, 4-byte Frame_Content_Size
    out.push(0xa0 | (options.checksum ? 4 : 0), ...le(data.length, 4));
  } else {
    out.push(options.checksum ? 4 : 0, 0x38); // window descriptor: 2^(10+7) = 128 KiB
  }
  for (let at = 0; at < data.length || at === 0; ) {
    const size = Math.min(128 * 1024, data.length - at);
    const last = at + size >= data.length;
    out.push(...blockHeader(last, 0, size));
    for (const byte of data.subarray(at, at + size)) out.push(byte);
    at += size;
    if (last) break;
  }
  if (options.checksum) out.push(...le(Number(xxh64(data) & 0xffffffffn), 4)); // libzstd (so qemu) verifies it
  return Uint8Array.from(out);
}

function rleFrame(byte: number, length: number): Uint8Array {
  return Uint8Array.from([...MAGIC, 0xa0, ...le(length, 4), ...blockHeader(true, 1, length), byte]);
}

function pattern(length: number, seed: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 31 + seed) & 0xff);
}

const concat = (...parts: Uint8Array[]): Uint8Array => Uint8Array.from(parts.flatMap((p) => [...p]));

describe('qcow2 zstd clusters', () => {
  it('decodes one frame followed by sector padding and garbage', () => {
    const data = pattern(4096, 1);
    const out = decodeZstdCluster(concat(rawFrame(data), Uint8Array.from([0xde, 0xad, 0xbe, 0xef, 0, 0, 0])), 4096);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
  });

  it('joins several frames, skippable frames and frames without a content size', () => {
    const a = pattern(1000, 2);
    const b = pattern(2000, 3);
    const skippable = Uint8Array.from([0x50, 0x2a, 0x4d, 0x18, ...le(5, 4), 9, 9, 9, 9, 9]);
    const input = concat(rawFrame(a, { checksum: true }), skippable, rawFrame(b, { contentSize: false }), rleFrame(7, 1096), Uint8Array.from([1, 2, 3]));
    const out = decodeZstdCluster(input, 4096);
    expect(Buffer.from(out.subarray(0, 1000)).equals(Buffer.from(a))).toBe(true);
    expect(Buffer.from(out.subarray(1000, 3000)).equals(Buffer.from(b))).toBe(true);
    expect(out.subarray(3000).every((x) => x === 7)).toBe(true);
  });

  it('refuses a frame whose content checksum does not match, as libzstd does', () => {
    const a = pattern(4096, 5);
    const frame = rawFrame(a, { checksum: true });
    frame[frame.length - 1] = (frame[frame.length - 1] as number) ^ 0x40;
    expect(() => decodeZstdCluster(frame, 4096)).toThrow(/doesn't match checksum/);
  });

  it('refuses frames that end before the cluster is full', () => {
    expect(() => decodeZstdCluster(rawFrame(pattern(1000, 4)), 4096)).toThrow(/ends after 1000 of 4096/);
    expect(() => decodeZstdCluster(rawFrame(pattern(4096, 4)).subarray(0, 2000), 4096)).toThrow(/ends after \d+ of 4096/);
    // Full, but the frame's last block is cut off (its content size promises more).
    const cut = rawFrame(pattern(8192, 4), { contentSize: false });
    expect(() => decodeZstdCluster(cut.subarray(0, cut.length - 100), 8192)).toThrow(/ends after \d+ of 8192/);
  });

  it('refuses a frame holding more than the cluster', () => {
    expect(() => decodeZstdCluster(rawFrame(pattern(5000, 5)), 4096)).toThrow(/more than the 4096-byte cluster/);
    expect(() => decodeZstdCluster(rawFrame(pattern(5000, 5), { contentSize: false }), 4096)).toThrow(/more than the 4096-byte cluster/);
    // The cluster fills exactly at a block's end, but the frame goes on.
    const twoBlocks = rawFrame(pattern(128 * 1024 + 10, 5), { contentSize: false });
    expect(() => decodeZstdCluster(twoBlocks, 128 * 1024)).toThrow(/more than the 131072-byte cluster/);
  });

  it('refuses what libzstd refuses before allocating anything', () => {
    const reserved = rawFrame(pattern(100, 6));
    reserved[4] = (reserved[4] as number) | 0x08;
    expect(() => decodeZstdCluster(reserved, 100)).toThrow(/Unsupported frame parameter/);
    // A 2 GiB window, no content size.
    const huge = Uint8Array.from([...MAGIC, 0x00, 0xa8, ...blockHeader(true, 0, 4), 1, 2, 3, 4]);
    expect(() => decodeZstdCluster(huge, 4)).toThrow(/too much memory/);
    const dictionary = Uint8Array.from([...MAGIC, 0xa1, 7, ...le(4, 4), ...blockHeader(true, 0, 4), 1, 2, 3, 4]);
    expect(() => decodeZstdCluster(dictionary, 4)).toThrow(/Dictionary mismatch/);
    const badType = Uint8Array.from([...MAGIC, 0xa0, ...le(4, 4), ...blockHeader(true, 3, 4), 1, 2, 3, 4]);
    expect(() => decodeZstdCluster(badType, 4)).toThrow(/Data corruption/);
    expect(() => decodeZstdCluster(Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9]), 4)).toThrow(/Unknown frame descriptor/);
  });

  it('decode() reports damage as IMAGE_CORRUPT naming where', async () => {
    await expect(decode('zstd', rawFrame(pattern(10, 1)), 4096, 'cluster at 0x1234')).rejects.toMatchObject({ code: 'IMAGE_CORRUPT', message: expect.stringContaining('0x1234') });
    await expect(decode('deflate', Uint8Array.from([0xff, 0xff, 0xff]), 4096, 'cluster at 0x99')).rejects.toMatchObject({ code: 'IMAGE_CORRUPT' });
  });

  it('decodes with libzstd: node:zlib from Node 22.15 on, zstd-napi before', () => {
    const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
    expect(zstdBackend()).toBe(major > 22 || (major === 22 && minor >= 15) ? 'node:zlib' : 'zstd-napi');
  });

  it("a decoder's own failure is not blamed on the image", async () => {
    // A TypeError inside the codec is our bug: it propagates as it is (INTERNAL_ERROR to the CLI and the service).
    const notBytes = { length: 10, subarray: () => null } as unknown as Uint8Array;
    for (const codec of ['zstd', 'deflate', 'vmdk-grain'] as const) {
      const err = await decode(codec, notBytes, 4096, 'cluster').then(() => undefined, (e: unknown) => e);
      expect(err, codec).toBeInstanceOf(Error);
      expect((err as { code?: string }).code, codec).not.toBe('IMAGE_CORRUPT');
    }
  });

  it('keeps the first cluster of a deflate stream that goes on past it, as qemu does', async () => {
    const { deflateRawSync } = await import('node:zlib');
    const data = Buffer.from(pattern(10_000, 9));
    const out = await decode('deflate', deflateRawSync(data), 4096, 'long stream');
    expect(Buffer.from(out).equals(data.subarray(0, 4096))).toBe(true);
  });

  const hasZstdTool = ((): boolean => {
    try {
      execFileSync('zstd', ['--version']);
      return true;
    } catch {
      return false;
    }
  })();

  it.skipIf(!hasZstdTool)('decodes what the zstd tool makes at every level, with Huffman and FSE blocks', () => {
    const samples: Array<[string, Uint8Array]> = [
      ['mixed', mixedContent(300_000, 3)],
      ['random', seededBytes(65536, 4)],
      ['zeros', new Uint8Array(65536)],
      ['text', Buffer.from('diskconv block 17 qcow2 zstd cluster '.repeat(3000))],
      ['binary', readFileSync(process.execPath).subarray(2 ** 20, 2 ** 20 + 262144)],
      ['small', seededBytes(700, 5)],
    ];
    for (const [name, data] of samples) {
      for (const args of [['-1'], ['-3'], ['-9'], ['-17'], ['-3', '--no-content-size'], ['--fast=5'], ['-6', '--long=24']]) {
        const frame = execFileSync('zstd', ['-q', '-c', ...args], { input: data, maxBuffer: 1 << 26 });
        const padded = Buffer.concat([frame, seededBytes(300, 6)]); // garbage up to the sector, as in qcow2
        const out = decodeZstdCluster(padded, data.length);
        expect(Buffer.from(out).equals(Buffer.from(data)), `${name} ${args.join(' ')}`).toBe(true);
      }
    }
  });
});
