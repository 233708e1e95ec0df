/**
 * The transmission phase of one connection: requests read in order, run concurrently
 * (mutations ordered by the export), replies sent as each finishes.
 * Memory is bounded: a request's payload is at most 32 MiB, and no further request is
 * read while too many are in flight or the client is not reading its replies.
 */
import { BufferPool, type Lease } from '../io/buffer-pool.js';
import * as P from '../io/nbd/protocol.js';
import { NbdRequestError, nbdErrorOf, type NbdExport, type ReadChunk } from './export.js';
import { ProtocolViolation, type Session } from './handshake.js';
import { closeGracefully } from './wire.js';

/** Requests of one connection being worked on at once. */
const MAX_IN_FLIGHT = 64;
/** Payload bytes (reads and writes) of one connection in flight at once. */
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Write payload buffers kept for reuse by one connection. */
const PAYLOAD_POOL_BYTES = 16 * 1024 * 1024;
/** Reply bytes queued for a client that is not reading before its requests are left unread. */
const MAX_QUEUED_REPLY_BYTES = 16 * 1024 * 1024;

interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: bigint;
  length: bigint;
}

/** Flags each command takes (FUA is accepted on all, as the spec asks). */
const ALLOWED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_PAYLOAD_LEN,
  [P.NBD_CMD_FLUSH]: 0,
  [P.NBD_CMD_TRIM]: 0,
  [P.NBD_CMD_CACHE]: 0,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO,
  [P.NBD_CMD_BLOCK_STATUS]: P.NBD_CMD_FLAG_REQ_ONE,
  [P.NBD_CMD_DISC]: 0,
};

export class Transmission {
  private inFlight = 0;
  private inFlightBytes = 0;
  private readonly running = new Set<Promise<void>>();
  private wake: (() => void) | null = null;
  private stopping = false;
  private readonly payloads = new BufferPool(PAYLOAD_POOL_BYTES);

  constructor(
    private readonly s: Session,
    private readonly exp: NbdExport,
  ) {}

  /** Stops reading requests, lets the ones in flight finish, then closes the connection. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wakeUp();
    await Promise.allSettled([...this.running]);
    closeGracefully(this.s.socket);
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Serves requests until DISC, end of stream, a violation or stop(). */
  async run(): Promise<void> {
    const socket = this.s.socket;
    const onDrain = () => this.wakeUp();
    socket.on('drain', onDrain);
    try {
      for (;;) {
        while (
          !this.stopping &&
          (this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES || socket.writableLength > MAX_QUEUED_REPLY_BYTES)
        ) {
          await new Promise<void>((resolve) => (this.wake = resolve));
        }
        if (this.stopping) break;
        const req = await this.readRequest();
        if (req === null) break;
        if (this.stopping) break;
        if (req.type === P.NBD_CMD_DISC) break;
        let payload: Lease | undefined;
        if (req.type === P.NBD_CMD_WRITE) payload = await this.readPayload(req);
        else if (this.s.extended && req.flags & P.NBD_CMD_FLAG_PAYLOAD_LEN) {
          // a payload this server never asked for: consumed (bounded), then refused
          if (req.length > BigInt(P.NBD_MAX_PAYLOAD)) throw new ProtocolViolation('payload too large');
          await this.s.reader.skip(Number(req.length));
          this.sendError(req, P.NBD_EINVAL, 'this command takes no payload');
          continue;
        }
        const bytes = req.type === P.NBD_CMD_READ || req.type === P.NBD_CMD_WRITE ? Number(req.length <= BigInt(P.NBD_MAX_PAYLOAD) ? req.length : 0n) : 0;
        this.inFlight++;
        this.inFlightBytes += bytes;
        const job: Promise<void> = this.handle(req, payload?.buf).finally(() => {
          payload?.release();
          this.inFlight--;
          this.inFlightBytes -= bytes;
          this.running.delete(job);
          this.wakeUp();
        });
        this.running.add(job);
      }
    } finally {
      // finish what was started (writes land; replies go out if the client still listens)
      await Promise.allSettled([...this.running]);
      socket.off('drain', onDrain);
    }
  }

  /** The next request header, or null when the client closed between requests. */
  private async readRequest(): Promise<Request | null> {
    const r = this.s.reader;
    let head: Buffer;
    try {
      head = await r.read(4);
    } catch {
      return null;
    }
    const magic = head.readUInt32BE(0);
    const expected = this.s.extended ? P.NBD_EXTENDED_REQUEST_MAGIC : P.NBD_REQUEST_MAGIC;
    if (magic !== expected) throw new ProtocolViolation('bad request magic');
    const rest = await r.read((this.s.extended ? P.EXTENDED_REQUEST_HEADER_SIZE : P.REQUEST_HEADER_SIZE) - 4);
    return {
      flags: rest.readUInt16BE(0),
      type: rest.readUInt16BE(2),
      cookie: Buffer.from(rest.subarray(4, 12)),
      offset: rest.readBigUInt64BE(12),
      length: this.s.extended ? rest.readBigUInt64BE(20) : BigInt(rest.readUInt32BE(20)),
    };
  }

  /**
   * A write's payload, in a pooled buffer released once the write is done (images do not
   * keep a write's buffer); one larger than the limit cannot be buffered: the client is dropped.
   */
  private async readPayload(req: Request): Promise<Lease> {
    if (req.length > BigInt(P.NBD_MAX_PAYLOAD)) throw new ProtocolViolation('write payload too large');
    const lease = this.payloads.lease(Number(req.length));
    try {
      await this.s.reader.readInto(lease.buf);
    } catch (err) {
      lease.release();
      throw err;
    }
    return lease;
  }

  private async handle(req: Request, payload: Buffer | undefined): Promise<void> {
    try {
      await this.execute(req, payload);
    } catch (err) {
      this.sendError(req, nbdErrorOf(err), err instanceof Error ? err.message : String(err));
    }
  }

  private async execute(req: Request, payload: Buffer | undefined): Promise<void> {
    const exp = this.exp;
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) throw new NbdRequestError(P.NBD_EINVAL, `unknown command ${req.type}`);
    if (req.flags & ~(allowed | P.NBD_CMD_FLAG_FUA)) throw new NbdRequestError(P.NBD_EINVAL, 'unexpected command flags');
    if (req.flags & P.NBD_CMD_FLAG_PAYLOAD_LEN && !this.s.extended) throw new NbdRequestError(P.NBD_EINVAL, 'unexpected command flags');
    const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case P.NBD_CMD_READ: {
        if (req.flags & P.NBD_CMD_FLAG_DF && !this.s.structured) throw new NbdRequestError(P.NBD_EINVAL, 'DF without structured replies');
        if (req.length > BigInt(P.NBD_MAX_PAYLOAD)) throw new NbdRequestError(P.NBD_EINVAL, 'read too large');
        exp.checkRange(req.offset, req.length, false);
        const df = (req.flags & P.NBD_CMD_FLAG_DF) !== 0;
        const chunks = await exp.read(Number(req.offset), Number(req.length), this.s.structured && !df);
        this.sendRead(req, chunks);
        return;
      }
      case P.NBD_CMD_WRITE:
        if (exp.opts.readOnly) throw new NbdRequestError(P.NBD_EPERM, 'the export is read-only');
        exp.checkRange(req.offset, req.length, true);
        if (req.length > 0n) await exp.write(Number(req.offset), payload!);
        break;
      case P.NBD_CMD_WRITE_ZEROES:
      case P.NBD_CMD_TRIM: {
        if (exp.opts.readOnly) throw new NbdRequestError(P.NBD_EPERM, 'the export is read-only');
        exp.checkRange(req.offset, req.length, true);
        const offset = Number(req.offset);
        const length = Number(req.length);
        if (length === 0) break;
        if (req.type === P.NBD_CMD_TRIM) await exp.trim(offset, length);
        else await exp.writeZeroes(offset, length, (req.flags & P.NBD_CMD_FLAG_NO_HOLE) !== 0, (req.flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0);
        break;
      }
      case P.NBD_CMD_FLUSH:
        await exp.flush();
        break;
      case P.NBD_CMD_CACHE:
        exp.checkRange(req.offset, req.length, false);
        break;
      case P.NBD_CMD_BLOCK_STATUS: {
        if (this.s.contexts.length === 0) throw new NbdRequestError(P.NBD_EINVAL, 'no metadata context selected');
        if (req.length === 0n) throw new NbdRequestError(P.NBD_EINVAL, 'empty block status request');
        exp.checkRange(req.offset, req.length, false);
        await this.sendBlockStatus(req);
        return;
      }
    }
    if (fua && req.type !== P.NBD_CMD_FLUSH) await exp.flush();
    this.sendDone(req);
  }

  // --- replies (each written in one synchronous burst, so replies never interleave) ---

  private write(parts: Buffer[]): void {
    const socket = this.s.socket;
    if (socket.destroyed || socket.writableEnded) return;
    socket.cork();
    for (const p of parts) socket.write(p);
    socket.uncork();
  }

  private simpleReply(req: Request, error: number): Buffer {
    const b = Buffer.alloc(P.SIMPLE_REPLY_HEADER_SIZE);
    b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
    b.writeUInt32BE(error, 4);
    req.cookie.copy(b, 8);
    return b;
  }

  private chunkHeader(req: Request, flags: number, type: number, length: number): Buffer {
    if (this.s.extended) {
      const b = Buffer.alloc(P.EXTENDED_REPLY_HEADER_SIZE);
      b.writeUInt32BE(P.NBD_EXTENDED_REPLY_MAGIC, 0);
      b.writeUInt16BE(flags, 4);
      b.writeUInt16BE(type, 6);
      req.cookie.copy(b, 8);
      b.writeBigUInt64BE(req.offset, 16);
      b.writeBigUInt64BE(BigInt(length), 24);
      return b;
    }
    const b = Buffer.alloc(P.STRUCTURED_REPLY_HEADER_SIZE);
    b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    req.cookie.copy(b, 8);
    b.writeUInt32BE(length, 16);
    return b;
  }

  private sendDone(req: Request): void {
    if (this.s.extended) this.write([this.chunkHeader(req, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0)]);
    else this.write([this.simpleReply(req, 0)]);
  }

  private sendError(req: Request, code: number, message: string): void {
    // a read without structured replies cannot carry an error after its header: the
    // header goes with the error and no data (the spec's way)
    if (!this.s.structured) {
      this.write([this.simpleReply(req, code)]);
      return;
    }
    const msg = Buffer.from(message.slice(0, 1024), 'utf8');
    const body = Buffer.alloc(6 + msg.length);
    body.writeUInt32BE(code, 0);
    body.writeUInt16BE(msg.length, 4);
    msg.copy(body, 6);
    this.write([this.chunkHeader(req, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, body.length), body]);
  }

  private sendRead(req: Request, chunks: ReadChunk[]): void {
    if (!this.s.structured) {
      const c = chunks[0] as { data: Buffer };
      this.write([this.simpleReply(req, 0), c.data]);
      return;
    }
    if (req.length === 0n) {
      this.write([this.chunkHeader(req, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0)]);
      return;
    }
    const parts: Buffer[] = [];
    chunks.forEach((c, i) => {
      const flags = i === chunks.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
      if ('data' in c) {
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(c.offset), 0);
        parts.push(this.chunkHeader(req, flags, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + c.data.length), off, c.data);
      } else {
        const body = Buffer.alloc(12);
        body.writeBigUInt64BE(BigInt(c.offset), 0);
        body.writeUInt32BE(c.hole, 8);
        parts.push(this.chunkHeader(req, flags, P.NBD_REPLY_TYPE_OFFSET_HOLE, 12), body);
      }
    });
    this.write(parts);
  }

  private async sendBlockStatus(req: Request): Promise<void> {
    const offset = Number(req.offset);
    const length = Number(req.length);
    const one = (req.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const parts: Buffer[] = [];
    for (let i = 0; i < this.s.contexts.length; i++) {
      const ctx = this.s.contexts[i];
      const descs = await this.exp.blockStatus(ctx, offset, length, one);
      const flags = i === this.s.contexts.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
      if (this.s.extended) {
        const body = Buffer.alloc(8 + 16 * descs.length);
        body.writeUInt32BE(ctx.id, 0);
        body.writeUInt32BE(descs.length, 4);
        descs.forEach((d, j) => {
          body.writeBigUInt64BE(BigInt(d.length), 8 + 16 * j);
          body.writeBigUInt64BE(BigInt(d.flags), 16 + 16 * j);
        });
        parts.push(this.chunkHeader(req, flags, P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, body.length), body);
      } else {
        // 32-bit descriptor lengths: a longer run is cut (the reply may cover less than asked)
        const body = Buffer.alloc(4 + 8 * descs.length);
        body.writeUInt32BE(ctx.id, 0);
        let n = 0;
        for (const d of descs) {
          const len = Math.min(d.length, 0xffffffff - 511);
          body.writeUInt32BE(len, 4 + 8 * n);
          body.writeUInt32BE(d.flags, 8 + 8 * n);
          n++;
          if (len !== d.length) break;
        }
        const used = body.subarray(0, 4 + 8 * n);
        parts.push(this.chunkHeader(req, flags, P.NBD_REPLY_TYPE_BLOCK_STATUS, used.length), used);
      }
    }
    this.write(parts);
  }
}

