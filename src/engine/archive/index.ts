/**
 * Archives that carry disks: OVA appliances (a tar with an OVF descriptor, an
 * optional manifest and the disks it names) and bundles (a tar holding a split
 * VMDK's descriptor and extents, or a qcow2 overlay with its backing chain).
 *
 * Every name found inside an image or an OVF resolves only to a member of the
 * same archive: never to a host path, never with `..`, an absolute path or a
 * URL, never through a link member (tar.ts refuses those). A name not in the
 * archive is UNSAFE_IMAGE naming the missing member. The result is one
 * DiskImage whose map points into the archive (compose.ts), read by the one
 * reader like any other image.
 */
import { createHash } from 'node:crypto';
import { ImageCorruptError, InvalidArgumentError, LimitExceededError, UnsafeImageError, UnsupportedFeatureError, UnsupportedFormatError, throwIfAborted } from '../errors.js';
import { enforceLimit, type Limits } from '../limits.js';
import { detectFormat, driverFor } from '../probe.js';
import { readExact, type RandomAccessSource } from '../source.js';
import type { ArchiveInfo, DiskImage, FormatId, OpenOptions, ParentLink } from '../types.js';
import { FORMAT_IDS } from '../types.js';
import { openSparseExtent, readVmdkDescriptorFile, vmdkParentLink } from '../formats/vmdk.js';
import { ConcatImage, LayeredImage, MemberImage, type ConcatPart } from './compose.js';
import { JoinedSource } from './joined-source.js';
import { MemberSource } from './member-source.js';
import { Scratch } from './stage.js';
import { parseOvf, type OvfFile } from './ovf.js';
import { indexTar, normalizeMemberName, shown, type TarIndex, type TarMember } from './tar.js';

import { indexZip, isZip } from './zip.js';

export { isTar } from './tar.js';
export { isZip } from './zip.js';

export interface ArchiveOpenOptions extends OpenOptions {
  /**
   * Which disk: for an OVA the 1-based index in the OVF's DiskSection (default 1),
   * its diskId or its file name; for a bundle the member name of the top image
   * (needed only when the bundle holds several).
   */
  disk?: string;
  /** The declared format of the disk inside (the top image). */
  format?: FormatId;
  /** Where compressed members (deflated zip members, gzip'd OVF files) are staged; default TMPDIR. */
  scratchDir?: string;
  /** Names the scratch folder `OWNER.archive-XXXXXX` (default `diskconv-archive-XXXXXX`). */
  scratchOwner?: string;
}

interface Context {
  /**
   * The archive, and after it whatever members need beside it (staged deflated or
   * gzip'd members, chunked OVF files joined): every member has one place in it.
   */
  archive: JoinedSource;
  scratch: Scratch;
  /** Staged members by name, in `archive` coordinates. */
  staged: Map<string, TarMember>;
  index: TarIndex;
  options: ArchiveOpenOptions;
  limits: Limits;
  /** Every member opened for the chosen disk, in order. */
  used: string[];
  kind: 'tar' | 'zip';
}

/**
 * Opens the disk an archive holds; the caller closes the image, then the archive source.
 * When a member had to be staged or joined, the image's map points into a JoinedSource
 * of the archive and those (`readsFrom`), which the image's close() closes and removes.
 */
export async function openArchive(archive: RandomAccessSource, options: ArchiveOpenOptions): Promise<DiskImage> {
  const { limits, signal } = options;
  const head = await archive.read(0, Math.min(64, archive.size), signal);
  const kind = isZip(head) ? 'zip' : 'tar';
  const index = kind === 'zip' ? await indexZip(archive, limits, signal) : await indexTar(archive, limits, signal);
  if (index.members.length === 0) throw new ImageCorruptError(`${archive.name}: the ${kind} archive holds no file`);
  const space = new JoinedSource(archive.name, archive);
  const scratch = new Scratch(options.scratchDir, options.scratchOwner !== undefined ? `${options.scratchOwner}.archive-` : undefined);
  const release = async (): Promise<void> => {
    try {
      await space.close();
    } finally {
      await scratch.remove();
    }
  };
  const ctx: Context = { archive: space, scratch, staged: new Map(), index, options, limits, used: [], kind };
  let image: DiskImage;
  try {
    image = await openArchiveImage(ctx);
  } catch (err) {
    await release();
    throw err;
  }
  if (!space.extended) {
    await release();
    return image;
  }
  const closeImage = image.close.bind(image);
  Object.assign(image, {
    readsFrom: space,
    close: async (): Promise<void> => {
      try {
        await closeImage();
      } finally {
        await release();
      }
    },
  });
  return image;
}

async function openArchiveImage(ctx: Context): Promise<DiskImage> {
  const { archive, index } = ctx;
  const ovfs = index.members.filter((m) => /\.ovf$/i.test(m.name));
  if (ovfs.length > 1) {
    throw new UnsafeImageError(`${archive.name}: the archive holds ${ovfs.length} OVF descriptors (${ovfs.map((m) => `"${shown(m.name)}"`).join(', ')}); an OVA has exactly one`);
  }
  const ovf = ovfs[0];
  if (ovf) return openOva(ctx, ovf);
  return openBundle(ctx);
}

/** A member's bytes as a source, staging it first when it is stored compressed. */
async function memberSource(ctx: Context, member: TarMember): Promise<MemberSource> {
  const m = await materialize(ctx, member);
  return new MemberSource(ctx.archive, m.offset, m.size, `${ctx.archive.name}/${member.name}`);
}

/**
 * The member with its bytes in place in `ctx.archive`: itself when stored, else
 * (a deflated zip member) inflated once into the scratch folder, its declared size
 * and CRC-32 checked (stage.ts), and joined after the archive.
 */
async function materialize(ctx: Context, member: TarMember): Promise<TarMember> {
  if (!member.packed) return member;
  const done = ctx.staged.get(member.name);
  if (done) return done;
  const file = await ctx.scratch.stage({
    source: ctx.archive,
    offset: member.offset,
    length: member.packed.compressedSize,
    codec: 'deflate-raw',
    expect: { size: member.size, crc32: member.packed.crc32 },
    what: `${ctx.archive.name}/${member.name}`,
    maxVirtualSize: ctx.limits.maxVirtualSize,
    ...(ctx.options.signal ? { signal: ctx.options.signal } : {}),
  });
  const staged: TarMember = { name: member.name, offset: ctx.archive.append(file, { owned: true }), size: member.size };
  ctx.staged.set(member.name, staged);
  return staged;
}

function dirOf(name: string): string {
  const slash = name.lastIndexOf('/');
  return slash < 0 ? '' : name.slice(0, slash + 1);
}

/**
 * The member a name inside `from` refers to, relative to `from`'s folder, as
 * qemu resolves a relative backing name; absolute paths, URLs and `..` are refused.
 */
function resolveReference(ctx: Context, from: TarMember, ref: string, what: string): TarMember {
  const where = `${ctx.archive.name}/${from.name}`;
  if (ref === '') throw new ImageCorruptError(`${where}: empty ${what} name`);
  if (/^[a-z][a-z0-9+.-]*:/i.test(ref)) throw new UnsafeImageError(`${where}: ${what} "${shown(ref)}" is a URL or protocol name; names inside an image resolve only to members of the same archive`);
  if (ref.startsWith('/')) throw new UnsafeImageError(`${where}: ${what} "${shown(ref)}" is an absolute path; names inside an image resolve only to members of the same archive, never to host files`);
  const name = normalizeMemberName(dirOf(from.name) + ref, `${where}: ${what}`);
  const member = ctx.index.byName.get(name);
  if (!member) throw new UnsafeImageError(`${where}: ${what} "${shown(ref)}" is not a member of the archive (looked for "${shown(name)}"); it is never looked for outside it`);
  return member;
}

/** Reads a small text member whole (OVF, manifest), bounded. */
async function memberText(ctx: Context, member: TarMember, what: string): Promise<string> {
  enforceLimit('maxArchiveTextBytes', member.size, ctx.limits, `${ctx.archive.name}/${member.name}: ${what}`);
  const m = await materialize(ctx, member);
  const bytes = await readExact(ctx.archive, m.offset, m.size, `${ctx.archive.name}/${member.name}`, ctx.options.signal);
  return Buffer.from(bytes).toString('utf8');
}

// ---------------------------------------------------------------------------
// OVA

async function openOva(ctx: Context, ovfMember: TarMember): Promise<DiskImage> {
  const name = ctx.archive.name;
  const where = `${name}/${ovfMember.name}`;
  const ovf = parseOvf(await memberText(ctx, ovfMember, 'OVF descriptor'), where);
  const manifest = await verifyManifest(ctx, ovfMember);

  const filesById = new Map<string, OvaFile>();
  const hrefs = new Set<string>();
  for (const file of ovf.files) {
    if (filesById.has(file.id)) throw new ImageCorruptError(`${where}: two References/File elements with ovf:id "${shown(file.id)}"`);
    const found = ovaFile(ctx, ovfMember, file);
    // Also a chunk named as a file of its own, or two files whose chunks are one member: the same bytes twice.
    for (const n of new Set([found.name, ...found.parts.map((p) => p.name)])) {
      if (hrefs.has(n)) throw new UnsafeImageError(`${where}: the OVF names the file "${shown(n)}" twice; which disk it is would be ambiguous`);
      hrefs.add(n);
    }
    filesById.set(file.id, found);
  }
  const fileRefs = new Set<string>();
  const disks = ovf.disks.map((disk, i) => {
    if (disk.fileRef !== undefined) {
      if (fileRefs.has(disk.fileRef)) throw new UnsafeImageError(`${where}: two disks use the file "${shown(disk.fileRef)}"`);
      fileRefs.add(disk.fileRef);
    }
    const file = disk.fileRef !== undefined ? filesById.get(disk.fileRef) : undefined;
    if (disk.fileRef !== undefined && !file) throw new ImageCorruptError(`${where}: disk "${shown(disk.diskId)}" refers to file "${shown(disk.fileRef)}", which References does not list`);
    return { index: i + 1, disk, file };
  });
  if (disks.length === 0) throw new ImageCorruptError(`${where}: the OVF's DiskSection names no disk`);

  const wanted = ctx.options.disk;
  let chosen = disks[0];
  if (wanted !== undefined) {
    chosen = /^[0-9]+$/.test(wanted)
      ? disks[Number(wanted) - 1]
      : disks.find((d) => d.disk.diskId === wanted || d.file?.name === wanted || d.file?.href === wanted);
    if (!chosen) {
      throw new InvalidArgumentError(
        `${name}: no disk "${shown(wanted)}" in the OVF; it names ${disks.map((d) => `${d.index} (${shown(d.disk.diskId)}${d.file ? `, ${shown(d.file.href)}` : ''})`).join(', ')}`,
      );
    }
  }
  if (!chosen) throw new ImageCorruptError(`${where}: no disk`);
  if (!chosen.file) throw new UnsupportedFeatureError(`${where}: disk ${chosen.index} ("${shown(chosen.disk.diskId)}") has no file (an empty disk of the appliance); there is nothing to convert`);
  if (chosen.disk.format !== undefined && /compressed/i.test(chosen.disk.format) && !/streamOptimized/i.test(chosen.disk.format)) {
    // e.g. VMware's "compressed" (gzip) disk format URI: refused by name rather than read as raw.
    throw new UnsupportedFeatureError(`${where}: disk format "${shown(chosen.disk.format)}" is not supported`);
  }

  const image = await openChain(ctx, await ovaDiskMember(ctx, chosen.file), ctx.options.format, []);
  const info: ArchiveInfo = {
    kind: 'ova',
    disks: disks.map((d) => ({
      index: d.index,
      'disk-id': d.disk.diskId,
      ...(d.file ? { file: d.file.name, size: d.file.storedSize } : {}),
      ...(d.disk.capacity !== undefined ? { capacity: d.disk.capacity } : {}),
      ...(d.disk.format !== undefined ? { format: d.disk.format } : {}),
    })),
    disk: chosen.index,
    members: [...ctx.used],
    manifest,
  };
  (image as { archive?: ArchiveInfo }).archive = info;
  return image;
}

/** A References/File of an OVF, found in the archive: one member, or its chunks. */
interface OvaFile {
  href: string;
  /** The file's name as a member name (relative to the OVF's folder). */
  name: string;
  /** The member holding it, or its chunks (`name.000000000`, ...) in order. */
  parts: TarMember[];
  /** Bytes as stored: the member's size, or the sum of its chunks. */
  storedSize: number;
  compression: 'gzip' | undefined;
  chunked: boolean;
}

/** A chunk's suffix: nine decimal digits, from 0 (VMware ovftool's `disk1.vmdk.000000000`). */
const CHUNK_SUFFIX = /\.([0-9]{9})$/;

/**
 * Finds an OVF file in the archive. `ovf:chunkSize` (DSP0243 5.2) splits the file
 * into members named `href.000000000`, `href.000000001`, ..., each chunkSize bytes
 * but the last; `ovf:compression="gzip"` means the (joined) bytes are a gzip
 * stream; `ovf:size` is the size as stored (compressed, all chunks), checked here.
 */
function ovaFile(ctx: Context, ovfMember: TarMember, file: OvfFile): OvaFile {
  const where = `${ctx.archive.name}/${ovfMember.name}`;
  let compression: 'gzip' | undefined;
  if (file.compression !== undefined && file.compression !== 'identity') {
    if (file.compression !== 'gzip') {
      throw new UnsupportedFeatureError(`${where}: the file "${shown(file.href)}" is stored with ovf:compression="${shown(file.compression)}"; only gzip and identity are defined`);
    }
    compression = 'gzip';
  }
  let parts: TarMember[];
  let name: string;
  if (file.chunkSize === undefined) {
    const member = resolveReference(ctx, ovfMember, file.href, 'file reference');
    parts = [member];
    name = member.name;
  } else {
    const chunkSize = file.chunkSize;
    if (chunkSize <= 0) throw new ImageCorruptError(`${where}: the file "${shown(file.href)}" has ovf:chunkSize="${chunkSize}"`);
    const first = resolveReference(ctx, ovfMember, `${file.href}.000000000`, 'file reference (first chunk)');
    name = first.name.slice(0, -'.000000000'.length);
    parts = [];
    for (let k = 0; ; k++) {
      const chunk = ctx.index.byName.get(`${name}.${String(k).padStart(9, '0')}`);
      if (!chunk) break;
      parts.push(chunk);
    }
    for (const m of ctx.index.members) {
      const suffix = m.name.startsWith(`${name}.`) ? CHUNK_SUFFIX.exec(m.name) : null;
      if (suffix && m.name.length === name.length + 10 && Number(suffix[1]) >= parts.length) {
        throw new ImageCorruptError(`${where}: chunk "${shown(m.name)}" of "${shown(file.href)}" follows a missing chunk ${parts.length}`);
      }
    }
    parts.forEach((chunk, k) => {
      const last = k === parts.length - 1;
      if (last ? chunk.size === 0 || chunk.size > chunkSize : chunk.size !== chunkSize) {
        throw new ImageCorruptError(`${where}: chunk "${shown(chunk.name)}" has ${chunk.size} bytes; with ovf:chunkSize="${chunkSize}" every chunk but the last has exactly that many, the last 1 to that many`);
      }
    });
  }
  const storedSize = parts.reduce((sum, p) => sum + p.size, 0);
  if (file.size !== undefined && file.size !== storedSize) {
    throw new ImageCorruptError(`${where}: the OVF gives "${shown(file.href)}" ${file.size} bytes, the archive ${parts.length > 1 || file.chunkSize !== undefined ? `has ${storedSize} in ${parts.length} chunks` : `member has ${storedSize}`}`);
  }
  return { href: file.href, name, parts, storedSize, compression, chunked: file.chunkSize !== undefined };
}

/**
 * The disk file of an OVF as one member of `ctx.archive`: the member itself, or its
 * chunks joined (read in place, no copy), and a gzip'd file decompressed into the
 * scratch folder (bounded, stage.ts) and joined after the archive.
 */
async function ovaDiskMember(ctx: Context, file: OvaFile): Promise<TarMember> {
  const parts = await Promise.all(file.parts.map((p) => materialize(ctx, p)));
  let stored: TarMember;
  if (!file.chunked) stored = parts[0] as TarMember;
  else {
    const joined = new JoinedSource(`${ctx.archive.name}/${file.name}`);
    for (const p of parts) joined.append(new MemberSource(ctx.archive, p.offset, p.size, `${ctx.archive.name}/${p.name}`), { owned: false, align: 1 });
    stored = { name: file.name, offset: ctx.archive.append(joined, { owned: false }), size: joined.size };
  }
  if (file.compression !== 'gzip') return stored;
  const staged = await ctx.scratch.stage({
    source: ctx.archive,
    offset: stored.offset,
    length: stored.size,
    codec: 'gzip',
    what: `${ctx.archive.name}/${file.name}`,
    maxVirtualSize: ctx.limits.maxVirtualSize,
    ...(ctx.options.signal ? { signal: ctx.options.signal } : {}),
  });
  return { name: file.name, offset: ctx.archive.append(staged, { owned: true }), size: staged.size };
}

/**
 * The manifest beside the OVF (same base name, `.mf`): every `ALG(file)= hex`
 * line names a member, whose digest must match. A manifest naming a file the
 * archive lacks, or a digest that differs, is corruption.
 */
async function verifyManifest(ctx: Context, ovfMember: TarMember): Promise<'verified' | 'absent'> {
  const mfs = ctx.index.members.filter((m) => /\.mf$/i.test(m.name));
  if (mfs.length === 0) return 'absent';
  if (mfs.length > 1) throw new UnsafeImageError(`${ctx.archive.name}: the archive holds ${mfs.length} manifests; an OVA has at most one`);
  const mf = mfs[0] as TarMember;
  const where = `${ctx.archive.name}/${mf.name}`;
  const text = await memberText(ctx, mf, 'manifest');
  const lines = text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
  const seen = new Set<string>();
  const checks: Array<{ member: TarMember; alg: string; digest: string }> = [];
  for (const line of lines) {
    const m = /^\s*(SHA1|SHA256|SHA512)\s*\(\s*(.+?)\s*\)\s*=\s*([0-9a-fA-F]+)\s*$/.exec(line);
    if (!m) throw new ImageCorruptError(`${where}: manifest line "${shown(line)}" is not ALG(file)= digest with SHA1, SHA256 or SHA512`);
    const alg = (m[1] as string).toLowerCase();
    const digest = (m[3] as string).toLowerCase();
    const lengths: Record<string, number> = { sha1: 40, sha256: 64, sha512: 128 };
    if (digest.length !== lengths[alg]) throw new ImageCorruptError(`${where}: ${alg.toUpperCase()} digest of "${shown(m[2] as string)}" has ${digest.length} hex digits`);
    const member = resolveReference(ctx, mf, m[2] as string, 'manifest entry');
    if (seen.has(member.name)) throw new ImageCorruptError(`${where}: the manifest lists "${shown(member.name)}" twice`);
    seen.add(member.name);
    checks.push({ member, alg, digest });
  }
  if (!seen.has(ovfMember.name)) throw new ImageCorruptError(`${where}: the manifest has no digest of the OVF descriptor "${shown(ovfMember.name)}"`);
  for (const { member, alg, digest } of checks) {
    const got = await digestOf(ctx, member, alg);
    if (got !== digest) {
      throw new ImageCorruptError(`${ctx.archive.name}/${member.name}: ${alg.toUpperCase()} digest ${got} differs from the manifest's ${digest}; the appliance is damaged or altered`);
    }
  }
  return 'verified';
}

const DIGEST_CHUNK = 4 * 2 ** 20;

async function digestOf(ctx: Context, packed: TarMember, alg: string): Promise<string> {
  const hash = createHash(alg);
  const member = await materialize(ctx, packed);
  for (let done = 0; done < member.size; ) {
    throwIfAborted(ctx.options.signal);
    const length = Math.min(DIGEST_CHUNK, member.size - done);
    hash.update(await readExact(ctx.archive, member.offset + done, length, `${ctx.archive.name}/${member.name}`, ctx.options.signal));
    done += length;
  }
  return hash.digest('hex');
}

// ---------------------------------------------------------------------------
// Bundles

/** What a member names (backing file, extent files), without opening anything it names. */
async function referencesOf(ctx: Context, member: TarMember): Promise<{ format: FormatId; refs: string[] } | undefined> {
  const source = await memberSource(ctx, member);
  let format: FormatId;
  try {
    ({ format } = await detectFormat(source, undefined, ctx.options.signal));
  } catch {
    return undefined; // not an image we read; it can only be named by one
  }
  if (format === 'vmdk') {
    const descriptor = await readVmdkDescriptorFile(source, ctx.limits, ctx.options.signal, { allowParent: true }).catch(() => null);
    if (descriptor === null) return { format, refs: [] };
    if (descriptor) {
      const refs = descriptor.extents.flatMap((e) => (e.fileName !== undefined ? [resolveQuietly(ctx, member, e.fileName)] : []));
      // A split child's parent is named by it too, so it is not another top.
      if (descriptor.parentHint !== undefined) refs.push(resolveQuietly(ctx, member, descriptor.parentHint));
      return { format, refs };
    }
  }
  if (LAYERED_FORMATS.has(format)) {
    const image = await driverFor(format)
      .open(source, { limits: ctx.limits, metadataOnly: true, backingSupplied: true, ...(ctx.options.signal ? { signal: ctx.options.signal } : {}) })
      .catch(() => undefined);
    if (!image) return { format, refs: [] };
    const link = parentLinkOf(image);
    await image.close();
    if (!link) return { format, refs: [] };
    let parent = '';
    try {
      parent = resolveParent(ctx, member, link).name;
    } catch {
      // named but not found: reported when the chain is opened
    }
    return { format, refs: [parent] };
  }
  return { format, refs: [] };
}

function resolveQuietly(ctx: Context, from: TarMember, ref: string): string {
  try {
    return resolveReference(ctx, from, ref, 'reference').name;
  } catch {
    return '';
  }
}

async function openBundle(ctx: Context): Promise<DiskImage> {
  const name = ctx.archive.name;
  let top: TarMember | undefined;
  if (ctx.options.disk !== undefined) {
    top = ctx.index.byName.get(normalizeMemberName(ctx.options.disk, `${name}: --disk`));
    if (!top) throw new InvalidArgumentError(`${name}: the archive has no member "${shown(ctx.options.disk)}"; it holds ${listMembers(ctx)}`);
  } else {
    const images: Array<{ member: TarMember; format: FormatId }> = [];
    const referenced = new Set<string>();
    for (const member of ctx.index.members) {
      const found = await referencesOf(ctx, member);
      if (!found) continue;
      if (found.format !== 'raw') images.push({ member, format: found.format });
      for (const r of found.refs) referenced.add(r);
    }
    const tops = images.filter((i) => !referenced.has(i.member.name));
    if (tops.length > 1) {
      throw new InvalidArgumentError(
        `${name}: the bundle holds several disks (${tops.map((t) => `"${shown(t.member.name)}" (${t.format})`).join(', ')}); choose one with --disk NAME (API: disk)`,
      );
    }
    if (tops.length === 0 && images.length > 0) {
      throw new UnsafeImageError(`${name}: every image in the bundle is the backing file or an extent of another (${images.map((i) => `"${shown(i.member.name)}"`).join(', ')}): the references loop`);
    }
    top = tops[0]?.member ?? (ctx.index.members.length === 1 ? ctx.index.members[0] : undefined);
    if (!top) throw new UnsupportedFormatError(`${name}: the tar archive holds no disk image this tool reads (members: ${listMembers(ctx)})`);
  }
  const image = await openChain(ctx, top, ctx.options.format, []);
  (image as { archive?: ArchiveInfo }).archive = { kind: ctx.kind, members: [...ctx.used] };
  return image;
}

function listMembers(ctx: Context): string {
  const names = ctx.index.members.map((m) => `"${shown(m.name)}"`);
  return names.length > 8 ? `${names.slice(0, 8).join(', ')}, ...` : names.join(', ');
}

/**
 * Opens a member as an image in archive coordinates: a VMDK descriptor with its
 * extents, a qcow2 with its backing chain (each a member), or a plain image.
 */
async function openChain(ctx: Context, member: TarMember, declared: FormatId | undefined, chain: string[]): Promise<DiskImage> {
  const where = `${ctx.archive.name}/${member.name}`;
  if (chain.includes(member.name)) {
    throw new UnsafeImageError(`${where}: the backing chain loops (${[...chain, member.name].map((n) => `"${shown(n)}"`).join(' -> ')})`);
  }
  if (chain.length >= ctx.limits.maxChainDepth) {
    throw new LimitExceededError('maxChainDepth', chain.length + 1, ctx.limits.maxChainDepth, `${where}: images in the backing chain`);
  }
  const { options, limits } = ctx;
  const source = await memberSource(ctx, member);
  const { format, driver } = await detectFormat(source, declared, options.signal);
  ctx.used.push(member.name);
  const open: OpenOptions = {
    limits,
    ...(options.signal ? { signal: options.signal } : {}),
    ...(options.passphrase ? { passphrase: options.passphrase } : {}),
    ...(options.metadataOnly ? { metadataOnly: true } : {}),
  };
  if (chain.length === 0 && options.snapshot) open.snapshot = options.snapshot;

  if (format === 'vmdk') {
    const descriptor = await readVmdkDescriptorFile(source, limits, options.signal, { allowParent: true });
    if (descriptor) {
      const split = await openSplitVmdk(ctx, member, descriptor);
      if (descriptor.parentHint === undefined) return split;
      // A split child (twoGbMaxExtentSparse made with -b): its extents over the parent the descriptor names.
      try {
        return await layerOver(ctx, member, split, vmdkParentLink(descriptor.parentHint, descriptor.parentCid), chain);
      } catch (err) {
        await split.close();
        throw err;
      }
    }
  }
  if (LAYERED_FORMATS.has(format)) {
    const image = await driver.open(source, { ...open, backingSupplied: true });
    try {
      const link = parentLinkOf(image);
      if (!link) return new MemberImage(image, source);
      return await layerOver(ctx, member, new MemberImage(image, source), link, chain);
    } catch (err) {
      await image.close();
      throw err;
    }
  }
  return new MemberImage(await driver.open(source, open), source);
}

/** The child `top` (member `member`) over the parent its link names, found among the members and checked against the link. */
async function layerOver(ctx: Context, member: TarMember, top: MemberImage | ConcatImage, link: ParentLink, chain: string[]): Promise<DiskImage> {
  const where = `${ctx.archive.name}/${member.name}`;
  const parentMember = resolveParent(ctx, member, link);
  if (link.format !== undefined && !(FORMAT_IDS as readonly string[]).includes(link.format)) {
    throw new UnsupportedFeatureError(`${where}: backing file format "${shown(link.format)}" is not supported`);
  }
  const { passphrase: _unused, ...rest } = ctx.options;
  const backing = await openChain({ ...ctx, options: rest }, parentMember, link.format, [...chain, member.name]);
  try {
    const mismatch = link.mismatch(backing);
    if (mismatch !== undefined) throw new UnsafeImageError(`${where}: "${shown(parentMember.name)}" is not this image's parent: ${mismatch}`);
  } catch (err) {
    await backing.close();
    throw err;
  }
  return new LayeredImage(top, backing);
}

/** Formats whose images may name a parent the bundle supplies. */
const LAYERED_FORMATS = new Set<FormatId>(['qcow2', 'vmdk', 'vpc', 'vhdx']);

/** The driver's link to a parent, or a qcow2's backing file name (with its format) as one. */
function parentLinkOf(image: DiskImage): ParentLink | undefined {
  if (image.parent) return image.parent;
  const info = image.info();
  if (info.backingFilename === undefined) return undefined;
  return {
    names: [{ name: info.backingFilename, how: 'path', from: 'backing file' }],
    ...(info.backingFilenameFormat !== undefined ? { format: info.backingFilenameFormat as FormatId } : {}),
    mismatch: () => undefined,
  };
}

/**
 * The member a differencing image's parent is, from the names it gives (ParentLink),
 * only ever inside the archive. A `path` name resolves as qemu resolves a relative
 * backing file name, strictly (an absolute path, URL or `..` is refused). A
 * `locator` name (VHD/VHDX parent locators, written by Windows as relative and as
 * absolute paths) is tried as a relative path inside the archive when it is one
 * without `..`, then by its last component in the child's folder. No name found is
 * UNSAFE_IMAGE naming what was looked for.
 */
function resolveParent(ctx: Context, from: TarMember, link: ParentLink): TarMember {
  const where = `${ctx.archive.name}/${from.name}`;
  const tried: string[] = [];
  for (const ref of link.names) {
    if (ref.how === 'path') return resolveReference(ctx, from, ref.name, ref.from);
    for (const name of locatorCandidates(ref.name)) {
      let member: TarMember | undefined;
      try {
        member = ctx.index.byName.get(normalizeMemberName(dirOf(from.name) + name, where));
      } catch {
        continue; // not a safe member name: never a path
      }
      if (member && member.name !== from.name) return member;
      const looked = `"${shown(dirOf(from.name) + name)}"`;
      if (!tried.includes(looked)) tried.push(looked);
    }
  }
  const named = link.names.map((n) => `${n.from} "${shown(n.name)}"`).join(', ');
  throw new UnsafeImageError(
    `${where}: its parent (${named || 'no name given'}) is not a member of the archive (looked for ${tried.join(', ') || 'nothing usable'}); a parent is never looked for outside the archive`,
  );
}

/** What a locator's name may be inside the archive: itself when relative and without `..`, then its last component. */
function locatorCandidates(raw: string): string[] {
  let text = raw.replace(/\\/g, '/');
  const url = /^file:\/\/[^/]*(\/.*)$/i.exec(text);
  if (url) {
    try {
      text = decodeURIComponent(url[1] as string);
    } catch {
      text = url[1] as string;
    }
  }
  const absolute = /^[a-z]:/i.test(text) || text.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(text);
  const out: string[] = [];
  const segments = text.split('/');
  if (!absolute && !segments.includes('..')) out.push(text);
  const base = segments[segments.length - 1] ?? '';
  if (base !== '' && base !== '.' && base !== '..' && !out.includes(base)) out.push(base);
  return out;
}

async function openSplitVmdk(ctx: Context, member: TarMember, descriptor: NonNullable<Awaited<ReturnType<typeof readVmdkDescriptorFile>>>): Promise<ConcatImage> {
  const where = `${ctx.archive.name}/${member.name}`;
  const parts: ConcatPart[] = [];
  const extentsInfo: Array<Record<string, unknown>> = [];
  const names = new Set<string>();
  try {
    for (const extent of descriptor.extents) {
      const length = extent.sectors * 512;
      if (extent.type === 'ZERO') {
        parts.push({ length });
        continue;
      }
      const file = await materialize(ctx, resolveReference(ctx, member, extent.fileName as string, `extent file (line ${extent.lineNumber})`));
      if (file.name === member.name) throw new UnsafeImageError(`${where}: extent line ${extent.lineNumber} names the descriptor itself`);
      if (names.has(file.name)) throw new UnsafeImageError(`${where}: the extent file "${shown(file.name)}" is named twice`);
      names.add(file.name);
      ctx.used.push(file.name);
      const source = await memberSource(ctx, file);
      if (extent.type === 'FLAT') {
        if (extent.fileOffset + length > file.size) {
          throw new ImageCorruptError(`${where}: FLAT extent line ${extent.lineNumber} needs ${extent.fileOffset + length} bytes of "${shown(file.name)}", which has ${file.size}`);
        }
        parts.push({ length, storedAt: file.offset + extent.fileOffset, name: file.name });
        extentsInfo.push({ 'virtual-size': length, filename: source.name, format: 'FLAT' });
      } else {
        const ofChild = descriptor.parentHint !== undefined;
        const image = new MemberImage(await openSparseExtent(source, ctx.limits, ctx.options.signal, { ofChild }), source);
        parts.push({ length, image, name: file.name });
        const cluster = image.info().clusterSize;
        extentsInfo.push({ 'virtual-size': length, filename: source.name, ...(cluster !== undefined ? { 'cluster-size': cluster } : {}), format: 'SPARSE' });
      }
    }
  } catch (err) {
    for (const p of parts) await p.image?.close();
    throw err;
  }
  const firstSparse = parts.find((p) => p.image)?.image?.info().clusterSize;
  return new ConcatImage('vmdk', parts, {
    ...(firstSparse !== undefined ? { clusterSize: firstSparse } : {}),
    dirty: false,
    // As qemu-img info: a VMDK child's backing file format is "vmdk" (vmdk_parent_open).
    ...(descriptor.parentHint !== undefined ? { backingFilename: descriptor.parentHint, backingFilenameFormat: 'vmdk' } : {}),
    formatSpecific: {
      type: 'vmdk',
      data: { cid: descriptor.cid, 'parent-cid': descriptor.parentCid, 'create-type': descriptor.createType, extents: extentsInfo },
    },
  });
}
