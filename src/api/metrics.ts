/** /metrics in the Prometheus text format, from the shared counters in Redis and the queue. */
import { DURATION_BUCKETS, JOB_STATES } from '../queue/records.js';

export interface MetricsInput {
  stats: Record<string, string>;
  depth: { waiting: number; delayed: number; active: number };
}

const num = (v: string | undefined): number => {
  const n = Number(v ?? 0);
  return Number.isFinite(n) ? n : 0;
};

export function renderMetrics({ stats, depth }: MetricsInput): string {
  const lines: string[] = [];
  const metric = (name: string, type: string, help: string, samples: [labels: string, value: number][]): void => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) lines.push(`${name}${labels} ${value}`);
  };
  metric(
    'diskconv_jobs',
    'gauge',
    'Jobs by state (records kept until retention removes them).',
    JOB_STATES.map((s) => [`{state="${s}"}`, Math.max(0, num(stats[`state:${s}`]))]),
  );
  metric('diskconv_converted_bytes_total', 'counter', 'Guest bytes (virtual size) of succeeded conversions.', [['', num(stats.bytes_converted)]]);
  const count = num(stats.conversions);
  metric('diskconv_conversion_seconds', 'histogram', 'Wall time of succeeded conversions.', [
    ...DURATION_BUCKETS.map((le): [string, number] => [`_bucket{le="${le}"}`, num(stats[`conversion_seconds_le_${le}`])]),
    ['_bucket{le="+Inf"}', count],
    ['_sum', num(stats.conversion_seconds_sum)],
    ['_count', count],
  ]);
  metric('diskconv_queue_depth', 'gauge', 'Jobs in the BullMQ queue by state.', [
    ['{state="waiting"}', depth.waiting],
    ['{state="delayed"}', depth.delayed],
    ['{state="active"}', depth.active],
  ]);
  return lines.join('\n') + '\n';
}
