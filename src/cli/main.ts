import { readFileSync } from 'node:fs';
import { isDiskconvError } from '../engine/errors.js';
import { UsageError, type CommandSpec } from './args.js';
import { exitStatusOf } from './errors.js';

interface CommandModule {
  spec: CommandSpec;
  run(argv: string[], out: (s: string) => void): Promise<number>;
}

/** Each verb in its own module, imported only when used, so start-up stays lean. */
const COMMANDS: Record<string, () => Promise<CommandModule>> = {
  info: () => import('./commands/info.js'),
  convert: () => import('./commands/convert.js'),
  check: () => import('./commands/check.js'),
  create: () => import('./commands/create.js'),
  measure: () => import('./commands/measure.js'),
  map: () => import('./commands/map.js'),
  compare: () => import('./commands/compare.js'),
  snapshot: () => import('./commands/snapshot.js'),
};

const SERVICE = ['serve', 'worker', 'up'] as const;

export function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

async function usage(): Promise<string> {
  const lines = ['usage: diskconv [--version] [--help] COMMAND [command options]', 'Convert qcow2, vmdk, vdi, vpc (VHD), vhdx and raw disk images to raw, as qemu-img does.', '', 'Commands:'];
  for (const [name, load] of Object.entries(COMMANDS)) {
    const { spec } = await load();
    lines.push(`  ${`${name} ${spec.operands}`.padEnd(22)}${spec.summary.split('. ')[0]?.replace(/\.$/, '')}`);
  }
  lines.push(
    `  ${'serve'.padEnd(22)}run the HTTP API`,
    `  ${'worker'.padEnd(22)}run a conversion worker`,
    `  ${'up'.padEnd(22)}run API and worker (and a private redis-server when REDIS_URL is unset)`,
    '',
    "Formats: auto (default), qcow2, vmdk, vdi, vpc, vhdx, raw. 'diskconv COMMAND --help' shows a command's options.",
  );
  return lines.join('\n');
}

export async function runCli(argv: string[], out: (s: string) => void = (s) => process.stdout.write(s + '\n')): Promise<number> {
  const [command, ...rest] = argv;
  const jsonErrors = rest.includes('--output=json') || rest.join(' ').includes('--output json');
  try {
    if (command === '--version' || command === '-V' || command === 'version') {
      out(`diskconv version ${version()}`);
      return 0;
    }
    if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
      out(await usage());
      return command === undefined ? 1 : 0;
    }
    if ((SERVICE as readonly string[]).includes(command)) {
      const { runService } = await import('./service.js');
      return await runService(command as (typeof SERVICE)[number], rest);
    }
    const load = COMMANDS[command];
    if (!load) throw new UsageError(`Command not found: ${command}`);
    return await (await load()).run(rest, out);
  } catch (err) {
    const code = isDiskconvError(err) ? err.code : 'INTERNAL_ERROR';
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(jsonErrors ? JSON.stringify({ code, message }) + '\n' : `diskconv: ${code}: ${message}\n`);
    if (err instanceof UsageError && !jsonErrors) {
      process.stderr.write(`Try 'diskconv ${err.command ? `${err.command} ` : ''}--help' for more information\n`);
    }
    if (!isDiskconvError(err) && process.env.DISKCONV_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    return exitStatusOf(err) ?? (command === 'check' && isDiskconvError(err) && err.code === 'IMAGE_CORRUPT' ? 2 : 1);
  }
}
