/**
 * `diskconv convert`: qemu-img convert -O raw, with qemu-img's flags and their
 * meaning, written through the never-destroy destination rules (destination.ts).
 */
import { convertToRaw, InvalidArgumentError, type Extent, type ExtentSink } from '../../engine/index.js';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, parseOrHelp, PASSPHRASE_OPTION, UsageError } from '../args.js';
import { CACHE_MODES, DestinationSink, refuseSameFile, type CacheMode } from '../destination.js';
import { dataBytesOf, declaredFormat, parseSnapshot, passphraseFile, withImage } from '../image.js';
import { ProgressPrinter } from '../progress.js';
import { parseSize } from '../size.js';

export const spec: CommandSpec = {
  name: 'convert',
  operands: 'SRC DST',
  summary: 'Convert SRC to a raw image at DST, byte-identical to qemu-img convert -O raw.',
  minOperands: 2,
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
    { key: 'copy-offload', short: 'C', help: 'copy offloading (accepted; the output is the same)' },
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
  ) {}
  async write(extent: Extent): Promise<void> {
    const counted = extent.kind === 'data' || this.countZeros;
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
    }
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

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const [src, dst] = args.operands as [string, string];
  const target = args.get('target') ?? 'raw';
  if (target !== 'raw') throw new InvalidArgumentError(`output format '${target}' is not supported; only -O raw`);
  const noCreate = args.has('no-create');
  const targetIsZero = args.has('target-is-zero');
  if (targetIsZero && !noCreate) throw new UsageError('--target-is-zero requires use of -n flag');
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
  const progress = args.has('progress') && !args.has('quiet') ? new ProgressPrinter((s) => process.stdout.write(s)) : undefined;

  // Refused before the source is even parsed: nothing about the image can make SRC = DST safe.
  await refuseSameFile(src, dst);
  const abort = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => abort.abort(new InvalidArgumentError(`interrupted by ${sig}`));
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal).once('SIGHUP', onSignal);
  try {
    return await withImage(src, { format: declaredFormat(args.get('format')), ...passphraseFile(args), ...(snap ? { snapshot: parseSnapshot(snap) } : {}), signal: abort.signal }, async (image, source) => {
      const data = await dataBytesOf(image, abort.signal);
      const sink = await DestinationSink.open({
        path: dst,
        sourcePath: src,
        virtualSize: image.virtualSize,
        allocatedBytes: data,
        noCreate,
        targetIsZero,
        sparseBlock,
        ...(cache ? { cache } : {}),
      });
      const total = sparseBlock === 0 ? image.virtualSize : data;
      progress?.start();
      const piece = progress ? Math.max(64 * 1024, Math.floor(total / 400)) : Number.MAX_SAFE_INTEGER;
      const counted = new CountingSink(sink, sparseBlock === 0, piece, (done) => progress?.update(total === 0 ? 100 : (100 * done) / total));
      await convertToRaw(image, source, counted, { signal: abort.signal, ...(readConcurrency ? { readConcurrency } : {}) });
      progress?.end();
      return 0;
    });
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal).off('SIGHUP', onSignal);
  }
}
