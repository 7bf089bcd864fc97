/**
 * The Dockerfile cannot be built here (no Docker daemon), so what can be checked without one is: the build
 * stage copies in every file `npm run build` runs or reads (a script the build gained but the stage lacks
 * fails only in `docker build`, as scripts/bundle-cli.mjs once would have).
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const dockerfile = readFileSync(`${ROOT}/Dockerfile`, 'utf8');
const pkg = JSON.parse(readFileSync(`${ROOT}/package.json`, 'utf8')) as { scripts: Record<string, string> };

/** The sources of the COPY lines of the first stage (the build), context paths only. */
function buildStageCopies(): string[] {
  const stages = dockerfile.split(/^FROM /m).slice(1);
  const build = stages[0] ?? '';
  const sources: string[] = [];
  for (const line of build.split('\n')) {
    const m = /^COPY\s+(?!--from)(.+)$/.exec(line.trim());
    if (!m?.[1]) continue;
    const parts = m[1].split(/\s+/);
    sources.push(...parts.slice(0, -1).map((p) => p.replace(/^\.\//, '').replace(/\/$/, '')));
  }
  return sources;
}

/** The files the build script names: `node FILE` and `tsc -p FILE`. */
function buildInputs(): string[] {
  const script = pkg.scripts.build ?? '';
  return [...script.matchAll(/(?:\bnode|\btsc -p)\s+([\w./-]+\.(?:json|mjs|cjs|js))\b/g)].map((m) => m[1] as string);
}

describe('Dockerfile build stage', () => {
  it('copies every file npm run build runs or reads', () => {
    const copies = buildStageCopies();
    const inputs = buildInputs();
    expect(inputs).toEqual(expect.arrayContaining(['tsconfig.json', 'native/build.mjs', 'scripts/bundle-cli.mjs']));
    for (const input of inputs) {
      expect(copies.some((c) => input === c || input.startsWith(`${c}/`)), `${input} is not copied into the build stage`).toBe(true);
    }
    // And what tsc compiles.
    expect(copies).toContain('src');
  });
});
