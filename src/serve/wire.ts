/**
 * Exact-length reads from a stream socket with bounded buffering: the socket is paused
 * while more than a little is queued, so a client that sends faster than the server
 * works (or that sends garbage) cannot grow the server's memory.
 */
import type { Duplex } from 'node:stream';

/** Bytes queued before the socket is paused (a little more than one maximal request). */
const HIGH_WATER = 1024 * 1024;

export class ConnectionClosed extends Error {
  constructor() {
    super('connection closed');
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private queued = 0;
  private ended = false;
  private waiter: (() => void) | null = null;
  /** a payload being filled as bytes arrive (they are copied once, never queued) */
  private direct: { target: Buffer; have: number } | null = null;
  private readonly onData = (chunk: Buffer) => {
    const d = this.direct;
    if (d) {
      const n = Math.min(chunk.length, d.target.length - d.have);
      chunk.copy(d.target, d.have, 0, n);
      d.have += n;
      if (d.have === d.target.length) {
        this.direct = null;
        this.wake();
      }
      if (n === chunk.length) return;
      chunk = chunk.subarray(n);
    }
    this.chunks.push(chunk);
    this.queued += chunk.length;
    if (this.queued > HIGH_WATER) this.socket.pause();
    this.wake();
  };
  private readonly onEnd = () => {
    this.ended = true;
    this.wake();
  };

  constructor(private readonly socket: Duplex) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** Bytes received and not read yet. */
  get pending(): number {
    return this.queued;
  }

  /** Exactly `n` bytes (n ≤ what the caller has bounded); ConnectionClosed at end of stream. */
  async read(n: number): Promise<Buffer> {
    if (n === 0) return Buffer.alloc(0);
    while (this.queued < n) {
      if (this.ended) throw new ConnectionClosed();
      if (this.socket.isPaused()) this.socket.resume();
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
    let out: Buffer;
    if (this.chunks[0].length >= n) {
      const first = this.chunks[0];
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0];
        const take = Math.min(c.length, n - at);
        c.copy(out, at, 0, take);
        at += take;
        if (take === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(take);
      }
    }
    this.queued -= n;
    if (this.queued <= HIGH_WATER / 2 && this.socket.isPaused() && !this.ended) this.socket.resume();
    return out;
  }

  /** Fills `target` (a write's payload): what is queued first, then bytes as they arrive. */
  async readInto(target: Buffer): Promise<void> {
    let have = 0;
    while (have < target.length && this.chunks.length > 0) {
      const c = this.chunks[0];
      const take = Math.min(c.length, target.length - have);
      c.copy(target, have, 0, take);
      have += take;
      this.queued -= take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
    if (have === target.length) return;
    this.direct = { target, have };
    try {
      while (this.direct) {
        if (this.ended) throw new ConnectionClosed();
        if (this.socket.isPaused()) this.socket.resume();
        await new Promise<void>((resolve) => (this.waiter = resolve));
      }
    } finally {
      this.direct = null;
    }
  }

  /** Reads and drops `n` bytes in bounded pieces. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const step = Math.min(n, 64 * 1024);
      await this.read(step);
      n -= step;
    }
  }

  /** Stops reading this socket (before it is handed to TLS); returns what was queued. */
  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.queued = 0;
    return rest;
  }
}

/** Writes `data` and resolves once the socket took it (rejects if the socket is gone). */
export function send(socket: Duplex, data: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    if (socket.destroyed || socket.writableEnded) return reject(new ConnectionClosed());
    socket.write(data, (err) => (err ? reject(err) : resolve()));
  });
}

/** How long a closing connection may take to hand its last replies to a client. */
const CLOSE_GRACE_MS = 2000;

/**
 * Ends a connection after the replies already written (TLS sends its close_notify);
 * one whose client does not take them is destroyed after a grace period.
 */
export function closeGracefully(socket: Duplex): void {
  if (socket.destroyed) return;
  socket.end();
  setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
}
