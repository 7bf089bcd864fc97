/**
 * Real HTTP servers on loopback for URL-import tests: a static file server with
 * or without range support, and knobs for the failures the importer must
 * survive (dropped connections, stalls, redirects). Every request is recorded.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface RecordedRequest {
  method: string;
  path: string;
  host: string | undefined;
  range: string | undefined;
  ifRange: string | undefined;
}

export interface TestServer {
  /** `http://host:port` */
  origin: string;
  port: number;
  requests: RecordedRequest[];
  close(): Promise<void>;
}

export type Handler = (req: IncomingMessage, res: ServerResponse, index: number) => void;

export async function startServer(handler: Handler, host = '127.0.0.1'): Promise<TestServer> {
  const requests: RecordedRequest[] = [];
  const server = http.createServer((req, res) => {
    const header = (name: string): string | undefined => {
      const v = req.headers[name];
      return Array.isArray(v) ? v[0] : v;
    };
    requests.push({ method: req.method ?? '', path: req.url ?? '', host: header('host'), range: header('range'), ifRange: header('if-range') });
    handler(req, res, requests.length - 1);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  const origin = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  return {
    origin,
    port,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export interface FileOptions {
  /** Honour Range requests and say Accept-Ranges: bytes. */
  ranges: boolean;
  etag?: string;
  /** No Content-Length (chunked). */
  chunked?: boolean;
  /** Content-Length to announce instead of the real one (lies). */
  announcedLength?: number;
  /**
   * Destroy the connection after this many body bytes, for the responses whose
   * request index (0-based, among requests reaching this handler) is listed.
   */
  dropAfter?: { bytes: number; requests: number[] };
  /** Send this many body bytes, then nothing (the socket stays open). */
  stallAfter?: number;
  /** Send the body in chunks of this size, one every `trickleMs`. */
  trickle?: { chunk: number; everyMs: number };
}

/** Serves `data` for GET with the given behaviour. */
export function fileHandler(data: Buffer, options: FileOptions): Handler {
  let index = 0;
  return (req, res) => {
    const mine = index++;
    const headers: Record<string, string | number> = { 'content-type': 'application/octet-stream' };
    if (options.etag) headers.etag = options.etag;
    if (options.ranges) headers['accept-ranges'] = 'bytes';
    let start = 0;
    let end = data.length; // exclusive
    let status = 200;
    const range = req.headers.range;
    const ifRangeOk = req.headers['if-range'] === undefined || req.headers['if-range'] === options.etag;
    if (options.ranges && range && ifRangeOk) {
      const m = /^bytes=(\d+)-(\d*)$/.exec(range);
      if (!m) {
        res.writeHead(416, { 'content-range': `bytes */${data.length}` }).end();
        return;
      }
      start = Number(m[1]);
      end = m[2] === '' ? data.length : Math.min(data.length, Number(m[2]) + 1);
      if (start >= data.length || end <= start) {
        res.writeHead(416, { 'content-range': `bytes */${data.length}` }).end();
        return;
      }
      status = 206;
      headers['content-range'] = `bytes ${start}-${end - 1}/${data.length}`;
    }
    const body = data.subarray(start, end);
    if (!options.chunked) headers['content-length'] = options.announcedLength ?? body.length;
    res.writeHead(status, headers);

    const drop = options.dropAfter && options.dropAfter.requests.includes(mine) ? options.dropAfter.bytes : undefined;
    if (drop !== undefined) {
      res.flushHeaders();
      res.write(body.subarray(0, Math.min(drop, body.length)), () => setTimeout(() => req.socket.destroy(), 20));
      return;
    }
    if (options.stallAfter !== undefined) {
      res.write(body.subarray(0, options.stallAfter));
      return; // never ends
    }
    if (options.trickle) {
      const { chunk, everyMs } = options.trickle;
      let pos = 0;
      const timer = setInterval(() => {
        if (res.destroyed) return clearInterval(timer);
        res.write(body.subarray(pos, pos + chunk));
        pos += chunk;
        if (pos >= body.length) {
          clearInterval(timer);
          res.end();
        }
      }, everyMs);
      res.on('close', () => clearInterval(timer));
      return;
    }
    res.end(body);
  };
}

/** Routes by exact path; anything else is a 404. */
export function routes(table: Record<string, Handler>): Handler {
  return (req, res, index) => {
    const path = (req.url ?? '').split('?')[0] ?? '';
    const handler = table[path];
    if (handler) handler(req, res, index);
    else res.writeHead(404).end('not found');
  };
}

export function redirect(location: string, status = 302): Handler {
  return (_req, res) => {
    res.writeHead(status, { location }).end();
  };
}

/**
 * A TCP port where connecting hangs: a listener that never accepts (python3,
 * since Node always accepts), with its one-slot accept queue filled by a
 * connection of ours, so the kernel ignores further SYNs.
 */
export async function startBlackhole(): Promise<{ port: number; close(): Promise<void> }> {
  const { spawn } = await import('node:child_process');
  const net = await import('node:net');
  const script = [
    'import socket, sys',
    's = socket.socket()',
    's.bind(("127.0.0.1", 0))',
    's.listen(0)',
    'print(s.getsockname()[1], flush=True)',
    'sys.stdin.read()',
  ].join('\n');
  const child = spawn('python3', ['-c', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('error', reject);
    child.stdout.once('data', (data: Buffer) => resolve(Number(data.toString().trim())));
  });
  const fillers = [net.connect(port, '127.0.0.1')];
  await new Promise<void>((resolve, reject) => {
    fillers[0]?.once('connect', () => resolve());
    fillers[0]?.once('error', reject);
  });
  fillers.push(net.connect(port, '127.0.0.1'));
  for (const f of fillers) f.on('error', () => {});
  return {
    port,
    close: async () => {
      for (const f of fillers) f.destroy();
      child.stdin.end();
      child.kill();
    },
  };
}
