/** `diskconv check`: qemu-img check's report and exit codes. */
import { checkImage } from '../../engine/open.js';
import { InvalidArgumentError, UnsupportedFeatureError } from '../../engine/errors.js';
import { CACHE_MODES } from '../destination.js';
import { withExitStatus } from '../errors.js';
import { type CommandSpec, DISK_OPTION, FORCE_SHARE_OPTION, FORMAT_OPTION, OUTPUT_OPTION, outputOf, parseOrHelp, PASSPHRASE_OPTION, UsageError } from '../args.js';
import { formatHumanCheck, formatJsonCheck } from '../human.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';

export const spec: CommandSpec = {
  name: 'check',
  operands: 'FILE',
  summary: "Check an image's metadata. Exit status as qemu-img check: 0 clean, 1 check error, 2 corruptions, 3 leaks, 63 no checks for the format.",
  minOperands: 1,
  maxOperands: 1,
  options: [
    FORMAT_OPTION,
    OUTPUT_OPTION,
    { key: 'quiet', short: 'q', help: 'quiet: print nothing on stdout; the exit status tells' },
    { key: 'repair', short: 'r', value: 'leaks|all', help: 'repair: refused (diskconv never changes an image)' },
    { key: 'src-cache', short: 'T', value: 'CACHE', help: 'source cache mode (accepted; the image is only read)' },
    PASSPHRASE_OPTION,
    DISK_OPTION,
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
  notes: 'Human output as qemu-img check: findings (ERROR ..., Leaked cluster ...) on stderr, the summary on stdout.',
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const file = args.operands[0] as string;
  const output = outputOf(args.get('output'));
  const repair = args.get('repair');
  if (repair !== undefined) {
    if (repair !== 'leaks' && repair !== 'all') throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${repair}`, 'check');
    throw new InvalidArgumentError(`-r ${repair} would repair (write) the image; diskconv never changes an image (check without -r reports)`);
  }
  const cache = args.get('src-cache');
  if (cache !== undefined && !(CACHE_MODES as readonly string[]).includes(cache)) throw new UsageError(`Invalid source cache option: ${cache}`, 'check');
  const quiet = args.has('quiet');
  const opened = await sourceOf(args, file);
  return withImage(opened.path, opened.options, async (image) => {
    // qemu-img: an error on stderr (nothing on stdout, JSON or not), exit 63.
    if (!image.check) throw withExitStatus(new UnsupportedFeatureError(`This image format does not support checks (${image.format})`), 63);
    const report = await checkImage(image);
    // As qemu-img, human or JSON: the drivers' findings on stderr, the report on stdout (JSON: qemu's keys in its order).
    for (const m of report.messages) process.stderr.write(`${m}\n`);
    if (output === 'json') out(formatJsonCheck(opened.options.displayName ?? file, image.format, report));
    else if (!quiet) out(formatHumanCheck(report));
    if (report.checkErrors > 0) return 1;
    if (report.corruptions > 0) return 2;
    if (report.leaks > 0) return 3;
    return 0;
  });
}
