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
  // The CLI's own dependencies are bundled so that startup reads one file instead of
  // resolving packages; koffi (native), piscina (spawns its workers by path) and fzstd
  // (decompression, loaded with the qcow2 code) stay external.
  noExternal: ['commander', 'cli-progress'],
  external: ['koffi', 'fzstd', 'piscina'],
});
