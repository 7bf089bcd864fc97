/*
 * What both native helpers (native/seek's I/O, native/codec's decodeWrite) need to write
 * files as Node would: whole pwrites in bounded pieces, the zero-block test and the sparse writes of -S, and
 * failures as Node's fs errors (.code, .errno, .syscall). Header-only: each addon is its
 * own node-gyp target, and static functions keep them independent.
 */
#ifndef DISKCONV_FS_IO_H
#define DISKCONV_FS_IO_H

#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/*
 * Longest single pwrite. Measured on the 4 GiB qcow2 bench image (Linux 6.18
 * ext4, 2-core VM): writes of up to 8 MiB cost 2.4 s of system time (median of
 * 4), writes cut at 256 KiB 0.7 s, at 128 KiB 0.68, at 64 KiB 0.74, at 32 KiB
 * 0.84. A large write makes the page cache allocate large folios, which come
 * from the free 2 MiB blocks the VM has handed back to its host, so each page
 * is faulted in again at the host inside the copy (copy_folio_from_iter_atomic,
 * 69 % of the samples). qemu-img writes about 200 KiB at a time.
 */
#define WRITE_PIECE (256 * 1024)

static inline const char *errno_name(int err) {
  switch (err) {
    case ENOSPC: return "ENOSPC";
    case EDQUOT: return "EDQUOT";
    case EIO: return "EIO";
    case EFBIG: return "EFBIG";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EROFS: return "EROFS";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EAGAIN: return "EAGAIN";
    case ENXIO: return "ENXIO";
    case EPIPE: return "EPIPE";
    case ENOMEM: return "ENOMEM";
    case EOVERFLOW: return "EOVERFLOW";
    case ESPIPE: return "ESPIPE";
    case EISDIR: return "EISDIR";
    case ECANCELED: return "ECANCELED";
    default: return "EUNKNOWN";
  }
}

/* An error as Node's fs makes them: "ENOSPC: No space left on device, pwrite", .code, .errno (negative), .syscall. */
static inline napi_value fs_error(napi_env env, int err, const char *syscall) {
  napi_value msg, code, error, call, errnum;
  char text[256];
  const char *name = errno_name(err);
  snprintf(text, sizeof text, "%s: %s, %s", name, strerror(err), syscall);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &error);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &call);
  napi_set_named_property(env, error, "syscall", call);
  napi_create_int32(env, -err, &errnum);
  napi_set_named_property(env, error, "errno", errnum);
  return error;
}

/* True when n bytes at p are all zero: 8-byte words, 64 bytes per step. */
static inline int all_zero(const uint8_t *p, size_t n) {
  while (n > 0 && ((uintptr_t)p & 7) != 0) {
    if (*p) return 0;
    p++;
    n--;
  }
  const uint64_t *w = (const uint64_t *)p;
  while (n >= 64) {
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return 0;
    w += 8;
    n -= 64;
  }
  while (n >= 8) {
    if (*w) return 0;
    w++;
    n -= 8;
  }
  for (p = (const uint8_t *)w; n > 0; p++, n--)
    if (*p) return 0;
  return 1;
}

/* Writes all n bytes at pos in pieces of at most WRITE_PIECE; 0 or the errno. Adds what it wrote to *written when given. */
static inline int write_all(int fd, const uint8_t *p, size_t n, int64_t pos, int64_t *written) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n < WRITE_PIECE ? n : WRITE_PIECE, (off_t)pos);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO; /* a regular file never accepts nothing; refuse rather than spin */
    p += w;
    n -= (size_t)w;
    pos += w;
    if (written) *written += w;
  }
  return 0;
}

/*
 * Writes the blocks of [p, p + len) (at file offset pos; blocks of `block` bytes aligned to the
 * file offset) that are not all zero, as qemu-img's -S; block 0 writes every byte. 0 or the errno;
 * adds what it wrote to *written when given.
 */
static inline int write_nonzero(int fd, const uint8_t *p, size_t len, int64_t pos, int64_t block, int64_t *written) {
  if (block <= 0) return write_all(fd, p, len, pos, written);
  size_t run = (size_t)-1; /* start of the current non-zero run, or none */
  size_t at = 0;
  while (at < len) {
    int64_t into = (pos + (int64_t)at) % block;
    size_t next = at + (size_t)(block - into);
    if (next > len) next = len;
    if (all_zero(p + at, next - at)) {
      if (run != (size_t)-1) {
        int err = write_all(fd, p + run, at - run, pos + (int64_t)run, written);
        if (err) return err;
        run = (size_t)-1;
      }
    } else if (run == (size_t)-1) {
      run = at;
    }
    at = next;
  }
  return run != (size_t)-1 ? write_all(fd, p + run, len - run, pos + (int64_t)run, written) : 0;
}

/*
 * A promise for async work `name` (execute on a threadpool thread, then complete on the main thread with `data`),
 * queued; its deferred and work handle stored where given. NULL where N-API refused: then nothing is queued and
 * the caller still owns (and frees) `data`.
 */
static inline napi_value queue_work(napi_env env, const char *name, napi_async_execute_callback execute, napi_async_complete_callback complete,
                                    void *data, napi_deferred *deferred, napi_async_work *work) {
  napi_value promise, resource_name;
  if (napi_create_promise(env, deferred, &promise) != napi_ok || napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name) != napi_ok ||
      napi_create_async_work(env, NULL, resource_name, execute, complete, data, work) != napi_ok)
    return NULL;
  if (napi_queue_async_work(env, *work) != napi_ok) {
    napi_delete_async_work(env, *work);
    *work = NULL; /* deleted: a caller's cleanup must not delete it again */
    return NULL;
  }
  return promise;
}

#endif
