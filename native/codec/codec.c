/*
 * diskconv's optional native decoder: a batch of compressed clusters (qcow2
 * zlib and zstd clusters, streamOptimized VMDK grains) decoded in one trip to
 * the libuv threadpool, with libdeflate for deflate and the system's libzstd
 * (the library qemu-img itself links) for zstd.
 *
 * Why: with node:zlib every cluster is a JavaScript call into a zlib stream
 * on a decoder worker thread (one V8 isolate per core, its own start-up, JIT
 * and message round trips), and zlib's inflate runs at about 320 MiB/s here
 * where libdeflate's whole-buffer decoder does 525 MiB/s on the same qcow2
 * clusters and 1150 MiB/s on VMDK grains (measured on the 4 GiB bench images).
 *
 *   decodeMany(codec, inputs, outputs) -> Promise<Int32Array>
 *     codec: 0 a qcow2 zlib cluster (raw deflate), 1 a VMDK grain (12-byte
 *     marker, then a zlib stream), 2 a qcow2 zstd cluster. inputs[i] is the
 *     compressed bytes (an upper bound: trailing bytes are ignored), outputs[i]
 *     the room to decode into: for qcow2 exactly the cluster, for a grain the
 *     grain size. Resolves with, for each i, the bytes decoded, or -1 where this
 *     fast path does not vouch for the result: the caller then decodes that one
 *     with its own decoder (node:zlib, libzstd through Node), which gives the
 *     answer and the error message for damaged data. So only a clean decode is
 *     ever taken from here:
 *       - qcow2 zlib: the deflate stream ends within the cluster and fills it
 *         exactly (a stream that runs on past the cluster, which qemu cuts,
 *         goes to the caller);
 *       - VMDK grain: the zlib stream (Adler-32 checked) ends within the grain
 *         and gives at least one byte;
 *       - qcow2 zstd: qemu's own loop (block/qcow2-threads.c,
 *         qcow2_zstd_decompress): ZSTD_decompressStream until the cluster is
 *         full, failing on an error, on no progress, or when the last frame is
 *         not complete once the cluster is full. Windows over 2^21 bytes (more
 *         than the largest cluster) are left to the caller, so a hostile frame
 *         cannot make every threadpool thread hold a 128 MiB window.
 *     The arrays must stay unchanged until the promise settles; references to
 *     them keep them alive.
 *
 *   decodeWrite(codec, inputs, meta, fd, block) -> Promise<Int32Array>
 *     The same decoders and the same rule of what is clean, but each cluster is
 *     written to the output file straight from the thread that decoded it,
 *     while it is still in that core's cache: meta holds four numbers per
 *     input, [position, skip, length, decodedLength]; the decoded bytes
 *     [skip, skip + length) go to `position` of `fd`, blocks of `block` bytes
 *     (aligned to the file offset) that are all zero skipped (left as holes,
 *     qemu-img's -S; 0 writes every byte), in pwrites of at most 256 KiB as
 *     native/seek's writeExtents. Each thread decodes into one page-aligned
 *     buffer of its own (no output arena in JavaScript, no copy, no page
 *     faults per batch). Resolves with, for each input, the bytes decoded
 *     (written), or -1 where this path declines (not written: the caller
 *     decodes that one itself, as for decodeMany; also a cluster over 4 MiB
 *     or one that decodes to fewer than skip + length bytes). Rejects with an
 *     fs-style Error (.code ENOSPC, EIO, ..., .syscall "pwrite") when a write
 *     fails. The descriptor is dup()ed when the call is made, so the writes
 *     go to the file the caller opened even if it closes its descriptor while
 *     a call is still in flight (a conversion that failed elsewhere).
 *     codec 3 (decodeWrite only) is no codec: the input holds the data itself
 *     (a stored cluster of a compressed image), and its bytes [skip, skip +
 *     length) are written as they are, with the same zero-block rule; the
 *     result is `length` (decodedLength is then the input's length). So the
 *     stored runs between compressed clusters are written by the threadpool
 *     in parallel pieces too, instead of one sink write per batch after it.
 *
 * Each threadpool thread keeps one libdeflate decompressor and one ZSTD_DCtx.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libdeflate.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "fs-io.h"

#define MAX_JOBS (1 << 16)
#define MAX_ZSTD_WINDOW_LOG 21
/* Largest cluster decodeWrite decodes into its per-thread buffer (qcow2 clusters are at most 2 MiB). */
#define MAX_DIRECT_CLUSTER (4u << 20)

/* CODEC_VERBATIM (decodeWrite only): the input is the data, written as it is (stored clusters of a compressed image). */
enum { CODEC_QCOW2_DEFLATE = 0, CODEC_VMDK_GRAIN = 1, CODEC_QCOW2_ZSTD = 2, CODEC_VERBATIM = 3 };

typedef struct {
  const uint8_t *in;
  size_t in_len;
  uint8_t *out;
  size_t out_len;
  /* decodeWrite: where the bytes [skip, skip + length) of the decoded cluster go. */
  int64_t position;
  size_t skip, length;
} item_t;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep_in, keep_out;
  int codec;
  size_t count;
  item_t *items;
  int32_t *result;
  /* decodeWrite: a dup of the caller's descriptor (-1 for decodeMany), the sparse block, the first write error. */
  int fd;
  int64_t block;
  int err;
} job_t;

static __thread struct libdeflate_decompressor *deflater;
static __thread ZSTD_DCtx *zstd_ctx;
static __thread uint8_t *direct_buf;
static __thread size_t direct_cap;

static int32_t decode_deflate(const item_t *it) {
  if (!deflater && !(deflater = libdeflate_alloc_decompressor())) return -1;
  size_t used = 0, produced = 0;
  enum libdeflate_result r = libdeflate_deflate_decompress_ex(deflater, it->in, it->in_len, it->out, it->out_len, &used, &produced);
  return r == LIBDEFLATE_SUCCESS && produced == it->out_len ? (int32_t)produced : -1;
}

static int32_t decode_grain(const item_t *it) {
  if (it->in_len < 12) return -1;
  uint32_t size = (uint32_t)it->in[8] | ((uint32_t)it->in[9] << 8) | ((uint32_t)it->in[10] << 16) | ((uint32_t)it->in[11] << 24);
  if (size == 0 || (size_t)size > it->in_len - 12) return -1;
  if (!deflater && !(deflater = libdeflate_alloc_decompressor())) return -1;
  size_t used = 0, produced = 0;
  enum libdeflate_result r = libdeflate_zlib_decompress_ex(deflater, it->in + 12, size, it->out, it->out_len, &used, &produced);
  return r == LIBDEFLATE_SUCCESS && produced > 0 ? (int32_t)produced : -1;
}

static int32_t decode_zstd(const item_t *it) {
  if (!zstd_ctx) {
    zstd_ctx = ZSTD_createDCtx();
    if (!zstd_ctx) return -1;
    if (ZSTD_isError(ZSTD_DCtx_setParameter(zstd_ctx, ZSTD_d_windowLogMax, MAX_ZSTD_WINDOW_LOG))) {
      ZSTD_freeDCtx(zstd_ctx);
      zstd_ctx = NULL;
      return -1;
    }
  }
  if (ZSTD_isError(ZSTD_DCtx_reset(zstd_ctx, ZSTD_reset_session_only))) return -1;
  ZSTD_outBuffer output = {it->out, it->out_len, 0};
  ZSTD_inBuffer input = {it->in, it->in_len, 0};
  while (output.pos < output.size) {
    size_t last_in = input.pos, last_out = output.pos;
    size_t ret = ZSTD_decompressStream(zstd_ctx, &output, &input);
    if (ZSTD_isError(ret)) return -1;
    if (output.pos == output.size && ret != 0) return -1; /* the last frame goes on past the cluster */
    if (last_in >= input.pos && last_out >= output.pos) return -1; /* no progress: the input ends first */
  }
  return (int32_t)output.pos;
}

static int32_t decode_one(int codec, const item_t *it) {
  switch (codec) {
    case CODEC_QCOW2_DEFLATE: return decode_deflate(it);
    case CODEC_VMDK_GRAIN: return decode_grain(it);
    default: return decode_zstd(it);
  }
}

static void execute_direct(job_t *job) {
  for (size_t i = 0; i < job->count; i++) {
    item_t it = job->items[i];
    job->result[i] = -1;
    if (job->err) continue; /* a write failed: the call rejects, nothing more is written */
    if (job->codec == CODEC_VERBATIM) {
      /* Nothing to decode: the input's bytes [skip, skip + length) go out as they are. */
      if (it.skip + it.length > it.in_len) continue;
      int err = write_nonzero(job->fd, it.in + it.skip, it.length, it.position, job->block, NULL);
      if (err) job->err = err;
      else job->result[i] = (int32_t)it.length;
      continue;
    }
    if (it.out_len > MAX_DIRECT_CLUSTER || it.skip + it.length > it.out_len) continue;
    if (direct_cap < it.out_len) {
      free(direct_buf);
      direct_cap = 0;
      size_t cap = it.out_len < (64u << 10) ? (64u << 10) : it.out_len;
      cap = (cap + 4095) & ~(size_t)4095;
      if (!(direct_buf = aligned_alloc(4096, cap))) continue;
      direct_cap = cap;
    }
    it.out = direct_buf;
    int32_t produced = decode_one(job->codec, &it);
    if (produced < 0 || (size_t)produced < it.skip + it.length) continue; /* the caller gives qemu's answer */
    int err = write_nonzero(job->fd, direct_buf + it.skip, it.length, it.position, job->block, NULL);
    if (err) {
      job->err = err;
      continue;
    }
    job->result[i] = produced;
  }
}

static void execute(napi_env env, void *data) {
  (void)env;
  job_t *job = data;
  if (job->fd >= 0) {
    execute_direct(job);
    return;
  }
  for (size_t i = 0; i < job->count; i++) job->result[i] = decode_one(job->codec, &job->items[i]);
}

static void release(napi_env env, job_t *job) {
  if (job->keep_in) napi_delete_reference(env, job->keep_in);
  if (job->keep_out) napi_delete_reference(env, job->keep_out);
  if (job->work) napi_delete_async_work(env, job->work);
  if (job->fd >= 0) close(job->fd);
  free(job->items);
  free(job->result);
  free(job);
}

/* A failed pwrite of decodeWrite, as Node's fs errors look (.code, .errno, .syscall). */
static void reject_errno(napi_env env, job_t *job) {
  napi_reject_deferred(env, job->deferred, fs_error(env, job->err, "pwrite"));
}

static void complete(napi_env env, napi_status status, void *data) {
  job_t *job = data;
  napi_value buffer, result;
  void *bytes = NULL;
  if (job->err) {
    reject_errno(env, job);
    release(env, job);
    return;
  }
  if (napi_create_arraybuffer(env, job->count * sizeof(int32_t), &bytes, &buffer) == napi_ok &&
      napi_create_typedarray(env, napi_int32_array, job->count, buffer, 0, &result) == napi_ok) {
    /* Cancelled work (status != napi_ok) decoded nothing: every item goes to the caller's own decoder. */
    for (size_t i = 0; i < job->count; i++) ((int32_t *)bytes)[i] = status == napi_ok ? job->result[i] : -1;
    napi_resolve_deferred(env, job->deferred, result);
  } else {
    napi_value msg, err;
    napi_create_string_utf8(env, "decodeMany: could not make the result", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, job->deferred, err);
  }
  release(env, job);
}

static napi_value fail(napi_env env, job_t *job, const char *message) {
  if (job) {
    if (job->fd >= 0) close(job->fd);
    free(job->items);
    free(job->result);
    free(job);
  }
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

static int view_of(napi_env env, napi_value array, uint32_t i, void **ptr, size_t *length) {
  napi_value view;
  bool is_typed;
  napi_typedarray_type type;
  return napi_get_element(env, array, i, &view) == napi_ok && napi_is_typedarray(env, view, &is_typed) == napi_ok && is_typed &&
         napi_get_typedarray_info(env, view, &type, length, ptr, NULL, NULL) == napi_ok && type == napi_uint8_array;
}

static napi_value decode_many(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3) return fail(env, NULL, "decodeMany(codec, inputs, outputs)");
  int32_t codec;
  uint32_t count, nout;
  bool is_array;
  if (napi_get_value_int32(env, argv[0], &codec) != napi_ok || codec < 0 || codec > 2) return fail(env, NULL, "decodeMany: codec must be 0, 1 or 2");
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok) return fail(env, NULL, "decodeMany: inputs must be an array");
  if (napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[2], &nout) != napi_ok || nout != count)
    return fail(env, NULL, "decodeMany: outputs must be an array as long as inputs");
  if (count == 0 || count > MAX_JOBS) return fail(env, NULL, "decodeMany: 1 to 65536 items");
  job_t *job = calloc(1, sizeof *job);
  if (!job) return fail(env, NULL, "decodeMany: out of memory");
  job->items = calloc(count, sizeof *job->items);
  job->result = calloc(count, sizeof *job->result);
  if (!job->items || !job->result) return fail(env, job, "decodeMany: out of memory");
  job->fd = -1;
  job->codec = codec;
  job->count = count;
  for (uint32_t i = 0; i < count; i++) {
    void *in, *out;
    size_t in_len, out_len;
    if (!view_of(env, argv[1], i, &in, &in_len) || !view_of(env, argv[2], i, &out, &out_len)) return fail(env, job, "decodeMany: inputs and outputs must be Uint8Arrays");
    if (out_len == 0 || out_len > (1u << 30)) return fail(env, job, "decodeMany: each output must be 1 byte to 1 GiB");
    job->items[i] = (item_t){in, in_len, out, out_len, 0, 0, 0};
  }
  napi_value promise = NULL;
  if (napi_create_reference(env, argv[1], 1, &job->keep_in) != napi_ok || napi_create_reference(env, argv[2], 1, &job->keep_out) != napi_ok ||
      !(promise = queue_work(env, "diskconv.decodeMany", execute, complete, job, &job->deferred, &job->work))) {
    release(env, job);
    napi_throw_error(env, NULL, "decodeMany: could not queue the work");
    return NULL;
  }
  return promise;
}

static napi_value decode_write(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5) return fail(env, NULL, "decodeWrite(codec, inputs, meta, fd, block)");
  int32_t codec, fd;
  int64_t block;
  uint32_t count;
  bool is_array, is_typed;
  napi_typedarray_type type;
  size_t meta_len;
  void *meta_ptr;
  if (napi_get_value_int32(env, argv[0], &codec) != napi_ok || codec < 0 || codec > 3) return fail(env, NULL, "decodeWrite: codec must be 0, 1, 2 or 3");
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok) return fail(env, NULL, "decodeWrite: inputs must be an array");
  if (count == 0 || count > MAX_JOBS) return fail(env, NULL, "decodeWrite: 1 to 65536 items");
  if (napi_is_typedarray(env, argv[2], &is_typed) != napi_ok || !is_typed || napi_get_typedarray_info(env, argv[2], &type, &meta_len, &meta_ptr, NULL, NULL) != napi_ok ||
      type != napi_float64_array || meta_len != 4 * (size_t)count)
    return fail(env, NULL, "decodeWrite: meta must be a Float64Array of 4 numbers per input");
  if (napi_get_value_int32(env, argv[3], &fd) != napi_ok || fd < 0) return fail(env, NULL, "decodeWrite: fd must be a descriptor");
  if (napi_get_value_int64(env, argv[4], &block) != napi_ok || block < 0 || block > (1 << 30)) return fail(env, NULL, "decodeWrite: block must be 0..2^30");
  job_t *job = calloc(1, sizeof *job);
  if (!job) return fail(env, NULL, "decodeWrite: out of memory");
  job->fd = -1;
  job->items = calloc(count, sizeof *job->items);
  job->result = calloc(count, sizeof *job->result);
  if (!job->items || !job->result) return fail(env, job, "decodeWrite: out of memory");
  job->codec = codec;
  job->count = count;
  job->block = block;
  const double *meta = meta_ptr;
  for (uint32_t i = 0; i < count; i++) {
    void *in;
    size_t in_len;
    if (!view_of(env, argv[1], i, &in, &in_len)) return fail(env, job, "decodeWrite: inputs must be Uint8Arrays");
    double position = meta[4 * i], skip = meta[4 * i + 1], length = meta[4 * i + 2], decoded = meta[4 * i + 3];
    /* Integers, the decoded length 1 byte to 1 GiB, [skip, skip + length) inside it, the position a safe file offset. */
    if (!(position >= 0 && position <= 9007199254740991.0 && position == (double)(int64_t)position) || !(decoded >= 1 && decoded <= (double)(1u << 30)) ||
        decoded != (double)(int64_t)decoded || !(skip >= 0) || skip != (double)(int64_t)skip || !(length >= 1) || length != (double)(int64_t)length || skip + length > decoded)
      return fail(env, job, "decodeWrite: meta holds [position, skip, length, decodedLength] with 0 <= skip < skip + length <= decodedLength <= 2^30");
    job->items[i] = (item_t){in, in_len, NULL, (size_t)decoded, (int64_t)position, (size_t)skip, (size_t)length};
  }
  /* Our own descriptor for the call's lifetime: a close of the caller's cannot send these writes to another file. */
  job->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (job->fd < 0) return fail(env, job, "decodeWrite: cannot duplicate the descriptor");
  napi_value promise = NULL;
  if (napi_create_reference(env, argv[1], 1, &job->keep_in) != napi_ok ||
      !(promise = queue_work(env, "diskconv.decodeWrite", execute, complete, job, &job->deferred, &job->work))) {
    release(env, job);
    napi_throw_error(env, NULL, "decodeWrite: could not queue the work");
    return NULL;
  }
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "decodeMany", NAPI_AUTO_LENGTH, decode_many, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "decodeMany", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "decodeWrite", NAPI_AUTO_LENGTH, decode_write, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "decodeWrite", fn) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
