/**
 * Errors of URL import. Network failures that may heal on their own use the
 * engine's SourceUnavailableError (SOURCE_UNAVAILABLE, retried by the queue);
 * everything here fails the same way every time and is not retried.
 */
import { DiskconvError } from '../engine/errors.js';

/**
 * The URL or a redirect target breaks a URL-import rule: scheme, port, user-info,
 * a numeric IPv4 spelling, a forbidden address, too many redirects.
 */
export class UrlRefusedError extends DiskconvError {
  readonly code = 'URL_REFUSED' as const;
  readonly deterministic = true;
  constructor(
    message: string,
    /** Short machine-readable reason: 'scheme', 'userinfo', 'port', 'ipv4-spelling', 'loopback', 'too-many-redirects'... */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The download (or its declared length) is larger than the policy's maxBytes. */
export class SourceTooLargeError extends DiskconvError {
  readonly code = 'SOURCE_TOO_LARGE' as const;
  readonly deterministic = true;
  constructor(
    message: string,
    readonly maxBytes: number,
  ) {
    super(message);
  }
}

/** The downloaded bytes do not hash to the expected sha256. */
export class ChecksumMismatchError extends DiskconvError {
  readonly code = 'CHECKSUM_MISMATCH' as const;
  readonly deterministic = true;
  constructor(
    readonly expected: string,
    readonly actual: string,
    what: string,
  ) {
    super(`${what}: sha256 is ${actual}, expected ${expected}`);
  }
}

/**
 * The remote server answered with a client error (4xx other than 408/429), a
 * response we cannot use (no Location on a redirect, an encoded body), or its TLS
 * certificate was refused, or the host name does not exist.
 */
export class UrlFetchError extends DiskconvError {
  readonly code = 'URL_FETCH_FAILED' as const;
  readonly deterministic = true;
  constructor(
    message: string,
    readonly status?: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * The remote file changed while it was read (another ETag, another size, or a
 * whole 200 answer to a range request guarded by If-Range): the bytes read so far
 * belong to another version, so this attempt stops rather than stitching a disk
 * from two. Retried: a new attempt reads the new version from its start.
 */
export class SourceChangedError extends DiskconvError {
  readonly code = 'SOURCE_CHANGED' as const;
  readonly deterministic = false;
}
