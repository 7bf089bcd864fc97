/**
 * A local HTTP server standing in for the web during URL-import tests. Routes:
 *   /range/<name>     honours Range requests (Accept-Ranges: bytes)
 *   /plain/<name>     ignores Range, always the whole body (no Accept-Ranges)
 *   /drop/<name>      like /range, but the first response of more than 64 KiB is cut halfway
 *   /redirect/<name>  302 to /range/<name>
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer, type Server, type ServerResponse } from 'node:http';
import { join } from 'node:path';

export interface FileServer {
  url: string;
  port: number;
  /** Requests seen, "METHOD path range". */
  log: string[];
  /** Responses cut on purpose, by file name. */
  dropped: Set<string>;
  /** The service settings that allow URL imports from this server (loopback, its port). */
  importEnv: { URL_IMPORT_ALLOW: string; URL_IMPORT_PORTS: string };
  close(): Promise<void>;
}

export async function startFileServer(dir: string): Promise<FileServer> {
  const log: string[] = [];
  const dropped = new Set<string>();
  /** Sends [start, end]; for /drop, the first long response stops halfway and the connection is reset. */
  const send = (res: ServerResponse, path: string, start: number, end: number, dropName?: string): void => {
    if (dropName !== undefined && !dropped.has(dropName) && end - start + 1 > 64 * 1024) {
      dropped.add(dropName);
      const half = createReadStream(path, { start, end: start + Math.floor((end - start) / 2) });
      half.on('data', (c) => res.write(c));
      half.on('end', () => res.socket?.destroy());
      return;
    }
    createReadStream(path, { start, end }).pipe(res);
  };
  const server: Server = createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', 'http://x');
      const [, mode, name] = url.pathname.split('/');
      log.push(`${req.method} ${url.pathname} ${req.headers.range ?? ''}`);
      if (!mode || !name || !/^[\w.-]+$/.test(name)) {
        res.writeHead(404).end();
        return;
      }
      if (mode === 'redirect') {
        res.writeHead(302, { location: `/range/${name}` }).end();
        return;
      }
      const path = join(dir, name);
      const st = await stat(path).catch(() => undefined);
      if (!st) {
        res.writeHead(404).end();
        return;
      }
      const size = st.size;
      const ranged = mode === 'range' || mode === 'drop';
      const m = ranged ? /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '') : null;
      if (m) {
        const start = Number(m[1]);
        const end = m[2] ? Math.min(Number(m[2]), size - 1) : size - 1;
        if (start >= size) {
          res.writeHead(416, { 'content-range': `bytes */${size}` }).end();
          return;
        }
        res.writeHead(206, { 'accept-ranges': 'bytes', 'content-range': `bytes ${start}-${end}/${size}`, 'content-length': String(end - start + 1), etag: '"v1"' });
        if (req.method === 'HEAD') res.end();
        else send(res, path, start, end, mode === 'drop' ? name : undefined);
        return;
      }
      res.writeHead(200, { 'content-length': String(size), ...(ranged ? { 'accept-ranges': 'bytes', etag: '"v1"' } : {}) });
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      send(res, path, 0, size - 1, mode === 'drop' ? name : undefined);
    })();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    log,
    dropped,
    importEnv: { URL_IMPORT_ALLOW: '127.0.0.1', URL_IMPORT_PORTS: `80,443,${port}` },
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
