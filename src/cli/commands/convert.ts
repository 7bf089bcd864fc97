/**
 * `diskconv convert`: qemu-img convert -O raw, with qemu-img's flags and their
 * meaning, written through the never-destroy destination rules (destination.ts).
 */
import { convertToRaw, type ExtentSink } from '../../engine/convert.js';
import { InvalidArgumentError } from '../../engine/errors.js';
import { readExtents } from '../../engine/reader.js';
import type { DirectTarget } from '../../engine/native-decoder.js';
import type { DiskImage, Extent, MapEntry } from '../../engine/types.js';
import type { RandomAccessSource } from '../../engine/source.js';
import { sleep } from '../../engine/ranged-source.js';
import { onFirstDecode } from '../../engine/decode-start.js';
import { createRequire } from 'node:module';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, parseOrHelp, PASSPHRASE_OPTION, UsageError } from '../args.js';
import {
  accumulateOptions,
  hasHelpOption,
  parseRawCreateOptions,
  preallocationOf,
  RAW_OPTIONS_HELP_NO_FILE,
  RAW_OPTIONS_HELP_WITH_FILE,
  type Preallocation,
} from '../create-options.js';
import { CACHE_MODES, DestinationSink, refuseSameFile, type CacheMode } from '../destination.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION, parseImageOpts, parseObjects } from '../image-opts.js';
import { dataBytesOf, parseSnapshot, sourceOf, withImage } from '../image.js';
import { ProgressPrinter } from '../progress.js';
import { parseSize } from '../size.js';

export const spec: CommandSpec = {
  name: 'convert',
  operands: 'SRC DST',
  summary: 'Convert SRC to a raw image at DST, byte-identical to qemu-img convert -O raw.',
  minOperands: 0,
  maxOperands: 2,
  options: [
    FORMAT_OPTION,
    PASSPHRASE_OPTION,
    DISK_OPTION,
    { key: 'target', short: 'O', value: 'raw', help: 'output format; only raw' },
    { key: 'snapshot', short: 'l', value: 'SNAPSHOT', help: 'convert an internal snapshot: snapshot.name=NAME, snapshot.id=ID or NAME_OR_ID' },
    { key: 'progress', short: 'p', help: 'show progress on stdout, as qemu-img prints it' },
    { key: 'quiet', short: 'q', help: 'quiet: no progress' },
    { key: 'no-create', short: 'n', help: 'write into the existing DST in place (never created, truncated or resized; must be at least the virtual size)' },
    { key: 'target-is-zero', long: 'target-is-zero', help: 'with -n: DST already reads as zeros, so zeros are not written' },
    { key: 'sparse', short: 'S', value: 'SIZE', help: 'zero runs of SIZE bytes (a multiple of 512, at most 16M; default 4k) stay holes; 0 = fully allocated' },
    { key: 'cache', short: 't', value: 'CACHE', help: `destination cache mode: ${CACHE_MODES.join(', ')}; unsafe (the default) never flushes, the others flush at the end` },
    { key: 'src-cache', short: 'T', value: 'CACHE', help: 'source cache mode (accepted; the source is only read)' },
    { key: 'coroutines', short: 'm', value: 'N', help: 'parallel requests, 1-16: reads in flight (default 4)' },
    { key: 'out-of-order', short: 'W', help: 'allow out-of-order writes (accepted; writes are in order, the output is the same)' },
    FORCE_SHARE_OPTION,
    { key: 'copy-offload', short: 'C', help: 'copy offloading (accepted; the output is the same); not with -c, -S or --salvage' },
    { key: 'options', short: 'o', value: 'OPTIONS', repeatable: true, help: 'raw output options: preallocation=off|falloc|full (falloc and full: fully allocated), nocow=on|off, extent_size_hint=SIZE (accepted, no effect), size (ignored, as qemu-img); -o help lists them' },
    { key: 'rate-limit', short: 'r', value: 'RATE', help: 'write at most RATE bytes per second (k, M, G suffixes; 0 = no limit)' },
    { key: 'compress', short: 'c', help: "compressed output: refused, as qemu-img refuses it for raw ('Compression not supported for this file format')" },
    { key: 'backing', short: 'B', value: 'BACKING', help: 'backing file of the output: refused for raw, as qemu-img (with -n accepted and ignored, as qemu-img; never opened)' },
    { key: 'backing-format', short: 'F', value: 'FMT', help: 'format of -B: refused for raw, as qemu-img' },
    { key: 'bitmaps', long: 'bitmaps', help: "copy persistent bitmaps: refused, as qemu-img ('Format driver 'raw' does not support bitmaps')" },
    { key: 'skip-broken-bitmaps', long: 'skip-broken-bitmaps', help: 'with --bitmaps: refused with it' },
    { key: 'salvage', long: 'salvage', help: 'continue past unreadable source ranges, writing zeros there (a warning for each, unless -q)' },
    { key: 'target-image-opts', long: 'target-image-opts', help: 'DST is an option string driver=raw,file.filename=PATH (needs -n)' },
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
  notes: [
    'DST is never destroyed: the source itself is refused (SAME_FILE, also through links); a block or',
    'character device is written in place, never truncated or removed; a file is written under a',
    'temporary name beside DST and renamed over it only when complete, so a failure leaves DST as it was.',
  ].join('\n'),
};

const MAX_SPARSE = 16 * 2 ** 20;

/**
 * Counts the bytes written for qemu-img's progress: a share of the allocated
 * bytes (data, and zeros too under -S 0), not of the virtual size. With
 * progress on, data extents are handed on in pieces of at most 1/400 of the
 * total, so the line moves at least every 1 % as qemu-img's does.
 */
class CountingSink implements ExtentSink {
  done = 0;
  constructor(
    private readonly inner: ExtentSink,
    private readonly countZeros: boolean,
    private readonly piece: number,
    private readonly onData: (done: number) => void,
    /** --salvage: ranges written as zeros because they could not be read; they count as the data they were. */
    private readonly salvaged: ReadonlyArray<readonly [number, number]> = [],
  ) {}
  /** Forwarded (no --salvage, which counts extent by extent): compressed clusters may reach the file from the decoding threads. */
  directTarget(): DirectTarget | undefined {
    return this.salvaged.length === 0 ? this.inner.directTarget?.() : undefined;
  }
  async write(extent: Extent): Promise<void> {
    const counted = extent.kind === 'data' || this.countZeros;
    if (extent.kind === 'data' && extent.written) {
      // Already in the file (directTarget): only counted, in pieces as the others.
      for (let at = 0; at < extent.length; at += this.piece) {
        this.done += Math.min(this.piece, extent.length - at);
        this.onData(this.done);
      }
      return;
    }
    if (counted && extent.length > this.piece) {
      for (let at = 0; at < extent.length; at += this.piece) {
        const length = Math.min(this.piece, extent.length - at);
        const offset = extent.offset + at;
        await this.inner.write(extent.kind === 'data' ? { kind: 'data', offset, length, data: extent.data.subarray(at, at + length) } : { kind: 'zero', offset, length });
        this.done += length;
        this.onData(this.done);
      }
      return;
    }
    await this.inner.write(extent);
    if (extent.kind === 'data' || this.countZeros) {
      this.done += extent.length;
      this.onData(this.done);
    } else if (this.salvaged.length > 0) {
      const end = extent.offset + extent.length;
      const lost = this.salvaged.reduce((sum, [from, to]) => sum + Math.max(0, Math.min(to, end) - Math.max(from, extent.offset)), 0);
      if (lost > 0) {
        this.done += lost;
        this.onData(this.done);
      }
    }
  }
  /**
   * A batch goes on in one piece (one native write for many extents), cut
   * where its counted bytes would pass `piece`, so progress still moves every ~1 %.
   */
  async writeBatch(extents: readonly Extent[]): Promise<void> {
    const inner = this.inner;
    // --salvage counts lost ranges extent by extent (write() above): rare, so no batching there.
    if (!inner.writeBatch || this.salvaged.length > 0) {
      for (const extent of extents) await this.write(extent);
      return;
    }
    let group: Extent[] = [];
    let groupBytes = 0;
    const flush = async (): Promise<void> => {
      if (group.length === 0) return;
      await (inner.writeBatch as NonNullable<ExtentSink['writeBatch']>)(group);
      group = [];
      if (groupBytes > 0) {
        this.done += groupBytes;
        this.onData(this.done);
      }
      groupBytes = 0;
    };
    for (const extent of extents) {
      const counted = extent.kind === 'data' || this.countZeros ? extent.length : 0;
      if (counted > this.piece) {
        await flush();
        await this.write(extent);
        continue;
      }
      if (groupBytes + counted > this.piece) await flush();
      group.push(extent);
      groupBytes += counted;
    }
    await flush();
  }
  finish(virtualSize: number): Promise<void> {
    return this.inner.finish(virtualSize);
  }
  abort(): Promise<void> {
    return this.inner.abort();
  }
}

function cacheMode(value: string | undefined, what: string): CacheMode | undefined {
  if (value === undefined) return undefined;
  if ((CACHE_MODES as readonly string[]).includes(value)) return value as CacheMode;
  throw new UsageError(`Invalid ${what}cache option: ${value}`);
}

/** qemu's cvtnum for -r: a size (k, M, G... suffixes), 0 = no limit. */
function rateLimit(text: string | undefined): number {
  if (text === undefined) return 0;
  try {
    return parseSize(text, 'rate limit');
  } catch (err) {
    // Beyond 2^53 bytes per second is no limit at all.
    if (err instanceof UsageError && err.message.includes('larger than diskconv handles')) return 0;
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** Sleeps after each write so that the bytes written stay within `rate` per second since the start (qemu's -r). */
class ThrottledSink implements ExtentSink {
  private written = 0;
  private readonly start = Date.now();
  constructor(
    private readonly inner: ExtentSink,
    private readonly rate: number,
    private readonly countZeros: boolean,
    private readonly signal: AbortSignal,
  ) {}
  async write(extent: Extent): Promise<void> {
    await this.inner.write(extent);
    if (extent.kind !== 'data' && !this.countZeros) return;
    this.written += extent.length;
    const due = this.start + (1000 * this.written) / this.rate;
    const wait = due - Date.now();
    if (wait > 0) await sleep(wait, this.signal);
  }
  finish(virtualSize: number): Promise<void> {
    return this.inner.finish(virtualSize);
  }
  abort(): Promise<void> {
    return this.inner.abort();
  }
}

/** Errors of reading the source that --salvage turns into zeros: a data error, or the file failing underneath. */
const salvageable = (err: unknown): boolean => {
  const code = (err as { code?: unknown }).code;
  return code === 'IMAGE_CORRUPT' || code === 'SOURCE_UNAVAILABLE';
};

/** The image with the map entries in `bad` read as zeros. */
function withZeros(image: DiskImage, bad: ReadonlyArray<readonly [number, number]>): DiskImage {
  return {
    format: image.format,
    virtualSize: image.virtualSize,
    info: () => image.info(),
    ...(image.readsFrom ? { readsFrom: image.readsFrom } : {}),
    close: async () => {},
    async *map(signal?: AbortSignal): AsyncIterable<MapEntry> {
      for await (const e of image.map(signal)) {
        yield bad.some(([from, to]) => from === e.offset && to === e.offset + e.length) ? { kind: 'zero', offset: e.offset, length: e.length, status: 'zeroed' } : e;
      }
    },
  };
}

/**
 * --salvage, as qemu-img's: a range that cannot be read is written as zeros
 * with a warning per 512-byte sector (unless -q), and the conversion goes on.
 * On a read error the map entry that fails alone is found (each data entry
 * from the failing point is read by itself), marked, and reading resumes where
 * it stopped; what was written stays written. An error in the metadata itself
 * (the map cannot go on) still ends the conversion, as does any output error.
 */
async function convertSalvaging(
  image: DiskImage,
  source: RandomAccessSource,
  sink: ExtentSink,
  bad: Array<readonly [number, number]>,
  options: { signal: AbortSignal; readConcurrency?: number; warn?: (s: string) => void },
): Promise<void> {
  let at = 0;
  try {
    for (;;) {
      try {
        for await (const extent of readExtents(withZeros(image, bad), source, { signal: options.signal, start: at, ...(options.readConcurrency ? { readConcurrency: options.readConcurrency } : {}) })) {
          options.signal.throwIfAborted();
          await sink.write(extent);
          at = extent.offset + extent.length;
        }
        break;
      } catch (err) {
        if (!salvageable(err) || options.signal.aborted) throw err;
        let found: readonly [number, number] | undefined;
        for await (const e of withZeros(image, bad).map(options.signal)) {
          if (e.offset + e.length <= at || e.kind === 'zero') continue;
          try {
            for await (const _ of readExtents(image, source, { signal: options.signal, start: Math.max(at, e.offset), end: e.offset + e.length, readConcurrency: 1 })) void _;
          } catch (inner) {
            if (!salvageable(inner)) throw inner;
            found = [e.offset, e.offset + e.length];
            const reason = `${(inner as { code: string }).code}: ${(inner as Error).message}`;
            for (let s = Math.max(at, e.offset); s < e.offset + e.length; s += 512) options.warn?.(`diskconv: warning: error while reading offset ${s}: ${reason}\n`);
            break;
          }
        }
        if (!found) throw err;
        bad.push(found);
      }
    }
    await sink.finish(image.virtualSize);
  } catch (err) {
    await sink.abort().catch(() => {});
    throw err;
  }
}

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  // From the first compressed cluster on, V8 tiers up no further than Sparkplug: on 2 cores its
  // optimizing compiler's threads took CPU from the decoding ones for no gain (compressed 4 GiB
  // sources, CPU -7 to -14 %: bench/results/2026-12-02-session6-compressed.md). Uncompressed ones unchanged.
  // node:v8 (with the perf_hooks it loads) costs ~9 ms at start: loaded only when a cluster needs decoding.
  onFirstDecode(() => (createRequire(import.meta.url)('node:v8') as typeof import('node:v8')).setFlagsFromString('--max-opt=1'));
  const target = args.get('target') ?? 'raw';
  if (target !== 'raw') throw new InvalidArgumentError(`output format '${target}' is not supported; only -O raw`);
  // The checks qemu-img makes before it opens anything, in its order and words.
  const optionList = accumulateOptions(args.all('options'));
  const rate = rateLimit(args.get('rate-limit'));
  const noCreate = args.has('no-create');
  const targetIsZero = args.has('target-is-zero');
  const copyOffload = args.has('copy-offload');
  const salvage = args.has('salvage');
  if (args.has('skip-broken-bitmaps') && !args.has('bitmaps')) throw new InvalidArgumentError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (args.has('compress') && copyOffload) throw new InvalidArgumentError('Cannot enable copy offloading when -c is used');
  if (args.has('sparse') && copyOffload) throw new InvalidArgumentError('Cannot enable copy offloading when -S is used');
  if (copyOffload && salvage) throw new InvalidArgumentError('Cannot use copy offloading in salvaging mode');
  if (args.has('target-image-opts') && !noCreate) throw new InvalidArgumentError('--target-image-opts requires use of -n flag');
  if (noCreate && optionList !== undefined) throw new InvalidArgumentError('-o has no effect when skipping image creation');
  if (targetIsZero && !noCreate) throw new UsageError('--target-is-zero requires use of -n flag');
  if (optionList !== undefined && hasHelpOption(optionList)) {
    // qemu-img: with a target filename the file protocol's options join the list.
    out(args.operands.length >= 2 ? RAW_OPTIONS_HELP_WITH_FILE : RAW_OPTIONS_HELP_NO_FILE);
    return 0;
  }
  if (args.operands.length < 2) throw new UsageError(args.operands.length === 0 ? 'Must specify image file name' : 'expecting SRC DST');
  const [srcOperand, dstOperand] = args.operands as [string, string];
  let sparseBlock = 4096;
  const sparse = args.get('sparse');
  if (sparse !== undefined) {
    const valid = /^\s*[0-9]/.test(sparse) ? (() => { try { return parseSize(sparse, 'sparse size'); } catch { return -1; } })() : -1;
    if (valid < 0 || valid % 512 !== 0 || valid > MAX_SPARSE) {
      throw new UsageError(
        'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).',
      );
    }
    sparseBlock = valid;
  }
  const cache = cacheMode(args.get('cache'), '');
  cacheMode(args.get('src-cache'), 'source ');
  let readConcurrency: number | undefined;
  const m = args.get('coroutines');
  if (m !== undefined) {
    const n = /^[0-9]+$/.test(m) ? Number(m) : NaN;
    if (!(n >= 1 && n <= 16)) throw new UsageError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
    readConcurrency = n;
  }
  const snap = args.get('snapshot');
  const quiet = args.has('quiet');
  const progress = args.has('progress') && !quiet ? new ProgressPrinter((s) => process.stdout.write(s)) : undefined;
  const secrets = await parseObjects(args.all('object'));
  const opened = await sourceOf(args, srcOperand, 'format', secrets);
  const src = opened.path;
  let dst = dstOperand;
  if (args.has('target-image-opts')) {
    const t = parseImageOpts(dstOperand, secrets);
    if (t.format !== 'raw') throw new InvalidArgumentError(`--target-image-opts: diskconv writes raw targets only; give driver=raw (not '${dstOperand}')`);
    dst = t.path;
  }

  // Refused before the source is even parsed: nothing about the image can make SRC = DST safe.
  await refuseSameFile(src, dst);
  const abort = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => abort.abort(new InvalidArgumentError(`interrupted by ${sig}`));
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal).once('SIGHUP', onSignal);
  try {
    return await withImage(src, { ...opened.options, ...(snap ? { snapshot: parseSnapshot(snap) } : {}), signal: abort.signal }, async (image, source) => {
      // What qemu-img checks once the source is open, before it creates the target.
      let preallocation: Preallocation = 'off';
      if (!noCreate) {
        const opts = optionList !== undefined ? parseRawCreateOptions(optionList) : {};
        if (args.has('backing')) throw new InvalidArgumentError("Backing file not supported for file format 'raw'");
        if (args.has('backing-format')) throw new InvalidArgumentError("Backing file format not supported for file format 'raw'");
        if (args.has('compress')) throw new InvalidArgumentError('Compression not supported for this file format');
        preallocation = preallocationOf(opts, `${dst}: error while converting raw: `);
      } else {
        // With -n qemu-img never creates the target, so -B names nothing it opens (nor do we).
        if (targetIsZero && args.has('backing')) throw new InvalidArgumentError('Cannot use --target-is-zero when the destination image has a backing file');
        if (args.has('compress')) throw new InvalidArgumentError('Compression not supported for this file format');
      }
      // qemu-img refuses this once it has made the target; nothing is made here.
      if (args.has('bitmaps')) throw new InvalidArgumentError("Format driver 'raw' does not support bitmaps");
      // The data bytes cost a walk of the whole map before the conversion's own: taken only for
      // -p (its total) or when the free space might not hold the output (DestinationSink asks then).
      let data: number | undefined;
      const dataBytes = async (): Promise<number> => (data ??= await dataBytesOf(image, abort.signal));
      if (progress) await dataBytes();
      const sink = await DestinationSink.open({
        path: dst,
        sourcePath: src,
        virtualSize: image.virtualSize,
        allocatedBytes: dataBytes,
        noCreate,
        targetIsZero,
        // falloc and full: the whole file allocated, whatever -S says (progress still counts as -S says).
        sparseBlock: preallocation === 'off' ? sparseBlock : 0,
        ...(cache ? { cache } : {}),
      });
      const total = sparseBlock === 0 ? image.virtualSize : (data ?? 0);
      progress?.start();
      const piece = progress ? Math.max(64 * 1024, Math.floor(total / 400)) : Number.MAX_SAFE_INTEGER;
      const throttled = rate > 0 ? new ThrottledSink(sink, rate, sparseBlock === 0, abort.signal) : sink;
      const bad: Array<readonly [number, number]> = [];
      const counted = new CountingSink(throttled, sparseBlock === 0, piece, (done) => progress?.update(total === 0 ? 100 : (100 * done) / total), bad);
      const read = { signal: abort.signal, ...(readConcurrency ? { readConcurrency } : {}) };
      if (salvage) await convertSalvaging(image, source, counted, bad, { ...read, ...(quiet ? {} : { warn: (s: string) => process.stderr.write(s) }) });
      else await convertToRaw(image, source, counted, read);
      progress?.end();
      return 0;
    });
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal).off('SIGHUP', onSignal);
  }
}
