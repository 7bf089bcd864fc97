import type { Extent, ExtentSink } from '../../src/engine/index.js';

/** The engine broke its own contract (extent order, lengths): a bug, never an image's fault. */
export class ContractViolation extends Error {
  override name = 'ContractViolation';
}

/**
 * A sink that writes nothing and counts: a hostile virtual size costs no disk,
 * and every extent is checked to be in order, contiguous and of its stated length.
 */
export class CountingSink implements ExtentSink {
  dataBytes = 0;
  zeroBytes = 0;
  extents = 0;
  private next = 0;
  finished: number | undefined;
  aborted = false;

  async write(extent: Extent): Promise<void> {
    if (extent.offset !== this.next) throw new ContractViolation(`extent at ${extent.offset}, expected ${this.next}`);
    if (!Number.isSafeInteger(extent.length) || extent.length <= 0) throw new ContractViolation(`extent at ${extent.offset} has length ${extent.length}`);
    if (extent.kind === 'data') {
      if (extent.data.length !== extent.length) throw new ContractViolation(`data extent at ${extent.offset}: ${extent.data.length} bytes for length ${extent.length}`);
      this.dataBytes += extent.length;
    } else {
      this.zeroBytes += extent.length;
    }
    this.extents++;
    this.next += extent.length;
  }

  async finish(virtualSize: number): Promise<void> {
    if (this.next !== virtualSize) throw new ContractViolation(`extents end at ${this.next}, virtual size is ${virtualSize}`);
    this.finished = virtualSize;
  }

  async abort(): Promise<void> {
    this.aborted = true;
  }
}
