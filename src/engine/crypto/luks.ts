/**
 * LUKS1 headers as qemu writes them inside qcow2 (the crypto header extension)
 * and unlocks them (crypto/block-luks.c, LUKS on-disk format 1.2.1): the header
 * and its eight key slots are validated as qemu validates them, a passphrase
 * unlocks a slot (PBKDF2, decrypt the split key material, AF-merge) and the
 * master key is checked against the header's digest.
 *
 * Hostile headers cannot make us spin: the PBKDF2 iterations of one unlock are
 * bounded in total (Limits.maxPbkdf2Iterations), stripes must be qemu's 4000,
 * key sizes are those of real ciphers, and every slot lies inside the header region.
 */
import { promisify } from 'node:util';
import { nodeCrypto } from './node-crypto.js';
import { ImageCorruptError, UnsupportedFeatureError, WrongPassphraseError, throwIfAborted } from '../errors.js';
import { enforceLimit, type Limits } from '../limits.js';
import { assertSupportedCipher, createSectorCipher, CRYPT_SECTOR, type CipherMode, type IvGenAlg, type SectorCipher } from './sector-cipher.js';

const pbkdf2Async = (...args: Parameters<typeof import('node:crypto').pbkdf2Sync>): Promise<Buffer> => promisify(nodeCrypto().pbkdf2)(...args);

export const LUKS_HEADER_BYTES = 592;
const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const NUM_KEY_SLOTS = 8;
const STRIPES = 4000;
const DIGEST_LEN = 20;
const SLOT_ENABLED = 0x00ac71f3;
const SLOT_DISABLED = 0x0000dead;
/** qemu: the key slots start at 4096 bytes, after the header's sectors. */
const HEADER_SECTORS = 4096 / CRYPT_SECTOR;

/** Key sizes (bytes) per cipher family, as qemu's qcrypto_block_luks_cipher_name_lookup. */
const CIPHER_KEY_SIZES: Record<string, readonly number[]> = {
  aes: [16, 24, 32],
  cast5: [16],
  serpent: [16, 24, 32],
  twofish: [16, 24, 32],
};
const HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'];

export interface LuksSlot {
  active: boolean;
  iterations: number;
  salt: Uint8Array;
  keyOffsetSector: number;
  stripes: number;
}

export interface LuksHeader {
  /** qemu's names: aes-256, twofish-128, ... */
  cipherAlg: string;
  cipherMode: CipherMode;
  ivgenAlg: IvGenAlg;
  ivgenHashAlg?: string;
  hashAlg: string;
  payloadOffsetSector: number;
  masterKeyBytes: number;
  mkDigest: Uint8Array;
  mkDigestSalt: Uint8Array;
  mkDigestIterations: number;
  uuid: string;
  slots: LuksSlot[];
}

/** Reads `length` bytes at `offset` of the LUKS region (bounds-checked by the caller's region). */
export type RegionReader = (offset: number, length: number, what: string) => Promise<Uint8Array>;

function cField(bytes: Uint8Array, start: number, length: number, what: string): string {
  const field = bytes.subarray(start, start + length);
  const nul = field.indexOf(0);
  if (nul < 0) throw new ImageCorruptError(`LUKS header ${what} is not NUL terminated`);
  let s = '';
  for (const c of field.subarray(0, nul)) s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '?';
  return s;
}

/** Parses and validates a LUKS1 header (qcrypto_block_luks_check_header and _parse_header). */
export function parseLuksHeader(bytes: Uint8Array): LuksHeader {
  if (bytes.length < LUKS_HEADER_BYTES) throw new ImageCorruptError(`LUKS header is ${bytes.length} bytes, shorter than ${LUKS_HEADER_BYTES}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (!LUKS_MAGIC.every((b, i) => bytes[i] === b)) throw new ImageCorruptError('volume is not in LUKS format (bad magic in the crypto header)');
  const version = view.getUint16(6);
  if (version !== 1) throw new UnsupportedFeatureError(`LUKS version ${version} is not supported (only LUKS1, as qemu 7.2)`);
  const cipherName = cField(bytes, 8, 32, 'cipher name');
  const cipherModeSpec = cField(bytes, 40, 32, 'cipher mode');
  const hashSpec = cField(bytes, 72, 32, 'hash spec');
  const payloadOffsetSector = view.getUint32(104);
  const masterKeyBytes = view.getUint32(108);
  const mkDigest = bytes.slice(112, 112 + DIGEST_LEN);
  const mkDigestSalt = bytes.slice(132, 164);
  const mkDigestIterations = view.getUint32(164);
  const uuid = cField(bytes, 168, 40, 'uuid');
  if (mkDigestIterations === 0) throw new ImageCorruptError('LUKS master key digest has zero iterations');

  // cipher mode: "xts-plain64", "cbc-essiv:sha256", "ecb"
  const dash = cipherModeSpec.indexOf('-');
  const modeName = dash < 0 ? cipherModeSpec : cipherModeSpec.slice(0, dash);
  const ivSpec = dash < 0 ? 'plain64' : cipherModeSpec.slice(dash + 1);
  if (!['ecb', 'cbc', 'ctr', 'xts'].includes(modeName)) throw new UnsupportedFeatureError(`LUKS cipher mode '${modeName}' is not supported`);
  const cipherMode = modeName as CipherMode;
  const colon = ivSpec.indexOf(':');
  const ivName = colon < 0 ? ivSpec : ivSpec.slice(0, colon);
  if (!['plain', 'plain64', 'essiv'].includes(ivName)) throw new UnsupportedFeatureError(`LUKS IV generator '${ivName}' is not supported`);
  const ivgenAlg = ivName as IvGenAlg;
  let ivgenHashAlg: string | undefined;
  if (ivgenAlg === 'essiv') {
    ivgenHashAlg = colon < 0 ? '' : ivSpec.slice(colon + 1);
    if (!HASHES.includes(ivgenHashAlg)) throw new UnsupportedFeatureError(`LUKS essiv hash '${ivgenHashAlg}' is not supported`);
  }
  if (!HASHES.includes(hashSpec)) throw new UnsupportedFeatureError(`LUKS hash '${hashSpec}' is not supported`);

  const algKeyBytes = cipherMode === 'xts' ? masterKeyBytes / 2 : masterKeyBytes;
  const sizes = CIPHER_KEY_SIZES[cipherName];
  if (!sizes || !Number.isInteger(algKeyBytes) || !sizes.includes(algKeyBytes)) {
    throw new UnsupportedFeatureError(`LUKS cipher '${cipherName}' with a ${masterKeyBytes}-byte key is not supported`);
  }
  const cipherAlg = `${cipherName}-${algKeyBytes * 8}`;

  const slots: LuksSlot[] = [];
  const splitSectors = Math.ceil((masterKeyBytes * STRIPES) / CRYPT_SECTOR);
  for (let i = 0; i < NUM_KEY_SLOTS; i++) {
    const at = 208 + i * 48;
    const state = view.getUint32(at);
    const slot: LuksSlot = {
      active: state === SLOT_ENABLED,
      iterations: view.getUint32(at + 4),
      salt: bytes.slice(at + 8, at + 40),
      keyOffsetSector: view.getUint32(at + 40),
      stripes: view.getUint32(at + 44),
    };
    if (slot.stripes !== STRIPES) throw new ImageCorruptError(`LUKS key slot ${i} is corrupted (stripes ${slot.stripes} != ${STRIPES})`);
    if (state !== SLOT_ENABLED && state !== SLOT_DISABLED) throw new ImageCorruptError(`LUKS key slot ${i} state (active/disabled) is corrupted`);
    if (slot.active && slot.iterations === 0) throw new ImageCorruptError(`LUKS key slot ${i} is enabled but has zero iterations`);
    if (slot.keyOffsetSector < HEADER_SECTORS) throw new ImageCorruptError(`LUKS key slot ${i} overlaps the LUKS header`);
    if (slot.keyOffsetSector + splitSectors > payloadOffsetSector) throw new ImageCorruptError(`LUKS key slot ${i} overlaps the encrypted payload`);
    slots.push(slot);
  }
  for (let i = 0; i < NUM_KEY_SLOTS; i++) {
    for (let j = i + 1; j < NUM_KEY_SLOTS; j++) {
      const a = slots[i] as LuksSlot;
      const b = slots[j] as LuksSlot;
      if (a.keyOffsetSector + splitSectors > b.keyOffsetSector && b.keyOffsetSector + splitSectors > a.keyOffsetSector) {
        throw new ImageCorruptError(`LUKS key slots ${i} and ${j} overlap in the header`);
      }
    }
  }
  return {
    cipherAlg,
    cipherMode,
    ivgenAlg,
    ...(ivgenHashAlg !== undefined ? { ivgenHashAlg } : {}),
    hashAlg: hashSpec,
    payloadOffsetSector,
    masterKeyBytes,
    mkDigest,
    mkDigestSalt,
    mkDigestIterations,
    uuid,
    slots,
  };
}

/** qemu-img info's `encrypt` object for a LUKS image (key order as qemu prints it). */
export function luksInfoJson(h: LuksHeader): Record<string, unknown> {
  return {
    'ivgen-alg': h.ivgenAlg,
    ...(h.ivgenHashAlg !== undefined ? { 'ivgen-hash-alg': h.ivgenHashAlg } : {}),
    'hash-alg': h.hashAlg,
    'cipher-alg': h.cipherAlg,
    uuid: h.uuid,
    format: 'luks',
    'cipher-mode': h.cipherMode,
    slots: h.slots.map((s) =>
      s.active ? { active: true, iters: s.iterations, 'key-offset': s.keyOffsetSector * CRYPT_SECTOR, stripes: s.stripes } : { active: false, 'key-offset': s.keyOffsetSector * CRYPT_SECTOR },
    ),
    'payload-offset': h.payloadOffsetSector * CRYPT_SECTOR,
    'master-key-iters': h.mkDigestIterations,
  };
}

/** Bytes of the LUKS region a header uses: its key material must lie inside the region. */
export function luksRegionEnd(h: LuksHeader): number {
  const splitBytes = h.masterKeyBytes * STRIPES;
  return Math.max(LUKS_HEADER_BYTES, ...h.slots.map((s) => s.keyOffsetSector * CRYPT_SECTOR + splitBytes));
}

/** LUKS anti-forensic diffusion (crypto/afsplit.c): hash digest-sized chunks with a big-endian counter. */
function diffuse(hash: string, block: Buffer): void {
  const { createHash } = nodeCrypto();
  const digestLen = createHash(hash).digest().length;
  const count = Math.ceil(block.length / digestLen);
  for (let i = 0; i < count; i++) {
    const start = i * digestLen;
    const chunk = Math.min(digestLen, block.length - start);
    const iv = Buffer.alloc(4);
    iv.writeUInt32BE(i);
    const out = createHash(hash).update(iv).update(block.subarray(start, start + chunk)).digest();
    out.copy(block, start, 0, chunk);
  }
}

function afMerge(hash: string, blockLen: number, stripes: number, split: Uint8Array): Buffer {
  const block = Buffer.alloc(blockLen);
  for (let i = 0; i < stripes - 1; i++) {
    const stripe = split.subarray(i * blockLen, (i + 1) * blockLen);
    for (let k = 0; k < blockLen; k++) block[k] = (block[k] as number) ^ (stripe[k] as number);
    diffuse(hash, block);
  }
  const last = split.subarray((stripes - 1) * blockLen, stripes * blockLen);
  for (let k = 0; k < blockLen; k++) block[k] = (block[k] as number) ^ (last[k] as number);
  return block;
}

/**
 * Tries the passphrase on every active key slot; returns the payload cipher
 * (IVs numbered by host file sector, as qcow2 LUKS does) or throws
 * WRONG_PASSPHRASE. Ciphers node:crypto lacks are refused by name first.
 */
export async function unlockLuks(h: LuksHeader, passphrase: Uint8Array, read: RegionReader, limits: Limits, signal?: AbortSignal): Promise<SectorCipher> {
  assertSupportedCipher(h.cipherAlg, h.cipherMode);
  const splitBytes = h.masterKeyBytes * STRIPES;
  if (splitBytes % CRYPT_SECTOR !== 0) {
    // qemu asserts on this (its decryption works on whole sectors); no qemu-made image has it.
    throw new UnsupportedFeatureError(`LUKS key material of ${splitBytes} bytes is not a whole number of ${CRYPT_SECTOR}-byte sectors`);
  }
  const cipherFor = (key: Uint8Array, ivFrom: 'file' | 'guest'): SectorCipher =>
    createSectorCipher({
      alg: h.cipherAlg,
      mode: h.cipherMode,
      ivgen: h.ivgenAlg,
      ...(h.ivgenHashAlg !== undefined ? { ivHash: h.ivgenHashAlg } : {}),
      key,
      ivFrom,
    });
  let iterations = 0;
  const spend = (n: number, what: string): void => {
    iterations += n;
    enforceLimit('maxPbkdf2Iterations', iterations, limits, `LUKS PBKDF2 iterations (${what})`);
  };
  const active = h.slots.filter((s) => s.active);
  if (active.length === 0) throw new WrongPassphraseError('the LUKS header has no active key slot; no passphrase can unlock it');
  for (const [i, slot] of h.slots.entries()) {
    if (!slot.active) continue;
    throwIfAborted(signal);
    spend(slot.iterations, `key slot ${i}`);
    const slotKey = await pbkdf2Async(passphrase, slot.salt, slot.iterations, h.masterKeyBytes, h.hashAlg);
    const material = await read(slot.keyOffsetSector * CRYPT_SECTOR, splitBytes, `LUKS key slot ${i} key material`);
    const split = Buffer.alloc(splitBytes);
    cipherFor(slotKey, 'file').decrypt(material, split, 0);
    const masterKey = afMerge(h.hashAlg, h.masterKeyBytes, STRIPES, split);
    spend(h.mkDigestIterations, 'master key digest');
    const digest = await pbkdf2Async(masterKey, h.mkDigestSalt, h.mkDigestIterations, DIGEST_LEN, h.hashAlg);
    if (nodeCrypto().timingSafeEqual(digest, h.mkDigest)) return cipherFor(masterKey, 'file');
  }
  throw new WrongPassphraseError('wrong passphrase: it unlocks none of the LUKS key slots');
}
