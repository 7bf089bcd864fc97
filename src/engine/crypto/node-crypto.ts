/**
 * node:crypto on first use. Loading it takes ~6 ms, a visible share of a CLI conversion's start, and most
 * conversions never need it (no checksum asked, no encryption): so the engine asks for it only where it hashes
 * or decrypts, never at import.
 */
import { createRequire } from 'node:module';

type NodeCrypto = typeof import('node:crypto');

let loaded: NodeCrypto | undefined;

export function nodeCrypto(): NodeCrypto {
  return (loaded ??= createRequire(import.meta.url)('node:crypto') as NodeCrypto);
}
