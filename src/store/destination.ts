/**
 * Per-job destinations: an image a job writes into a user's own pool (today
 * RBD, the block pool a cloud boots from). Unlike the output store, a
 * destination is named by the user, never served by /v1/jobs/{id}/output and
 * never removed by retention; the service removes only an image it created
 * itself, and only while the job that created it fails or is cancelled.
 *
 * The contract, in the order a job uses it:
 *   check(target)              refuse a target before anything is written
 *   create(target, size, job)  make the image (a name clash throws, the existing image untouched)
 *   writer.write()/finish()    the conversion's extents, in guest order (an ExtentSink)
 *   writer.commit()            make it usable (RBD: snapshot `snap`, protected) and say where it is
 *   writer.abort()             on failure or cancel: remove what create() made, nothing else
 */
import type { ExtentSink } from '../engine/index.js';
import { DiskconvError } from '../engine/errors.js';

export interface RbdTarget {
  target: 'rbd';
  pool: string;
  image: string;
}

/** Every kind of destination a job can name (one today). */
export type DestinationTarget = RbdTarget;

export interface DestinationResult {
  target: 'rbd';
  pool: string;
  image: string;
  /** The protected snapshot clones are made from. */
  snapshot: string;
  size: number;
  /** Glance's own form: `rbd://FSID/POOL/IMAGE/SNAP`. */
  location: string;
}

export interface DestinationWriter extends ExtentSink {
  /** After `finish()`: snapshot and protect; the image is complete and final. */
  commit(): Promise<DestinationResult>;
}

export interface Destinations {
  /** Target kinds this process can write ('rbd' when configured). */
  readonly kinds: readonly DestinationTarget['target'][];
  /** Throws DestinationRefusedError when the target is not allowed (pool outside RBD_POOLS, bad name). Writes nothing. */
  check(target: DestinationTarget): void;
  /**
   * Creates the image at `virtualSize`, tagged with `owner` (the job id);
   * throws DestinationExistsError (and touches nothing) when the name is taken
   * by anything but an image of this same owner that a previous attempt left
   * (killed before the job was recorded; not cloned, not handed over), which is
   * removed and made again.
   */
  create(target: DestinationTarget, virtualSize: number, owner: string): Promise<DestinationWriter>;
  /**
   * Removes a committed destination that this service created (a job deleted
   * or cancelled after it finished writing): unprotects and removes its
   * snapshot, then the image.
   */
  remove(result: DestinationResult): Promise<void>;
  /** Marks a committed destination as registered elsewhere (Glance): from then on no retry of the job may rewrite it. */
  handOver(result: DestinationResult): Promise<void>;
  /**
   * Removes what attempts left behind for jobs that no longer wait or run (`live(job)` false): RBD temporaries of a
   * worker that died while its job then failed or was cancelled. Never a committed image; returns how many went.
   */
  sweepLeftovers(live: (job: string) => Promise<boolean>): Promise<number>;
}

/** The target is not allowed here: deterministic, nothing was written. */
export class DestinationRefusedError extends DiskconvError {
  readonly code = 'DESTINATION_REFUSED' as const;
  readonly deterministic = true;
}

/** The destination's name is taken; the existing image was left as it was. */
export class DestinationExistsError extends DiskconvError {
  readonly code = 'DESTINATION_EXISTS' as const;
  readonly deterministic = true;
}

/** The destination's backend failed (rbd exited with an error, cluster unreachable): transient. */
export class DestinationError extends DiskconvError {
  readonly code = 'DESTINATION_UNAVAILABLE' as const;
  readonly deterministic = false;
}

/** No destination configured (RBD_POOLS empty): every target is refused. */
export class NoDestinations implements Destinations {
  readonly kinds = [] as const;
  check(target: DestinationTarget): void {
    throw new DestinationRefusedError(`${target.target} targets are not enabled on this service (set RBD_POOLS)`);
  }
  async create(target: DestinationTarget): Promise<DestinationWriter> {
    this.check(target);
    throw new Error('unreachable');
  }
  async remove(): Promise<void> {}
  async handOver(): Promise<void> {}
  async sweepLeftovers(): Promise<number> {
    return 0;
  }
}
