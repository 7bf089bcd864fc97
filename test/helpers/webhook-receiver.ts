/**
 * A webhook receiver on 127.0.0.1 that verifies X-Diskconv-Signature the way the
 * README tells receivers to (HMAC-SHA256 over `timestamp.body`, timestamp within
 * 5 minutes) and answers with the next status in `statuses` (then 200); a
 * delivery it cannot verify gets 401.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';

export interface Delivery {
  headers: IncomingHttpHeaders;
  body: string;
  verified: boolean;
}

export interface WebhookReceiver {
  url: string;
  deliveries: Delivery[];
  close(): Promise<void>;
}

export async function startReceiver(secret: string, statuses: number[] = []): Promise<WebhookReceiver> {
  const deliveries: Delivery[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const timestamp = String(req.headers['x-diskconv-timestamp'] ?? '');
      const given = Buffer.from(String(req.headers['x-diskconv-signature'] ?? ''));
      const expected = Buffer.from(`sha256=${createHmac('sha256', secret).update(`${timestamp}.`).update(body).digest('hex')}`);
      const fresh = Math.abs(Date.now() / 1000 - Number(timestamp)) < 300;
      const verified = fresh && given.length === expected.length && timingSafeEqual(given, expected);
      deliveries.push({ headers: req.headers, body: body.toString(), verified });
      res.writeHead(verified ? (statuses.shift() ?? 200) : 401).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}/hook`,
    deliveries,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
