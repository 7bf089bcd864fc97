/**
 * JoinedSource: the archive and the members staged or joined beside it as one
 * address space. Reads inside one segment, across segments, over the alignment
 * padding and past the end; batched reads; holes; closing closes only what it owns.
 */
import { describe, expect, it } from 'vitest';
import { BufferSource } from '../../../src/engine/index.js';
import { JoinedSource } from '../../../src/engine/archive/joined-source.js';
import { MemberSource } from '../../../src/engine/archive/member-source.js';

const bytes = (n: number, seed: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff));

describe('JoinedSource', () => {
  it('lays segments after the first at the alignment asked, padding reading as zeros', async () => {
    const a = bytes(5000, 1);
    const b = bytes(3000, 2);
    const c = bytes(10, 3);
    const joined = new JoinedSource('x', new BufferSource(a));
    expect(joined.extended).toBe(false);
    const atB = joined.append(new BufferSource(b), { owned: false });
    const atC = joined.append(new BufferSource(c), { owned: false, align: 1 });
    expect(atB).toBe(8192);
    expect(atC).toBe(8192 + 3000);
    expect(joined.size).toBe(8192 + 3010);
    expect(joined.extended).toBe(true);
    const whole = Buffer.concat([a, Buffer.alloc(8192 - 5000), b, c]);
    // Every window of a few sizes, from every 997th offset: the same bytes as the flat layout.
    for (let at = 0; at < whole.length; at += 997) {
      for (const len of [1, 100, 4000, 20000]) {
        const got = Buffer.from(await joined.read(at, len));
        expect(got.equals(whole.subarray(at, Math.min(whole.length, at + len))), `read ${at}+${len}`).toBe(true);
        const target = Buffer.alloc(len, 0xee);
        const n = await joined.readInto(target, at);
        expect(n).toBe(Math.min(len, whole.length - at));
        expect(target.subarray(0, n).equals(whole.subarray(at, at + n)), `readInto ${at}+${len}`).toBe(true);
      }
    }
    expect((await joined.read(whole.length, 10)).length).toBe(0);
    const targets = [Buffer.alloc(10), Buffer.alloc(6000), Buffer.alloc(50)];
    const counts = await joined.readIntoMany(targets, [4995, 4000, whole.length - 20]);
    expect(counts).toEqual([10, 6000, 20]);
    expect(targets[1]?.equals(whole.subarray(4000, 10000))).toBe(true);
    expect(targets[2]?.subarray(0, 20).equals(whole.subarray(whole.length - 20))).toBe(true);
  });

  it('dataRanges answers only within one segment, in joined coordinates; close closes only owned segments', async () => {
    let closed = 0;
    const owned = Object.assign(new BufferSource(bytes(100, 4)), {
      close: async () => void closed++,
      dataRanges: async (offset: number, end: number) => [offset, end],
    });
    const base = Object.assign(new BufferSource(bytes(100, 5)), { close: async () => void (closed += 10) });
    const joined = new JoinedSource('x', base);
    const at = joined.append(owned, { owned: true });
    expect(await joined.dataRanges(at + 10, at + 20, 8)).toEqual([at + 10, at + 20]);
    expect(await joined.dataRanges(50, at + 20, 8)).toBeUndefined();
    await joined.close();
    expect(closed).toBe(1);
    expect(joined.size).toBe(100);
    expect(joined.extended).toBe(false);
  });
});

/** A buffer that records the reader's announcements (RandomAccessSource.willRead), as a range source would act on them. */
class AnnouncedSource extends BufferSource {
  readonly announced: Array<[number, number]> = [];
  willRead(start: number, end: number): void {
    this.announced.push([start, end]);
  }
}

describe('announcements (willRead) through members and joined sources', () => {
  it('a member shifts and clips them into its window; a joined source sends each part to its segment', () => {
    const archive = new AnnouncedSource(bytes(100_000, 4));
    const member = new MemberSource(archive, 10_000, 5_000, 'm');
    member.willRead?.(100, 200);
    member.willRead?.(4_900, 9_000); // clipped at the member's end
    member.willRead?.(6_000, 7_000); // wholly past it: nothing
    expect(archive.announced).toEqual([
      [10_100, 10_200],
      [14_900, 15_000],
    ]);
    const second = new AnnouncedSource(bytes(3_000, 5));
    const joined = new JoinedSource('j', archive);
    const at = joined.append(new BufferSource(bytes(3_000, 6)), { owned: false });
    const atSecond = joined.append(second, { owned: false });
    archive.announced.length = 0;
    joined.willRead?.(99_000, atSecond + 1_000); // the archive's tail, the plain segment, padding, the second's head
    expect(at).toBe(102_400);
    expect(archive.announced).toEqual([[99_000, 100_000]]);
    expect(second.announced).toEqual([[0, 1_000]]);
  });

  it('sources over a source that cannot fetch ahead have no willRead, so the reader plans nothing for them', () => {
    const plain = new BufferSource(bytes(10_000, 7));
    expect(new MemberSource(plain, 0, 100, 'm').willRead).toBeUndefined();
    const joined = new JoinedSource('j', plain);
    joined.append(new BufferSource(bytes(10, 8)), { owned: false });
    expect(joined.willRead).toBeUndefined();
    // Members of a joined source over members (an OVF file in chunks) nest without asking in circles.
    const over = new JoinedSource('k');
    over.append(new MemberSource(joined, 0, 5_000, 'c0'), { owned: false, align: 1 });
    joined.append(over, { owned: false });
    expect(over.willRead).toBeUndefined();
  });
});
