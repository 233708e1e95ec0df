/**
 * HTTP(S) peers for tests: nginx serving a directory (plain and TLS with a self-signed
 * certificate made by openssl), and qimg run asynchronously (a server living in the
 * test process must keep answering while qimg runs). Under CI=true a missing nginx,
 * openssl or qemu-img curl driver fails the file instead of skipping it.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { QIMG, plainEnv, type RunResult } from './qemu.js';

export const NGINX = '/usr/sbin/nginx';

const hasNginx = spawnSync(NGINX, ['-v']).status === 0 && spawnSync('openssl', ['version']).status === 0;

/** Call at the top of a test file that serves images by nginx; returns whether to run its tests. */
export function nginxAvailable(): boolean {
  if (!hasNginx && process.env.CI === 'true') throw new Error('nginx and openssl are required under CI=true (install nginx-light and openssl)');
  return hasNginx;
}

/** Whether qemu-img has its curl driver (Debian's qemu-block-extra): the oracle for http(s) names. */
export function qemuCurlAvailable(): boolean {
  const r = spawnSync('qemu-img', ['--help'], { encoding: 'utf8' });
  const formats = /Supported formats:(.*)/.exec(r.stdout ?? '')?.[1] ?? '';
  const has = / https?( |$)/.test(formats);
  if (!has && process.env.CI === 'true') throw new Error("qemu-img's curl driver is required under CI=true (install qemu-block-extra)");
  return has;
}

/** A TCP port nobody listens on right now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

/** A self-signed certificate for 127.0.0.1 (it is its own CA: NODE_EXTRA_CA_CERTS takes it). */
export function selfSignedCert(dir: string): { cert: string; key: string } {
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  const r = spawnSync(
    'openssl',
    ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
    { encoding: 'utf8', timeout: 30_000 },
  );
  if (r.status !== 0) throw new Error(`openssl req failed: ${r.stderr}`);
  return { cert, key };
}

export interface Nginx {
  port: number;
  tlsPort: number;
  stop(): void;
}

/** Starts nginx on 127.0.0.1 serving `root` over http and https; `prefix` holds its config, pid and log. */
export async function startNginx(prefix: string, root: string, tls: { cert: string; key: string }): Promise<Nginx> {
  // nginx's workers drop to an unprivileged user when started as root: they must be able
  // to walk to the (mkdtemp 0700) directory and read the files
  for (let dir = root; dir.startsWith(prefix); dir = dirname(dir)) chmodSync(dir, 0o755);
  const port = await freePort();
  const tlsPort = await freePort();
  const conf = join(prefix, 'nginx.conf');
  writeFileSync(
    conf,
    `worker_processes 1; pid ${prefix}/nginx.pid; error_log ${prefix}/error.log;
events {}
http {
  access_log off;
  server { listen 127.0.0.1:${port}; root ${root}; }
  server { listen 127.0.0.1:${tlsPort} ssl; ssl_certificate ${tls.cert}; ssl_certificate_key ${tls.key}; root ${root}; }
}
`,
  );
  const child: ChildProcess = spawn(NGINX, ['-p', prefix, '-c', conf, '-g', 'daemon off;'], { stdio: 'ignore' });
  const stop = (): void => {
    if (child.pid !== undefined && child.exitCode === null) child.kill('SIGTERM');
  };
  try {
    await waitForPort(port);
    await waitForPort(tlsPort);
  } catch (err) {
    stop();
    const log = (() => {
      try {
        return readFileSync(join(prefix, 'error.log'), 'utf8');
      } catch {
        return '';
      }
    })();
    throw new Error(`nginx did not start: ${(err as Error).message}\n${log}`, { cause: err });
  }
  return { port, tlsPort, stop };
}

async function waitForPort(port: number, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const up = await new Promise<boolean>((resolve) => {
      const sock = createConnection({ host: '127.0.0.1', port }, () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => resolve(false));
    });
    if (up) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on port ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Runs the built qimg without blocking this process's event loop; `ms` is the elapsed time. */
export function qimgAsync(args: string[], opts: { env?: NodeJS.ProcessEnv; timeout?: number } = {}): Promise<RunResult & { ms: number }> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn(process.execPath, [QIMG, ...args], { env: opts.env ?? plainEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeout ?? 30_000);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ status: code ?? (signal ? 128 : 1), stdout, stderr, ms: Date.now() - started });
    });
  });
}
