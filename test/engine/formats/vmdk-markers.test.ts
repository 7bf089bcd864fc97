/**
 * Walking a streamOptimized VMDK's grain markers while its bytes arrive
 * (src/engine/formats/vmdk-markers.ts): the same bytes as qemu-img, grains
 * mapped before the footer is there, and a clear StreamLayoutMismatchError
 * wherever the markers disagree with the grain directory qemu reads.
 */
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferSource, convertToRaw, openImage, StreamLayoutMismatchError, type Extent, type ExtentSink, type RandomAccessSource } from '../../../src/engine/index.js';
import { makeTempDir, mixedContent, qemuRawSha256 } from '../../helpers/qemu.js';
import { buildStream } from '../../helpers/vmware-stream.js';

const MiB = 2 ** 20;

/** A source whose bytes past `available` are not there yet: reads of them wait until `release()`. */
class ArrivingBuffer implements RandomAccessSource {
  readonly size: number;
  private readonly inner: BufferSource;
  private gate: Promise<void>;
  private open!: () => void;
  arriving = true;
  /** The furthest byte a read has asked for. */
  furthest = 0;
  constructor(
    bytes: Buffer,
    readonly name: string,
    private available: number,
  ) {
    this.size = bytes.length;
    this.inner = new BufferSource(bytes, name);
    this.gate = new Promise((resolve) => (this.open = resolve));
  }
  release(): void {
    this.available = this.size;
    this.arriving = false;
    this.open();
  }
  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    this.furthest = Math.max(this.furthest, offset + length);
    if (offset + length > this.available) await this.gate;
    return this.inner.read(offset, length, signal);
  }
  async close(): Promise<void> {}
}

/** Hashes the raw output (holes as zeros) and remembers how far it got. */
class HashSink implements ExtentSink {
  readonly hash = createHash('sha256');
  written = 0;
  async write(extent: Extent): Promise<void> {
    this.hash.update(extent.kind === 'data' ? extent.data.subarray(0, extent.length) : Buffer.alloc(extent.length));
    this.written = extent.offset + extent.length;
  }
  async finish(): Promise<void> {}
  async abort(): Promise<void> {}
}

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir('diskconv-vmdk-markers-')));
afterAll(async () => cleanup());

function content(size: number, seed: number): Buffer {
  const buf = mixedContent(size, seed);
  buf.fill(0, Math.min(size, 2 * MiB), Math.min(size, 4 * MiB + 8192));
  return buf;
}

async function qemuSha(name: string, bytes: Buffer): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  return qemuRawSha256(path, dir);
}

describe('streamOptimized vmdk read by its grain markers while it arrives', () => {
  for (const [label, bytes] of [
    // Large enough that the reader's first batches (8 MiB of guest data each) lie in the half that has arrived.
    ['64 KiB grains', buildStream(content(48 * MiB, 1), 'a.vmdk')],
    ['a last grain holding only the bytes inside the disk', buildStream(content(48 * MiB + 5 * 512, 2), 'b.vmdk')],
    ['a last grain compressed whole (VMware)', buildStream(content(48 * MiB + 5 * 512, 3), 'c.vmdk', { lastGrainWhole: true })],
    ['4 KiB grains, several grain tables', buildStream(content(48 * MiB, 4), 'd.vmdk', { grainSectors: 8 })],
  ] as const) {
    it(`${label}: converts the first grains before the footer arrives, to qemu-img's bytes`, async () => {
      const expected = await qemuSha(`${label.replace(/\W+/g, '-')}.vmdk`, bytes);
      const half = Math.floor(bytes.length / 2);
      const source = new ArrivingBuffer(bytes, 'upload.vmdk', half);
      const image = await openImage(source, { format: 'auto' });
      const sink = new HashSink();
      const converting = convertToRaw(image, source, sink);
      // Without the footer the directory reader could map nothing; the walk converts what has arrived.
      for (let i = 0; i < 500 && sink.written === 0; i++) await new Promise((r) => setTimeout(r, 10));
      expect(sink.written).toBeGreaterThan(0);
      expect(source.arriving).toBe(true);
      source.release();
      await converting;
      expect(sink.hash.digest('hex')).toBe(expected);
      await image.close();
    });
  }

  const mismatches: Array<[string, Buffer]> = [
    // Grain 31's marker names grain 32 (a zero grain, absent): in order, but not what the directory says.
    ['a marker naming another (absent) grain than the directory maps there', buildStream(content(12 * MiB, 5), 'e.vmdk', { editGrain: (g, m) => (g === 31 ? (m.writeBigUInt64LE(32n * 128n, 0), m) : m) })],
    ['a marker LBA far outside the disk', buildStream(content(2 * MiB, 6), 'f.vmdk', { editGrain: (g, m) => (g === 3 ? (m.writeBigUInt64LE(999_999n, 0), m) : m) })],
    ['a marker LBA off the grain boundary', buildStream(content(2 * MiB, 7), 'g.vmdk', { editGrain: (g, m) => (g === 0 ? (m.writeBigUInt64LE(1n, 0), m) : m) })],
  ];
  for (const [label, bytes] of mismatches) {
    it(`${label}: the walk refuses with StreamLayoutMismatchError; the directory reader gives qemu-img's bytes`, async () => {
      const walking = new ArrivingBuffer(bytes, 'upload.vmdk', bytes.length);
      const image = await openImage(walking, { format: 'auto' });
      const err = await convertToRaw(image, walking, new HashSink()).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(StreamLayoutMismatchError);
      expect((err as StreamLayoutMismatchError).deterministic).toBe(false);
      // The fallback: every byte in, the ordinary reader.
      const whole = new BufferSource(bytes, 'upload.vmdk');
      const sink = new HashSink();
      await convertToRaw(await openImage(whole, { format: 'auto' }), whole, sink);
      expect(sink.hash.digest('hex')).toBe(await qemuSha(`${label.replace(/\W+/g, '-')}.vmdk`, bytes));
    });
  }

  it('a source that has every byte is read through the grain directory as before', async () => {
    const bytes = buildStream(content(4 * MiB, 9), 'h.vmdk', { editGrain: (g, m) => (g === 0 ? (m.writeBigUInt64LE(1n, 0), m) : m) });
    const whole = new BufferSource(bytes, 'h.vmdk');
    const sink = new HashSink();
    await convertToRaw(await openImage(whole, { format: 'auto' }), whole, sink); // no walk, so no mismatch
    expect(sink.hash.digest('hex')).toBe(await qemuSha('h.vmdk', bytes));
  });
});
