/**
 * Starting `qimg serve` (and qemu-nbd, the reference) from tests: a free TCP port on
 * 127.0.0.1 or a unix socket, readiness from the pid file (written once the server
 * listens), and stopping by pid. Every server a test starts is recorded so afterAll
 * can stop the ones a failed test left behind.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import * as net from 'node:net';
import { alive } from './processes.js';
import { plainEnv, QIMG } from './qemu.js';

/** A port nobody listens on now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Whether `pid` is gone within `ms`. */
export async function exitsWithin(pid: number, ms: number): Promise<boolean> {
  try {
    await waitFor(() => !alive(pid), ms, `process ${pid} to exit`);
    return true;
  } catch {
    return false;
  }
}

const started = new Set<number>();

/** SIGTERM, then SIGKILL after 5 s; waits until the process is gone. */
export async function stopPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    started.delete(pid);
    return;
  }
  if (!(await exitsWithin(pid, 5000))) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    await exitsWithin(pid, 2000);
  }
  started.delete(pid);
}

/** Stops every server still running (afterAll). */
export async function stopAll(): Promise<void> {
  await Promise.all([...started].map((pid) => stopPid(pid)));
}

export interface Served {
  pid: number;
  /** the exit code of a server started in the foreground (not --fork) */
  exit?: Promise<number | null>;
  child?: ChildProcess;
  stderr: () => string;
}

/**
 * `qimg serve ARGS --pid-file PIDFILE` in the foreground (a child of the test), ready
 * once the pid file exists.
 */
export async function serveForeground(args: string[], pidFile: string): Promise<Served> {
  const child = spawn(process.execPath, [QIMG, 'serve', ...args, '--pid-file', pidFile], { env: plainEnv(), stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let exited = false;
  void exit.then(() => (exited = true));
  await waitFor(() => existsSync(pidFile) || exited, 15_000, `qimg serve ${args.join(' ')} to listen`);
  if (exited) throw new Error(`qimg serve ${args.join(' ')} exited: ${err}`);
  started.add(child.pid!);
  return { pid: child.pid!, exit, child, stderr: () => err };
}

/** `qimg serve ARGS --fork --pid-file PIDFILE`: returns once the parent returned. */
export function serveForked(args: string[], pidFile: string): Served {
  const r = spawnSync(process.execPath, [QIMG, 'serve', ...args, '--fork', '--pid-file', pidFile], { env: plainEnv(), encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`qimg serve --fork ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  started.add(pid);
  return { pid, stderr: () => r.stderr };
}

/** qemu-nbd ARGS --fork --pid-file PIDFILE (the reference server). */
export function qemuNbdForked(args: string[], pidFile: string): Served {
  const r = spawnSync('qemu-nbd', [...args, '--fork', '--pid-file', pidFile], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`qemu-nbd ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  started.add(pid);
  return { pid, stderr: () => r.stderr };
}
