import { defineConfig } from 'tsup';

// Two entries: the CLI (bundled so startup loads one file) and the library API.
export default defineConfig({
  entry: { cli: 'src/cli/main.ts', index: 'src/index.ts', 'compress-worker': 'src/ops/compress-worker.ts' },
  format: ['esm'],
  target: 'node20',
  platform: 'node',
  dts: { entry: { index: 'src/index.ts' } },
  clean: true,
  splitting: true,
  sourcemap: false,
  external: ['koffi', 'fzstd', 'commander', 'chalk', 'cli-table3', 'piscina'],
});
