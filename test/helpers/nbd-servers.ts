/**
 * NBD servers for tests: qemu-nbd (daemonized, stopped by its pid) and nbdkit (a child
 * with --exit-with-parent, stopped by its pid), on unix sockets in a temp dir or on
 * 127.0.0.1 with a port the OS picked. Under CI=true a missing qemu-nbd or nbdkit fails
 * the test file instead of skipping it.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { stopPidSync } from './processes.js';

const hasQemuNbd = spawnSync('qemu-nbd', ['--version']).status === 0;
const hasNbdkit = spawnSync('nbdkit', ['--version']).status === 0;

/** Call at the top of a test file that needs qemu-nbd and nbdkit; returns whether to run. */
export function nbdServersAvailable(): boolean {
  if ((!hasQemuNbd || !hasNbdkit) && process.env.CI === 'true') {
    throw new Error('qemu-nbd and nbdkit are required under CI=true (install qemu-utils and nbdkit)');
  }
  return hasQemuNbd && hasNbdkit;
}

export interface RunningServer {
  /** an nbd+unix:// or nbd:// URL of the export */
  uri: string;
  pid: number;
  stop(): void;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => resolve(typeof addr === 'object' && addr ? addr.port : 0));
    });
  });
}

/** Signals `pid` and waits (up to 5 s, then SIGKILL) until it is gone. */
export const stopPid = stopPidSync;

/**
 * qemu-nbd serving `file` (persistent, up to 8 clients at once, daemonized) under export name `exportName`:
 * on a unix socket in `dir`, or on 127.0.0.1:`port`.
 */
export function startQemuNbd(dir: string, tag: string, file: string, opts: { format: string; readOnly?: boolean; exportName?: string; port?: number }): RunningServer {
  const sock = join(dir, `${tag}.sock`);
  const pidFile = join(dir, `${tag}.pid`);
  const name = opts.exportName ?? 'exp';
  const where = opts.port ? ['-b', '127.0.0.1', '-p', String(opts.port)] : ['-k', sock];
  const args = ['-t', '-e', '8', ...(opts.readOnly ? ['-r'] : []), '-f', opts.format, '-x', name, ...where, '--fork', '--pid-file', pidFile, file];
  const r = spawnSync('qemu-nbd', args, { encoding: 'utf8', timeout: 30_000 });
  const pid = existsSync(pidFile) ? Number(readFileSync(pidFile, 'utf8').trim()) : 0;
  if (r.status !== 0 || !pid) {
    if (pid) stopPid(pid);
    throw new Error(`qemu-nbd ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
  }
  const uri = opts.port ? `nbd://127.0.0.1:${opts.port}/${name}` : `nbd+unix:///${name}?socket=${sock}`;
  return { uri, pid, stop: () => stopPid(pid) };
}

/** nbdkit in the foreground as our child on a unix socket in `dir`; waits for its socket. */
export async function startNbdkit(dir: string, tag: string, args: string[]): Promise<RunningServer & { child: ChildProcess }> {
  const sock = join(dir, `${tag}.sock`);
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  for (let i = 0; i < 500 && !existsSync(sock); i++) {
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  if (!existsSync(sock)) {
    child.kill('SIGKILL');
    throw new Error(`nbdkit ${args.join(' ')} did not start: ${stderr}`);
  }
  const pid = child.pid as number;
  return { uri: `nbd+unix:///?socket=${sock}`, pid, child, stop: () => stopPid(pid) };
}
