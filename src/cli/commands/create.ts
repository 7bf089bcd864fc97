/** `diskconv create -f raw FILE SIZE`: a sparse raw file (or a check that a device is large enough), as qemu-img create. */
import { UnsupportedFormatError } from '../../engine/errors.js';
import { type CommandSpec, parseOrHelp, UsageError } from '../args.js';
import { DestinationSink } from '../destination.js';
import { accumulateOptions, hasHelpOption, parseRawCreateOptions, preallocationOf, RAW_OPTIONS_HELP_WITH_FILE, type RawCreateOptions } from '../create-options.js';
import { parseSize, SIZE_HINT } from '../size.js';

/** The text of the last `key=` in an option list, as qemu-img prints it back (`nocow=yes`); a bare key is on, `noKEY` off. */
function lastValue(list: string, key: string): string {
  let value = 'on';
  for (const kv of list.split(',')) {
    if (kv === key) value = 'on';
    else if (kv === `no${key}`) value = 'off';
    else if (kv.startsWith(`${key}=`)) value = kv.slice(key.length + 1);
  }
  return value;
}

export const spec: CommandSpec = {
  name: 'create',
  operands: 'FILE [SIZE]',
  summary: 'Create a raw image of SIZE bytes (k, M, G, T, P, E suffixes): a sparse file, as qemu-img create -f raw.',
  minOperands: 1,
  maxOperands: 2,
  options: [
    { key: 'format', short: 'f', value: 'raw', help: 'image format; only raw' },
    { key: 'options', short: 'o', value: 'OPTIONS', repeatable: true, help: 'size=SIZE, preallocation=off|falloc|full, nocow=on|off, extent_size_hint=SIZE (accepted, no effect); help lists them' },
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
  let opts: RawCreateOptions = {};
  const list = accumulateOptions(args.all('options'));
  if (list !== undefined && hasHelpOption(list)) {
    out(RAW_OPTIONS_HELP_WITH_FILE);
    return 0;
  }
  if (list !== undefined) opts = parseRawCreateOptions(list, `${file}: `);
  if (opts.size !== undefined && sizeText !== undefined) throw new UsageError(`${file}: The image size must be specified only once`);
  let size: number;
  if (sizeText === undefined) {
    if (opts.size === undefined) throw new UsageError(`${file}: Image creation needs a size parameter`);
    size = opts.size;
  } else {
    try {
      size = parseSize(sizeText, 'image size');
    } catch (err) {
      if (err instanceof UsageError && !err.message.includes('Must be')) throw new UsageError(`Invalid image size specified. ${SIZE_HINT}`);
      throw err;
    }
  }
  // The line lists the options given, in qemu's order (size, nocow, preallocation, extent_size_hint), before the file driver checks them.
  const given = list ?? '';
  const shown = [
    `size=${size}`,
    ...(opts.nocow !== undefined ? [`nocow=${lastValue(given, 'nocow')}`] : []),
    ...(opts.preallocation !== undefined ? [`preallocation=${opts.preallocation}`] : []),
    ...(opts.extentSizeHint !== undefined ? [`extent_size_hint=${opts.extentSizeHint}`] : []),
  ];
  if (!args.has('quiet')) out(`Formatting '${file}', fmt=raw ${shown.join(' ')}`);
  const prealloc = preallocationOf(opts, `${file}: `);
  const full = prealloc !== 'off';
  // qemu rounds a raw image up to whole 512-byte sectors.
  const fileSize = Math.ceil(size / 512) * 512;
  const sink = await DestinationSink.open({ path: file, virtualSize: fileSize, allocatedBytes: full ? fileSize : 0, sparseBlock: full ? 0 : 4096 });
  if (sink.kind === 'block-device' || sink.kind === 'char-device') {
    // qemu-img create on a device only checks its size; nothing is written.
    await sink.abort();
    return 0;
  }
  try {
    if (full && fileSize > 0) await sink.write({ kind: 'zero', offset: 0, length: fileSize });
    await sink.finish(fileSize);
  } catch (err) {
    await sink.abort();
    throw err;
  }
  return 0;
}
