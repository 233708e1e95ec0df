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
  // resolving packages; koffi (native), piscina (spawns its workers by path), fzstd and
  // cli-progress (loaded only when needed) stay external.
  noExternal: ['commander'],
  // Bundled CommonJS (commander) requires Node built-ins: give the ESM bundle a require.
  banner: { js: "import { createRequire as __qimgCreateRequire } from 'node:module'; const require = __qimgCreateRequire(import.meta.url);" },
  external: ['koffi', 'fzstd', 'piscina', 'cli-progress'],
});
