/**
 * qemu-img's progress line (util/qemu-progress.c): `    (%3.2f/100%)\r` on
 * stdout, whether or not it is a terminal; printed at 0, whenever the share
 * grows by more than 1 point, at 100, and once more at 100 at the end before a
 * newline.
 */
/** printf's `%.2f`: exact ties (3.125) round to even (3.12), as glibc does; toFixed would give 3.13. */
export function printf2(v: number): string {
  const thousandths = v * 1000;
  if (Number.isInteger(thousandths) && Math.abs(thousandths) % 10 === 5) {
    const down = Math.floor(v * 100);
    return ((down % 2 === 0 ? down : down + 1) / 100).toFixed(2);
  }
  return v.toFixed(2);
}

export class ProgressPrinter {
  private last = 0;
  private current = 0;

  /** `minStep`: points the share must move before it is printed again (qemu-img convert 1, compare 2). */
  constructor(
    private readonly write: (s: string) => void,
    private readonly minStep = 1,
  ) {}

  private print(): void {
    this.last = this.current;
    this.write(`    (${printf2(Math.fround(this.current))}/100%)\r`);
  }

  start(): void {
    this.current = 0;
    this.print();
  }

  /** `percent` of the work done, 0-100. */
  update(percent: number): void {
    this.current = Math.min(100, Math.fround(percent));
    if (this.current > this.last + this.minStep || this.current < this.last - this.minStep || this.current === 100) this.print();
  }

  end(): void {
    this.current = 100;
    this.print();
    this.write('\n');
  }

  /** qemu_progress_end() alone: the newline, without a last 100 (compare, or a command that failed). */
  close(): void {
    this.write('\n');
  }
}
