/*
 * diskconv's optional native helper, part two: reading and writing a batch of
 * extents in one trip to the libuv threadpool, copying runs of one file into
 * another (copyExtents), and starting the writeback of a written range
 * (syncRange, at the end of this file).
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
#include <fcntl.h> /* sync_file_range */
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fs-io.h"

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
    job->err = write_nonzero(job->fd, s->ptr, s->len, s->pos, job->block, &job->written);
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
    napi_reject_deferred(env, job->deferred, fs_error(env, job->err, job->reading ? "pread" : "pwrite"));
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
  napi_value promise = NULL;
  if (napi_create_reference(env, argv[1], 1, &job->keep) != napi_ok ||
      !(promise = queue_work(env, reading ? "diskconv.readExtents" : "diskconv.writeExtents", execute, complete, job, &job->deferred, &job->work))) {
    free(job->segs);
    free(job->got);
    free(job);
    return fail(env, "writeExtents/readExtents: could not queue the work");
  }
  return promise;
}

napi_value write_extents(napi_env env, napi_callback_info info) { return start(env, info, 0); }
napi_value read_extents(napi_env env, napi_callback_info info) { return start(env, info, 1); }

/*
 *   copyExtents(inFd, outFd, fileOffsets, lengths, positions, block, chunk) -> Promise<number>
 *     for every i, the lengths[i] bytes at fileOffsets[i] of inFd are read and
 *     written at positions[i] of outFd, `chunk` bytes at a time (rounded up to
 *     whole blocks) through one page-aligned buffer, blocks of `block` bytes (aligned to the output
 *     offset) that are all zero skipped as writeExtents does. Resolves with the
 *     bytes read (fewer than the sum of lengths only where inFd ended early: the
 *     caller reports the short read); rejects with an fs-style error whose
 *     .syscall ("pread" or "pwrite") says which file failed.
 *
 * Why: readExtents then writeExtents moves each batch through the reader's
 * arenas (16 MiB each, several in flight), so by the time the sink writes a
 * batch its bytes have left the CPU's caches and the write's copy into the page
 * cache reads them from memory again; the kernel's copies were 1.56 x a plain
 * pread/pwrite loop's for the same bytes. Here each chunk is written right after
 * it is read, while it is still in cache, and the job needs no arena at all.
 */
typedef struct {
  int64_t from, len, to;
} copy_run_t;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int in_fd, out_fd;
  int64_t block, chunk;
  size_t count;
  copy_run_t *runs;
  int err;
  const char *syscall;
  int64_t read;
} copy_job_t;

static void execute_copy(napi_env env, void *data) {
  (void)env;
  copy_job_t *job = data;
  /* Pieces of whole zero-detection blocks, cut at multiples of the piece in the output, so each
     block is judged whole as writeExtents judges it (a block is never split between two pieces). */
  int64_t piece = job->block > 0 ? (job->chunk + job->block - 1) / job->block * job->block : job->chunk;
  uint8_t *buf = aligned_alloc(4096, (size_t)((piece + 4095) / 4096 * 4096));
  if (!buf) {
    job->err = ENOMEM;
    job->syscall = "pread";
    return;
  }
  int64_t written = 0;
  for (size_t i = 0; i < job->count; i++) {
    const copy_run_t *r = &job->runs[i];
    for (int64_t done = 0; done < r->len;) {
      int64_t to = r->to + done;
      int64_t span = piece - to % piece;
      size_t want = (size_t)(r->len - done < span ? r->len - done : span);
      size_t got = 0;
      while (got < want) {
        ssize_t n = pread(job->in_fd, buf + got, want - got, (off_t)(r->from + done + (int64_t)got));
        if (n < 0) {
          if (errno == EINTR) continue;
          job->err = errno;
          job->syscall = "pread";
          goto out;
        }
        if (n == 0) break; /* end of file: the caller reports the short read */
        got += (size_t)n;
      }
      job->read += (int64_t)got;
      job->err = write_nonzero(job->out_fd, buf, got, to, job->block, &written);
      if (job->err) {
        job->syscall = "pwrite";
        goto out;
      }
      if (got < want) goto out;
      done += (int64_t)got;
    }
  }
out:
  free(buf);
}

static void complete_copy(napi_env env, napi_status status, void *data) {
  copy_job_t *job = data;
  if (status != napi_ok && job->err == 0) {
    job->err = ECANCELED;
    job->syscall = "pread";
  }
  if (job->err == 0) {
    napi_value result;
    napi_create_int64(env, job->read, &result);
    napi_resolve_deferred(env, job->deferred, result);
  } else {
    napi_reject_deferred(env, job->deferred, fs_error(env, job->err, job->syscall));
  }
  napi_delete_async_work(env, job->work);
  free(job->runs);
  free(job);
}

/* The i-th element of an array as a safe non-negative integer, or -1. */
static int64_t array_offset(napi_env env, napi_value array, uint32_t i) {
  napi_value v;
  double d;
  if (napi_get_element(env, array, i, &v) != napi_ok || napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0) || d > 9007199254740991.0 ||
      d != (double)(int64_t)d)
    return -1;
  return (int64_t)d;
}

napi_value copy_extents(napi_env env, napi_callback_info info) {
  static const char usage[] = "copyExtents(inFd, outFd, fileOffsets, lengths, positions, block, chunk)";
  size_t argc = 7;
  napi_value argv[7];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 7) return fail(env, usage);
  int32_t in_fd, out_fd;
  int64_t block, chunk;
  uint32_t count = 0, n;
  bool is_array;
  if (napi_get_value_int32(env, argv[0], &in_fd) != napi_ok || in_fd < 0 || napi_get_value_int32(env, argv[1], &out_fd) != napi_ok || out_fd < 0 ||
      napi_get_value_int64(env, argv[5], &block) != napi_ok || block < 0 || block > (1 << 30) || napi_get_value_int64(env, argv[6], &chunk) != napi_ok ||
      chunk < 4096 || chunk > (1 << 26) || chunk % 4096 != 0 || block > (1 << 26))
    return fail(env, usage);
  for (int a = 2; a <= 4; a++) {
    if (napi_is_array(env, argv[a], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[a], &n) != napi_ok) return fail(env, usage);
    if (a == 2) count = n;
    else if (n != count) return fail(env, "copyExtents: fileOffsets, lengths and positions must be as long as each other");
  }
  if (count > MAX_SEGMENTS) return fail(env, "copyExtents: too many runs");
  copy_job_t *job = calloc(1, sizeof *job);
  copy_run_t *runs = count ? calloc(count, sizeof *runs) : NULL;
  if (!job || (count && !runs)) {
    free(job);
    free(runs);
    return fail(env, "copyExtents: out of memory");
  }
  for (uint32_t i = 0; i < count; i++) {
    runs[i].from = array_offset(env, argv[2], i);
    runs[i].len = array_offset(env, argv[3], i);
    runs[i].to = array_offset(env, argv[4], i);
    if (runs[i].from < 0 || runs[i].len < 0 || runs[i].to < 0) {
      free(job);
      free(runs);
      return fail(env, "copyExtents: every offset, length and position must be a non-negative integer");
    }
  }
  job->in_fd = in_fd;
  job->out_fd = out_fd;
  job->block = block;
  job->chunk = chunk;
  job->count = count;
  job->runs = runs;
  napi_value promise = queue_work(env, "diskconv.copyExtents", execute_copy, complete_copy, job, &job->deferred, &job->work);
  if (!promise) {
    free(runs);
    free(job);
    return fail(env, "copyExtents: could not queue the work");
  }
  return promise;
}

/*
 *   syncRange(fd, offset, length) -> Promise<boolean>
 *     sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) on a threadpool
 *     thread: starts writeback of the dirty pages of that range and does not
 *     wait for it. A flushed conversion calls it as the output grows, so its
 *     closing fdatasync finds most of the data already on its way to the disk
 *     instead of all of it still dirty (the kernel's own background writeback
 *     starts only at dirty_background_ratio, gigabytes here). On a thread
 *     because it can still block, on the device's request queue or on pages
 *     locked by an earlier writeback. No flush of the device's cache and no
 *     metadata: that stays the closing fdatasync's job.
 *     Resolves true when writeback was started, false where the descriptor
 *     cannot take it (EINVAL, ENOSYS, ESPIPE, EOPNOTSUPP: a pipe, a filesystem
 *     without it), so the caller stops asking; rejects with an fs-style error
 *     (.syscall "sync_file_range") on any other failure (EIO, ENOSPC, ...),
 *     which the caller must report: it is an I/O error of the output.
 */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int64_t offset, length;
  int err;
} range_job_t;

static void execute_range(napi_env env, void *data) {
  (void)env;
  range_job_t *job = data;
  while (sync_file_range(job->fd, (off64_t)job->offset, (off64_t)job->length, SYNC_FILE_RANGE_WRITE) != 0) {
    if (errno == EINTR) continue;
    job->err = errno;
    return;
  }
}

static void complete_range(napi_env env, napi_status status, void *data) {
  range_job_t *job = data;
  if (status != napi_ok && job->err == 0) job->err = ECANCELED;
  int unsupported = job->err == EINVAL || job->err == ENOSYS || job->err == ESPIPE || job->err == EOPNOTSUPP;
  if (job->err == 0 || unsupported) {
    napi_value result;
    napi_get_boolean(env, job->err == 0, &result);
    napi_resolve_deferred(env, job->deferred, result);
  } else {
    napi_reject_deferred(env, job->deferred, fs_error(env, job->err, "sync_file_range"));
  }
  napi_delete_async_work(env, job->work);
  free(job);
}

napi_value sync_range(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd;
  int64_t offset, length;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok || napi_get_value_int64(env, argv[2], &length) != napi_ok || fd < 0 || offset < 0 ||
      length < 0)
    return fail(env, "syncRange(fd, offset, length): a descriptor and non-negative integers");
  range_job_t *job = calloc(1, sizeof *job);
  if (!job) return fail(env, "syncRange: out of memory");
  job->fd = fd;
  job->offset = offset;
  job->length = length;
  napi_value promise = queue_work(env, "diskconv.syncRange", execute_range, complete_range, job, &job->deferred, &job->work);
  if (!promise) {
    free(job);
    return fail(env, "syncRange: could not queue the work");
  }
  return promise;
}
