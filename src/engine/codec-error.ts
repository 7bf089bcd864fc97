/**
 * A codec's verdict on its input: the compressed bytes are damaged (zlib's or
 * libzstd's own error, or output of the wrong size). Only these become
 * IMAGE_CORRUPT; anything else a decoder throws is our bug or a dead worker
 * thread and surfaces as an internal error.
 */
export class CodecDataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CodecDataError';
  }
}
