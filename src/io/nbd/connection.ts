/**
 * One NBD client connection in its transmission phase: many requests in flight
 * (each known by its cookie), replies read as they come, simple, structured or
 * extended. Every reply chunk is checked against the request it answers; a protocol
 * violation, a dropped connection or a silent server fails every pending request
 * with one error, and later requests fail at once with the same error.
 */
import { createConnection, type Socket } from 'node:net';
import { ByteReader } from './byte-reader.js';
import { NbdError } from './errors.js';
import { listExports, negotiate, type ListedExport, type NegotiatedExport } from './handshake.js';
import { describeNbdAddress, type NbdAddress } from './uri.js';
import {
  EXTENDED_REQUEST_HEADER_SIZE,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_REQUEST_MAGIC,
  REQUEST_HEADER_SIZE,
} from './protocol.js';
import { ReplyParser, type NbdExtent, type Pending, type ReplyRequests } from './reply-parser.js';
import { SocketInput } from './socket-input.js';
import { startClientTls, type NbdClientTls } from './tls-client.js';

export type { NbdExtent } from './reply-parser.js';

export interface NbdConnectOptions {
  /** milliseconds for connecting and the handshake */
  handshakeTimeoutMs?: number;
  /** milliseconds a server with requests pending may stay silent */
  replyTimeoutMs?: number;
  /** STARTTLS with these credentials before anything else */
  tls?: NbdClientTls;
}

/**
 * How long a silent server is waited for: 30 s for connecting and the handshake, 120 s
 * for the next byte of a reply (a flush of a large cache can take long).
 * QIMG_NBD_TIMEOUT (seconds) sets both.
 */
export function nbdTimeoutMs(phase: 'handshake' | 'reply'): number {
  const env = Number(process.env.QIMG_NBD_TIMEOUT);
  if (Number.isFinite(env) && env > 0) return env * 1000;
  return phase === 'handshake' ? 30_000 : 120_000;
}

/** Requests and payload bytes in flight at once (memory and server-queue bounds). */
const MAX_REQUESTS_IN_FLIGHT = 64;
const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
export class NbdConnection implements ReplyRequests {
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private failure: NbdError | undefined;
  private inFlightBytes = 0;
  private readonly waiting: Array<() => void> = [];
  /** runs while requests are pending; restarted by every byte the server sends */
  private replyTimer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly socket: Socket,
    input: SocketInput,
    private readonly reader: ByteReader,
    readonly info: NegotiatedExport,
    private readonly replyTimeoutMs: number,
  ) {
    input.onActivity = () => this.replyTimer?.refresh();
    input.switchTo(new ReplyParser(info, this));
    // bytes that came with the end of the handshake (a server may not send any before a request)
    const early = reader.drain();
    if (early.length > 0) input.onread.callback(early.length, early);
    socket.on('error', (err: NodeJS.ErrnoException) => this.fail(droppedError(err, 'NBD server closed the connection')));
    socket.on('close', () => this.fail(new NbdError('NBD server closed the connection')));
  }

  /** Connects to `addr`, negotiates the export, and is ready for requests. */
  static async connect(addr: NbdAddress, opts: NbdConnectOptions = {}): Promise<NbdConnection> {
    const { value: info, wire, input, reader } = await NbdConnection.handshake(addr, opts, (socket, reader, startTls) => negotiate(socket, reader, addr.exportName, startTls));
    return new NbdConnection(wire, input, reader, info, opts.replyTimeoutMs ?? nbdTimeoutMs('reply'));
  }

  /** The exports the server at `addr` offers (qemu-nbd -L); the session ends with NBD_OPT_ABORT. */
  static async listExports(addr: NbdAddress, opts: NbdConnectOptions = {}): Promise<ListedExport[]> {
    const { value, wire } = await NbdConnection.handshake(addr, opts, listExports);
    wire.on('error', () => undefined);
    wire.end();
    setTimeout(() => wire.destroy(), 1000).unref();
    return value;
  }

  /**
   * Connects to `addr` and runs `run` (the option phase) with the handshake's timeout and
   * errors; with TLS credentials `run` gets the STARTTLS step to call first.
   */
  private static async handshake<T>(
    addr: NbdAddress,
    opts: NbdConnectOptions,
    run: (socket: Socket, reader: ByteReader, startTls?: () => Promise<Socket>) => Promise<T>,
  ): Promise<{ value: T; wire: Socket; input: SocketInput; reader: ByteReader }> {
    const timeoutMs = opts.handshakeTimeoutMs ?? nbdTimeoutMs('handshake');
    let socket: Socket;
    const reader = new ByteReader();
    const input = new SocketInput(reader);
    // a TLS session reads the socket itself: its plaintext is fed to the consumers
    const onread = opts.tls ? undefined : input.onread;
    try {
      socket =
        addr.transport === 'unix'
          ? createConnection({ path: addr.socket, ...(onread ? { onread } : {}) })
          : createConnection({ host: addr.host, port: addr.port, ...(onread ? { onread } : {}) });
    } catch (err) {
      throw new NbdError(`Failed to connect to '${describeNbdAddress(addr)}': ${(err as Error).message}`);
    }
    let wire: Socket = socket;
    const feed = (chunk: Buffer) => {
      if (!input.feed(chunk)) wire.pause();
    };
    if (!onread) socket.on('data', feed);
    reader.attach(socket);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      reader.fail(new NbdError(`NBD server did not complete the handshake within ${Math.round(timeoutMs / 1000)} s`));
      wire.destroy();
      socket.destroy();
    }, timeoutMs);
    const watch = (s: Socket) => {
      s.on('error', (err: NodeJS.ErrnoException) => reader.fail(droppedError(err, 'NBD server closed the connection during the handshake')));
      s.on('close', () => reader.fail(new NbdError('NBD server closed the connection during the handshake')));
    };
    const startTls = opts.tls
      ? async (): Promise<Socket> => {
          socket.off('data', feed);
          socket.removeAllListeners('error');
          socket.removeAllListeners('close');
          // the raw socket's errors surface through the TLS session from here on
          socket.on('error', () => undefined);
          const secure = await startClientTls(socket, opts.tls!, addr.transport === 'tcp' ? addr.host : undefined);
          wire = secure;
          secure.on('data', feed);
          reader.attach(secure);
          watch(secure);
          return secure;
        }
      : undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
        socket.once('close', () => reject(new Error('closed')));
      }).catch((err: NodeJS.ErrnoException) => {
        if (timedOut) throw new NbdError(`Failed to connect to '${describeNbdAddress(addr)}': Connection timed out`);
        throw connectError(addr, err);
      });
      socket.removeAllListeners('error');
      socket.removeAllListeners('close');
      watch(socket);
      if (addr.transport === 'tcp') socket.setNoDelay(true);
      const value = await run(socket, reader, startTls);
      wire.removeAllListeners('error');
      wire.removeAllListeners('close');
      return { value, wire, input, reader };
    } catch (err) {
      wire.destroy();
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Reads `buf.length` bytes at `offset` (one request: the caller splits by maxBlock). */
  async read(offset: number, buf: Buffer): Promise<void> {
    await this.submit(NBD_CMD_READ, 0, offset, buf.length, undefined, buf);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.submit(NBD_CMD_WRITE, 0, offset, data.length, data);
  }

  /**
   * Sends a write without waiting for its answer: `sent` settles once the kernel has
   * taken the payload (the caller may then reuse `data`: no copy is made), `done` with
   * the server's answer.
   */
  writeBehind(offset: number, data: Buffer): { sent: Promise<void>; done: Promise<void> } {
    let onSent!: (err?: Error | null) => void;
    const sent = new Promise<void>((resolve, reject) => {
      onSent = (err) => (err ? reject(this.failure ?? new NbdError(`NBD connection failed: ${err.message}`)) : resolve());
    });
    const done = this.submit(NBD_CMD_WRITE, 0, offset, data.length, data, undefined, onSent).then(() => undefined);
    // failing before the payload went out fails `sent` too (a later call is ignored)
    done.catch((err: Error) => onSent(err));
    return { sent, done };
  }

  async writeZeroes(offset: number, length: number, flags: number): Promise<void> {
    await this.submit(NBD_CMD_WRITE_ZEROES, flags, offset, length);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.submit(NBD_CMD_TRIM, 0, offset, length);
  }

  async flush(): Promise<void> {
    await this.submit(NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** base:allocation of [offset, offset + length): consecutive extents from offset. */
  async blockStatus(offset: number, length: number): Promise<NbdExtent[]> {
    if (this.info.allocationContext === undefined) throw new NbdError('the NBD server has no base:allocation context', false);
    const extents = await this.submit(NBD_CMD_BLOCK_STATUS, 0, offset, length);
    return extents ?? [];
  }

  /** Sends NBD_CMD_DISC once the requests in flight are answered, then closes. */
  async close(): Promise<void> {
    if (!this.failure) {
      while (this.pending.size > 0 && !this.failure) await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    if (!this.failure) {
      this.failure = new NbdError('the NBD connection is closed');
      this.socket.write(this.requestHeader(NBD_CMD_DISC, 0, this.nextCookie++, 0, 0));
      const closed = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
      this.socket.end();
      const timer = setTimeout(() => this.socket.destroy(), 1000);
      await closed;
      clearTimeout(timer);
    }
    this.reader.fail(this.failure);
    this.socket.destroy();
  }

  /** Sends one request and waits for its whole reply. */
  private async submit(
    command: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    buffer?: Buffer,
    onSent?: (err?: Error | null) => void,
  ): Promise<NbdExtent[] | undefined> {
    if (this.failure) throw this.failure;
    // a write carries its payload, a read's reply does: either counts against the budget
    const cost = command === NBD_CMD_WRITE || command === NBD_CMD_READ ? length : 0;
    while (this.pending.size >= MAX_REQUESTS_IN_FLIGHT || (this.pending.size > 0 && this.inFlightBytes + cost > MAX_BYTES_IN_FLIGHT)) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
      if (this.failure) throw this.failure;
    }
    const cookie = this.nextCookie++;
    const done = new Promise<NbdExtent[] | undefined>((resolve, reject) => {
      this.pending.set(cookie, { command, offset, length, cost, buffer, filled: buffer ? [] : undefined, resolve, reject });
    });
    this.inFlightBytes += cost;
    this.replyTimer ??= setTimeout(() => this.fail(new NbdError(`NBD server did not reply within ${Math.round(this.replyTimeoutMs / 1000)} s`)), this.replyTimeoutMs);
    this.socket.cork();
    this.socket.write(this.requestHeader(command, flags, cookie, offset, length));
    if (payload) this.socket.write(payload, onSent);
    this.socket.uncork();
    return done;
  }

  private requestHeader(command: number, flags: number, cookie: bigint, offset: number, length: number): Buffer {
    const ext = this.info.extendedHeaders;
    const h = Buffer.alloc(ext ? EXTENDED_REQUEST_HEADER_SIZE : REQUEST_HEADER_SIZE);
    h.writeUInt32BE(ext ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(command, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    // the only difference: a 64-bit length in extended headers
    if (ext) h.writeBigUInt64BE(BigInt(length), 24);
    else h.writeUInt32BE(length, 24);
    return h;
  }

  /** Fails the connection: every pending and later request gets `err`. */
  fail(err: NbdError): void {
    if (this.failure) return;
    this.failure = err;
    this.stopReplyTimer();
    this.reader.fail(err);
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.inFlightBytes = 0;
    for (const wake of this.waiting.splice(0)) wake();
    this.socket.destroy();
  }

  private stopReplyTimer(): void {
    clearTimeout(this.replyTimer);
    this.replyTimer = undefined;
  }

  complete(cookie: bigint, p: Pending): void {
    this.pending.delete(cookie);
    this.inFlightBytes -= p.cost;
    if (this.pending.size === 0) this.stopReplyTimer();
    for (const wake of this.waiting.splice(0)) wake();
    if (p.error) p.reject(p.error);
    else p.resolve(p.extents);
  }

  lookup(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new NbdError(`NBD protocol error: reply for unknown cookie ${cookie}`);
    return p;
  }
}

/** A socket error: a peer that went away (reset, broken pipe) is a closed connection. */
function droppedError(err: NodeJS.ErrnoException, closed: string): NbdError {
  if (err.code === 'ECONNRESET' || err.code === 'EPIPE') return new NbdError(closed);
  return new NbdError(`NBD connection failed: ${err.message}`);
}

/** qemu's words for a failed connect. */
function connectError(addr: NbdAddress, err: NodeJS.ErrnoException): NbdError {
  if (err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN') {
    return new NbdError(`address resolution failed for ${describeNbdAddress(addr)}: Name or service not known`);
  }
  const text: Record<string, string> = {
    ECONNREFUSED: 'Connection refused',
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    ETIMEDOUT: 'Connection timed out',
    EHOSTUNREACH: 'No route to host',
    ENETUNREACH: 'Network is unreachable',
    ENOTSOCK: 'Socket operation on non-socket',
  };
  return new NbdError(`Failed to connect to '${describeNbdAddress(addr)}': ${text[err.code ?? ''] ?? err.message}`);
}
