/** `diskconv info`: qemu-img info, human or JSON. */
import { imageInfo } from '../../engine/open.js';
import { UnsafeImageError } from '../../engine/errors.js';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, PASSPHRASE_OPTION } from '../args.js';
import { formatHumanInfo, formatJsonInfo, qemuJson, qemuOrder } from '../human.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';

export const spec: CommandSpec = {
  name: 'info',
  operands: 'FILE',
  summary: "Show an image's metadata as qemu-img info does (same fields, same JSON keys). Reads metadata only.",
  minOperands: 1,
  maxOperands: 1,
  options: [
    FORMAT_OPTION,
    OUTPUT_OPTION,
    { key: 'backing-chain', long: 'backing-chain', help: "the image's backing chain (JSON: a list); refused for an image that has a backing file, which is never opened" },
    PASSPHRASE_OPTION,
    DISK_OPTION,
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const file = args.operands[0] as string;
  const output = outputOf(args.get('output'));
  // Metadata only: an image with a backing file shows it; nothing it names is opened.
  const opened = await sourceOf(args, file);
  const info = await withImage(opened.path, { ...opened.options, metadataOnly: true }, (img, src) => imageInfo(img, src));
  const chain = args.has('backing-chain');
  if (chain && info['backing-filename'] !== undefined) {
    throw new UnsafeImageError(
      `--backing-chain would open the backing file "${info['backing-filename']}" that ${file} names; diskconv never opens a path named inside an image (info without --backing-chain shows the name)`,
    );
  }
  // A chain of one image: the same human text, and qemu-img's JSON list of one.
  out(output === 'json' ? (chain ? qemuJson([qemuOrder(info)]) : formatJsonInfo(info)) : formatHumanInfo(info));
  return 0;
}
