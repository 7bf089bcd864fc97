/**
 * The bytes of an RBD output for an upload into Glance (a pool Glance does not
 * use, or a refused location): `rbd export POOL/IMAGE@snap -` streamed, never
 * held in memory. A failing rbd ends the stream with its own message.
 */
import { PassThrough, type Readable } from 'node:stream';
import { lastLines, spawnTool } from '../store/rbd/cli.js';
import type { DestinationResult } from '../store/index.js';
import { GlanceUnavailableError } from './glance.js';

export async function rbdExport(result: Pick<DestinationResult, 'pool' | 'image' | 'snapshot'>): Promise<Readable> {
  const spec = `${result.pool}/${result.image}@${result.snapshot}`;
  const child = spawnTool('rbd', ['export', '--no-progress', spec, '-']);
  child.stdin.end();
  const out = new PassThrough({ highWaterMark: 4 * 2 ** 20 });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => {
    if (stderr.length < 64 * 1024) stderr += c.toString();
  });
  child.stdout.pipe(out, { end: false });
  child.once('error', (err) => out.destroy(new GlanceUnavailableError(`cannot run rbd export: ${err.message}`)));
  child.once('close', (code) => {
    if (code === 0) out.end();
    else out.destroy(new GlanceUnavailableError(`rbd export ${spec} failed (exit ${code ?? 'signal'}): ${lastLines(stderr) || 'no message'}`));
  });
  // The reader gave up (Glance refused, cancel): stop rbd too.
  out.once('close', () => {
    if (child.exitCode === null) child.kill('SIGTERM');
  });
  return out;
}
