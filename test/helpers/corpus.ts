/**
 * The shared real-world corpus (../shared/corpus beside the repository): its
 * manifest, sidecar files, and what the product must do with each image.
 * Corpus files are read in place and never copied into the repository; `.bz2`
 * images are decompressed into a temporary directory.
 */
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, readFileSync, readdirSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI } from './cli.js';

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CORPUS_ROOT = resolve(REPO_ROOT, '../shared/corpus');
export const corpusPresent = (): boolean => existsSync(join(CORPUS_ROOT, 'MANIFEST.tsv'));

export interface CorpusRow {
  /** Path relative to the corpus root, as listed (may end in .bz2). */
  file: string;
  format: string;
  subformat: string;
  qemuInfoOk: boolean;
  qemuConvertOk: boolean;
  virtualSize: number | undefined;
  note: string;
}

export function readManifest(): CorpusRow[] {
  const lines = readFileSync(join(CORPUS_ROOT, 'MANIFEST.tsv'), 'utf8').split('\n').filter((l) => l.trim() !== '');
  const header = (lines.shift() ?? '').split('\t');
  const col = (name: string): number => {
    const i = header.indexOf(name);
    if (i < 0) throw new Error(`MANIFEST.tsv has no column ${name}`);
    return i;
  };
  const [file, format, subformat, infoOk, convertOk, size, note] = ['file', 'format', 'subformat', 'qemu_info_ok', 'qemu_convert_ok', 'virtual_size', 'note'].map(col) as number[];
  return lines.map((line) => {
    const f = line.split('\t');
    const at = (i: number | undefined): string => f[i as number] ?? '';
    return {
      file: at(file),
      format: at(format),
      subformat: at(subformat),
      qemuInfoOk: at(infoOk) === 'yes',
      qemuConvertOk: at(convertOk) === 'yes',
      virtualSize: at(size) === '' ? undefined : Number(at(size)),
      note: at(note),
    };
  });
}

/** Formats qemu reads and we refuse by name. */
const FOREIGN_FORMATS = new Set(['parallels', 'bochs', 'dmg', 'cloop']);
/** Codes that mean "refused for a reason in the image"; anything else (INTERNAL_ERROR, a crash) is a bug. */
export const REFUSAL_CODES = ['IMAGE_CORRUPT', 'UNSAFE_IMAGE', 'UNSUPPORTED_FEATURE', 'LIMIT_EXCEEDED'] as const;

export type Expectation =
  /** Same bytes and info as qemu-img. */
  | { kind: 'same' }
  /** Refused with one of these codes. */
  | { kind: 'refuse'; codes: readonly string[]; why: string };

export function expectationFor(row: CorpusRow): Expectation {
  if (FOREIGN_FORMATS.has(row.format)) return { kind: 'refuse', codes: ['UNSUPPORTED_FORMAT'], why: `${row.format} is not a supported format` };
  // A vmdk descriptor naming extent files: we never open a file named inside an image, even where qemu does.
  if (row.format === 'vmdk' && /twoGbMaxExtent|monolithicFlat|vmfs|descriptor/i.test(row.subformat)) {
    return { kind: 'refuse', codes: ['UNSAFE_IMAGE'], why: 'vmdk naming other extent files' };
  }
  if (row.format === 'vdi' && /differencing|snapshot/i.test(row.subformat)) return { kind: 'refuse', codes: ['UNSAFE_IMAGE'], why: 'VDI differencing image' };
  if (!row.qemuConvertOk) return { kind: 'refuse', codes: REFUSAL_CODES, why: 'qemu-img refuses it' };
  // qemu reads a differencing VHD/VHDX without its parent (its output lacks the parent's data); we never open the parent.
  if ((row.format === 'vpc' || row.format === 'vhdx') && /differencing/i.test(row.subformat)) {
    return { kind: 'refuse', codes: ['UNSAFE_IMAGE'], why: `${row.format} differencing image, parent never opened` };
  }
  if (['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx', 'raw'].includes(row.format)) return { kind: 'same' };
  throw new Error(`${row.file}: no expectation for format ${row.format}`);
}

/** The image path relative to the directory we run in, and that directory. */
export interface Located {
  cwd: string;
  relPath: string;
  /** Sidecar files (`NAME.info.json`, ...) live beside the image in the corpus, named without `.bz2`. */
  sidecarBase: string;
}

export const isCompressed = (row: CorpusRow): boolean => row.file.endsWith('.bz2');

/**
 * Where to find the image: corpus files are used in place (run from the corpus
 * root with the manifest's relative path, as the sidecars were made, so paths
 * that qemu prints inside info match); `.bz2` ones from `tempRoot`.
 */
export function locate(row: CorpusRow, tempRoot: string): Located {
  const relPath = row.file.replace(/\.bz2$/, '');
  return { cwd: isCompressed(row) ? tempRoot : CORPUS_ROOT, relPath, sidecarBase: join(CORPUS_ROOT, relPath) };
}

/** Decompresses a `.bz2` corpus image into tempRoot with the `bzip2` command. */
export async function decompress(row: CorpusRow, tempRoot: string): Promise<void> {
  const target = join(tempRoot, row.file.replace(/\.bz2$/, ''));
  await mkdir(dirname(target), { recursive: true });
  const child = spawn('bzip2', ['-dc', join(CORPUS_ROOT, row.file)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // Listen for the exit before piping: the output may finish first, and waiting
  // for events in sequence would then wait forever.
  const exited = new Promise<number | null>((done, fail) => {
    child.on('error', (err) => fail(new Error(`cannot run bzip2 (install it: apt-get install bzip2): ${err.message}`)));
    child.on('close', done);
  });
  await pipeline(child.stdout, createWriteStream(target));
  const code = await exited;
  if (code !== 0) throw new Error(`bzip2 -dc ${row.file} failed (${code}): ${stderr}`);
}

/** The sidecar with qemu's raw sha256: the whole disk, or its first 64 MiB for images over 2 GiB. */
export function rawShaSidecar(located: Located): { path: string; bytes: number | undefined } | undefined {
  const whole = `${located.sidecarBase}.raw.sha256`;
  if (existsSync(whole)) return { path: whole, bytes: undefined };
  const dir = dirname(located.sidecarBase);
  const prefix = `${basename(located.sidecarBase)}.raw-first64M`;
  const partial = readdirSync(dir).find((n) => n.startsWith(prefix) && n.endsWith('.sha256'));
  return partial ? { path: join(dir, partial), bytes: 64 * 2 ** 20 } : undefined;
}

export function readSha256Sidecar(path: string): string {
  const hash = readFileSync(path, 'utf8').trim().split(/\s+/)[0] ?? '';
  if (!/^[0-9a-f]{64}$/.test(hash)) throw new Error(`${path} holds no sha256`);
  return hash;
}

/** sha256 of a file, or of its first `bytes` bytes. */
export async function sha256Of(path: string, bytes?: number): Promise<string> {
  const hash = createHash('sha256');
  const chunk = { highWaterMark: 4 * 2 ** 20 };
  const stream = createReadStream(path, bytes === undefined ? chunk : { ...chunk, start: 0, end: bytes - 1 });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Heap cap for the CLI under test: a hostile image must not make us grow with a size it claims. */
export const CLI_HEAP_MB = 256;

/** Runs the built CLI in `cwd` with a capped heap and a time limit. */
export function runDiskconvIn(cwd: string, args: string[], timeoutMs: number): Promise<{ code: number; stdout: string; stderr: string; timedOut: boolean }> {
  return new Promise((done) => {
    execFile(
      process.execPath,
      [`--max-old-space-size=${CLI_HEAP_MB}`, CLI, ...args],
      { cwd, maxBuffer: 16 * 2 ** 20, timeout: timeoutMs, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        const timedOut = err !== null && (err as { killed?: boolean }).killed === true;
        const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
        done({ code, stdout, stderr, timedOut });
      },
    );
  });
}
