import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Most tests wait on qemu-img and qimg child processes: two files at a time keep
    // both cores busy (vitest's default leaves one idle on a 2-core machine).
    maxWorkers: 2,
  },
});
