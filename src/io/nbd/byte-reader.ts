/**
 * Exact-length reads from a stream socket, for the NBD client's handshake: bytes queue
 * as they arrive (through the socket's `onread` hook, see socket-input.ts); the socket
 * is paused while more than a few MiB wait unread (bounded memory whatever the peer
 * sends), and a closed or failed stream rejects the pending and every later read with
 * one error.
 */
import type { Socket } from 'node:net';
import type { InputConsumer } from './socket-input.js';

/** Unread bytes past which the socket stops reading until they are consumed. */
const HIGH_WATER = 4 * 1024 * 1024;

/** Bytes each socket read may deliver to the reader. */
const READ_SIZE = 64 * 1024;

export class ByteReader implements InputConsumer {
  private chunks: Buffer[] = [];
  private available = 0;
  private waiter: { need: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  private failure: Error | undefined;
  private paused = false;
  private socket: Socket | undefined;

  /** The socket the bytes come from (paused and resumed by the reader). */
  attach(socket: Socket): void {
    this.socket = socket;
  }

  /** A fresh buffer per read: queued bytes keep referring to theirs. */
  nextBuffer(): Buffer {
    return Buffer.allocUnsafe(READ_SIZE);
  }

  /** `data` arrived; false pauses the socket until the queue drains. */
  received(data: Buffer): boolean {
    this.push(data);
    return !this.paused;
  }

  /** Hands over (and forgets) the bytes received and not read. */
  drain(): Buffer {
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.available = 0;
    return rest;
  }

  /** Fails every pending and later read with `err` (the first failure wins). */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }

  /** `n` bytes (n is small: headers and bounded payloads). */
  async read(n: number): Promise<Buffer> {
    await this.waitFor(n);
    return this.take(n);
  }

  /** Fills `target` as bytes arrive (large payloads never queue whole). */
  async readInto(target: Buffer): Promise<void> {
    let done = 0;
    while (done < target.length) {
      await this.waitFor(1);
      done += this.copyOut(target, done);
    }
  }

  /** Reads and drops `n` bytes. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      await this.waitFor(1);
      const piece = Math.min(n, this.available);
      this.take(piece);
      n -= piece;
    }
  }

  private push(data: Buffer): void {
    if (this.failure) return;
    this.chunks.push(data);
    this.available += data.length;
    if (this.available > HIGH_WATER) this.paused = true;
    const w = this.waiter;
    if (w && this.available >= w.need) {
      this.waiter = undefined;
      w.resolve();
    }
  }

  private async waitFor(n: number): Promise<void> {
    if (this.available >= n) return;
    if (this.failure) throw this.failure;
    if (this.paused) {
      this.paused = false;
      this.socket?.resume();
    }
    await new Promise<void>((resolve, reject) => {
      this.waiter = { need: n, resolve, reject };
    });
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.available -= n;
    } else {
      out = Buffer.allocUnsafe(n);
      this.copyOut(out, 0);
    }
    this.resumeIfLow();
    return out;
  }

  /** Copies queued bytes into target[from..]; returns how many. */
  private copyOut(target: Buffer, from: number): number {
    let done = 0;
    while (from + done < target.length && this.chunks.length > 0) {
      const chunk = this.chunks[0];
      const n = Math.min(chunk.length, target.length - from - done);
      chunk.copy(target, from + done, 0, n);
      done += n;
      if (n === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(n);
    }
    this.available -= done;
    this.resumeIfLow();
    return done;
  }

  private resumeIfLow(): void {
    if (this.paused && this.available < HIGH_WATER / 2 && !this.failure) {
      this.paused = false;
      this.socket?.resume();
    }
  }
}
