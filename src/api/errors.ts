/**
 * Every error the API answers with, in one place: a stable code, its HTTP status,
 * a title, and the mapping from engine, URL, store, fastify and multipart errors
 * to those codes. Answers are application/problem+json (RFC 9457) with
 * {type, title, status, detail, code}; on 5xx the detail never carries internals.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { ZodError } from 'zod';
import { DiskconvError, isDiskconvError } from '../engine/errors.js';

interface CodeInfo {
  status: number;
  title: string;
}

/** Code -> status and title. The README's error table is this table. */
export const ERROR_CODES = {
  // request
  BAD_REQUEST: { status: 400, title: 'Bad request' },
  INVALID_JSON: { status: 400, title: 'The body is not valid JSON' },
  VALIDATION_FAILED: { status: 400, title: 'A field is missing or invalid' },
  INVALID_CURSOR: { status: 400, title: 'The cursor is not one this API returned' },
  INVALID_CONTENT_LENGTH: { status: 400, title: 'Content-Length does not match the body' },
  MALFORMED_MULTIPART: { status: 400, title: 'The multipart body is malformed' },
  MISSING_FILE: { status: 400, title: "The multipart body has no 'file' part" },
  TOO_MANY_FILES: { status: 400, title: "Only one file part, named 'file', is accepted" },
  TOO_MANY_FIELDS: { status: 400, title: 'Too many multipart fields' },
  EMPTY_BODY: { status: 400, title: 'The body is empty' },
  INCOMPLETE_BODY: { status: 400, title: 'The body ended before it was complete' },
  UNAUTHORIZED: { status: 401, title: 'A valid bearer token is required' },
  NOT_FOUND: { status: 404, title: 'Not found' },
  JOB_NOT_READY: { status: 409, title: 'The job has no output (yet)' },
  OUTPUT_ELSEWHERE: { status: 409, title: 'The job wrote its output to a destination (see output.location), not the output store' },
  DESTINATION_EXISTS: { status: 409, title: 'The destination image already exists; it was left untouched' },
  DESTINATION_REFUSED: { status: 422, title: 'The output destination is not allowed' },
  IDEMPOTENCY_KEY_REUSED: { status: 422, title: 'The Idempotency-Key was used with a different request' },
  IDEMPOTENCY_KEY_IN_USE: { status: 409, title: 'A request with this Idempotency-Key is still being processed' },
  PAYLOAD_TOO_LARGE: { status: 413, title: 'The body is larger than allowed' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, title: 'Unsupported Content-Type' },
  RANGE_NOT_SATISFIABLE: { status: 416, title: 'The range is outside the output' },
  URI_TOO_LONG: { status: 414, title: 'URI too long' },
  HEADERS_TOO_LARGE: { status: 431, title: 'Request header fields too large' },
  UPLOAD_TIMEOUT: { status: 408, title: 'The upload sent nothing for too long' },
  RATE_LIMITED: { status: 429, title: 'Too many requests' },
  // image (engine) and source
  IMAGE_CORRUPT: { status: 422, title: 'The image is corrupt or truncated' },
  UNSAFE_IMAGE: { status: 422, title: 'The image is refused for safety' },
  UNSUPPORTED_FEATURE: { status: 422, title: 'The image uses a feature that is not supported' },
  UNSUPPORTED_FORMAT: { status: 422, title: 'The image format is not supported' },
  FORMAT_MISMATCH: { status: 422, title: 'The declared format does not match the bytes' },
  LIMIT_EXCEEDED: { status: 422, title: 'The image exceeds a limit' },
  WRONG_PASSPHRASE: { status: 422, title: 'The passphrase does not unlock the encrypted image' },
  INVALID_ARGUMENT: { status: 400, title: 'Invalid argument' },
  CHECKSUM_MISMATCH: { status: 422, title: 'The bytes do not match expected_sha256' },
  URL_REFUSED: { status: 422, title: 'The URL is refused by the URL import rules' },
  SOURCE_TOO_LARGE: { status: 413, title: 'The source is larger than allowed' },
  URL_FETCH_FAILED: { status: 422, title: 'The URL could not be fetched' },
  GLANCE_NOT_CONFIGURED: { status: 422, title: 'This service does not publish into Glance' },
  GLANCE_REFUSED: { status: 502, title: 'Glance refused to publish the image' },
  GLANCE_UNAVAILABLE: { status: 502, title: 'Glance could not be reached' },
  // server side
  INTERNAL_ERROR: { status: 500, title: 'Internal error' },
  SOURCE_UNAVAILABLE: { status: 502, title: 'The source could not be read' },
  SOURCE_CHANGED: { status: 502, title: 'The source changed while it was read' },
  STORE_UNAVAILABLE: { status: 503, title: 'The store is unavailable' },
  STORE_OBJECT_MISSING: { status: 503, title: 'A stored object is missing' },
  DESTINATION_UNAVAILABLE: { status: 503, title: 'The output destination is unavailable' },
  QUEUE_UNAVAILABLE: { status: 503, title: 'The job queue is unavailable' },
  NOT_READY: { status: 503, title: 'The service is not ready' },
  ABORTED: { status: 503, title: 'The operation was aborted' },
  INSUFFICIENT_SPACE: { status: 507, title: 'Not enough free space in the store' },
} as const satisfies Record<string, CodeInfo>;

export type ApiErrorCode = keyof typeof ERROR_CODES;

/** An error raised by the API layer itself. */
export class ApiError extends DiskconvError {
  readonly deterministic = true;
  constructor(
    readonly code: ApiErrorCode,
    message?: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message ?? ERROR_CODES[code].title);
  }
}

/** Our code for a fastify core or @fastify/multipart error, when it is one (a job failed by it says the same as the answer). */
export function fastifyErrorCode(err: unknown): ApiErrorCode | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? FASTIFY_CODES[code] : undefined;
}

/** fastify core and @fastify/multipart codes -> ours. */
const FASTIFY_CODES: Record<string, ApiErrorCode> = {
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  FST_INVALID_MULTIPART_CONTENT_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  FST_ERR_CTP_BODY_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  FST_REQ_FILE_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  FST_ERR_CTP_INVALID_JSON_BODY: 'INVALID_JSON',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'INVALID_JSON',
  FST_INVALID_JSON_FIELD_ERROR: 'VALIDATION_FAILED',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: 'INVALID_CONTENT_LENGTH',
  FST_FILES_LIMIT: 'TOO_MANY_FILES',
  FST_PARTS_LIMIT: 'TOO_MANY_FIELDS',
  FST_FIELDS_LIMIT: 'TOO_MANY_FIELDS',
  FST_PROTO_VIOLATION: 'VALIDATION_FAILED',
  FST_MP_PREMATURE_CLOSE: 'INCOMPLETE_BODY',
  FST_ERR_BAD_URL: 'BAD_REQUEST',
  FST_ERR_VALIDATION: 'VALIDATION_FAILED',
};

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
}

export function problemFor(code: string, detail: string): Problem {
  const info: CodeInfo = (ERROR_CODES as Record<string, CodeInfo>)[code] ?? ERROR_CODES.INTERNAL_ERROR;
  // 5xx answers say what kind of failure it was, never what the server saw.
  const safeDetail = info.status >= 500 ? info.title : detail;
  return { type: `urn:diskconv:problem:${code.toLowerCase().replace(/_/g, '-')}`, title: info.title, status: info.status, detail: safeDetail, code };
}

/** Seconds a client is told to wait before retrying when Redis is unreachable. */
export const QUEUE_RETRY_AFTER_SECONDS = 5;

/**
 * ioredis's own failures (a command refused while disconnected with the offline
 * queue off, retries exhausted, a connection closed under a command) and BullMQ's
 * enqueue timeout: Redis is unreachable, which the client should hear as a 503
 * to retry, not an internal error.
 */
export function isRedisUnavailable(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  if (err.name === 'MaxRetriesPerRequestError' || err.name === 'QueueTimeoutError') return true;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EPIPE' || code === 'ETIMEDOUT') return true;
  return /enableOfflineQueue|Connection is closed|Stream isn't writeable|connect ECONNREFUSED/.test(err.message);
}

/** Maps anything thrown to a problem. */
export function toProblem(err: unknown): { problem: Problem; headers: Record<string, string> } {
  if (err instanceof ApiError) return { problem: problemFor(err.code, err.message), headers: err.headers };
  if (isRedisUnavailable(err)) return { problem: problemFor('QUEUE_UNAVAILABLE', 'the job queue is unavailable'), headers: { 'retry-after': String(QUEUE_RETRY_AFTER_SECONDS) } };
  if (err instanceof ZodError) {
    const detail = err.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ');
    return { problem: problemFor('VALIDATION_FAILED', detail), headers: {} };
  }
  if (isDiskconvError(err)) {
    const known = err.code in ERROR_CODES;
    const code = known ? err.code : err.deterministic ? 'BAD_REQUEST' : 'INTERNAL_ERROR';
    return { problem: problemFor(code, err.message), headers: {} };
  }
  const fe = err as Partial<FastifyError>;
  if (typeof fe.code === 'string' && fe.code in FASTIFY_CODES) {
    const code = FASTIFY_CODES[fe.code] as ApiErrorCode;
    return { problem: problemFor(code, cleanFastifyMessage(fe.message ?? '')), headers: {} };
  }
  if (typeof fe.statusCode === 'number' && fe.statusCode === 429) {
    return { problem: problemFor('RATE_LIMITED', fe.message ?? 'rate limit exceeded'), headers: {} };
  }
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return { problem: { ...problemFor('BAD_REQUEST', cleanFastifyMessage(fe.message ?? '')), status: fe.statusCode }, headers: {} };
  }
  return { problem: problemFor('INTERNAL_ERROR', 'internal error'), headers: {} };
}

function cleanFastifyMessage(message: string): string {
  return message.replace(/^FST_[A-Z_]+:\s*/, '');
}

export function sendProblem(reply: FastifyReply, problem: Problem, headers: Record<string, string> = {}): FastifyReply {
  return reply.code(problem.status).headers(headers).type('application/problem+json').send(problem);
}

/** The app's error handler: logs 5xx with the request, answers a problem. */
export function errorHandler(this: unknown, err: FastifyError, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  const { problem, headers } = toProblem(err);
  if (problem.status >= 500) request.log.error({ err }, 'request failed');
  else request.log.info({ code: problem.code, detail: problem.detail }, 'request refused');
  // A body we refuse to read (too large, unauthenticated, rate limited...) must not be
  // drained: close the connection instead of reading the rest of it.
  if (!request.raw.complete) reply.header('connection', 'close');
  return sendProblem(reply, problem, headers);
}

/**
 * Node's HTTP parser refusals (malformed request, headers too large, a request
 * timeout) never reach fastify's routing: answer them as problem+json on the raw
 * socket, as fastify's default handler does with its own JSON, and close it.
 */
export function clientErrorProblem(err: NodeJS.ErrnoException, socket: import('node:stream').Duplex): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const code: ApiErrorCode = err.code === 'HPE_HEADER_OVERFLOW' ? 'HEADERS_TOO_LARGE' : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'UPLOAD_TIMEOUT' : 'BAD_REQUEST';
  const detail = code === 'HEADERS_TOO_LARGE' ? 'the request headers (or the URL) are larger than allowed' : code === 'UPLOAD_TIMEOUT' ? 'the request took too long' : 'the request is malformed';
  const body = JSON.stringify(problemFor(code, detail));
  const status = ERROR_CODES[code].status;
  if (socket.writable) {
    socket.write(
      `HTTP/1.1 ${status} ${ERROR_CODES[code].title}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy();
}
