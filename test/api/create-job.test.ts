import { describe, expect, it } from 'vitest';
import { newJobId } from '../../src/api/create-job.js';
import { RbdDestinations } from '../../src/store/rbd/destinations.js';

describe('newJobId', () => {
  // The id is the RBD image's name when a job names none; one id in 64 used to start with '-',
  // which the RBD name rule refuses (tus upload with output_target=rbd failed so in CI).
  it('is 128 random bits in base64url, never refused as a default RBD image name', () => {
    const rbd = new RbdDestinations({ pools: ['images'], commandTimeoutMs: 1000 });
    const seen = new Set<string>();
    for (let i = 0; i < 20_000; i++) {
      const id = newJobId();
      expect(id).toMatch(/^[A-Za-z0-9_][A-Za-z0-9_-]{21}$/);
      expect(() => rbd.check({ target: 'rbd', pool: 'images', image: id })).not.toThrow();
      seen.add(id);
    }
    expect(seen.size).toBe(20_000);
  });
});
