/** The `zstd` tool, for tests that need real zstd frames (made by the reference encoder, never by us). */
import { execFileSync } from 'node:child_process';

/** Whether the `zstd` tool is on this machine (tests that need it skip, visibly, without it). */
export const zstdTool = ((): boolean => {
  try {
    execFileSync('zstd', ['--version']);
    return true;
  } catch {
    return false;
  }
})();

/** One zstd frame of `data`, as `zstd -q -c ARGS` writes it. */
export function zstdFrame(data: Uint8Array, args: string[] = ['-3']): Uint8Array {
  return execFileSync('zstd', ['-q', '-c', ...args], { input: data, maxBuffer: 1 << 26 });
}
