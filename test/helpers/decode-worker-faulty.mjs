// A decoder worker for test/engine/decode-pool.test.ts: serves decode requests with
// the built pool's own protocol (dist/engine/decode-pool.js), but its "codec" copies
// the input and fails on purpose by the input's first byte:
//   0xEE  the thread exits (a worker dying mid-batch), 0xEF a TypeError (our bug),
//   0xED  a CodecDataError (the data's fault).
// With workerData.failAtStart the thread dies before serving anything.
import { parentPort, workerData } from 'node:worker_threads';
import { serveDecodeRequests } from '../../dist/engine/decode-pool.js';
import { CodecDataError } from '../../dist/engine/codec-error.js';

if (workerData?.failAtStart) process.exit(5);
serveDecodeRequests(parentPort, (_codec, input, decodedLength, alloc) => {
  if (input[0] === 0xee) process.exit(7);
  if (input[0] === 0xef) throw new TypeError('decoder bug');
  if (input[0] === 0xed) throw new CodecDataError('bad data');
  const out = alloc(decodedLength);
  out.fill(0);
  out.set(input.subarray(0, Math.min(input.length, decodedLength)));
  return out;
});
