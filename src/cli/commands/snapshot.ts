/**
 * `diskconv snapshot -l FILE`: qemu-img snapshot -l, the internal snapshots of
 * an image (qcow2), listed as qemu-img lists them; nothing for an image without
 * any or a format without snapshots. Reads metadata only. `-a`, `-c` and `-d`
 * change the image, which diskconv never does: they are refused.
 */
import { InvalidArgumentError } from '../../engine/errors.js';
import { type CommandSpec, FORCE_SHARE_OPTION, FORMAT_OPTION, parseOrHelp, UsageError } from '../args.js';
import { snapshotTable } from '../human.js';
import { IMAGE_OPTS_OPTION, OBJECT_OPTION } from '../image-opts.js';
import { sourceOf, withImage } from '../image.js';

export const spec: CommandSpec = {
  name: 'snapshot',
  operands: 'FILE',
  summary: "List an image's internal snapshots (-l), as qemu-img snapshot -l. Reads metadata only; -a, -c, -d are refused (diskconv never changes an image).",
  minOperands: 1,
  maxOperands: 1,
  options: [
    { key: 'list', short: 'l', help: 'list the snapshots' },
    { key: 'apply', short: 'a', value: 'SNAPSHOT', help: 'revert to SNAPSHOT: refused (changes the image)' },
    { key: 'create', short: 'c', value: 'SNAPSHOT', help: 'create SNAPSHOT: refused (changes the image)' },
    { key: 'delete', short: 'd', value: 'SNAPSHOT', help: 'delete SNAPSHOT: refused (changes the image)' },
    FORMAT_OPTION,
    { key: 'quiet', short: 'q', help: 'quiet (accepted; -l prints the list)' },
    FORCE_SHARE_OPTION,
    OBJECT_OPTION,
    IMAGE_OPTS_OPTION,
  ],
};

export async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseOrHelp(spec, argv, out);
  if (!args) return 0;
  const actions = ['list', 'apply', 'create', 'delete'].filter((k) => args.has(k));
  if (actions.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'", 'snapshot');
  if (actions.length === 0) throw new UsageError('snapshot needs -l (list); diskconv never changes an image', 'snapshot');
  if (actions[0] !== 'list') throw new InvalidArgumentError(`snapshot -${(actions[0] as string)[0]} would change the image; diskconv only reads images (snapshot -l lists them)`);
  const opened = await sourceOf(args, args.operands[0] as string);
  const snapshots = await withImage(opened.path, { ...opened.options, metadataOnly: true }, async (image) => image.info().snapshots ?? []);
  if (snapshots.length > 0) out(snapshotTable(snapshots).join('\n'));
  return 0;
}
