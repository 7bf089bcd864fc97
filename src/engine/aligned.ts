/**
 * Page-aligned memory for I/O buffers. The kernel copies between the page
 * cache and user memory several times faster when the user side is
 * page-aligned: `Buffer.allocUnsafeSlow` memory sits at page+16, and measured
 * here pread from the page cache into it ran at 2.5 GiB/s against 11.8 GiB/s
 * into aligned memory (64 % of qcow2's samples were the kernel's copy
 * routines). A WebAssembly.Memory's buffer is mapped whole pages (64 KiB
 * aligned), so it is what I/O buffers are carved from; where WebAssembly is
 * unavailable (--jitless) ordinary memory does the same job, slower.
 */
const WASM_PAGE = 65536;

/** The one WebAssembly API used (the engine compiles without DOM typings). */
const wasm = (globalThis as unknown as { WebAssembly?: { Memory: new (d: { initial: number; maximum: number; shared?: boolean }) => { buffer: ArrayBuffer | SharedArrayBuffer } } }).WebAssembly;

/**
 * `shared`: backed by a SharedArrayBuffer, so decoder threads read input from
 * it and write output into it in place (decode-pool.ts) instead of copying.
 */
export function alignedBuffer(bytes: number, options: { shared?: boolean } = {}): Buffer {
  if (bytes <= 0) return Buffer.alloc(0);
  const pages = Math.ceil(bytes / WASM_PAGE);
  try {
    if (!wasm) throw new Error('no WebAssembly');
    const memory = new wasm.Memory({ initial: pages, maximum: pages, ...(options.shared ? { shared: true } : {}) });
    return Buffer.from(memory.buffer, 0, bytes);
  } catch {
    return options.shared ? Buffer.from(new SharedArrayBuffer(bytes)) : Buffer.allocUnsafeSlow(bytes);
  }
}

export function isShared(bytes: Uint8Array): boolean {
  return typeof SharedArrayBuffer === 'function' && bytes.buffer instanceof SharedArrayBuffer;
}
