{
  "targets": [
    {
      "target_name": "seek",
      "sources": ["seek.c", "io.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
