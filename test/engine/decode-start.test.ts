/**
 * decode-start.ts: the hook a process owner (the CLI's convert) sets runs once, at the
 * first compressed cluster decoded, and never for a conversion without one.
 */
import { deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { onFirstDecode } from '../../src/engine/decode-start.js';
import { decode } from '../../src/engine/decompress.js';
import { mixedContent } from '../helpers/qemu.js';

describe('onFirstDecode', () => {
  it('runs once, at the first cluster decoded', async () => {
    let calls = 0;
    onFirstDecode(() => calls++);
    expect(calls).toBe(0);
    const data = mixedContent(65536, 7);
    const input = deflateRawSync(data);
    expect(Buffer.from(await decode('deflate', input, 65536, 'x')).equals(data)).toBe(true);
    expect(calls).toBe(1);
    await decode('deflate', input, 65536, 'x');
    expect(calls).toBe(1);
    // Set again after decoding started, it has nothing left to wait for: it never runs.
    onFirstDecode(() => calls++);
    await decode('deflate', input, 65536, 'x');
    expect(calls).toBe(1);
  });
});
