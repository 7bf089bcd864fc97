/** Part sizes and parts in flight of the S3 output (no bucket needed): S3's rules, and the memory they bound. */
import { describe, expect, it } from 'vitest';
import { MAX_PARTS, partSizeFor } from '../../src/store/s3/objects.js';
import { PARTS_IN_FLIGHT, partsInFlightFor } from '../../src/store/s3/output.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

describe('S3 output parts', () => {
  it('derives the part size from the virtual size: at least 5 MiB, at most 10,000 parts', () => {
    for (const size of [0, 1, 5 * MiB, 4 * GiB, 16 * GiB, 80 * GiB, 100 * GiB, 1024 * GiB, 5 * 1024 * GiB]) {
      const part = partSizeFor(size);
      expect(part).toBeGreaterThanOrEqual(5 * MiB);
      expect(Math.ceil(size / part)).toBeLessThanOrEqual(MAX_PARTS);
    }
    expect(partSizeFor(4 * GiB)).toBe(8 * MiB);
    expect(partSizeFor(16 * GiB)).toBe(8 * MiB);
  });

  it('keeps the part buffers (parts in flight + the one filled) near 40 MiB, never fewer than one in flight', () => {
    expect(partsInFlightFor(partSizeFor(4 * GiB))).toBe(PARTS_IN_FLIGHT);
    for (const size of [4 * GiB, 16 * GiB, 100 * GiB, 130 * GiB]) {
      const part = partSizeFor(size);
      expect((partsInFlightFor(part) + 1) * part).toBeLessThanOrEqual(40 * MiB);
    }
    // Parts so large that two buffers pass the bound: one in flight, one filled.
    expect(partsInFlightFor(partSizeFor(1024 * GiB))).toBe(1);
    expect(partsInFlightFor(8 * MiB, 1)).toBe(1);
  });
});
