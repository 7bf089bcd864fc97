/**
 * `diskconv compare A B`: qemu-img compare's messages and exit status. Both
 * images are read through the engine's reader in guest order, a window at a
 * time (constant memory); where both read as zeros nothing is read or compared.
 * Exit status: 0 identical, 1 different (or a usage error), 2 an image cannot be
 * opened, 4 an image cannot be read.
 */
import { blockStatus, qemuStatusSpan, type BlockStatus } from '../../engine/block-status.js';
import { ImageCorruptError } from '../../engine/errors.js';
import { readExtents } from '../../engine/reader.js';
import type { DiskImage, Extent } from '../../engine/types.js';
import type { RandomAccessSource } from '../../engine/source.js';
import { type CommandSpec, FORCE_SHARE_OPTION, parseOrHelp, UsageError } from '../args.js';
import { CACHE_MODES } from '../destination.js';
import { withExitStatus } from '../errors.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION, parseObjects } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';
import { ProgressPrinter } from '../progress.js';

export const spec: CommandSpec = {
  name: 'compare',
  operands: 'A B',
  summary: 'Compare the guest contents of two images, as qemu-img compare. Exit status 0 identical, 1 different, 2 cannot open, 4 cannot read.',
  minOperands: 2,
  maxOperands: 2,
  options: [
    { key: 'format', short: 'f', value: 'FMT', help: "A's format: auto (default), qcow2, vmdk, vdi, vpc, vhdx or raw" },
    { key: 'format2', short: 'F', value: 'FMT', help: "B's format" },
    { key: 'strict', short: 's', help: 'strict: images of different sizes, or whose allocation differs, are a mismatch' },
    { key: 'quiet', short: 'q', help: 'quiet: print nothing; the exit status tells' },
    { key: 'src-cache', short: 'T', value: 'CACHE', help: 'source cache mode (accepted; the images are only read)' },
    { key: 'progress', short: 'p', help: 'show progress on stdout, as qemu-img prints it' },
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
  notes: [
    'By default images of different sizes compare equal when the larger one holds only zeros past the',
    "end of the smaller ('Warning: Image size mismatch!'). Offsets are those of the first differing",
    '512-byte sector, as qemu-img prints them.',
  ].join('\n'),
};

const SECTOR = 512;
const BLOCK = 64 * 1024;
const ZEROS = Buffer.alloc(BLOCK);

/** The extent covering each asked offset, in increasing order; an extent's bytes stay valid until the cursor moves past it. */
class Cursor<T extends { offset: number; length: number }> {
  private current: T | undefined;
  constructor(private readonly it: AsyncIterator<T>) {}
  async at(offset: number): Promise<T> {
    while (!this.current || this.current.offset + this.current.length <= offset) {
      const step = await this.it.next();
      if (step.done) throw new ImageCorruptError(`image map ends before guest offset ${offset}`);
      this.current = step.value;
    }
    return this.current;
  }
  async close(): Promise<void> {
    await this.it.return?.(undefined);
  }
}

const bytesOf = (e: Extent & { kind: 'data' }, from: number, to: number): Buffer =>
  Buffer.from(e.data.buffer as ArrayBuffer, e.data.byteOffset + (from - e.offset), to - from);

/** First guest offset in [from, to) where the two differ (a missing side reads as zeros), or -1. */
function firstDifference(a: Extent | undefined, b: Extent | undefined, from: number, to: number): number {
  const da = a?.kind === 'data' ? a : undefined;
  const db = b?.kind === 'data' ? b : undefined;
  if (!da && !db) return -1;
  for (let at = from; at < to; at += BLOCK) {
    const end = Math.min(to, at + BLOCK);
    const x = da ? bytesOf(da, at, end) : ZEROS.subarray(0, end - at);
    const y = db ? bytesOf(db, at, end) : ZEROS.subarray(0, end - at);
    if (x.equals(y)) continue;
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return at + i;
  }
  return -1;
}

/** Block statuses with one of lookahead, so the last run is known as such (qemu's end-of-file flag). */
class StatusCursor {
  private current: BlockStatus | undefined;
  private following: BlockStatus | undefined;
  private done = false;
  constructor(
    private readonly image: DiskImage,
    private readonly it: AsyncIterator<BlockStatus>,
  ) {}
  private async pull(): Promise<BlockStatus | undefined> {
    if (this.done) return undefined;
    const step = await this.it.next();
    if (step.done) this.done = true;
    return step.done ? undefined : step.value;
  }
  /**
   * The status at `offset`, and where qemu's last answer (the one flagged end of
   * file) starts when this is the last run: a run answered a span at a time ends
   * in its last span.
   */
  async at(offset: number): Promise<{ status: BlockStatus; eofFrom: number | undefined }> {
    if (!this.current) this.following = await this.pull();
    while (!this.current || this.current.offset + this.current.length <= offset) {
      if (!this.following) throw new ImageCorruptError(`image map ends before guest offset ${offset}`);
      this.current = this.following;
      this.following = await this.pull();
    }
    const status = this.current;
    if (this.following) return { status, eofFrom: undefined };
    const end = status.offset + status.length;
    const span = qemuStatusSpan(this.image, status);
    return { status, eofFrom: span === undefined ? status.offset : Math.max(status.offset, Math.floor((end - 1) / span) * span) };
  }
  async close(): Promise<void> {
    await this.it.return?.(undefined);
  }
}

/** qemu-img's IO_BUF_SIZE: compare reads at most this much at a time. */
const IO_BUF_SIZE = 2 * 2 ** 20;

/** Where qemu-img compare's chunk from `offset` ends: the shortest driver answer, capped at IO_BUF_SIZE unless all read as zeros. */
function qemuChunkEnd(offset: number, ...sides: Array<[DiskImage, BlockStatus]>): number {
  let end = Infinity;
  for (const [image, status] of sides) {
    end = Math.min(end, status.offset + status.length);
    const span = qemuStatusSpan(image, status);
    if (span !== undefined) end = Math.min(end, (Math.floor(offset / span) + 1) * span);
  }
  if (!sides.every(([, st]) => st.zero)) end = Math.min(end, offset + IO_BUF_SIZE);
  return end;
}

const sameStatus = (x: BlockStatus, y: BlockStatus): boolean =>
  x.data === y.data && x.zero === y.zero && x.present === y.present && (x.hostOffset === undefined) === (y.hostOffset === undefined);

interface Side {
  image: DiskImage;
  source: RandomAccessSource;
}

async function compareImages(a: Side, b: Side, strict: boolean, say: (s: string) => void, progress?: ProgressPrinter): Promise<number> {
  const sizeA = a.image.virtualSize;
  const sizeB = b.image.virtualSize;
  if (strict && sizeA !== sizeB) {
    say('Strict mode: Image size mismatch!');
    return 1;
  }
  const extents = [a, b].map((s) => new Cursor(readExtents(s.image, s.source)[Symbol.asyncIterator]()));
  const statuses = strict || progress ? [a, b].map((s) => new StatusCursor(s.image, blockStatus(s.image, s.source)[Symbol.asyncIterator]())) : [];
  const [ea, eb] = extents as [Cursor<Extent>, Cursor<Extent>];
  const mismatch = (at: number): number => {
    say(`Content mismatch at offset ${Math.floor(at / SECTOR) * SECTOR}!`);
    return 1;
  };
  try {
    const common = Math.min(sizeA, sizeB);
    // -p moves as qemu-img's does: one step per chunk qemu would compare (both drivers' answers, at most
    // IO_BUF_SIZE where data is read), whatever steps our own extents take inside it.
    let chunkEnd = 0;
    const total = Math.max(sizeA, sizeB);
    for (let offset = 0; offset < common; ) {
      let end = common;
      if (progress && offset >= chunkEnd) {
        const [sa, sb] = (await Promise.all(statuses.map((c) => c.at(offset)))) as [Awaited<ReturnType<StatusCursor['at']>>, Awaited<ReturnType<StatusCursor['at']>>];
        chunkEnd = Math.min(common, qemuChunkEnd(offset, [a.image, sa.status], [b.image, sb.status]));
      }
      if (progress) end = Math.min(end, chunkEnd);
      if (strict) {
        const [sa, sb] = (await Promise.all(statuses.map((c) => c.at(offset)))) as [Awaited<ReturnType<StatusCursor['at']>>, Awaited<ReturnType<StatusCursor['at']>>];
        // qemu compares the whole status word: its flags and whether this answer reaches the end of the image.
        const eofA = sa.eofFrom !== undefined && offset >= sa.eofFrom;
        const eofB = sb.eofFrom !== undefined && offset >= sb.eofFrom;
        if (!sameStatus(sa.status, sb.status) || eofA !== eofB) {
          say(`Strict mode: Offset ${offset} block status mismatch!`);
          return 1;
        }
        end = Math.min(end, sa.status.offset + sa.status.length, sb.status.offset + sb.status.length);
        for (const from of [sa.eofFrom, sb.eofFrom]) if (from !== undefined && from > offset) end = Math.min(end, from);
      }
      const x = await ea.at(offset);
      const y = await eb.at(offset);
      end = Math.min(end, x.offset + x.length, y.offset + y.length);
      const diff = firstDifference(x, y, offset, end);
      if (diff >= 0) return mismatch(diff);
      offset = end;
      if (offset === chunkEnd) progress?.update((100 * offset) / total);
    }
    if (sizeA !== sizeB) {
      say('Warning: Image size mismatch!');
      const over = sizeA > sizeB ? ea : eb;
      const size = Math.max(sizeA, sizeB);
      const overSide = sizeA > sizeB ? a : b;
      const overStatus = statuses[sizeA > sizeB ? 0 : 1];
      for (let offset = common; offset < size; ) {
        const x = await over.at(offset);
        let end = Math.min(size, x.offset + x.length);
        if (progress && overStatus && offset >= chunkEnd) chunkEnd = Math.min(size, qemuChunkEnd(offset, [overSide.image, (await overStatus.at(offset)).status]));
        if (progress) end = Math.min(end, chunkEnd);
        const diff = firstDifference(x, undefined, offset, end);
        if (diff >= 0) return mismatch(diff);
        offset = end;
        if (offset === chunkEnd) progress?.update((100 * offset) / size);
      }
    }
    say('Images are identical.');
    return 0;
  } finally {
    for (const c of [...extents, ...statuses]) await c.close();
  }
}

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const cache = args.get('src-cache');
  // qemu-img compare exits 2 on a bad cache mode or format, as on any image it cannot open.
  if (cache !== undefined && !(CACHE_MODES as readonly string[]).includes(cache)) throw withExitStatus(new UsageError(`Invalid source cache option: ${cache}`, 'compare'), 2);
  const [fileA, fileB] = args.operands as [string, string];
  let openA, openB;
  try {
    const secrets = await parseObjects(args.all('object'));
    openA = await sourceOf(args, fileA, 'format', secrets);
    openB = await sourceOf(args, fileB, 'format2', secrets);
  } catch (err) {
    throw withExitStatus(err, 2);
  }
  const quiet = args.has('quiet');
  const say = (s: string): void => {
    if (!quiet) out(s);
  };
  // qemu-img compare -p: the line from 0 once both images are open (minimum step 2 points), and its newline at the end whatever happens.
  const progress = args.has('progress') && !quiet ? new ProgressPrinter((s) => process.stdout.write(s), 2) : undefined;
  // 2 until both images are open and readable (qemu-img's "Could not open"), 4 once reading fails.
  let opened = false;
  try {
    return await withImage(openA.path, openA.options, (imageA, sourceA) => {
      imageA.readable?.();
      return withImage(openB.path, openB.options, (imageB, sourceB) => {
        imageB.readable?.();
        opened = true;
        progress?.start();
        return compareImages({ image: imageA, source: sourceA }, { image: imageB, source: sourceB }, args.has('strict'), say, progress);
      });
    });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    const cannotOpen = !opened || code === 'UNSUPPORTED_FEATURE' || code === 'UNSAFE_IMAGE';
    throw withExitStatus(err, cannotOpen ? 2 : 4);
  } finally {
    progress?.close();
  }
}
