import { stat } from 'node:fs/promises';
import {
  checkImage,
  convertToRaw,
  FileSource,
  imageInfo,
  InvalidArgumentError,
  isDiskconvError,
  openImage,
  parseFormat,
  RawFileSink,
  type FormatId,
  type QemuInfoJson,
  type SnapshotSelector,
} from '../engine/index.js';
import { parseArgs } from './args.js';
import { formatHumanInfo, formatHumanCheck } from './human.js';

const USAGE = `diskconv: convert qcow2, vmdk, vdi and raw disk images to raw

Usage:
  diskconv info [-f FMT] [--output=human|json] FILE
  diskconv convert [-f FMT] -O raw [-p] [-l snapshot.name=NAME|snapshot.id=ID] SRC DST
  diskconv check [-f FMT] [--output=human|json] FILE
  diskconv serve      run the HTTP API
  diskconv worker     run a conversion worker
  diskconv up         run API and worker (and a private redis-server when REDIS_URL is unset)

Formats: auto (default), qcow2, vmdk, vdi, raw.`;

type Output = 'human' | 'json';

function outputOf(value: string | undefined): Output {
  if (value === undefined || value === 'human') return 'human';
  if (value === 'json') return 'json';
  throw new InvalidArgumentError(`--output must be human or json, not '${value}'`);
}

function declaredFormat(value: string | undefined): FormatId | 'auto' {
  return value === undefined ? 'auto' : parseFormat(value);
}

/** `-l snapshot.name=NAME`, `-l snapshot.id=ID`, or qemu's bare `-l NAME_OR_ID`. */
export function parseSnapshot(value: string): SnapshotSelector {
  const parts = Object.fromEntries(
    value.split(',').map((kv) => {
      const eq = kv.indexOf('=');
      return eq < 0 ? ['', kv] : [kv.slice(0, eq), kv.slice(eq + 1)];
    }),
  ) as Record<string, string>;
  const name = parts['snapshot.name'];
  const id = parts['snapshot.id'];
  if (name !== undefined || id !== undefined) return { ...(name !== undefined ? { name } : {}), ...(id !== undefined ? { id } : {}) };
  if (parts[''] !== undefined) return { name: parts[''], id: parts[''] };
  throw new InvalidArgumentError(`-l expects snapshot.name=NAME or snapshot.id=ID, not '${value}'`);
}

async function withImage<T>(
  file: string,
  format: FormatId | 'auto',
  snapshot: SnapshotSelector | undefined,
  fn: (image: Awaited<ReturnType<typeof openImage>>, source: FileSource) => Promise<T>,
): Promise<T> {
  const source = await FileSource.open(file);
  try {
    const image = await openImage(source, { format, ...(snapshot ? { snapshot } : {}) });
    try {
      return await fn(image, source);
    } finally {
      await image.close();
    }
  } finally {
    await source.close();
  }
}

async function cmdInfo(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseArgs(argv, ['-f', '--output'], []);
  const file = singleFile(args.positionals);
  const output = outputOf(args.options.get('--output'));
  const info: QemuInfoJson = await withImage(file, declaredFormat(args.options.get('-f')), undefined, (img, src) => imageInfo(img, src));
  out(output === 'json' ? JSON.stringify(info, null, 4) : formatHumanInfo(info));
  return 0;
}

async function cmdCheck(argv: string[], out: (s: string) => void): Promise<number> {
  const args = parseArgs(argv, ['-f', '--output'], []);
  const file = singleFile(args.positionals);
  const output = outputOf(args.options.get('--output'));
  return withImage(file, declaredFormat(args.options.get('-f')), undefined, async (image) => {
    if (!image.check) {
      const msg = `This image format (${image.format}) does not support checks`;
      out(output === 'json' ? JSON.stringify({ filename: file, format: image.format, 'check-errors': 0, supported: false, message: msg }, null, 4) : msg);
      return 63;
    }
    const report = await checkImage(image);
    if (output === 'json') {
      out(
        JSON.stringify(
          {
            filename: file,
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

async function cmdConvert(argv: string[]): Promise<number> {
  const args = parseArgs(argv, ['-f', '-O', '-l', '--output'], ['-p', '-q']);
  if (args.positionals.length !== 2) throw new InvalidArgumentError('convert needs SRC and DST');
  const [src, dst] = args.positionals as [string, string];
  const target = args.options.get('-O') ?? 'raw';
  if (target !== 'raw') throw new InvalidArgumentError(`output format '${target}' is not supported; only -O raw`);
  const snap = args.options.get('-l');
  const showProgress = args.flags.has('-p') && !args.flags.has('-q') && process.stderr.isTTY === true;
  if ((await stat(dst).catch(() => undefined))?.isDirectory()) throw new InvalidArgumentError(`${dst} is a directory`);
  return withImage(src, declaredFormat(args.options.get('-f')), snap ? parseSnapshot(snap) : undefined, async (image, source) => {
    const sink = await RawFileSink.create(dst, { removeOnAbort: true });
    await convertToRaw(image, source, sink, {
      ...(showProgress
        ? { onProgress: (p) => process.stderr.write(`    (${((100 * p.bytesDone) / Math.max(1, p.bytesTotal)).toFixed(2)}/100%)\r`) }
        : {}),
    });
    if (showProgress) process.stderr.write('\n');
    return 0;
  });
}

function singleFile(positionals: string[]): string {
  if (positionals.length !== 1) throw new InvalidArgumentError('expected exactly one FILE');
  return positionals[0] as string;
}

export async function runCli(argv: string[], out: (s: string) => void = (s) => process.stdout.write(s + '\n')): Promise<number> {
  const [command, ...rest] = argv;
  const jsonErrors = rest.includes('--output=json') || rest.join(' ').includes('--output json');
  try {
    switch (command) {
      case 'info':
        return await cmdInfo(rest, out);
      case 'check':
        return await cmdCheck(rest, out);
      case 'convert':
        return await cmdConvert(rest);
      case 'serve':
      case 'worker':
      case 'up': {
        const { runService } = await import('./service.js');
        return await runService(command, rest);
      }
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        out(USAGE);
        return command === undefined ? 1 : 0;
      default:
        throw new InvalidArgumentError(`unknown command '${command}'; see diskconv --help`);
    }
  } catch (err) {
    const code = isDiskconvError(err) ? err.code : 'INTERNAL_ERROR';
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(jsonErrors ? JSON.stringify({ code, message }) + '\n' : `diskconv: ${code}: ${message}\n`);
    if (!isDiskconvError(err) && process.env.DISKCONV_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    return command === 'check' && isDiskconvError(err) && err.code === 'IMAGE_CORRUPT' ? 2 : 1;
  }
}
