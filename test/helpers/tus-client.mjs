// A tus client process for tests (tus-js-client in Node). Prints one JSON line per event.
//   node tus-client.mjs start  ENDPOINT FILE TOKEN CHUNK KILL_AFTER_CHUNKS METADATA_JSON
//   node tus-client.mjs resume UPLOAD_URL FILE TOKEN CHUNK
import { readFileSync } from 'node:fs';
import * as tus from 'tus-js-client';

const [mode, target, file, token, chunk, killAfter, metadata] = process.argv.slice(2);
const data = readFileSync(file);
const say = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
let chunks = 0;
const upload = new tus.Upload(data, {
  ...(mode === 'start' ? { endpoint: target } : { uploadUrl: target }),
  chunkSize: Number(chunk),
  uploadSize: data.length,
  metadata: metadata ? JSON.parse(metadata) : {},
  headers: token ? { Authorization: `Bearer ${token}` } : {},
  retryDelays: [],
  storeFingerprintForResuming: false,
  onUploadUrlAvailable: () => say({ event: 'url', url: upload.url }),
  onBeforeRequest: (req) => {
    if (req.getMethod() === 'PATCH') say({ event: 'patch', offset: Number(req.getHeader('Upload-Offset')) });
  },
  onAfterResponse: (req, res) => {
    const job = res.getHeader('Diskconv-Job');
    if (job) say({ event: 'job', job });
    if (req.getMethod() === 'HEAD') say({ event: 'head', offset: Number(res.getHeader('Upload-Offset')) });
  },
  onChunkComplete: (_size, accepted) => {
    chunks++;
    say({ event: 'chunk', accepted });
    if (killAfter && chunks >= Number(killAfter)) process.kill(process.pid, 'SIGKILL'); // cut off, mid-upload
  },
  onSuccess: () => say({ event: 'success' }),
  onError: (err) => {
    say({ event: 'error', message: String(err) });
    process.exitCode = 1;
  },
});
upload.start();
