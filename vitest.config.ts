import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // The machines have two cores; qemu-img fixtures and servers are heavy.
    pool: 'forks',
    poolOptions: { forks: { maxForks: 2, minForks: 1 } },
    // A run that finds no test must fail, not pass.
    passWithNoTests: false,
    // One entry each; keep it an array. ceph-global: the run's shared test Ceph, started lazily.
    // build: dist/ built once before any test (tests spawn dist/cli.js).
    // glance-setup: the run's shared test Glance, started lazily (with the test Ceph as its RBD store).
    globalSetup: ['test/global/build.ts', 'test/helpers/ceph-global.ts', 'test/helpers/glance-setup.ts'],
  },
});
