#!/usr/bin/env node
// Launcher: all logic lives in the built bundle (dist/cli.cjs). Start-up is most of
// a metadata command's time, and compiling the bundle is a large part of it, so the
// bundle is compiled through vm.Script with a V8 code cache kept beside it (or in
// ~/.cache/qimg when dist/ is read-only). The cache is keyed by the bundle's size and
// mtime; V8 itself refuses a cache made by another V8 or with other flags, and then a
// new one is written. V8 compiles functions when they first run, so the cache holds
// what the runs that wrote it used: the first run of each subcommand writes it again
// (a superset), and a list beside it says which subcommands it covers.
// CommonJS (bin/package.json says so): Node's ES module loader would add its own start-up.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');
const { createRequire, Module } = require('node:module');

// File I/O runs on libuv's threadpool; size it for several requests in flight
// (must happen before the first asynchronous file operation).
process.env.UV_THREADPOOL_SIZE ??= '16';

const bundle = path.join(__dirname, '..', 'dist', 'cli.cjs');

function fail(err) {
  process.stderr.write(`qimg: ${err && err.message ? err.message : err}\n`);
  process.exit(1);
}

/** Where the code cache for this exact bundle lives (two candidate directories). */
function cachePaths(st) {
  const name = `cli.cjs.${st.size}-${Math.floor(st.mtimeMs)}.v8cache`;
  const home = process.env.XDG_CACHE_HOME || path.join(process.env.HOME || '/tmp', '.cache');
  return [path.join(path.dirname(bundle), name), path.join(home, 'qimg', name)];
}

/** Writes `data` to `file` atomically (concurrent runs may race). */
function writeAtomically(file, data) {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    fs.writeFileSync(tmp, data);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

/** Stores the cache and the subcommands it covers in the first writable place; drops stale ones. */
function saveCache(script, paths, covered) {
  let data;
  try {
    data = script.createCachedData();
  } catch {
    return;
  }
  for (const file of paths) {
    try {
      const dir = path.dirname(file);
      fs.mkdirSync(dir, { recursive: true });
      writeAtomically(file, data);
      writeAtomically(`${file}.json`, JSON.stringify({ commands: [...covered] }));
      const mine = path.basename(file);
      for (const old of fs.readdirSync(dir)) {
        if (old.startsWith('cli.cjs.') && !old.startsWith(mine)) fs.rmSync(path.join(dir, old), { force: true });
      }
      return;
    } catch {
      // not writable: try the next place
    }
  }
}

/** The subcommand of this run ('' for none), as far as the cache is concerned. */
function subcommand() {
  return process.argv.slice(2).find((a) => !a.startsWith('-')) ?? '';
}

/**
 * The bundle's require. commander loads node:child_process (with net and dgram) for
 * executable subcommands, which qimg has none of: it gets a stand-in that loads the
 * module only if something reaches for it.
 */
function bundleRequire() {
  const real = createRequire(bundle);
  const lazyChildProcess = new Proxy({}, { get: (_, key) => real('node:child_process')[key] });
  const require = (id) => (id === 'child_process' || id === 'node:child_process' ? lazyChildProcess : real(id));
  return Object.assign(require, { resolve: real.resolve, cache: real.cache, main: real.main });
}

/** Loads the bundle through the code cache; plain require if anything about that fails. */
function loadCli() {
  const require = bundleRequire();
  let st, source;
  try {
    st = fs.statSync(bundle);
    source = fs.readFileSync(bundle, 'utf8');
  } catch {
    return require(bundle);
  }
  const paths = cachePaths(st);
  let cachedData;
  let covered = new Set();
  for (const file of paths) {
    try {
      cachedData = fs.readFileSync(file);
    } catch {
      continue; // not there: try the next place
    }
    try {
      covered = new Set(JSON.parse(fs.readFileSync(`${file}.json`, 'utf8')).commands);
    } catch {
      // no list: the cache covers nothing for sure
    }
    break;
  }
  const script = new vm.Script(Module.wrap(source), { filename: bundle, cachedData });
  const mod = { exports: {}, filename: bundle, id: bundle, loaded: false };
  script.runInThisContext().call(mod.exports, mod.exports, require, mod, bundle, path.dirname(bundle));
  // The cache gets what this run compiled too, written when the process ends.
  const cmd = subcommand();
  if (!cachedData || script.cachedDataRejected) covered = new Set();
  if (!covered.has(cmd)) process.once('exit', () => saveCache(script, paths, covered.add(cmd)));
  return mod.exports;
}

let cli;
try {
  cli = loadCli();
} catch (err) {
  fail(err);
}
cli.main(process.argv).catch(fail);
