#!/usr/bin/env node
// Tiny launcher: all logic lives in the built bundle.
import('../dist/cli.js').then((m) => m.main(process.argv)).catch((err) => {
  process.stderr.write(`qimg: ${err && err.message ? err.message : err}\n`);
  process.exit(1);
});
