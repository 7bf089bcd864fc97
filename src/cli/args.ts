/**
 * The CLI's one parser: each command declares its options (short and long
 * names, whether they take a value, help text) and gets getopt_long's
 * behaviour, as qemu-img has it: `-fqcow2` and `-f qcow2`, bundled flags
 * (`-pq`), `--output=json` and `--output json`, unambiguous long prefixes
 * (`--out=json`), options and operands in any order, `--` ending options.
 * Help text is generated from the same specs, so it cannot drift.
 */
import { DiskconvError } from '../engine/errors.js';

export interface OptionSpec {
  /** Key the parsed value is stored under. */
  key: string;
  /** One-letter form, without the dash: `f` for `-f`. */
  short?: string;
  /** Long form, without the dashes: `output` for `--output`. */
  long?: string;
  /** Name of the value in help (`FMT`); absent for a flag. */
  value?: string;
  help: string;
  /** Given several times, every value is kept (`all()`); otherwise the last wins. */
  repeatable?: boolean;
}

export interface CommandSpec {
  name: string;
  /** Operands as help shows them: `SRC DST`. */
  operands: string;
  summary: string;
  options: readonly OptionSpec[];
  /** Fewest and most operands; outside that range is a usage error. */
  minOperands: number;
  maxOperands: number;
  /** Extra paragraphs after the option list. */
  notes?: string;
}

/** A command line that does not parse: printed with a hint to `--help`, exit status 1. */
export class UsageError extends DiskconvError {
  readonly code = 'INVALID_ARGUMENT' as const;
  readonly deterministic = true;
  constructor(
    message: string,
    readonly command?: string,
  ) {
    super(message);
  }
}

export class ParsedArgs {
  constructor(
    readonly operands: string[],
    private readonly values: Map<string, string[]>,
    /** True when -h/--help was given: the caller prints help and exits 0. */
    readonly help: boolean,
  ) {}

  /** The option's last value, or undefined. */
  get(key: string): string | undefined {
    const all = this.values.get(key);
    return all?.[all.length - 1];
  }

  /** Every value given for a repeatable option, in order. */
  all(key: string): string[] {
    return this.values.get(key) ?? [];
  }

  /** True when the option (flag or valued) was given. */
  has(key: string): boolean {
    return this.values.has(key);
  }
}

const HELP: OptionSpec = { key: 'help', short: 'h', long: 'help', help: 'show this help and exit' };

export function parseCommand(spec: CommandSpec, argv: readonly string[]): ParsedArgs {
  const options = [...spec.options, HELP];
  const values = new Map<string, string[]>();
  const operands: string[] = [];
  const set = (opt: OptionSpec, value: string): void => {
    const prev = values.get(opt.key);
    values.set(opt.key, opt.repeatable && prev ? [...prev, value] : [value]);
  };
  const fail = (message: string): never => {
    throw new UsageError(message, spec.name);
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      const exact = options.find((o) => o.long === name);
      const prefixed = exact ? [exact] : options.filter((o) => o.long !== undefined && name.length > 0 && o.long.startsWith(name));
      if (prefixed.length > 1) fail(`option '--${name}' is ambiguous`);
      const opt = prefixed[0] ?? fail(`unrecognized option '${arg}'`);
      if (opt.value === undefined) {
        if (eq >= 0) fail(`option '--${opt.long}' doesn't allow an argument`);
        set(opt, '');
      } else if (eq >= 0) {
        set(opt, arg.slice(eq + 1));
      } else {
        const next = argv[++i];
        if (next === undefined) fail(`option '--${opt.long}' requires an argument`);
        set(opt, next as string);
      }
      continue;
    }
    if (arg.startsWith('-') && arg !== '-') {
      // A cluster of short options: flags, then at most one that takes the rest (or the next word) as its value.
      for (let j = 1; j < arg.length; j++) {
        const letter = arg[j] as string;
        const opt = options.find((o) => o.short === letter) ?? fail(`invalid option -- '${letter}'`);
        if (opt.value === undefined) {
          set(opt, '');
          continue;
        }
        const rest = arg.slice(j + 1);
        if (rest.length > 0) set(opt, rest);
        else {
          const next = argv[++i];
          if (next === undefined) fail(`option requires an argument -- '${letter}'`);
          set(opt, next as string);
        }
        break;
      }
      continue;
    }
    operands.push(arg);
  }
  const help = values.has('help');
  if (!help && (operands.length < spec.minOperands || operands.length > spec.maxOperands)) {
    if (operands.length < spec.minOperands) fail(spec.maxOperands === 1 ? 'Expecting one image file name' : `expecting ${spec.operands}`);
    fail(`Unexpected argument: ${operands[spec.maxOperands] as string}`);
  }
  return new ParsedArgs(operands, values, help);
}

function optionLabel(o: OptionSpec): string {
  const names = [o.short ? `-${o.short}` : undefined, o.long ? `--${o.long}` : undefined].filter(Boolean).join(', ');
  if (o.value === undefined) return names;
  return o.long ? `${names}=${o.value}` : `${names} ${o.value}`;
}

/**
 * Every command's preamble: parses argv, and for -h/--help prints the command's
 * help and returns undefined (the command then exits 0).
 */
export function parseOrHelp(spec: CommandSpec, argv: readonly string[], out: (s: string) => void): ParsedArgs | undefined {
  const args = parseCommand(spec, argv);
  if (!args.help) return args;
  out(commandHelp(spec));
  return undefined;
}

/** `diskconv COMMAND --help`. */
export function commandHelp(spec: CommandSpec): string {
  const opts = [...spec.options, HELP];
  const labels = opts.map(optionLabel);
  const width = Math.min(30, Math.max(...labels.map((l) => l.length)) + 2);
  const lines = [`usage: diskconv ${spec.name} [options] ${spec.operands}`, '', spec.summary, '', 'Options:'];
  opts.forEach((o, k) => {
    const label = labels[k] as string;
    lines.push(label.length + 2 > width ? `  ${label}\n  ${''.padEnd(width)}${o.help}` : `  ${label.padEnd(width)}${o.help}`);
  });
  if (spec.notes) lines.push('', spec.notes);
  return lines.join('\n');
}

/** `--output=human|json`, shared by the commands that print reports. */
export const OUTPUT_OPTION: OptionSpec = { key: 'output', long: 'output', value: 'human|json', help: 'output format (default human)' };
/** `-f FMT`: the declared source format. */
export const FORMAT_OPTION: OptionSpec = { key: 'format', short: 'f', value: 'FMT', help: 'source format: auto (default), qcow2, vmdk, vdi, vpc (VHD), vhdx or raw; refused when the bytes disagree' };
/** `-U`: qemu-img's --force-share; diskconv takes no image locks, so it is accepted and changes nothing. */
export const FORCE_SHARE_OPTION: OptionSpec = { key: 'force-share', short: 'U', long: 'force-share', help: 'open without locks (accepted; diskconv takes no image locks)' };
/** `--passphrase-file FILE`: the key of an encrypted qcow2. */
export const PASSPHRASE_OPTION: OptionSpec = {
  key: 'passphrase-file',
  long: 'passphrase-file',
  value: 'FILE',
  help: "key of an encrypted qcow2 (LUKS or legacy AES): the file's bytes exactly, as qemu's secret file= (a trailing newline counts)",
};

/** `--disk N|ID|NAME`: which disk of an OVA (1-based, by diskId or file) or which top member of a tar bundle. */
export const DISK_OPTION: OptionSpec = {
  key: 'disk',
  long: 'disk',
  value: 'N|NAME',
  help: 'OVA: the disk to read (1-based index in the OVF, its diskId or file; default the first); tar bundle: the member that is the disk',
};

export type Output = 'human' | 'json';

export function outputOf(value: string | undefined): Output {
  if (value === undefined || value === 'human') return 'human';
  if (value === 'json') return 'json';
  throw new UsageError(`--output must be human or json, not '${value}'`);
}
