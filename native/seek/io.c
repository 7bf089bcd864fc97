/*
 * diskconv's optional native helper, part two: reading and writing a batch of
 * extents in one trip to the libuv threadpool.
 *
 * Through fs/promises every extent costs its own round trip (main thread ->
 * threadpool -> main thread), and before it a JavaScript scan for zero blocks
 * on the main thread. On a fragmented image that is thousands of round trips
 * per GiB, each waiting for a core when the machine is busy. Here the whole
 * batch the reader produced (up to ~16 MiB, many extents) goes to one worker
 * thread, which finds the non-zero blocks (word compares) and pwrites them.
 *
 *   writeExtents(fd, views, positions, block) -> Promise<number>
 *     views: Uint8Array[] (the bytes of each data extent), positions: number[]
 *     (the file offset of each), block: 0 writes every byte, otherwise blocks of
 *     `block` bytes aligned to the file offset that are all zero are skipped
 *     (left as holes; qemu-img's -S). Resolves with the bytes written; rejects
 *     with an Error whose .code is the errno name (ENOSPC, EIO, ...) and .syscall
 *     "pwrite", like Node's own fs errors.
 *
 * The views must stay unchanged until the promise settles (the caller awaits
 * it before recycling its buffers); a reference to the array keeps them alive.
 *
 *   readExtents(fd, views, positions) -> Promise<number[]>
 *     fills views[i] from positions[i] (pread, stopping early only at the end
 *     of the file) for every i; resolves with the bytes read into each. Errors
 *     as above, .syscall "pread". The reader's batch of coalesced reads goes
 *     in one trip instead of one per read.
 *
 * Only the descriptor the caller opened is read or written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SEGMENTS (1 << 20)

typedef struct {
  const uint8_t *ptr;
  size_t len;
  int64_t pos;
} segment_t;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep;
  int fd;
  int64_t block;
  size_t count;
  segment_t *segs;
  int err;
  int64_t written;
  int reading;
  int64_t *got; /* reading: bytes read into each segment */
} job_t;

static const char *errno_name(int err) {
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
    default: return "EUNKNOWN";
  }
}

/* True when n bytes at p are all zero: 8-byte words, 64 bytes per step. */
static int all_zero(const uint8_t *p, size_t n) {
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
  p = (const uint8_t *)w;
  while (n > 0) {
    if (*p) return 0;
    p++;
    n--;
  }
  return 1;
}

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

static int write_all(int fd, const uint8_t *p, size_t n, int64_t pos, int64_t *written) {
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
    *written += w;
  }
  return 0;
}

static void execute_read(job_t *job) {
  for (size_t i = 0; i < job->count; i++) {
    const segment_t *s = &job->segs[i];
    size_t done = 0;
    while (done < s->len) {
      ssize_t r = pread(job->fd, (void *)(s->ptr + done), s->len - done, (off_t)(s->pos + (int64_t)done));
      if (r < 0) {
        if (errno == EINTR) continue;
        job->err = errno;
        return;
      }
      if (r == 0) break; /* end of file: the caller reports the short read */
      done += (size_t)r;
    }
    job->got[i] = (int64_t)done;
  }
}

static void execute(napi_env env, void *data) {
  (void)env;
  job_t *job = data;
  if (job->reading) {
    execute_read(job);
    return;
  }
  for (size_t i = 0; i < job->count && job->err == 0; i++) {
    const segment_t *s = &job->segs[i];
    if (job->block <= 0) {
      job->err = write_all(job->fd, s->ptr, s->len, s->pos, &job->written);
      continue;
    }
    size_t run = (size_t)-1; /* start of the current non-zero run, or none */
    size_t at = 0;
    while (at < s->len) {
      int64_t into = (s->pos + (int64_t)at) % job->block;
      size_t next = at + (size_t)(job->block - into);
      if (next > s->len) next = s->len;
      if (all_zero(s->ptr + at, next - at)) {
        if (run != (size_t)-1) {
          job->err = write_all(job->fd, s->ptr + run, at - run, s->pos + (int64_t)run, &job->written);
          if (job->err) break;
          run = (size_t)-1;
        }
      } else if (run == (size_t)-1) {
        run = at;
      }
      at = next;
    }
    if (job->err == 0 && run != (size_t)-1) job->err = write_all(job->fd, s->ptr + run, s->len - run, s->pos + (int64_t)run, &job->written);
  }
}

static void complete(napi_env env, napi_status status, void *data) {
  job_t *job = data;
  if (status != napi_ok && job->err == 0) job->err = ECANCELED;
  if (job->err == 0) {
    napi_value result;
    if (job->reading) {
      napi_create_array_with_length(env, job->count, &result);
      for (size_t i = 0; i < job->count; i++) {
        napi_value n;
        napi_create_int64(env, job->got[i], &n);
        napi_set_element(env, result, (uint32_t)i, n);
      }
    } else {
      napi_create_int64(env, job->written, &result);
    }
    napi_resolve_deferred(env, job->deferred, result);
  } else {
    napi_value msg, code, err, syscall, errnum;
    const char *name = job->err == ECANCELED ? "ECANCELED" : errno_name(job->err);
    char text[256];
    const char *call = job->reading ? "pread" : "pwrite";
    snprintf(text, sizeof text, "%s: %s, %s", name, strerror(job->err), call);
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &err);
    napi_create_string_utf8(env, call, NAPI_AUTO_LENGTH, &syscall);
    napi_set_named_property(env, err, "syscall", syscall);
    napi_create_int32(env, -job->err, &errnum);
    napi_set_named_property(env, err, "errno", errnum);
    napi_reject_deferred(env, job->deferred, err);
  }
  napi_delete_reference(env, job->keep);
  napi_delete_async_work(env, job->work);
  free(job->segs);
  free(job->got);
  free(job);
}

static napi_value fail(napi_env env, const char *message) {
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

static napi_value start(napi_env env, napi_callback_info info, int reading) {
  size_t argc = 4;
  napi_value argv[4];
  size_t want = reading ? 3 : 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != want)
    return fail(env, reading ? "readExtents(fd, views, positions)" : "writeExtents(fd, views, positions, block)");
  int32_t fd;
  int64_t block = 0;
  uint32_t count, npos;
  bool is_array;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) return fail(env, "writeExtents/readExtents: fd must be a descriptor");
  if (!reading && (napi_get_value_int64(env, argv[3], &block) != napi_ok || block < 0 || block > (1 << 30))) return fail(env, "writeExtents: block must be 0..2^30");
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok) return fail(env, "writeExtents/readExtents: views must be an array");
  if (napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[2], &npos) != napi_ok || npos != count) return fail(env, "writeExtents/readExtents: positions must be an array as long as views");
  if (count > MAX_SEGMENTS) return fail(env, "writeExtents/readExtents: too many views");
  job_t *job = calloc(1, sizeof *job);
  if (!job) return fail(env, "writeExtents/readExtents: out of memory");
  job->reading = reading;
  job->segs = count ? calloc(count, sizeof *job->segs) : NULL;
  job->got = reading && count ? calloc(count, sizeof *job->got) : NULL;
  if (count && (!job->segs || (reading && !job->got))) {
    free(job->segs);
    free(job->got);
    free(job);
    return fail(env, "writeExtents/readExtents: out of memory");
  }
  job->fd = fd;
  job->block = block;
  job->count = count;
  for (uint32_t i = 0; i < count; i++) {
    napi_value view, posv;
    bool is_typed;
    napi_typedarray_type type;
    size_t length;
    void *ptr;
    double pos;
    if (napi_get_element(env, argv[1], i, &view) != napi_ok || napi_is_typedarray(env, view, &is_typed) != napi_ok || !is_typed ||
        napi_get_typedarray_info(env, view, &type, &length, &ptr, NULL, NULL) != napi_ok || type != napi_uint8_array ||
        napi_get_element(env, argv[2], i, &posv) != napi_ok || napi_get_value_double(env, posv, &pos) != napi_ok || !(pos >= 0) ||
        pos > 9007199254740991.0 || pos != (double)(int64_t)pos) {
      free(job->segs);
      free(job->got);
      free(job);
      return fail(env, "writeExtents/readExtents: each view must be a Uint8Array and each position a non-negative integer");
    }
    job->segs[i].ptr = ptr;
    job->segs[i].len = length;
    job->segs[i].pos = (int64_t)pos;
  }
  napi_value promise, name;
  if (napi_create_reference(env, argv[1], 1, &job->keep) != napi_ok || napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, reading ? "diskconv.readExtents" : "diskconv.writeExtents", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, job, &job->work) != napi_ok || napi_queue_async_work(env, job->work) != napi_ok) {
    free(job->segs);
    free(job->got);
    free(job);
    return fail(env, "writeExtents/readExtents: could not queue the work");
  }
  return promise;
}

napi_value write_extents(napi_env env, napi_callback_info info) { return start(env, info, 0); }
napi_value read_extents(napi_env env, napi_callback_info info) { return start(env, info, 1); }
