/**
 * qemu-img's way to give an encrypted image its key: `--object secret,...`
 * defines a secret, `--image-opts` makes the image operand an option string
 * that names it:
 *
 *   --object secret,id=sec0,file=pass.txt \
 *   --image-opts driver=qcow2,file.filename=disk.qcow2,encrypt.key-secret=sec0
 *
 * Secrets: `id` and exactly one of `file` (the file's bytes, exactly, read when
 * the object is defined, as qemu reads them) or `data` (the text itself), with
 * `format=raw` (default) or `base64`. Encrypted secrets (`keyid`, `iv`) and
 * other object types are refused. Image options: `driver` (the format, or `file`
 * for a raw file), `file.filename` (or `filename` with driver=file),
 * `file.driver=file`, `encrypt.key-secret`; anything else is refused, as qemu
 * refuses an option its block driver does not know. Errors carry qemu's words.
 */
import { readFile } from 'node:fs/promises';
import { InvalidArgumentError } from '../engine/errors.js';
import { parseFormat } from '../engine/open.js';
import type { FormatId } from '../engine/types.js';
import type { OptionSpec } from './args.js';
import { optionPairs } from './qemu-opts.js';

export const OBJECT_OPTION: OptionSpec = {
  key: 'object',
  long: 'object',
  value: 'OBJECTDEF',
  repeatable: true,
  help: 'secret,id=ID,file=FILE or secret,id=ID,data=TEXT[,format=raw|base64]: a key for --image-opts encrypt.key-secret=ID',
};
export const IMAGE_OPTS_OPTION: OptionSpec = {
  key: 'image-opts',
  long: 'image-opts',
  help: 'the image operand is an option string: driver=FMT,file.filename=PATH[,encrypt.key-secret=ID]',
};

export type Secrets = ReadonlyMap<string, Uint8Array>;

const fail = (message: string): never => {
  throw new InvalidArgumentError(message);
};

async function secretBytes(fields: Map<string, string>): Promise<Uint8Array> {
  const file = fields.get('file');
  const data = fields.get('data');
  if (file !== undefined && data !== undefined) fail("'file' and 'data' are mutually exclusive");
  if (file === undefined && data === undefined) fail("Either 'file' or 'data' must be provided");
  let bytes: Buffer;
  if (file !== undefined) {
    try {
      bytes = await readFile(file);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      throw new InvalidArgumentError(`Unable to read ${file}: Failed to open file “${file}”: ${e.code === 'ENOENT' ? 'No such file or directory' : e.code === 'EACCES' ? 'Permission denied' : e.message}`);
    }
  } else bytes = Buffer.from(data as string, 'utf8');
  const format = fields.get('format') ?? 'raw';
  if (format === 'base64') {
    const text = bytes.toString('latin1');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 === 1) fail('Base64 data contains invalid characters');
    bytes = Buffer.from(text, 'base64');
  } else if (format !== 'raw') fail(`Parameter 'format' does not accept value '${format}'`);
  return bytes;
}

/** Every `--object`, in order: the secrets by id. */
export async function parseObjects(defs: readonly string[]): Promise<Secrets> {
  const secrets = new Map<string, Uint8Array>();
  for (const def of defs) {
    // The first element without '=' is the object type (qemu's implied qom-type).
    const comma = def.indexOf(',');
    const head = comma < 0 ? def : def.slice(0, comma);
    const rest = comma < 0 ? '' : def.slice(comma + 1);
    const pairs = head.includes('=') ? optionPairs(def) : [['qom-type', head] as [string, string], ...(rest ? optionPairs(rest) : [])];
    const fields = new Map(pairs);
    const type = fields.get('qom-type');
    if (type === undefined) fail("Parameter 'qom-type' is missing");
    if (type !== 'secret') fail(`Parameter 'qom-type' does not accept value '${type}' (diskconv knows only secret objects)`);
    for (const key of fields.keys()) {
      if (key === 'keyid' || key === 'iv') fail(`Parameter '${key}': encrypted secrets are not supported by diskconv; give the passphrase itself (file= or data=)`);
      if (!['qom-type', 'id', 'file', 'data', 'format'].includes(key)) fail(`Parameter '${key}' is unexpected`);
    }
    const id = fields.get('id') ?? fail("Parameter 'id' is missing");
    if (secrets.has(id)) fail(`attempt to add duplicate property '${id}' to object (type 'container')`);
    secrets.set(id, await secretBytes(fields));
  }
  return secrets;
}

export interface ImageSpec {
  path: string;
  format: FormatId | 'auto';
  passphrase?: Uint8Array;
  /** What info shows as the image's name: qemu's `json:{...}` when a key-secret is among the options. */
  displayName: string;
}

/** A JSON string as qemu's QDict printer writes one (its escapes). */
const q = (s: string): string => JSON.stringify(s);

/** The `--image-opts` operand: where the file is, its format, its key. */
export function parseImageOpts(operand: string, secrets: Secrets): ImageSpec {
  const fields = new Map(optionPairs(operand));
  const driver = fields.get('driver');
  const couldNot = (why: string): never => fail(`Could not open '${operand}': ${why}`);
  for (const key of fields.keys()) {
    if (['driver', 'file.filename', 'file.driver', 'encrypt.key-secret'].includes(key)) continue;
    // qemu takes `filename` for any driver; only the file driver reads it as the path (a format then lacks its "file").
    if (key === 'filename') continue;
    couldNot(driver === undefined ? `Cannot find device='${key}' nor node-name='${key}'` : `Block format '${driver}' does not support the option '${key}'`);
  }
  const fileDriver = fields.get('file.driver');
  if (fileDriver !== undefined && fileDriver !== 'file') couldNot(`diskconv reads local files only (file.driver=${fileDriver})`);
  const path = driver === 'file' ? (fields.get('filename') ?? fields.get('file.filename')) : fields.get('file.filename');
  if (path === undefined) couldNot('A block device must be specified for "file"');
  let format: FormatId | 'auto' = 'auto';
  if (driver !== undefined && driver !== 'file') {
    try {
      format = parseFormat(driver);
    } catch {
      couldNot(`Unknown driver '${driver}'`);
    }
  } else if (driver === 'file') format = 'raw';
  const secretId = fields.get('encrypt.key-secret');
  let passphrase: Uint8Array | undefined;
  if (secretId !== undefined) {
    if (format !== 'qcow2' && format !== 'auto') couldNot(`Block format '${driver}' does not support the option 'encrypt.key-secret'`);
    passphrase = secrets.get(secretId) ?? couldNot(`No secret with id '${secretId}'`);
  }
  const displayName =
    secretId === undefined
      ? (path as string)
      : `json:{"encrypt.key-secret": ${q(secretId)}, ${driver !== undefined ? `"driver": ${q(driver)}, ` : ''}"file": {"driver": "file", "filename": ${q(path as string)}}}`;
  return { path: path as string, format, ...(passphrase ? { passphrase } : {}), displayName };
}
