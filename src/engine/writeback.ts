/**
 * Early writeback for an output that will be flushed when it is finished.
 *
 * Without it the kernel keeps everything dirty until the closing fdatasync (its own
 * background writeback starts at dirty_background_ratio, 10 % of memory: gigabytes
 * here), so a flushed conversion is the conversion followed by the write of all of
 * its data. With it, every `everyBytes` written one call starts the writeback of
 * what was written since the last (never two at once), and the closing fdatasync
 * has only the last stretch left.
 *
 * A call that fails is remembered and `settle()` throws it: it is an I/O error of
 * the output, and the kernel may already have reported it to this call instead of
 * to the closing fdatasync.
 */
export const WRITEBACK_BYTES = 32 * 2 ** 20;

/**
 * Starts writeback of [start, end) of the file; resolves false where the file cannot
 * take it (the caller stops asking), true otherwise; rejects on an I/O error.
 */
export type StartWriteback = (start: number, end: number) => Promise<boolean>;

export class EarlyWriteback {
  /** The range written since the last call started: [from, to). */
  private from = Number.POSITIVE_INFINITY;
  private to = 0;
  /** Bytes written since the last call started (holes between writes do not count). */
  private pending = 0;
  private inFlight: Promise<void> | undefined;
  private failure: unknown;
  private stopped = false;
  /** Calls started (for the tests). */
  calls = 0;

  constructor(
    private readonly startWriteback: StartWriteback,
    private readonly everyBytes = WRITEBACK_BYTES,
  ) {}

  /** `length` bytes were written at `offset` (they are in the page cache): starts writeback when enough are new. */
  wrote(offset: number, length: number): void {
    if (length <= 0 || this.stopped) return;
    if (offset < this.from) this.from = offset;
    if (offset + length > this.to) this.to = offset + length;
    this.pending += length;
    if (this.inFlight || this.failure !== undefined || this.pending < this.everyBytes) return;
    const { from, to } = this;
    this.from = Number.POSITIVE_INFINITY;
    this.to = 0;
    this.pending = 0;
    this.calls++;
    this.inFlight = this.startWriteback(from, to)
      .then(
        (supported) => {
          if (!supported) this.stopped = true;
        },
        (err: unknown) => {
          this.failure = err;
        },
      )
      .finally(() => {
        this.inFlight = undefined;
      });
  }

  /** Waits for the call in flight; throws the failure of any call. The descriptor may be closed after it. */
  async settle(): Promise<void> {
    this.stopped = true;
    await this.inFlight;
    if (this.failure !== undefined) throw this.failure;
  }

  /** Waits for the call in flight without reporting (the output is being thrown away). */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.inFlight;
  }
}
