/** `diskconv check`: qemu-img check's report and exit codes. */
import { checkImage } from '../../engine/index.js';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, PASSPHRASE_OPTION } from '../args.js';
import { formatHumanCheck } from '../human.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';

export const spec: CommandSpec = {
  name: 'check',
  operands: 'FILE',
  summary: "Check an image's metadata. Exit status as qemu-img check: 0 clean, 1 check error, 2 corruptions, 3 leaks, 63 no checks for the format.",
  minOperands: 1,
  maxOperands: 1,
  options: [FORMAT_OPTION, OUTPUT_OPTION, PASSPHRASE_OPTION, DISK_OPTION, FORCE_SHARE_OPTION, OBJECT_OPTION, IMAGE_OPTS_OPTION],
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const file = args.operands[0] as string;
  const output = outputOf(args.get('output'));
  const opened = await sourceOf(args, file);
  return withImage(opened.path, opened.options, async (image) => {
    if (!image.check) {
      const msg = `This image format (${image.format}) does not support checks`;
      out(output === 'json' ? JSON.stringify({ filename: opened.options.displayName ?? file, format: image.format, 'check-errors': 0, supported: false, message: msg }, null, 4) : msg);
      return 63;
    }
    const report = await checkImage(image);
    if (output === 'json') {
      out(
        JSON.stringify(
          {
            filename: opened.options.displayName ?? file,
            format: image.format,
            'check-errors': report.checkErrors,
            ...(report.corruptions ? { corruptions: report.corruptions } : {}),
            ...(report.leaks ? { leaks: report.leaks } : {}),
            ...report.fields,
            ...(report.messages.length ? { messages: report.messages } : {}),
          },
          null,
          4,
        ),
      );
    } else {
      out(formatHumanCheck(report));
    }
    if (report.checkErrors > 0) return 1;
    if (report.corruptions > 0) return 2;
    if (report.leaks > 0) return 3;
    return 0;
  });
}
