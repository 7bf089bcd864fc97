import { InvalidArgumentError } from '../engine/errors.js';

/** Placeholder until the service lands (issue 3). */
export async function runService(command: string, _argv: string[]): Promise<number> {
  throw new InvalidArgumentError(`${command}: the service is not built yet`);
}
