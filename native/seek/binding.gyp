{
  "targets": [
    {
      "target_name": "seek",
      "sources": ["seek.c", "io.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "include_dirs": ["../common"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
