/**
 * Typed errors with stable codes. The CLI prints `code: message`; the API maps
 * `code` to an HTTP status in one place (src/api/errors.ts).
 */
export type ErrorCode =
  | 'IMAGE_CORRUPT'
  | 'UNSAFE_IMAGE'
  | 'UNSUPPORTED_FEATURE'
  | 'UNSUPPORTED_FORMAT'
  | 'FORMAT_MISMATCH'
  | 'LIMIT_EXCEEDED'
  | 'ABORTED'
  | 'SOURCE_UNAVAILABLE'
  | 'INSUFFICIENT_SPACE'
  | 'INVALID_ARGUMENT'
  | 'WRONG_PASSPHRASE';

export abstract class DiskconvError extends Error {
  /** Stable code; the engine's are ErrorCode, other layers (net, api, store) add their own. */
  abstract readonly code: ErrorCode | (string & {});
  /** Deterministic errors fail the same way every time; the queue does not retry them. */
  abstract readonly deterministic: boolean;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The image's own bytes are inconsistent: out-of-range offsets, bad tables, truncation. */
export class ImageCorruptError extends DiskconvError {
  readonly code = 'IMAGE_CORRUPT' as const;
  readonly deterministic = true;
}

/** The image is well formed but asks for something we refuse for safety (backing file, extent file...). */
export class UnsafeImageError extends DiskconvError {
  readonly code = 'UNSAFE_IMAGE' as const;
  readonly deterministic = true;
}

/** A feature of a supported format that we do not implement (yet), e.g. encryption. */
export class UnsupportedFeatureError extends DiskconvError {
  readonly code = 'UNSUPPORTED_FEATURE' as const;
  readonly deterministic = true;
}

/** A format we do not read (vhd, vhdx, dmg...). */
export class UnsupportedFormatError extends DiskconvError {
  readonly code = 'UNSUPPORTED_FORMAT' as const;
  readonly deterministic = true;
}

/** The declared format disagrees with the bytes. */
export class FormatMismatchError extends DiskconvError {
  readonly code = 'FORMAT_MISMATCH' as const;
  readonly deterministic = true;
}

/** A named limit was exceeded (metadata size, virtual size, descriptor size...). */
export class LimitExceededError extends DiskconvError {
  readonly code = 'LIMIT_EXCEEDED' as const;
  readonly deterministic = true;
  constructor(
    readonly limit: string,
    readonly value: number | bigint,
    readonly maximum: number | bigint,
    what: string,
  ) {
    super(`${what}: ${String(value)} exceeds the limit ${limit}=${String(maximum)}`);
  }
}

export class AbortedError extends DiskconvError {
  readonly code = 'ABORTED' as const;
  readonly deterministic = true;
  constructor(message = 'operation aborted') {
    super(message);
  }
}

/** Reading the source failed for a reason outside the image (I/O, network). Transient. */
export class SourceUnavailableError extends DiskconvError {
  readonly code = 'SOURCE_UNAVAILABLE' as const;
  readonly deterministic = false;
}

export class InsufficientSpaceError extends DiskconvError {
  readonly code = 'INSUFFICIENT_SPACE' as const;
  readonly deterministic = false;
}

/** The passphrase given for an encrypted image unlocks none of its key slots. */
export class WrongPassphraseError extends DiskconvError {
  readonly code = 'WRONG_PASSPHRASE' as const;
  readonly deterministic = true;
}

export class InvalidArgumentError extends DiskconvError {
  readonly code = 'INVALID_ARGUMENT' as const;
  readonly deterministic = true;
}

export function isDiskconvError(err: unknown): err is DiskconvError {
  return err instanceof DiskconvError;
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortedError();
}
