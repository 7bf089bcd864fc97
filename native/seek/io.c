/*
 * diskconv's optional native helper, part two: reading and writing a batch of
 * extents in one trip to the libuv threadpool, and starting the writeback of a
 * written range (syncRange, at the end of this file).
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
  napi_value promise, name;
  if (napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "diskconv.syncRange", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute_range, complete_range, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    free(job);
    return fail(env, "syncRange: could not queue the work");
  }
  return promise;
}
