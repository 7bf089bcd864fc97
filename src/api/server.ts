/** The API process: a logger, the app, a listening socket, and a graceful close. */
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import { buildApp, type AppDeps } from './app.js';

export interface RunningServer {
  app: FastifyInstance;
  url: string;
  close(): Promise<void>;
}

export async function startServer(config: Config, deps: AppDeps, logger: Logger): Promise<RunningServer> {
  const app = await buildApp(config, deps, { logger });
  await app.listen({ host: config.host, port: config.port });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : config.port;
  const host = config.host.includes(':') ? `[${config.host}]` : config.host;
  const url = `http://${host === '0.0.0.0' || host === '[::]' ? '127.0.0.1' : host}:${port}`;
  let closing: Promise<void> | undefined;
  return {
    app,
    url,
    close() {
      // In-flight requests finish (return503OnClosing answers new ones); idle keep-alive sockets close.
      closing ??= (async () => {
        const timer = setTimeout(() => app.server.closeAllConnections(), config.shutdownGraceMs);
        timer.unref();
        await app.close();
        clearTimeout(timer);
      })();
      return closing;
    },
  };
}
