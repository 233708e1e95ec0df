/**
 * Daemons the tests start (qemu-nbd, nbdkit, qimg serve): whether one still runs, and
 * stopping one so that its image locks are released before the test goes on.
 */
import { existsSync, readFileSync } from 'node:fs';

const hasProc = existsSync('/proc/self/stat');

/**
 * Whether `pid` still runs. A zombie counts as gone: a daemonized server is reparented
 * to pid 1, which may reap it late (or never, in a container), and its files (and image
 * locks) are closed already.
 */
export function alive(pid: number): boolean {
  if (hasProc) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const state = stat.charAt(stat.lastIndexOf(')') + 2);
      return state !== 'Z' && state !== 'X';
    } catch {
      return false;
    }
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));
function sleepMs(ms: number): void {
  Atomics.wait(sleeper, 0, 0, ms);
}

/** Signals `pid` and waits (up to 5 s, then SIGKILL) until it is gone. */
export function stopPidSync(pid: number, signal: NodeJS.Signals = 'SIGTERM'): void {
  try {
    process.kill(pid, signal);
  } catch {
    return;
  }
  for (let i = 0; i < 500 && alive(pid); i++) sleepMs(10);
  if (alive(pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone meanwhile */
    }
    for (let i = 0; i < 200 && alive(pid); i++) sleepMs(10);
  }
}
