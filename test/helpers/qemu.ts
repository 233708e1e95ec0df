/**
 * Running qemu-img / qemu-io (the oracle) and the built qimg CLI from tests. Under
 * CI=true a missing qemu-img fails the suite instead of skipping it.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url)).replace(/\/$/, '');
export const QIMG = join(ROOT, 'bin', 'qimg.js');

export const hasQemu = spawnSync('qemu-img', ['--version']).status === 0 && spawnSync('qemu-io', ['--version']).status === 0;

/** Call at the top of a qemu-dependent test file; returns whether to run its tests. */
export function qemuAvailable(): boolean {
  if (!hasQemu && process.env.CI === 'true') {
    throw new Error('qemu-img and qemu-io are required under CI=true (install qemu-utils)');
  }
  return hasQemu;
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeout?: number } = {}): RunResult {
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    encoding: 'utf8',
    timeout: opts.timeout ?? 60_000,
    maxBuffer: 256 * 1024 * 1024,
  });
  if (r.error) throw r.error;
  return { status: r.status ?? (r.signal ? 128 : 1), stdout: r.stdout, stderr: r.stderr };
}

export function qemuImg(args: string[], cwd?: string): RunResult {
  return run('qemu-img', args, { cwd });
}

export function qemuIo(args: string[], cwd?: string): RunResult {
  return run('qemu-io', args, { cwd });
}

/**
 * The environment qimg runs in unless a test gives one: the test's own, without
 * FORCE_COLOR, so that output piped to a test is qemu-img's bytes even where the
 * calling shell or CI forces colour (test/cli/style.test.ts tests colour itself).
 */
export function plainEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.FORCE_COLOR;
  return env;
}

export function qimg(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeout?: number } = {}): RunResult {
  return run(process.execPath, [QIMG, ...args], { ...opts, env: opts.env ?? plainEnv() });
}

/** Runs and throws with the output when the exit code is not 0. */
export function ok(r: RunResult, what = 'command'): RunResult {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

export function tempDir(prefix = 'qimg-test-'): { path: string; cleanup: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** qemu 7.2's PBKDF calibration fails now and then on virtual machines. */
const CALIBRATION_FAILURE = /Unable to get accurate CPU usage/;

/** Attempts after a calibration failure; under a loaded machine failures come in runs, so each waits longer. */
const CALIBRATION_RETRIES = 12;
const calibrationPause = (attempt: number): number => 100 * attempt;

/** Runs `f` again (up to 12 times, pausing a little longer each time) while qemu-img fails only because of its PBKDF calibration. */
export async function retryingCalibration(f: () => RunResult | Promise<RunResult>): Promise<RunResult> {
  let r = await f();
  for (let i = 1; i <= CALIBRATION_RETRIES && r.status !== 0 && CALIBRATION_FAILURE.test(r.stderr); i++) {
    await new Promise((resolve) => setTimeout(resolve, calibrationPause(i)));
    r = await f();
  }
  return r;
}

/** The synchronous form, for tests that run qemu-img with spawnSync. */
export function retryingCalibrationSync(f: () => RunResult): RunResult {
  let r = f();
  for (let i = 1; i <= CALIBRATION_RETRIES && r.status !== 0 && CALIBRATION_FAILURE.test(r.stderr); i++) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, calibrationPause(i));
    r = f();
  }
  return r;
}
