/** `diskconv create -f raw FILE SIZE`: a sparse raw file (or a check that a device is large enough), as qemu-img create. */
import { UnsupportedFormatError } from '../../engine/index.js';
import { type CommandSpec, parseOrHelp, UsageError } from '../args.js';
import { DestinationSink } from '../destination.js';
import { parseSize, SIZE_HINT } from '../size.js';

export const spec: CommandSpec = {
  name: 'create',
  operands: 'FILE [SIZE]',
  summary: 'Create a raw image of SIZE bytes (k, M, G, T, P, E suffixes): a sparse file, as qemu-img create -f raw.',
  minOperands: 1,
  maxOperands: 2,
  options: [
    { key: 'format', short: 'f', value: 'raw', help: 'image format; only raw' },
    { key: 'options', short: 'o', value: 'OPTIONS', repeatable: true, help: 'size=SIZE, preallocation=off|full' },
    { key: 'quiet', short: 'q', help: "quiet: no 'Formatting' line" },
  ],
  notes: 'An existing FILE is replaced only once the new one is complete (written beside it, then renamed); a block device is only checked to be large enough.',
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const format = args.get('format') ?? 'raw';
  if (format !== 'raw') throw new UnsupportedFormatError(`creating '${format}' images is not supported; only -f raw`);
  const [file, sizeText] = args.operands as [string, string | undefined];
  const opts = new Map<string, string>();
  for (const group of args.all('options')) {
    for (const kv of group.split(',')) {
      if (kv === '') continue;
      const eq = kv.indexOf('=');
      const key = eq < 0 ? kv : kv.slice(0, eq);
      if (key !== 'size' && key !== 'preallocation') throw new UsageError(`${file}: Invalid parameter '${key}'`);
      opts.set(key, eq < 0 ? '' : kv.slice(eq + 1));
    }
  }
  if (opts.has('size') && sizeText !== undefined) throw new UsageError(`${file}: The image size must be specified only once`);
  const text = sizeText ?? opts.get('size');
  if (text === undefined) throw new UsageError(`${file}: Image creation needs a size parameter`);
  let size: number;
  try {
    size = parseSize(text, 'image size');
  } catch (err) {
    if (err instanceof UsageError && !err.message.includes('Must be')) throw new UsageError(`Invalid image size specified. ${SIZE_HINT}`);
    throw err;
  }
  const prealloc = opts.get('preallocation') ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'full') throw new UsageError(`${file}: invalid parameter value: ${prealloc} (diskconv supports preallocation=off and full)`);
  if (!args.has('quiet')) out(`Formatting '${file}', fmt=raw size=${size}${opts.has('preallocation') ? ` preallocation=${prealloc}` : ''}`);
  // qemu rounds a raw image up to whole 512-byte sectors.
  const fileSize = Math.ceil(size / 512) * 512;
  const sink = await DestinationSink.open({ path: file, virtualSize: fileSize, allocatedBytes: prealloc === 'full' ? fileSize : 0, sparseBlock: prealloc === 'full' ? 0 : 4096 });
  if (sink.kind === 'block-device' || sink.kind === 'char-device') {
    // qemu-img create on a device only checks its size; nothing is written.
    await sink.abort();
    return 0;
  }
  try {
    if (prealloc === 'full' && fileSize > 0) await sink.write({ kind: 'zero', offset: 0, length: fileSize });
    await sink.finish(fileSize);
  } catch (err) {
    await sink.abort();
    throw err;
  }
  return 0;
}
