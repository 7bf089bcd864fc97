import { InvalidArgumentError } from '../engine/errors.js';

export interface ParsedArgs {
  positionals: string[];
  options: Map<string, string>;
  flags: Set<string>;
}

/**
 * Minimal qemu-img style parser: `-f FMT`, `-O FMT`, `-l SNAP`, `--output=json`
 * or `--output json`, boolean flags like `-p`.
 */
export function parseArgs(argv: string[], withValue: readonly string[], booleans: readonly string[]): ParsedArgs {
  const positionals: string[] = [];
  const options = new Map<string, string>();
  const flags = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq > 0 && arg.startsWith('--') ? arg.slice(0, eq) : arg;
    if (withValue.includes(name)) {
      const value = eq > 0 && arg.startsWith('--') ? arg.slice(eq + 1) : argv[++i];
      if (value === undefined) throw new InvalidArgumentError(`option ${name} needs a value`);
      options.set(name, value);
    } else if (booleans.includes(name)) {
      flags.add(name);
    } else {
      throw new InvalidArgumentError(`unknown option ${arg}`);
    }
  }
  return { positionals, options, flags };
}
