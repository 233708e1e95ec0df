import { defineConfig } from 'tsup';

const external = ['koffi', 'fzstd', 'piscina', 'cli-progress', 'cli-table3'];

export default defineConfig([
  // The library API and the compression worker: ESM, split into shared chunks.
  {
    entry: { index: 'src/index.ts', 'compress-worker': 'src/ops/compress-worker.ts' },
    format: ['esm'],
    target: 'node20',
    platform: 'node',
    dts: { entry: { index: 'src/index.ts' } },
    clean: false,
    splitting: true,
    sourcemap: false,
    external,
  },
  // The CLI: one CommonJS file, because bin/qimg.js compiles it through vm.Script with a
  // V8 code cache (Node 20 has no compile cache for ES modules), which takes most of the
  // compile time off every run after the first. Its own dependencies are bundled so
  // start-up reads one file (chalk too: it is ESM-only, and tiny); koffi (native),
  // piscina (spawns its workers by path), fzstd, cli-progress and cli-table3 (loaded
  // only when needed) stay external.
  {
    entry: { cli: 'src/cli/main.ts' },
    format: ['cjs'],
    outExtension: () => ({ js: '.cjs' }),
    target: 'node20',
    platform: 'node',
    clean: false,
    splitting: false,
    sourcemap: false,
    // import.meta.url (worker paths, createRequire) becomes the bundle's own file URL
    shims: true,
    // less source to read and hash at every start; names stay for profiles
    minifyWhitespace: true,
    minifySyntax: true,
    keepNames: true,
    noExternal: ['commander', 'chalk'],
    external,
  },
]);
