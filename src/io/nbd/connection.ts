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
import { negotiate, type NegotiatedExport } from './handshake.js';
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
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_MAX_STRING,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_SIZE,
  nbdErrorText,
} from './protocol.js';

/** One block-status descriptor: `length` bytes with NBD_STATE_* `flags`. */
export interface NbdExtent {
  length: number;
  flags: number;
}

export interface NbdConnectOptions {
  /** milliseconds for connecting and the handshake */
  handshakeTimeoutMs?: number;
  /** milliseconds a server with requests pending may stay silent */
  replyTimeoutMs?: number;
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
const MAX_REQUESTS_IN_FLIGHT = 16;
const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
/** The most block-status descriptors qimg accepts in one reply (qemu-nbd sends ≤ 128 Ki). */
const MAX_STATUS_DESCRIPTORS = 1 << 20;
/** The largest error chunk: error, message length, the message, an offset. */
const MAX_ERROR_CHUNK = 6 + NBD_MAX_STRING + 8;

interface Pending {
  command: number;
  offset: number;
  length: number;
  cost: number;
  /** READ: where the data goes, and the ranges already filled (sorted, disjoint) */
  buffer?: Buffer;
  filled?: Array<[number, number]>;
  /** BLOCK_STATUS: the answer */
  extents?: NbdExtent[];
  error?: NbdError;
  resolve: (extents: NbdExtent[] | undefined) => void;
  reject: (err: Error) => void;
}

export class NbdConnection {
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private failure: NbdError | undefined;
  private inFlightBytes = 0;
  private readonly waiting: Array<() => void> = [];
  /** runs while requests are pending; restarted by every byte the server sends */
  private replyTimer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly reader: ByteReader,
    readonly info: NegotiatedExport,
    private readonly replyTimeoutMs: number,
  ) {
    socket.on('data', () => this.replyTimer?.refresh());
    socket.on('error', (err) => this.fail(new NbdError(`NBD connection failed: ${err.message}`)));
    socket.on('close', () => this.fail(new NbdError('NBD server closed the connection')));
    void this.receiveLoop();
  }

  /** Connects to `addr`, negotiates the export, and is ready for requests. */
  static async connect(addr: NbdAddress, opts: NbdConnectOptions = {}): Promise<NbdConnection> {
    const timeoutMs = opts.handshakeTimeoutMs ?? nbdTimeoutMs('handshake');
    let socket: Socket;
    try {
      socket = addr.transport === 'unix' ? createConnection({ path: addr.socket }) : createConnection({ host: addr.host, port: addr.port });
    } catch (err) {
      throw new NbdError(`Failed to connect to '${describeNbdAddress(addr)}': ${(err as Error).message}`);
    }
    const reader = new ByteReader(socket);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      reader.fail(new NbdError(`NBD server did not complete the handshake within ${Math.round(timeoutMs / 1000)} s`));
      socket.destroy();
    }, timeoutMs);
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
      socket.on('error', (err) => reader.fail(new NbdError(`NBD connection failed: ${err.message}`)));
      socket.on('close', () => reader.fail(new NbdError('NBD server closed the connection during the handshake')));
      if (addr.transport === 'tcp') socket.setNoDelay(true);
      const info = await negotiate(socket, reader, addr.exportName);
      socket.removeAllListeners('error');
      socket.removeAllListeners('close');
      return new NbdConnection(socket, reader, info, opts.replyTimeoutMs ?? nbdTimeoutMs('reply'));
    } catch (err) {
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
  private async submit(command: number, flags: number, offset: number, length: number, payload?: Buffer, buffer?: Buffer): Promise<NbdExtent[] | undefined> {
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
    if (payload) this.socket.write(payload);
    this.socket.uncork();
    return done;
  }

  private requestHeader(command: number, flags: number, cookie: bigint, offset: number, length: number): Buffer {
    if (this.info.extendedHeaders) {
      const h = Buffer.alloc(EXTENDED_REQUEST_HEADER_SIZE);
      h.writeUInt32BE(NBD_EXTENDED_REQUEST_MAGIC, 0);
      h.writeUInt16BE(flags, 4);
      h.writeUInt16BE(command, 6);
      h.writeBigUInt64BE(cookie, 8);
      h.writeBigUInt64BE(BigInt(offset), 16);
      h.writeBigUInt64BE(BigInt(length), 24);
      return h;
    }
    const h = Buffer.alloc(REQUEST_HEADER_SIZE);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(command, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return h;
  }

  /** Fails the connection: every pending and later request gets `err`. */
  private fail(err: NbdError): void {
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

  private complete(cookie: bigint, p: Pending): void {
    this.pending.delete(cookie);
    this.inFlightBytes -= p.cost;
    if (this.pending.size === 0) this.stopReplyTimer();
    for (const wake of this.waiting.splice(0)) wake();
    if (p.error) p.reject(p.error);
    else p.resolve(p.extents);
  }

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (this.info.extendedHeaders) {
          if (magic !== NBD_EXTENDED_REPLY_MAGIC) throw protocolError(`invalid reply magic 0x${magic.toString(16)}`);
          const h = await this.reader.read(28);
          const length = h.readBigUInt64BE(20);
          await this.chunk(h.readUInt16BE(0), h.readUInt16BE(2), h.readBigUInt64BE(4), length);
        } else if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          const h = await this.reader.read(12);
          await this.simpleReply(h.readUInt32BE(0), h.readBigUInt64BE(4));
        } else if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.info.structuredReplies) {
          const h = await this.reader.read(16);
          await this.chunk(h.readUInt16BE(0), h.readUInt16BE(2), h.readBigUInt64BE(4), BigInt(h.readUInt32BE(12)));
        } else {
          throw protocolError(`invalid reply magic 0x${magic.toString(16)}`);
        }
      }
    } catch (err) {
      this.fail(err instanceof NbdError ? err : new NbdError(`NBD connection failed: ${(err as Error).message}`));
    }
  }

  private lookup(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw protocolError(`reply for unknown cookie ${cookie}`);
    return p;
  }

  private async simpleReply(error: number, cookie: bigint): Promise<void> {
    const p = this.lookup(cookie);
    if (error !== 0) {
      p.error = commandError(error, '');
    } else if (p.command === NBD_CMD_READ) {
      // with structured replies a read must be answered by chunks
      if (this.info.structuredReplies) throw protocolError('simple reply to a read');
      await this.reader.readInto(p.buffer as Buffer);
    } else if (p.command === NBD_CMD_BLOCK_STATUS) {
      throw protocolError('simple reply to a block status request');
    }
    this.complete(cookie, p);
  }

  private async chunk(flags: number, type: number, cookie: bigint, length64: bigint): Promise<void> {
    const p = this.lookup(cookie);
    if (length64 > BigInt(this.maxChunkLength(p, type))) throw protocolError(`reply chunk of ${length64} bytes is too long`);
    const length = Number(length64);
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (length !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) throw protocolError('invalid NONE chunk');
        break;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        if (p.command !== NBD_CMD_READ || length < 9) throw protocolError('unexpected data chunk');
        const at = this.chunkOffset(await this.reader.read(8), 0);
        this.claim(p, at, length - 8);
        const pos = at - p.offset;
        await this.reader.readInto((p.buffer as Buffer).subarray(pos, pos + length - 8));
        break;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (p.command !== NBD_CMD_READ || length !== 12) throw protocolError('unexpected hole chunk');
        const b = await this.reader.read(12);
        const at = this.chunkOffset(b, 0);
        const size = b.readUInt32BE(8);
        if (size === 0) throw protocolError('empty hole chunk');
        this.claim(p, at, size);
        (p.buffer as Buffer).fill(0, at - p.offset, at - p.offset + size);
        break;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS:
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
        await this.statusChunk(p, type, length);
        break;
      default:
        if (!(type & NBD_REPLY_TYPE_ERROR_BIT)) throw protocolError(`unknown reply chunk type ${type}`);
        await this.errorChunk(p, type, length);
    }
    if (flags & NBD_REPLY_FLAG_DONE) {
      if (!p.error && p.command === NBD_CMD_READ && covered(p) !== p.length) throw protocolError('read reply is missing data');
      if (!p.error && p.command === NBD_CMD_BLOCK_STATUS && !p.extents) throw protocolError('block status reply without extents');
      this.complete(cookie, p);
    }
  }

  /** The longest payload a chunk of `type` may carry for request `p`. */
  private maxChunkLength(p: Pending, type: number): number {
    if (type === NBD_REPLY_TYPE_OFFSET_DATA) return 8 + p.length;
    if (type === NBD_REPLY_TYPE_BLOCK_STATUS) return 4 + 8 * MAX_STATUS_DESCRIPTORS;
    if (type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT) return 8 + 16 * MAX_STATUS_DESCRIPTORS;
    if (type & NBD_REPLY_TYPE_ERROR_BIT) return MAX_ERROR_CHUNK;
    return 12;
  }

  private chunkOffset(b: Buffer, at: number): number {
    const v = b.readBigUInt64BE(at);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError('reply chunk offset out of range');
    return Number(v);
  }

  /** Records that [at, at + n) of a read is answered: inside the request, no overlap. */
  private claim(p: Pending, at: number, n: number): void {
    if (at < p.offset || at + n > p.offset + p.length) throw protocolError('reply chunk outside the requested range');
    const ranges = p.filled as Array<[number, number]>;
    let lo = 0;
    let hi = ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ranges[mid][0] < at) lo = mid + 1;
      else hi = mid;
    }
    if ((lo > 0 && ranges[lo - 1][1] > at) || (lo < ranges.length && ranges[lo][0] < at + n)) throw protocolError('overlapping reply chunks');
    ranges.splice(lo, 0, [at, at + n]);
  }

  private async statusChunk(p: Pending, type: number, length: number): Promise<void> {
    const ext = type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT;
    if (p.command !== NBD_CMD_BLOCK_STATUS || ext !== this.info.extendedHeaders) throw protocolError('unexpected block status chunk');
    if (p.extents) throw protocolError('more than one block status chunk');
    const headLen = ext ? 8 : 4;
    const descLen = ext ? 16 : 8;
    if (length < headLen + descLen || (length - headLen) % descLen !== 0) throw protocolError('invalid block status chunk length');
    const head = await this.reader.read(headLen);
    if (head.readUInt32BE(0) !== this.info.allocationContext) throw protocolError('block status for an unknown metadata context');
    const count = (length - headLen) / descLen;
    if (ext && head.readUInt32BE(4) !== count) throw protocolError('block status descriptor count does not match its length');
    const extents: NbdExtent[] = [];
    let total = 0;
    // descriptors are read in bounded batches
    for (let left = count; left > 0; ) {
      const batch = Math.min(left, 8192);
      const b = await this.reader.read(batch * descLen);
      for (let i = 0; i < batch; i++) {
        const o = i * descLen;
        const len = ext ? b.readBigUInt64BE(o) : BigInt(b.readUInt32BE(o));
        const flags = ext ? Number(b.readBigUInt64BE(o + 8) & 0xffffffffn) : b.readUInt32BE(o + 4);
        if (len === 0n) throw protocolError('empty block status descriptor');
        // only the last descriptor may reach past the request
        if (total >= p.length) throw protocolError('block status descriptors beyond the requested range');
        const n = Number(len > BigInt(p.length - total) ? BigInt(p.length - total) : len);
        extents.push({ length: n, flags });
        total += n;
      }
      left -= batch;
    }
    p.extents = extents;
  }

  private async errorChunk(p: Pending, type: number, length: number): Promise<void> {
    if (length < 6) throw protocolError('invalid error chunk');
    const b = await this.reader.read(length);
    const code = b.readUInt32BE(0);
    const msgLen = b.readUInt16BE(4);
    const fits = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 6 + msgLen + 8 === length : 6 + msgLen <= length;
    if (code === 0 || msgLen > NBD_MAX_STRING || !fits) throw protocolError('invalid error chunk');
    if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
      const at = this.chunkOffset(b, 6 + msgLen);
      if (at < p.offset || at >= p.offset + Math.max(1, p.length)) throw protocolError('error offset outside the requested range');
    }
    p.error ??= commandError(code, b.subarray(6, 6 + msgLen).toString('utf8'));
  }
}

function covered(p: Pending): number {
  let n = 0;
  for (const [a, b] of p.filled ?? []) n += b - a;
  return n;
}

function protocolError(what: string): NbdError {
  return new NbdError(`NBD protocol error: ${what}`);
}

/** The server's error for one request (the connection goes on). */
function commandError(code: number, message: string): NbdError {
  return new NbdError(message ? `${nbdErrorText(code)} (server reported: ${message})` : nbdErrorText(code), false);
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
