/** `diskconv measure -O raw`: the size a raw output needs, as qemu-img measure prints it. */
import { InvalidArgumentError } from '../../engine/errors.js';
import { type CommandSpec, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, UsageError } from '../args.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { parseSnapshot, sourceOf, withImage } from '../image.js';
import { parseSize, SIZE_HINT } from '../size.js';

export const spec: CommandSpec = {
  name: 'measure',
  operands: '[FILE]',
  summary: 'Print the size a raw image of FILE (or of --size SIZE) needs: required and fully allocated, as qemu-img measure.',
  minOperands: 0,
  maxOperands: 1,
  options: [
    FORMAT_OPTION,
    { key: 'target', short: 'O', value: 'raw', help: 'output format; only raw (the default)' },
    { key: 'size', long: 'size', value: 'SIZE', help: 'measure a new image of SIZE bytes instead of FILE' },
    { key: 'snapshot', short: 'l', value: 'SNAPSHOT', help: 'measure an internal snapshot' },
    OUTPUT_OPTION,
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const output = outputOf(args.get('output'));
  const target = args.get('target') ?? 'raw';
  if (target !== 'raw') throw new InvalidArgumentError(`output format '${target}' is not supported; only -O raw`);
  const sizeText = args.get('size');
  const file = args.operands[0];
  if (sizeText !== undefined && file !== undefined) throw new UsageError('--size N cannot be used together with a filename.', 'measure');
  if (sizeText === undefined && file === undefined) throw new UsageError('Either --size N or one filename must be specified.', 'measure');
  let virtualSize: number;
  if (sizeText !== undefined) {
    try {
      virtualSize = parseSize(sizeText, 'image size');
    } catch (err) {
      if (err instanceof UsageError && !err.message.includes('Must be')) throw new UsageError(`Invalid image size specified. ${SIZE_HINT}`);
      throw err;
    }
  } else {
    const snap = args.get('snapshot');
    const opened = await sourceOf(args, file as string);
    virtualSize = await withImage(opened.path, { ...opened.options, ...(snap ? { snapshot: parseSnapshot(snap) } : {}) }, async (image) => image.virtualSize);
  }
  // A raw image is as large as its virtual size, in whole 512-byte sectors, sparse or not.
  const required = Math.ceil(virtualSize / 512) * 512;
  out(output === 'json' ? JSON.stringify({ required, 'fully-allocated': required }, null, 4) : `required size: ${required}\nfully allocated size: ${required}`);
  return 0;
}
