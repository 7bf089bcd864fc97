/**
 * Runs fuzz cases in a child process and judges each one: a case must end in
 * success or a typed DiskconvError, within a time bound (the child is killed
 * and restarted on a hang) and a memory bound (V8 heap capped with
 * --max-old-space-size; RSS and ArrayBuffer peaks reported by the child).
 */
import { fork, type ChildProcess } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FormatId } from '../../src/engine/index.js';
import type { CaseResult } from './case.js';
import { compareWithQemu } from './differential.js';
import { describeMutations, makeCase, seedShape, type FuzzCase, type SeedImage } from './mutate.js';
import type { WorkerReply, WorkerRequest } from './worker.js';

const VITE_NODE = fileURLToPath(new URL('../../node_modules/vite-node/vite-node.mjs', import.meta.url));
const WORKER = fileURLToPath(new URL('./worker.ts', import.meta.url));

export interface Bounds {
  /** Per-case wall-clock bound. */
  caseTimeoutMs: number;
  /** V8 old-space cap for the child (MiB); exceeding it kills the child. */
  heapMiB: number;
  /** Peak resident memory of the child during a case. */
  rssLimitBytes: number;
  /** Peak bytes in ArrayBuffers/Buffers (outside the V8 heap) during a case. */
  arrayBufferLimitBytes: number;
}

export const DEFAULT_BOUNDS: Bounds = {
  caseTimeoutMs: 10_000,
  heapMiB: 256,
  rssLimitBytes: 768 * 2 ** 20,
  arrayBufferLimitBytes: 256 * 2 ** 20,
};

export type Verdict =
  | { ok: true; result: CaseResult; ms: number; peakRss: number }
  | { ok: false; kind: 'crash' | 'hang' | 'memory' | 'died' | 'differs'; detail: string; result?: CaseResult; ms: number };

type Pending = { resolve: (v: Verdict) => void; timer: NodeJS.Timeout; started: number };

/** A long-lived child that runs cases one at a time; restarted after any failure. */
export class FuzzWorker {
  private child: ChildProcess | undefined;
  private pending: Pending | undefined;
  private stderrTail = '';
  private nextId = 1;

  constructor(readonly bounds: Bounds = DEFAULT_BOUNDS) {}

  private async start(): Promise<ChildProcess> {
    const child = fork(VITE_NODE, ['--script', WORKER], {
      execArgv: [`--max-old-space-size=${this.bounds.heapMiB}`, '--expose-gc'],
      serialization: 'advanced',
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    child.stderr?.on('data', (chunk: Buffer) => {
      this.stderrTail = (this.stderrTail + chunk.toString()).slice(-4000);
    });
    await new Promise<void>((resolve, reject) => {
      const onMessage = (m: unknown): void => {
        if ((m as { ready?: boolean }).ready) {
          child.off('exit', onExit);
          resolve();
        }
      };
      const onExit = (code: number | null): void => reject(new Error(`fuzz worker exited during start-up (${code}): ${this.stderrTail}`));
      child.once('message', onMessage);
      child.once('exit', onExit);
    });
    child.on('message', (m: WorkerReply) => this.onReply(m));
    child.on('exit', (code, signal) => this.onExit(code, signal));
    this.child = child;
    return child;
  }

  private settle(verdict: Verdict): void {
    const p = this.pending;
    if (!p) return;
    clearTimeout(p.timer);
    this.pending = undefined;
    p.resolve(verdict);
  }

  private onReply(reply: WorkerReply): void {
    const { result, peakRss, peakArrayBuffers, ms } = reply;
    if (result.outcome === 'crash') {
      this.settle({ ok: false, kind: 'crash', detail: `${result.name} during ${result.stage}: ${result.message}\n${result.stack}`, result, ms });
    } else if (peakRss > this.bounds.rssLimitBytes || peakArrayBuffers > this.bounds.arrayBufferLimitBytes) {
      this.settle({ ok: false, kind: 'memory', detail: `peak RSS ${mib(peakRss)} MiB, peak ArrayBuffers ${mib(peakArrayBuffers)} MiB`, result, ms });
      this.kill(); // start the next case from a fresh process
    } else {
      this.settle({ ok: true, result, ms, peakRss });
    }
  }

  private onExit(code: number | null, signal: NodeJS.Signals | null): void {
    this.child = undefined;
    const p = this.pending;
    if (p) {
      const oom = /heap out of memory|Allocation failed/i.test(this.stderrTail);
      this.settle({
        ok: false,
        kind: oom ? 'memory' : 'died',
        detail: `worker exited (code ${code}, signal ${signal}) during the case${oom ? ': V8 heap limit reached' : ''}\n${this.stderrTail.slice(-1500)}`,
        ms: performance.now() - p.started,
      });
    }
  }

  private kill(): void {
    const child = this.child;
    this.child = undefined;
    child?.removeAllListeners('exit');
    child?.kill('SIGKILL');
  }

  async run(bytes: Uint8Array, declared?: FormatId): Promise<Verdict> {
    return this.send({ id: this.nextId++, bytes, ...(declared ? { declared } : {}) });
  }

  /** Runs a deliberate misbehaviour in the child; used to prove the bounds bite. */
  async selftest(what: 'typeerror' | 'hang' | 'heap' | 'buffers'): Promise<Verdict> {
    return this.send({ id: this.nextId++, selftest: what });
  }

  private async send(request: WorkerRequest): Promise<Verdict> {
    const child = this.child ?? (await this.start());
    this.stderrTail = '';
    return new Promise<Verdict>((resolve) => {
      const started = performance.now();
      const timer = setTimeout(() => {
        this.settle({ ok: false, kind: 'hang', detail: `no result within ${this.bounds.caseTimeoutMs} ms; worker killed`, ms: performance.now() - started });
        this.kill();
      }, this.bounds.caseTimeoutMs);
      this.pending = { resolve, timer, started };
      child.send(request);
    });
  }

  async close(): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    child.removeAllListeners('exit');
    await new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.kill('SIGTERM');
    });
  }
}

const mib = (n: number): string => (n / 2 ** 20).toFixed(0);

export interface Finding {
  fuzzCase: FuzzCase;
  verdict: Extract<Verdict, { ok: false }>;
  /** Where the bytes and the description were written, when a directory was given. */
  saved?: string;
}

export interface RunSummary {
  cases: number;
  converted: number;
  refused: Record<string, number>;
  findings: Finding[];
  /** With the differential oracle: converted cases qemu-img agreed on, and those it refused. */
  qemuSame: number;
  qemuRefuses: Array<{ fuzzCase: FuzzCase; qemuError: string }>;
  slowestMs: number;
  peakRss: number;
}

export interface RunOptions {
  seeds: readonly SeedImage[];
  runSeed: number;
  /** Stop after this many cases... */
  cases?: number;
  /** ...or after this many seconds, whichever comes first. */
  seconds?: number;
  /** First case index (to resume or replay a range). */
  firstCase?: number;
  bounds?: Bounds;
  /** Failing cases are written here as NAME.bin plus NAME.json. */
  findingsDir?: string;
  /** Compare every converted case with qemu-img (a scratch directory for its files). */
  differential?: { dir: string };
  onProgress?: (summary: RunSummary) => void;
}

export async function runFuzz(options: RunOptions): Promise<RunSummary> {
  const shapes = options.seeds.map(seedShape);
  const worker = new FuzzWorker(options.bounds);
  const summary: RunSummary = { cases: 0, converted: 0, refused: {}, findings: [], qemuSame: 0, qemuRefuses: [], slowestMs: 0, peakRss: 0 };
  const deadline = options.seconds !== undefined ? Date.now() + options.seconds * 1000 : Infinity;
  const limit = options.cases ?? Infinity;
  let lastProgress = Date.now();
  try {
    for (let index = options.firstCase ?? 0; summary.cases < limit && Date.now() < deadline; index++) {
      const fuzzCase = makeCase(options.seeds, shapes, options.runSeed, index);
      let verdict = await worker.run(fuzzCase.bytes, fuzzCase.declared);
      summary.cases++;
      if (options.differential && verdict.ok && verdict.result.outcome === 'converted' && verdict.result.sha256) {
        const r = verdict.result;
        const c = await compareWithQemu(fuzzCase.bytes, r.format, r.virtualSize, r.sha256 as string, options.differential.dir);
        if (c.verdict === 'same') summary.qemuSame++;
        else if (c.verdict === 'qemu-refuses') summary.qemuRefuses.push({ fuzzCase, qemuError: c.qemuError });
        else if (c.verdict === 'different') {
          verdict = { ok: false, kind: 'differs', detail: `converted as ${r.format} to sha256 ${r.sha256}, qemu-img -f ${r.format} gives ${c.qemuSha256}`, result: r, ms: verdict.ms };
        }
      }
      summary.slowestMs = Math.max(summary.slowestMs, verdict.ms);
      if (verdict.ok) {
        summary.peakRss = Math.max(summary.peakRss, verdict.peakRss);
        if (verdict.result.outcome === 'converted') summary.converted++;
        else if (verdict.result.outcome === 'refused') summary.refused[verdict.result.code] = (summary.refused[verdict.result.code] ?? 0) + 1;
      } else {
        const finding: Finding = { fuzzCase, verdict };
        if (options.findingsDir) finding.saved = await saveFinding(options.findingsDir, options.runSeed, finding);
        summary.findings.push(finding);
      }
      if (options.onProgress && Date.now() - lastProgress > 5000) {
        lastProgress = Date.now();
        options.onProgress(summary);
      }
    }
  } finally {
    await worker.close();
  }
  return summary;
}

async function saveFinding(dir: string, runSeed: number, finding: Finding): Promise<string> {
  const { fuzzCase, verdict } = finding;
  await mkdir(dir, { recursive: true });
  const base = join(dir, `${verdict.kind}-${fuzzCase.seed.replace(/[^A-Za-z0-9.-]+/g, '_')}-seed${runSeed}-case${fuzzCase.index}`);
  await writeFile(`${base}.bin`, fuzzCase.bytes);
  await writeFile(
    `${base}.json`,
    JSON.stringify(
      {
        kind: verdict.kind,
        seedImage: fuzzCase.seed,
        runSeed,
        caseIndex: fuzzCase.index,
        declared: fuzzCase.declared ?? null,
        mutations: describeMutations(fuzzCase.mutations),
        detail: verdict.detail,
        replay: `npm run fuzz -- --replay ${base}.bin${fuzzCase.declared ? ` --format ${fuzzCase.declared}` : ''}`,
      },
      null,
      2,
    ) + '\n',
  );
  return `${base}.bin`;
}
