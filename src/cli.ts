#!/usr/bin/env node
// The ESM entry (`node dist/cli.js`, the Docker image's entry point): the same launcher bin/diskconv runs.
import { createRequire } from 'node:module';
import type * as Launch from './cli/launch.cjs';

const { run } = createRequire(import.meta.url)('./cli/launch.cjs') as typeof Launch;
process.exitCode = await run(process.argv.slice(2));
