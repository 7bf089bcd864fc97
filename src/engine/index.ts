/**
 * The format engine: probe, open, info, check and convert disk images. It knows
 * nothing of HTTP, queues or object stores; those depend on it, never the reverse.
 */

export * from './errors.js';
export * from './types.js';
export { DEFAULT_LIMITS, withLimits, type Limits } from './limits.js';
export { FileSource, BufferSource, readExact, readThroughReadInto, type RandomAccessSource } from './source.js';
export { detectFormat, DRIVERS } from './probe.js';
export { readExtents, type ReadOptions } from './reader.js';
export { blockStatus, qemuStatusSpan, type BlockStatus } from './block-status.js';
export { detectWrapper, decompressTo, WRAPPER_FORMATS, WRAPPER_PROBE_BYTES, type WrapperFormat, type DecompressOptions } from './wrappers/index.js';
export { sniffWrapper, unwrapStream, type SniffedStream, type UnwrapResult } from './wrappers/stream.js';
export { RangedSource, Limiter, DEFAULT_RANGED_TUNING, type RangedSourceTuning, type RangedSourceStats } from './ranged-source.js';
export { Pacer } from './pace.js';
export { StreamLayoutMismatchError, type ArrivingSource } from './formats/vmdk-markers.js';
export { convertToRaw, RawFileSink, isAllZero, hashZeros, HASH_ALGORITHMS, type HashAlgorithm, type RawFileSinkOptions, type ExtentSink, type ConvertOptions, type ConvertResult, type Progress } from './convert.js';
export type { DirectTarget } from './native-decoder.js';
export * from './open.js';
