{
  "targets": [
    {
      "target_name": "seek",
      "sources": ["seek.c", "write.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
