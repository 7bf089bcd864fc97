/**
 * The fuzzer's child process: runs cases sent over IPC and reports each result
 * with the memory it peaked at. The parent (harness.ts) bounds its time (kills
 * it on a hang) and its memory (--max-old-space-size, plus the peaks reported
 * here, which also count Buffers outside the V8 heap).
 *
 * Started by harness.ts as: node --max-old-space-size=N vite-node.mjs --script worker.ts
 */
import type { FormatId } from '../../src/engine/index.js';
import { runCase, type CaseResult } from './case.js';

export type WorkerRequest =
  | { id: number; bytes: Uint8Array; declared?: FormatId }
  /** Misbehaviours on demand, so tests can prove the harness notices each one. */
  | { id: number; selftest: 'typeerror' | 'hang' | 'heap' | 'buffers' };

export interface WorkerReply {
  id: number;
  result: CaseResult;
  /** Peaks during the case, sampled every few milliseconds. */
  peakRss: number;
  peakArrayBuffers: number;
  ms: number;
}

const SAMPLE_MS = 5;

async function selftest(what: 'typeerror' | 'hang' | 'heap' | 'buffers'): Promise<CaseResult> {
  switch (what) {
    case 'typeerror':
      return runCase(new Uint8Array(0)).then(() => {
        const missing = undefined as unknown as { field: number };
        return { outcome: 'converted', format: 'raw', virtualSize: missing.field, dataBytes: 0 };
      });
    case 'hang':
      for (;;) {
        // A synchronous loop: only the parent's timer can end it.
      }
    case 'heap': {
      const hoard: number[][] = [];
      for (;;) hoard.push(new Array<number>(1e6).fill(1.5));
    }
    case 'buffers': {
      const hoard: Buffer[] = [];
      for (let i = 0; i < 24; i++) {
        hoard.push(Buffer.alloc(16 * 2 ** 20, 1));
        await new Promise((r) => setTimeout(r, 2));
      }
      return { outcome: 'converted', format: 'raw', virtualSize: hoard.length, dataBytes: 0 };
    }
  }
}

process.on('message', (msg: WorkerRequest) => {
  void (async () => {
    // A clean heap before each case, so the peaks belong to it (--expose-gc).
    (globalThis as { gc?: () => void }).gc?.();
    let peakRss = process.memoryUsage.rss();
    let peakArrayBuffers = process.memoryUsage().arrayBuffers;
    const sampler = setInterval(() => {
      peakRss = Math.max(peakRss, process.memoryUsage.rss());
      peakArrayBuffers = Math.max(peakArrayBuffers, process.memoryUsage().arrayBuffers);
    }, SAMPLE_MS);
    const started = performance.now();
    let result: CaseResult;
    try {
      result = 'selftest' in msg ? await selftest(msg.selftest) : await runCase(msg.bytes, msg.declared);
    } catch (err) {
      const e = err instanceof Error ? err : new Error(String(err));
      result = { outcome: 'crash', stage: 'open', name: e.name, message: e.message, stack: e.stack ?? '' };
    }
    clearInterval(sampler);
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
    peakArrayBuffers = Math.max(peakArrayBuffers, process.memoryUsage().arrayBuffers);
    const reply: WorkerReply = { id: msg.id, result, peakRss, peakArrayBuffers, ms: performance.now() - started };
    process.send?.(reply);
  })();
});

process.send?.({ ready: true });
