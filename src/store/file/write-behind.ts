/**
 * Write-behind flushing of a file being written: every `everyBytes` written, one
 * `fdatasync` runs in the background (never two at once), so the data reaches the
 * disk while the file grows and the commit's fsync (objects.ts publish) has only
 * the last stretch left. Without it the kernel holds everything dirty until the
 * commit (dirty_background_ratio is gigabytes on a large machine): a 1.2 GiB
 * output took 1.9 s to fsync at its commit, after its last byte had arrived.
 *
 * A background flush that fails is remembered and `finish()` throws it: an I/O
 * error reported to this descriptor would not be seen by the commit's fsync
 * through a descriptor opened later.
 */
import { open, type FileHandle } from 'node:fs/promises';

export const WRITE_BEHIND_BYTES = 32 * 2 ** 20;

export class WriteBehind {
  private flushedAt = 0;
  private inFlight: Promise<void> | undefined;
  private failure: unknown;
  private closed = false;
  /** Background flushes started (for the tests). */
  flushes = 0;

  private constructor(
    private readonly handle: FileHandle,
    private readonly everyBytes: number,
  ) {}

  /** Opens its own descriptor on `path` (the writer's may be closed or owned elsewhere). */
  static async open(path: string, everyBytes = WRITE_BEHIND_BYTES): Promise<WriteBehind> {
    return new WriteBehind(await open(path, 'r+'), everyBytes);
  }

  /** The writer has written `total` bytes so far: flushes in the background when enough are new. */
  written(total: number): void {
    if (this.closed || this.inFlight || this.failure !== undefined || total - this.flushedAt < this.everyBytes) return;
    this.flushes++;
    this.inFlight = this.handle
      .datasync()
      .then(
        () => {
          this.flushedAt = Math.max(this.flushedAt, total);
        },
        (err: unknown) => {
          this.failure = err;
        },
      )
      .finally(() => {
        this.inFlight = undefined;
      });
  }

  /**
   * Waits for the flush in flight, then fsyncs (data and metadata: the commit needs no fsync of its own after it,
   * objects.ts publish `synced`), closes; throws a background flush's failure.
   */
  async finish(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.inFlight;
      if (this.failure !== undefined) throw this.failure;
      await this.handle.sync();
    } finally {
      await this.handle.close().catch(() => {});
    }
  }

  /** Stops without flushing (the write is being thrown away). */
  async abort(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inFlight;
    await this.handle.close().catch(() => {});
  }
}
