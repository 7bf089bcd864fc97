/**
 * RBD images as per-job destinations, through the `rbd` CLI, shaped like
 * Glance's RBD store: create with the layering feature at the virtual size,
 * write, then create and protect snapshot `snap` so clones can be made at once;
 * the location is Glance's own `rbd://FSID/POOL/IMAGE/snap`.
 *
 * Writing streams an `rbd import-diff` (diff-stream.ts) of the non-zero blocks
 * only: holes never travel and never allocate. Only pools in RBD_POOLS are
 * written. An image is written under a temporary name of its attempt
 * (`diskconv-tmp.JOB.RANDOM`, tagged with image-meta diskconv.job) and renamed
 * into place when complete, so the final name never holds half an image. An
 * image that already exists is never touched (its name clash fails the job),
 * unless it is this job's own, left by an attempt that died after the rename
 * and before the job was recorded, not yet cloned and not handed to Glance.
 */
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Extent } from '../../engine/index.js';
import {
  DestinationError,
  DestinationExistsError,
  DestinationRefusedError,
  type DestinationResult,
  type Destinations,
  type DestinationTarget,
  type DestinationWriter,
} from '../destination.js';
import { CliFailure, lastLines, mustRun, runTool, spawnTool } from './cli.js';
import { DIFF_HEADER, END_RECORD, nonZeroRuns, sizeRecord, writeHeader } from './diff-stream.js';

export const SNAPSHOT = 'snap';
const OWNER_KEY = 'diskconv.job';
/** Set before the image is registered in Glance: from then on it is Glance's, and no retry may remove it. */
const HANDED_OVER_KEY = 'diskconv.glance';
/** Temporary names (one per attempt) under which images are written before they are renamed into place. */
const TEMP_PREFIX = 'diskconv-tmp.';
/** The tag's value: job ids may start with '-', which rbd would read as an option; the prefix keeps it a value. */
const ownerTag = (owner: string): string => `job:${owner}`;
const EEXIST = 17;
const ENOENT = 2;
const EBUSY = 16;

/** Pool and image names: what Ceph accepts, minus anything that could be read as an option or a path. */
const NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

export interface RbdSettings {
  pools: readonly string[];
  /** Deadline of one rbd command that is not the import itself. */
  commandTimeoutMs: number;
}

function asDestinationError(err: unknown, what: string): Error {
  if (err instanceof CliFailure) return new DestinationError(`${what}: ${lastLines(err.stderr) || `rbd exited ${err.code}`}`, { cause: err });
  if (err instanceof Error && 'code' in err) return err;
  return new DestinationError(`${what} failed`, { cause: err });
}

export class RbdDestinations implements Destinations {
  readonly kinds = ['rbd'] as const;
  private fsid: Promise<string> | undefined;

  constructor(private readonly settings: RbdSettings) {}

  check(target: DestinationTarget): void {
    if (target.target !== 'rbd') throw new DestinationRefusedError(`unknown output target '${String(target.target)}'`);
    if (!NAME.test(target.pool)) throw new DestinationRefusedError(`'${target.pool.slice(0, 64)}' is not a valid pool name`);
    if (!NAME.test(target.image)) throw new DestinationRefusedError(`'${target.image.slice(0, 64)}' is not a valid image name`);
    if (!this.settings.pools.includes(target.pool)) {
      throw new DestinationRefusedError(`pool '${target.pool}' is not one this service writes to (RBD_POOLS)`);
    }
  }

  private spec(target: DestinationTarget): string {
    return `${target.pool}/${target.image}`;
  }

  private rbd(args: string[]): Promise<string> {
    return mustRun('rbd', args, { timeoutMs: this.settings.commandTimeoutMs });
  }

  /** The cluster's fsid, for Glance-style locations (asked once). */
  clusterFsid(): Promise<string> {
    this.fsid ??= mustRun('ceph', ['fsid'], { timeoutMs: this.settings.commandTimeoutMs }).then(
      (out) => out.trim(),
      (err: unknown) => {
        this.fsid = undefined;
        throw asDestinationError(err, 'ceph fsid');
      },
    );
    return this.fsid;
  }

  async create(target: DestinationTarget, virtualSize: number, owner: string): Promise<DestinationWriter> {
    this.check(target);
    const fsid = await this.clusterFsid();
    // A clash fails before a byte is written; the final name is taken again, atomically, at commit.
    await this.claimName(target, owner);
    await this.removeStaleTemps(target.pool, owner);
    const temp = { ...target, image: `${TEMP_PREFIX}${owner}.${randomBytes(4).toString('hex')}` };
    await this.createTemp(temp, virtualSize, owner);
    return this.writer(target, temp, virtualSize, fsid, owner);
  }

  /**
   * Frees the final name when an earlier attempt of this job left it (renamed into place, perhaps snapshotted, but
   * never recorded: the attempt died); throws DestinationExistsError when anyone else's image has it.
   */
  private async claimName(target: DestinationTarget, owner: string): Promise<void> {
    const spec = this.spec(target);
    const info = await runTool('rbd', ['info', '--format', 'json', spec], { timeoutMs: this.settings.commandTimeoutMs });
    if (info.code === ENOENT) return;
    if (info.code !== 0) throw asDestinationError(new CliFailure('rbd info', info.code, info.stderr), `looking up ${spec}`);
    const meta = await this.metadata(spec);
    if (meta.get(OWNER_KEY) !== ownerTag(owner)) throw new DestinationExistsError(`RBD image ${spec} already exists; it was left untouched`);
    if (meta.has(HANDED_OVER_KEY)) {
      throw new DestinationExistsError(`RBD image ${spec} was written by an earlier attempt of this job and registered in Glance; it was left untouched`);
    }
    const snaps = JSON.parse(await this.rbd(['snap', 'ls', '--format', 'json', spec])) as Array<{ name: string; protected?: string }>;
    if (snaps.some((s) => s.name !== SNAPSHOT)) throw new DestinationExistsError(`RBD image ${spec} has snapshots this service did not make; it was left untouched`);
    const snapshot = snaps[0];
    if (snapshot) {
      // The attempt may have died between `snap create` and `snap protect`; unprotecting an unprotected snapshot is an
      // error (EINVAL, "snap is already unprotected"), so ask first. Protected and maybe cloned by someone who saw it:
      // unprotect refuses while clones exist, and then it stays.
      if (snapshot.protected !== 'false') {
        const unprotect = await runTool('rbd', ['snap', 'unprotect', `${spec}@${SNAPSHOT}`], { timeoutMs: this.settings.commandTimeoutMs });
        if (unprotect.code !== 0) {
          throw new DestinationExistsError(`RBD image ${spec} was written by an earlier attempt of this job and is in use (${lastLines(unprotect.stderr) || 'unprotect failed'}); it was left untouched`);
        }
      }
      await this.rbd(['snap', 'rm', '--no-progress', `${spec}@${SNAPSHOT}`]).catch((err: unknown) => {
        throw asDestinationError(err, `removing the earlier attempt's snapshot of ${spec}`);
      });
    }
    await this.removeImage(spec);
  }

  private async metadata(spec: string): Promise<Map<string, string>> {
    const out = await this.rbd(['image-meta', 'list', '--format', 'json', spec]).catch((err: unknown) => {
      throw asDestinationError(err, `reading the metadata of ${spec}`);
    });
    const parsed = (out.trim() ? JSON.parse(out) : {}) as Record<string, unknown>;
    return new Map(Object.entries(parsed).filter((e): e is [string, string] => typeof e[1] === 'string'));
  }

  /**
   * Images are written under a temporary name and renamed into place when complete, so the final name never holds a
   * half-written image, and an attempt killed between create and tag leaves only a temporary of its own.
   */
  private async createTemp(temp: DestinationTarget, virtualSize: number, owner: string): Promise<void> {
    const spec = this.spec(temp);
    await this.rbd(['create', '--size', `${virtualSize}B`, '--image-feature', 'layering', spec]).catch((err: unknown) => {
      throw asDestinationError(err, `creating ${spec}`);
    });
    try {
      await this.rbd(['image-meta', 'set', spec, OWNER_KEY, ownerTag(owner)]);
    } catch (err) {
      await this.rbd(['rm', '--no-progress', spec]).catch(() => {});
      throw asDestinationError(err, `tagging ${spec}`);
    }
  }

  /**
   * Temporaries that dead attempts of this job left: removed when nobody writes them any more (rbd refuses while a
   * watch is held, and then they wait for the next attempt, the commit or the sweeper). Another attempt's live one
   * is never touched. Returns how many went.
   */
  private async removeStaleTemps(pool: string, owner: string): Promise<number> {
    let removed = 0;
    for (const temp of await this.temporaries(pool)) {
      if (temp.owner === owner && (await this.removeTemp(pool, temp.name, owner))) removed++;
    }
    return removed;
  }

  /** Temporaries in `pool`, with the job their name says they belong to. */
  private async temporaries(pool: string): Promise<Array<{ name: string; owner: string }>> {
    const listed = await runTool('rbd', ['ls', '--format', 'json', pool], { timeoutMs: this.settings.commandTimeoutMs });
    if (listed.code !== 0) return [];
    return (JSON.parse(listed.stdout || '[]') as string[]).flatMap((name) => {
      if (!name.startsWith(TEMP_PREFIX)) return [];
      const rest = name.slice(TEMP_PREFIX.length);
      const dot = rest.lastIndexOf('.');
      return dot > 0 ? [{ name, owner: rest.slice(0, dot) }] : [];
    });
  }

  /** Removes a temporary that is `owner`'s: tagged so, or untagged and holding no data (killed between create and tag). */
  private async removeTemp(pool: string, name: string, owner: string): Promise<boolean> {
    const spec = `${pool}/${name}`;
    const meta = await this.metadata(spec).catch(() => undefined);
    if (!meta) return false;
    if (meta.get(OWNER_KEY) !== ownerTag(owner)) {
      if (meta.size > 0) return false;
      const du = await runTool('rbd', ['du', '--format', 'json', spec], { timeoutMs: this.settings.commandTimeoutMs });
      const used = du.code === 0 ? (JSON.parse(du.stdout) as { images?: Array<{ used_size?: number }> }).images?.[0]?.used_size : undefined;
      if (used !== 0) return false;
    }
    const res = await runTool('rbd', ['rm', '--no-progress', spec], { timeoutMs: this.settings.commandTimeoutMs });
    return res.code === 0;
  }

  async sweepLeftovers(live: (job: string) => Promise<boolean>): Promise<number> {
    let removed = 0;
    for (const pool of this.settings.pools) {
      for (const temp of await this.temporaries(pool)) {
        if (await live(temp.owner)) continue;
        if (await this.removeTemp(pool, temp.name, temp.owner)) removed++;
      }
    }
    return removed;
  }

  private async removeImage(spec: string): Promise<void> {
    // An image a dead client still watches cannot be removed until its watch times out (about 30 s).
    const deadline = Date.now() + 60_000;
    for (;;) {
      const res = await runTool('rbd', ['rm', '--no-progress', spec], { timeoutMs: this.settings.commandTimeoutMs });
      if (res.code === 0 || res.code === ENOENT) return;
      if (!(res.code === EBUSY || /watchers/.test(res.stderr)) || Date.now() > deadline) {
        throw asDestinationError(new CliFailure('rbd rm', res.code, res.stderr), `removing ${spec}`);
      }
      await sleep(1000);
    }
  }

  /** Marks a committed image as handed to Glance (called before its location is registered): no retry may rewrite it. */
  async handOver(result: DestinationResult): Promise<void> {
    const spec = `${result.pool}/${result.image}`;
    this.check({ target: 'rbd', pool: result.pool, image: result.image });
    await this.rbd(['image-meta', 'set', spec, HANDED_OVER_KEY, 'glance']).catch((err: unknown) => {
      throw asDestinationError(err, `marking ${spec} as registered in Glance`);
    });
  }

  private async writer(target: DestinationTarget, temp: DestinationTarget, size: number, fsid: string, owner: string): Promise<DestinationWriter> {
    const finalSpec = this.spec(target);
    // Where the image is now: its temporary name until commit renames it into place.
    let spec = this.spec(temp);
    const child = spawnTool('rbd', ['import-diff', '--no-progress', '-', spec]);
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => {
      if (stderr.length < 64 * 1024) stderr += c.toString();
    });
    child.stdout.resume();
    const exited = new Promise<number>((resolve) => {
      child.once('close', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
      child.once('error', (err) => {
        stderr += `cannot run rbd: ${err.message}`;
        resolve(-1);
      });
    });
    // An early exit shows up as EPIPE on stdin: the error we report is rbd's own message, after it exits.
    child.stdin.on('error', () => {});
    let dead = false;
    void exited.then(() => (dead = true));
    const failure = async (): Promise<Error> => {
      const code = await exited;
      return new DestinationError(`rbd import-diff into ${spec} failed (exit ${code}): ${lastLines(stderr) || 'no message'}`);
    };
    const push = async (chunk: Uint8Array): Promise<void> => {
      if (dead) throw await failure();
      if (!child.stdin.write(chunk)) {
        const drained = once(child.stdin, 'drain').then(() => undefined);
        const ended = exited.then(() => 'exited' as const);
        if ((await Promise.race([drained, ended])) === 'exited') throw await failure();
      }
    };
    let written = 0;
    let state: 'writing' | 'finished' | 'committed' | 'aborted' = 'writing';
    await push(DIFF_HEADER);
    await push(sizeRecord(size));

    return {
      write: async (extent: Extent) => {
        if (extent.offset !== written) throw new DestinationError(`extent at ${extent.offset}, expected ${written} (guest order)`);
        if (extent.offset + extent.length > size) throw new DestinationError(`extent past the image size ${size}`);
        written += extent.length;
        if (extent.kind === 'zero') return; // a new image reads zeros already
        for (const run of nonZeroRuns(extent.data, extent.offset)) {
          await push(writeHeader(run.offset, run.data.length));
          // The pipe copies what it cannot take at once; the reader may recycle the extent after we return.
          await push(Buffer.from(run.data));
        }
      },
      finish: async (virtualSize: number) => {
        if (virtualSize !== size) throw new DestinationError(`the image was created for ${size} bytes, the conversion ended at ${virtualSize}`);
        await push(END_RECORD);
        child.stdin.end();
        if ((await exited) !== 0) throw await failure();
        state = 'finished';
      },
      abort: async () => {
        if (state === 'committed' || state === 'aborted') return;
        const wasFinished = state === 'finished';
        state = 'aborted';
        if (!dead) {
          // End the stream where it is, so rbd closes the image cleanly (a killed rbd leaves its watch on the image for
          // half a minute, and the image cannot be removed meanwhile); kill it only if that does not end it.
          child.stdin.end(END_RECORD);
          const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
          await exited;
          clearTimeout(timer);
        }
        // Only the image create() made (under whichever name it has now); a snapshot may exist if commit failed midway.
        if (wasFinished) await this.dropSnapshot(spec).catch(() => {});
        await this.removeImage(spec).catch(() => {});
      },
      commit: async (): Promise<DestinationResult> => {
        if (state !== 'finished') throw new DestinationError(`commit of ${spec} before finish`);
        // The rename is atomic and refuses a taken name: an image made meanwhile under the final name stays as it was.
        const renamed = await runTool('rbd', ['rename', spec, finalSpec], { timeoutMs: this.settings.commandTimeoutMs });
        if (renamed.code === EEXIST) throw new DestinationExistsError(`RBD image ${finalSpec} was created by someone else during the conversion; it was left untouched`);
        if (renamed.code !== 0) throw asDestinationError(new CliFailure('rbd rename', renamed.code, renamed.stderr), `renaming ${spec} to ${finalSpec}`);
        spec = finalSpec;
        try {
          await this.rbd(['snap', 'create', '--no-progress', `${spec}@${SNAPSHOT}`]);
          await this.rbd(['snap', 'protect', `${spec}@${SNAPSHOT}`]);
        } catch (err) {
          throw asDestinationError(err, `snapshot of ${spec}`);
        }
        state = 'committed';
        // A dead attempt's temporary that was still watched when this one started can go now.
        await this.removeStaleTemps(target.pool, owner).catch(() => {});
        return { target: 'rbd', pool: target.pool, image: target.image, snapshot: SNAPSHOT, size, location: `rbd://${fsid}/${target.pool}/${target.image}/${SNAPSHOT}` };
      },
    };
  }

  private async dropSnapshot(spec: string): Promise<void> {
    await runTool('rbd', ['snap', 'unprotect', `${spec}@${SNAPSHOT}`], { timeoutMs: this.settings.commandTimeoutMs });
    await runTool('rbd', ['snap', 'rm', '--no-progress', `${spec}@${SNAPSHOT}`], { timeoutMs: this.settings.commandTimeoutMs });
  }

  async remove(result: DestinationResult): Promise<void> {
    const spec = `${result.pool}/${result.image}`;
    this.check({ target: 'rbd', pool: result.pool, image: result.image });
    await this.dropSnapshot(spec);
    await this.removeImage(spec);
  }
}
