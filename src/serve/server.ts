/**
 * The NBD server: a listener (TCP or unix socket) handing each connection through the
 * handshake to the transmission phase of one export. qemu-nbd's policies: at most
 * `shared` clients at once (later ones wait, unserved, until one leaves; 0 = no limit),
 * and without `persistent` the server ends when its last client has gone.
 */
import { lstatSync, readFileSync, unlinkSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import * as net from 'node:net';
import { QimgError } from '../core/errors.js';
import type { Duplex } from 'node:stream';
import type { NbdExport } from './export.js';
import { HANDSHAKE_TIMEOUT_MS, handshake } from './handshake.js';
import type { TlsServerCreds } from './tls.js';
import { Transmission } from './transmission.js';
import { closeGracefully } from './wire.js';

export type ListenAddress = { host: string; port: number } | { path: string };

export interface ServerOptions {
  address: ListenAddress;
  /** clients served at once; 0: no limit */
  shared: number;
  /** keep serving after the last client left */
  persistent: boolean;
  tls?: TlsServerCreds;
}

/** Connections waiting for a free slot beyond this many are closed at once. */
const MAX_WAITING = 128;

interface Client {
  socket: net.Socket;
  /** set once the handshake reached transmission */
  transmission?: Transmission;
  /** the socket in use (TLS wraps the raw one) */
  current?: Duplex;
}

export class NbdServer {
  private readonly server = net.createServer({ pauseOnConnect: true });
  private readonly clients = new Set<Client>();
  private readonly waiting: net.Socket[] = [];
  private stopping = false;
  private ended!: () => void;
  /** resolves when the server has stopped: after stop(), or after the last client without `persistent` */
  readonly done = new Promise<void>((resolve) => (this.ended = resolve));

  constructor(
    private readonly exp: NbdExport,
    private readonly opts: ServerOptions,
  ) {
    this.server.on('connection', (socket) => this.accept(socket));
  }

  /** Starts listening; a failure is qemu-nbd's message ("Failed to find an available port: ..."). */
  listen(): Promise<void> {
    const a = this.opts.address;
    if ('path' in a) removeStaleSocket(a.path);
    return new Promise((resolve, reject) => {
      this.server.once('error', (err: NodeJS.ErrnoException) => reject(listenError(err, this.opts.address)));
      const ready = () => {
        this.server.removeAllListeners('error');
        resolve();
      };
      if ('path' in a) this.server.listen(a.path, ready);
      else this.server.listen(a.port, a.host, ready);
    });
  }

  /** The TCP port listened on (tests ask for port 0). */
  get port(): number | undefined {
    const a = this.server.address();
    return a && typeof a === 'object' ? a.port : undefined;
  }

  private accept(socket: net.Socket): void {
    socket.on('error', () => undefined);
    if (this.stopping) {
      socket.destroy();
      return;
    }
    if (this.opts.shared > 0 && this.clients.size >= this.opts.shared) {
      if (this.waiting.length >= MAX_WAITING) socket.destroy();
      else this.waiting.push(socket);
      return;
    }
    void this.serve(socket);
  }

  private async serve(socket: net.Socket): Promise<void> {
    const client: Client = { socket };
    this.clients.add(client);
    socket.setNoDelay(true);
    socket.resume();
    const timer = setTimeout(() => socket.destroy(), HANDSHAKE_TIMEOUT_MS);
    let broken = false;
    try {
      const session = await handshake(socket, { exp: this.exp, tls: this.opts.tls, shuttingDown: () => this.stopping });
      clearTimeout(timer);
      if (session && !this.stopping) {
        client.current = session.socket;
        client.transmission = new Transmission(session, this.exp);
        await client.transmission.run();
      }
    } catch (err) {
      // a client that broke the protocol or went away: only its connection ends
      broken = true;
      if (process.env.QIMG_DEBUG === '1') process.stderr.write(`nbd connection closed: ${(err as Error).stack ?? String(err)}\n`);
    } finally {
      clearTimeout(timer);
      // the replies already written still reach a client that reads them
      if (broken) {
        client.current?.destroy();
        socket.destroy();
      } else closeGracefully(client.current ?? socket);
      this.clients.delete(client);
      this.next();
    }
  }

  /** A slot is free: serve the next waiting connection, or end when nobody is left. */
  private next(): void {
    if (this.stopping) {
      if (this.clients.size === 0) this.ended();
      return;
    }
    while (this.waiting.length > 0) {
      const socket = this.waiting.shift()!;
      if (socket.destroyed) continue;
      void this.serve(socket);
      return;
    }
    if (!this.opts.persistent && this.clients.size === 0) void this.stop();
  }

  /**
   * Stops accepting, lets every connection finish its requests in flight, then closes
   * them. The export's queued writes are done when this resolves.
   */
  async stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      this.server.close();
      for (const s of this.waiting.splice(0)) s.destroy();
      await Promise.allSettled(
        [...this.clients].map((c) => (c.transmission ? c.transmission.stop() : Promise.resolve(c.socket.destroy()))),
      );
      if (this.clients.size === 0) this.ended();
    }
    await this.done;
    await this.exp.drain();
  }
}

const SOCKET_ERRORS: Record<string, string> = {
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  EACCES: 'Permission denied',
  ENOENT: 'No such file or directory',
  ENOTDIR: 'Not a directory',
};

function listenError(err: NodeJS.ErrnoException, a: ListenAddress): QimgError {
  const why = SOCKET_ERRORS[err.code ?? ''] ?? err.message;
  const what = 'path' in a ? `Failed to bind socket to ${a.path}` : 'Failed to find an available port';
  return new QimgError(`${what}: ${why}`, { file: '', cause: err });
}

/**
 * A socket file no process has bound any more (its server was killed) is replaced, as
 * QEMU replaces it; one a live process holds (Linux lists bound unix sockets in
 * /proc/net/unix; without that list nothing is removed), and anything that is not a
 * socket, is left for listen to report. No connection is made: a probe would count as
 * a client of a live server.
 */
function removeStaleSocket(path: string): void {
  try {
    if (!lstatSync(path).isSocket()) return;
    const base = basename(path);
    const bound = readFileSync('/proc/net/unix', 'utf8')
      .split('\n')
      .slice(1)
      .map((line) => line.trim().split(/\s+/)[7])
      .filter((p): p is string => p !== undefined);
    // a name bound relative to another directory may be this one: only a clear miss counts as stale
    if (bound.some((p) => p === path || p === resolve(path) || basename(p) === base)) return;
    unlinkSync(path);
  } catch {
    // absent (the usual case), or nothing to tell: listen reports what is wrong
  }
}
