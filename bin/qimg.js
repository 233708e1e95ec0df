#!/usr/bin/env node
// Tiny launcher: all logic lives in the built bundle.
// File I/O runs on libuv's threadpool; size it for several requests in flight
// (must happen before the first asynchronous file operation).
process.env.UV_THREADPOOL_SIZE ??= '16';
import('../dist/cli.js').then((m) => m.main(process.argv)).catch((err) => {
  process.stderr.write(`qimg: ${err && err.message ? err.message : err}\n`);
  process.exit(1);
});
