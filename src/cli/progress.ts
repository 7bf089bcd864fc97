/**
 * qemu-img's progress line (util/qemu-progress.c): `    (%3.2f/100%)\r` on
 * stdout, whether or not it is a terminal; printed at 0, whenever the share
 * grows by more than 1 point, at 100, and once more at 100 at the end before a
 * newline.
 */
export class ProgressPrinter {
  private last = 0;
  private current = 0;

  constructor(private readonly write: (s: string) => void) {}

  private print(): void {
    this.last = this.current;
    this.write(`    (${Math.fround(this.current).toFixed(2)}/100%)\r`);
  }

  start(): void {
    this.current = 0;
    this.print();
  }

  /** `percent` of the work done, 0-100. */
  update(percent: number): void {
    this.current = Math.min(100, Math.fround(percent));
    if (this.current > this.last + 1 || this.current < this.last - 1 || this.current === 100) this.print();
  }

  end(): void {
    this.current = 100;
    this.print();
    this.write('\n');
  }
}
