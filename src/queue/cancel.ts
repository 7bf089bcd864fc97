/**
 * Delivers cancellations to the worker holding a job: the API marks the record
 * cancelled and publishes the id; every worker subscribes, and also polls the
 * state of its active jobs every second, in case a message was missed while the
 * subscription reconnected. Either path aborts the job's AbortSignal, which
 * reaches the engine's read loop.
 */
import type { Redis } from 'ioredis';
import type { JobRecords } from './records.js';

/** `superseded`: the job is no longer this attempt's (another attempt owns it); not a cancel. */
export type AbortReason = 'cancel' | 'shutdown' | 'superseded';

export class CancelWatcher {
  private readonly active = new Map<string, AbortController>();
  private subscriber: Redis | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly redis: Redis,
    private readonly records: JobRecords,
    private readonly pollMs = 1000,
  ) {}

  async start(): Promise<void> {
    this.subscriber = this.redis.duplicate();
    this.subscriber.on('error', () => {}); // ioredis reconnects; the poll covers the gap
    this.subscriber.on('message', (_channel: string, id: string) => this.abort(id, 'cancel'));
    await this.subscriber.subscribe(this.records.cancelChannel);
    this.timer = setInterval(() => void this.poll(), this.pollMs);
    this.timer.unref();
  }

  /** Registers a job being worked on; returns its controller. */
  track(id: string): AbortController {
    const controller = new AbortController();
    this.active.set(id, controller);
    return controller;
  }

  untrack(id: string): void {
    this.active.delete(id);
  }

  abort(id: string, reason: AbortReason): void {
    const controller = this.active.get(id);
    if (controller && !controller.signal.aborted) controller.abort(reason);
  }

  abortAll(reason: AbortReason): void {
    for (const id of this.active.keys()) this.abort(id, reason);
  }

  private async poll(): Promise<void> {
    if (this.active.size === 0) return;
    const ids = [...this.active.keys()];
    try {
      const states = await Promise.all(ids.map((id) => this.records.getState(id)));
      ids.forEach((id, i) => {
        const state = states[i];
        if (state === undefined || state === 'cancelled') this.abort(id, 'cancel');
      });
    } catch {
      // Redis unreachable: the job itself will fail over to a retry if it needs Redis.
    }
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.subscriber) {
      await this.subscriber.quit().catch(() => this.subscriber?.disconnect());
    }
  }
}
