{
  "targets": [
    {
      "target_name": "codec",
      "sources": ["codec.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "include_dirs": ["../common"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-ldeflate", "-lzstd"]
    }
  ]
}
