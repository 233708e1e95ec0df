// npm's `prepare` (run by `npm ci` and `npm install` in a checkout, and before `npm pack`):
// builds dist/, so that bin/qimg.js runs right after set-up. An install without the dev
// dependencies (`npm ci --omit=dev` over a dist/ built elsewhere) has no tsup: the
// build is skipped then, and dist/ left as it is, rather than removed and not rebuilt.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
try {
  require.resolve('tsup/package.json');
} catch {
  console.warn('qimg: prepare: tsup is not installed (dev dependencies omitted), dist/ not rebuilt');
  process.exit(0);
}

// the package manager that runs this script, as npm tells it (npm_execpath)
const runner = process.env.npm_execpath;
const r = !runner
  ? spawnSync('npm', ['run', 'build'], { stdio: 'inherit', shell: process.platform === 'win32' })
  : /\.[cm]?js$/.test(runner)
    ? spawnSync(process.execPath, [runner, 'run', 'build'], { stdio: 'inherit' })
    : spawnSync(runner, ['run', 'build'], { stdio: 'inherit' });
if (r.error) throw r.error;
process.exit(r.status ?? 1);
