/**
 * Errors of the CLI's output side: they name the destination path. The
 * service's API never sees them (it writes to its own store).
 */
import { DiskconvError, InsufficientSpaceError } from '../engine/errors.js';

/** The destination is the source (the same inode, through a link, or the same device). */
export class SameFileError extends DiskconvError {
  readonly code = 'SAME_FILE' as const;
  readonly deterministic = true;
}

/** The destination cannot be created or written: a missing or read-only directory, a directory, a socket. */
export class DestinationUnwritableError extends DiskconvError {
  readonly code = 'DESTINATION_UNWRITABLE' as const;
  readonly deterministic = true;
}

/** Names the path and the errno of a failed operation on the destination, with the code that fits it. */
export function destinationError(path: string, what: string, err: unknown): DiskconvError {
  if (err instanceof DiskconvError) return err;
  const errno = (err as NodeJS.ErrnoException | undefined)?.code;
  const reason = (err as Error | undefined)?.message ?? String(err);
  if (errno === 'ENOSPC' || errno === 'EDQUOT') return new InsufficientSpaceError(`${path}: ${what}: no space left on the device (${errno})`, { cause: err });
  return new DestinationUnwritableError(`${path}: ${what}: ${reason}`, { cause: err });
}

const exitStatuses = new WeakMap<object, number>();

/** Marks an error with the exit status its command gives it (compare: 2 when an image cannot be opened, 4 when it cannot be read). */
export function withExitStatus<E>(err: E, status: number): E {
  if (typeof err === 'object' && err !== null && !exitStatuses.has(err)) exitStatuses.set(err, status);
  return err;
}

export function exitStatusOf(err: unknown): number | undefined {
  return typeof err === 'object' && err !== null ? exitStatuses.get(err) : undefined;
}
