/** Bytes as Latin-1 text, for comparing signatures and banners; stops at the end of `bytes`. */
export function ascii(bytes: Uint8Array, offset: number, length: number): string {
  let s = '';
  const end = Math.min(bytes.length, offset + length);
  for (let i = offset; i < end; i++) s += String.fromCharCode(bytes[i] as number);
  return s;
}
