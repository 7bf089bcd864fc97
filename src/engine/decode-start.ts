/**
 * What runs once, when this process first decodes a compressed cluster (decompress.ts).
 * The engine itself changes nothing process-wide; a caller that owns its process may
 * (the CLI's convert: src/cli/commands/convert.ts stops V8's optimizing compiler then).
 */
let hook: (() => void) | undefined;

/** Runs `fn` once, at the first compressed cluster this process decodes; set after that, it never runs. */
export function onFirstDecode(fn: () => void): void {
  hook = fn;
}

/** Called by the decoders before their first cluster. */
export function decodingStarts(): void {
  const fn = hook;
  hook = undefined;
  fn?.();
}
