/*
 * diskconv's optional native helper: where a file's data lies (this file), and
 * reading and writing batches of extents in one threadpool trip each, and
 * starting writeback of a written range (io.c).
 *
 * Node has no lseek, so it cannot ask the filesystem for SEEK_DATA/SEEK_HOLE
 * (as qemu-img and cp --sparse do); without this the raw driver reads whole
 * sparse files and scans them for zeros. One call maps many extents, so a
 * fragmented file costs few crossings into C.
 *
 *   dataExtents(fd, offset, end, max) -> number[]  [start0, end0, start1, end1, ...]
 *     data ranges of [offset, end), at most `max` of them; the last range ends
 *     before `end` only when more ranges follow (ask again from there).
 *     Throws with .code "ENOTSUP" where the filesystem cannot tell (the caller
 *     then treats the whole file as data) and with the errno name otherwise.
 *
 * Only lseek on a descriptor the caller opened: no paths, no allocation of
 * caller-controlled size beyond `max` (capped).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define MAX_EXTENTS 65536

static napi_value throw_errno(napi_env env, int err) {
  const char *code = err == EINVAL || err == EOPNOTSUPP ? "ENOTSUP" : err == EBADF ? "EBADF" : err == EIO ? "EIO" : "EUNKNOWN";
  napi_throw_error(env, code, strerror(err));
  return NULL;
}

static napi_value data_extents(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4) {
    napi_throw_type_error(env, NULL, "dataExtents(fd, offset, end, max)");
    return NULL;
  }
  int32_t fd;
  int64_t offset, end, max;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &end) != napi_ok || napi_get_value_int64(env, argv[3], &max) != napi_ok || fd < 0 || offset < 0 ||
      end < offset || max < 1) {
    napi_throw_type_error(env, NULL, "dataExtents: fd, offset, end, max must be integers with 0 <= offset <= end and max >= 1");
    return NULL;
  }
  if (max > MAX_EXTENTS) max = MAX_EXTENTS;
  napi_value result;
  if (napi_create_array(env, &result) != napi_ok) return NULL;
  uint32_t n = 0;
  int64_t pos = offset;
  while (pos < end && (int64_t)(n / 2) < max) {
    off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; /* no data after pos */
      return throw_errno(env, errno);
    }
    if (data >= end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return throw_errno(env, errno);
    if (hole > end) hole = (off_t)end;
    if (hole <= data) { /* cannot happen on a sane filesystem; refuse rather than loop */
      napi_throw_error(env, "EUNKNOWN", "SEEK_HOLE did not move past SEEK_DATA");
      return NULL;
    }
    napi_value a, b;
    if (napi_create_int64(env, (int64_t)data, &a) != napi_ok || napi_create_int64(env, (int64_t)hole, &b) != napi_ok ||
        napi_set_element(env, result, n++, a) != napi_ok || napi_set_element(env, result, n++, b) != napi_ok)
      return NULL;
    pos = (int64_t)hole;
  }
  return result;
}

napi_value write_extents(napi_env env, napi_callback_info info); /* io.c */
napi_value read_extents(napi_env env, napi_callback_info info);  /* io.c */
napi_value sync_range(napi_env env, napi_callback_info info);    /* io.c */
napi_value copy_extents(napi_env env, napi_callback_info info);  /* io.c */

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "dataExtents", NAPI_AUTO_LENGTH, data_extents, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "dataExtents", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "writeExtents", NAPI_AUTO_LENGTH, write_extents, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "writeExtents", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "readExtents", NAPI_AUTO_LENGTH, read_extents, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "readExtents", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "syncRange", NAPI_AUTO_LENGTH, sync_range, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "syncRange", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "copyExtents", NAPI_AUTO_LENGTH, copy_extents, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "copyExtents", fn) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
