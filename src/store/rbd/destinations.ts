/**
 * RBD images as per-job destinations, through the `rbd` CLI, shaped like
 * Glance's RBD store: create with the layering feature at the virtual size,
 * write, then create and protect snapshot `snap` so clones can be made at once;
 * the location is Glance's own `rbd://FSID/POOL/IMAGE/snap`.
 *
 * Writing streams an `rbd import-diff` (diff-stream.ts) of the non-zero blocks
 * only: holes never travel and never allocate. Only pools in RBD_POOLS are
 * written; an image that already exists is never touched (its name clash fails
 * the job), unless it is this job's own unfinished image (tagged with image-meta
 * diskconv.job and without a snapshot), left by an attempt that died.
 */
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
    const spec = this.spec(target);
    const fsid = await this.clusterFsid();
    await this.createImage(target, virtualSize, owner);
    return this.writer(target, spec, virtualSize, fsid);
  }

  private async createImage(target: DestinationTarget, virtualSize: number, owner: string, retried = false): Promise<void> {
    const spec = this.spec(target);
    const res = await runTool('rbd', ['create', '--size', `${virtualSize}B`, '--image-feature', 'layering', spec], { timeoutMs: this.settings.commandTimeoutMs });
    if (res.code === 0) {
      try {
        await this.rbd(['image-meta', 'set', spec, OWNER_KEY, ownerTag(owner)]);
      } catch (err) {
        await this.rbd(['rm', '--no-progress', spec]).catch(() => {});
        throw asDestinationError(err, `tagging ${spec}`);
      }
      return;
    }
    if (res.code !== EEXIST) throw asDestinationError(new CliFailure('rbd create', res.code, res.stderr), `creating ${spec}`);
    if (!retried && (await this.isOwnUnfinished(target, owner))) {
      await this.removeImage(spec);
      return this.createImage(target, virtualSize, owner, true);
    }
    throw new DestinationExistsError(`RBD image ${spec} already exists; it was left untouched`);
  }

  /** True for an image this job made and never finished (no snapshot): a dead attempt's. */
  private async isOwnUnfinished(target: DestinationTarget, owner: string): Promise<boolean> {
    const spec = this.spec(target);
    const meta = await runTool('rbd', ['image-meta', 'get', spec, OWNER_KEY], { timeoutMs: this.settings.commandTimeoutMs });
    if (meta.code !== 0 || meta.stdout.trim() !== ownerTag(owner)) return false;
    const snaps = JSON.parse(await this.rbd(['snap', 'ls', '--format', 'json', spec])) as unknown[];
    return snaps.length === 0;
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

  private async writer(target: DestinationTarget, spec: string, size: number, fsid: string): Promise<DestinationWriter> {
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
        // Only the image create() made; a snapshot may exist if commit failed midway.
        if (wasFinished) await this.dropSnapshot(spec).catch(() => {});
        await this.removeImage(spec).catch(() => {});
      },
      commit: async (): Promise<DestinationResult> => {
        if (state !== 'finished') throw new DestinationError(`commit of ${spec} before finish`);
        try {
          await this.rbd(['snap', 'create', '--no-progress', `${spec}@${SNAPSHOT}`]);
          await this.rbd(['snap', 'protect', `${spec}@${SNAPSHOT}`]);
        } catch (err) {
          throw asDestinationError(err, `snapshot of ${spec}`);
        }
        state = 'committed';
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
