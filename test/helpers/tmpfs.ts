/** Whether this process can mount a small tmpfs (root with mount(8)): how tests fill a disk on purpose. */
import { execFileSync } from 'node:child_process';

export function canMountTmpfs(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync('mount', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
