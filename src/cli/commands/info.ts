/** `diskconv info`: qemu-img info, human or JSON. */
import { imageInfo } from '../../engine/index.js';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, PASSPHRASE_OPTION } from '../args.js';
import { formatHumanInfo, formatJsonInfo } from '../human.js';
import { declaredFormat, passphraseFile, withImage } from '../image.js';

export const spec: CommandSpec = {
  name: 'info',
  operands: 'FILE',
  summary: "Show an image's metadata as qemu-img info does (same fields, same JSON keys). Reads metadata only.",
  minOperands: 1,
  maxOperands: 1,
  options: [FORMAT_OPTION, OUTPUT_OPTION, PASSPHRASE_OPTION, DISK_OPTION, FORCE_SHARE_OPTION],
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const file = args.operands[0] as string;
  const output = outputOf(args.get('output'));
  // Metadata only: an image with a backing file shows it; nothing it names is opened.
  const info = await withImage(file, { format: declaredFormat(args.get('format')), metadataOnly: true, ...passphraseFile(args) }, (img, src) => imageInfo(img, src));
  out(output === 'json' ? formatJsonInfo(info) : formatHumanInfo(info));
  return 0;
}
