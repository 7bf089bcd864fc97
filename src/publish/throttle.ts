/**
 * Caps the rate at which an output is sent into Glance (GLANCE_UPLOAD_BYTES_PER_SECOND),
 * so a publishing worker does not saturate the Glance API host's link. A pass-through
 * stream that delays each chunk by its share of time; 0 means no cap.
 */
import { Transform, type Readable } from 'node:stream';

export function throttleUpload(body: Readable, bytesPerSecond: number): Readable {
  if (bytesPerSecond <= 0) return body;
  let nextFree = Date.now();
  const slice = Math.max(1, Math.floor(bytesPerSecond / 10));
  const timers = new Set<NodeJS.Timeout>();
  const out = new Transform({
    highWaterMark: slice,
    transform(chunk: Buffer, _enc, done) {
      // Sent in slices of a tenth of a second's worth, so the rate holds for large chunks too.
      const parts: Buffer[] = [];
      for (let i = 0; i < chunk.length; i += slice) parts.push(chunk.subarray(i, i + slice));
      const next = (): void => {
        const part = parts.shift();
        if (!part) {
          done();
          return;
        }
        const now = Date.now();
        const start = Math.max(now, nextFree);
        nextFree = start + (1000 * part.length) / bytesPerSecond;
        const timer = setTimeout(() => {
          timers.delete(timer);
          this.push(part);
          next();
        }, start - now);
        timers.add(timer);
      };
      next();
    },
    destroy(err, cb) {
      for (const t of timers) clearTimeout(t);
      body.destroy();
      cb(err);
    },
  });
  body.once('error', (err) => out.destroy(err));
  return body.pipe(out);
}
