/** The service's logger: pino, named per process, with secrets redacted from every line. */
import { pino, type Logger } from 'pino';
import type { Config } from './config.js';

/** Paths pino removes from every log line: bearer tokens and passphrases never reach the logs. */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'headers.authorization',
  'request.headers.authorization',
  'authorization',
  '*.authorization',
  // an encrypted image's key, wherever a line might carry it
  'passphrase',
  '*.passphrase',
  'req.body.passphrase',
  'body.passphrase',
];

export function createLogger(config: Pick<Config, 'logLevel'>, name: string): Logger {
  return pino({ name, level: config.logLevel, redact: { paths: REDACT_PATHS, censor: '[redacted]' } });
}

export type { Logger } from 'pino';
