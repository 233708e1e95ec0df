/**
 * The NBD client's reply side, parsed synchronously as bytes arrive: simple, structured
 * and extended replies, each chunk checked against the request it answers. Between
 * headers the socket reads into a small scratch buffer; while a read's payload is
 * expected it reads straight into the request's buffer (see socket-input.ts), so large
 * reads cost no copy and no allocation. Nothing queues: memory stays at the scratch
 * buffer and one bounded batch of block-status descriptors whatever the server sends.
 */
import { NbdError } from './errors.js';
import type { NegotiatedExport } from './handshake.js';
import type { InputConsumer } from './socket-input.js';
import {
  EXTENDED_REPLY_HEADER_SIZE,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_READ,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_MAX_STRING,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  SIMPLE_REPLY_HEADER_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  nbdErrorText,
} from './protocol.js';

/** One block-status descriptor: `length` bytes with NBD_STATE_* `flags`. */
export interface NbdExtent {
  length: number;
  flags: number;
}

/** A request waiting for its reply. */
export interface Pending {
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

/** What the parser needs of the connection. */
export interface ReplyRequests {
  /** The request with this cookie (a protocol error when there is none). */
  lookup(cookie: bigint): Pending;
  /** The whole reply to `p` has arrived. */
  complete(cookie: bigint, p: Pending): void;
  /** The server broke the protocol: the connection fails with `err`. */
  fail(err: NbdError): void;
}

/** The most block-status descriptors qimg accepts in one reply (qemu-nbd sends ≤ 128 Ki). */
const MAX_STATUS_DESCRIPTORS = 1 << 20;
/** Descriptors parsed per batch (the batch buffer is the only one that grows with them). */
const STATUS_BATCH = 8192;
/** The largest error chunk: error, message length, the message, an offset. */
const MAX_ERROR_CHUNK = 6 + NBD_MAX_STRING + 8;
/** Where reads go between payloads: headers, small chunks, the head of a payload. */
const SCRATCH_SIZE = 32 * 1024;

/** The bytes expected next: `buf` filled up to `have`, then `then(buf)`. */
interface Step {
  buf: Buffer;
  have: number;
  /** a payload: the socket reads into `buf` itself */
  direct: boolean;
  then: (b: Buffer) => void;
}

export class ReplyParser implements InputConsumer {
  private readonly scratch = Buffer.allocUnsafe(SCRATCH_SIZE);
  private readonly header = Buffer.allocUnsafe(EXTENDED_REPLY_HEADER_SIZE);
  private step!: Step;
  /** the buffer the socket reads into now, and whether it is the current step's own */
  private given: Buffer = this.scratch;
  private givenDirect = false;
  private failed = false;

  constructor(
    private readonly info: NegotiatedExport,
    private readonly requests: ReplyRequests,
  ) {
    this.expectReply();
  }

  nextBuffer(): Buffer {
    const s = this.step;
    this.givenDirect = s.direct && !this.failed;
    this.given = this.givenDirect ? s.buf.subarray(s.have) : this.scratch;
    return this.given;
  }

  received(data: Buffer): boolean {
    if (this.failed) return false;
    try {
      if (this.givenDirect && data.buffer === this.given.buffer && data.byteOffset === this.given.byteOffset) {
        // read in place: the bytes are where they belong (never past the step's end)
        const s = this.step;
        s.have += data.length;
        if (s.have === s.buf.length) s.then(s.buf);
      } else {
        this.feed(data);
      }
      return true;
    } catch (err) {
      this.failed = true;
      this.requests.fail(err instanceof NbdError ? err : new NbdError(`NBD connection failed: ${(err as Error).message}`));
      return false;
    }
  }

  /** Copies `data` into the steps it completes, one after another. */
  private feed(data: Buffer): void {
    let at = 0;
    while (at < data.length && !this.failed) {
      const s = this.step;
      const n = Math.min(data.length - at, s.buf.length - s.have);
      data.copy(s.buf, s.have, at, at + n);
      s.have += n;
      at += n;
      if (s.have === s.buf.length) s.then(s.buf);
    }
  }

  /** Expects `buf.length` bytes (at once when there are none). */
  private expect(buf: Buffer, direct: boolean, then: (b: Buffer) => void): void {
    if (buf.length === 0) {
      then(buf);
      return;
    }
    this.step = { buf, have: 0, direct, then };
  }

  /** The next reply header: the 16 bytes every kind has at least, then the rest. */
  private expectReply(): void {
    if (this.info.extendedHeaders) {
      this.expect(this.header.subarray(0, EXTENDED_REPLY_HEADER_SIZE), false, (h) => {
        const magic = h.readUInt32BE(0);
        if (magic !== NBD_EXTENDED_REPLY_MAGIC) throw protocolError(`invalid reply magic 0x${magic.toString(16)}`);
        this.chunk(h.readUInt16BE(4), h.readUInt16BE(6), h.readBigUInt64BE(8), h.readBigUInt64BE(24));
      });
      return;
    }
    this.expect(this.header.subarray(0, SIMPLE_REPLY_HEADER_SIZE), false, (h) => {
      const magic = h.readUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        this.simpleReply(h.readUInt32BE(4), h.readBigUInt64BE(8));
      } else if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.info.structuredReplies) {
        const rest = this.header.subarray(SIMPLE_REPLY_HEADER_SIZE, STRUCTURED_REPLY_HEADER_SIZE);
        this.expect(rest, false, () => {
          const whole = this.header;
          this.chunk(whole.readUInt16BE(4), whole.readUInt16BE(6), whole.readBigUInt64BE(8), BigInt(whole.readUInt32BE(16)));
        });
      } else {
        throw protocolError(`invalid reply magic 0x${magic.toString(16)}`);
      }
    });
  }

  private simpleReply(error: number, cookie: bigint): void {
    const p = this.requests.lookup(cookie);
    if (error !== 0) {
      p.error = commandError(error, '');
    } else if (p.command === NBD_CMD_READ) {
      // with structured replies a read must be answered by chunks
      if (this.info.structuredReplies) throw protocolError('simple reply to a read');
      this.expect(p.buffer as Buffer, true, () => this.done(cookie, p));
      return;
    } else if (p.command === NBD_CMD_BLOCK_STATUS) {
      throw protocolError('simple reply to a block status request');
    }
    this.done(cookie, p);
  }

  /** A reply is whole: its request completes and the next reply is expected. */
  private done(cookie: bigint, p: Pending): void {
    this.expectReply();
    this.requests.complete(cookie, p);
  }

  private chunk(flags: number, type: number, cookie: bigint, length64: bigint): void {
    const p = this.requests.lookup(cookie);
    if (length64 > BigInt(maxChunkLength(p, type))) throw protocolError(`reply chunk of ${length64} bytes is too long`);
    const length = Number(length64);
    const after = () => this.afterChunk(flags, cookie, p);
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (length !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) throw protocolError('invalid NONE chunk');
        after();
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA:
        if (p.command !== NBD_CMD_READ || length < 9) throw protocolError('unexpected data chunk');
        this.expect(this.header.subarray(0, 8), false, (b) => {
          const at = chunkOffset(b, 0);
          claim(p, at, length - 8);
          const pos = at - p.offset;
          this.expect((p.buffer as Buffer).subarray(pos, pos + length - 8), true, after);
        });
        return;
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        if (p.command !== NBD_CMD_READ || length !== 12) throw protocolError('unexpected hole chunk');
        this.expect(this.header.subarray(0, 12), false, (b) => {
          const at = chunkOffset(b, 0);
          const size = b.readUInt32BE(8);
          if (size === 0) throw protocolError('empty hole chunk');
          claim(p, at, size);
          (p.buffer as Buffer).fill(0, at - p.offset, at - p.offset + size);
          after();
        });
        return;
      case NBD_REPLY_TYPE_BLOCK_STATUS:
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
        this.statusChunk(p, type, length, after);
        return;
      default:
        if (!(type & NBD_REPLY_TYPE_ERROR_BIT)) throw protocolError(`unknown reply chunk type ${type}`);
        if (length < 6) throw protocolError('invalid error chunk');
        this.expect(Buffer.allocUnsafe(length), false, (b) => {
          errorChunk(p, type, b);
          after();
        });
    }
  }

  private afterChunk(flags: number, cookie: bigint, p: Pending): void {
    if (!(flags & NBD_REPLY_FLAG_DONE)) {
      this.expectReply();
      return;
    }
    if (!p.error && p.command === NBD_CMD_READ && covered(p) !== p.length) throw protocolError('read reply is missing data');
    if (!p.error && p.command === NBD_CMD_BLOCK_STATUS && !p.extents) throw protocolError('block status reply without extents');
    this.done(cookie, p);
  }

  private statusChunk(p: Pending, type: number, length: number, after: () => void): void {
    const ext = type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT;
    if (p.command !== NBD_CMD_BLOCK_STATUS || ext !== this.info.extendedHeaders) throw protocolError('unexpected block status chunk');
    if (p.extents) throw protocolError('more than one block status chunk');
    const headLen = ext ? 8 : 4;
    const descLen = ext ? 16 : 8;
    if (length < headLen + descLen || (length - headLen) % descLen !== 0) throw protocolError('invalid block status chunk length');
    const count = (length - headLen) / descLen;
    const extents: NbdExtent[] = [];
    let total = 0;
    let left = count;
    // descriptors are parsed in bounded batches
    const nextBatch = (): void => {
      if (left === 0) {
        p.extents = extents;
        after();
        return;
      }
      const batch = Math.min(left, STATUS_BATCH);
      left -= batch;
      this.expect(Buffer.allocUnsafe(batch * descLen), false, (b) => {
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
        nextBatch();
      });
    };
    this.expect(this.header.subarray(0, headLen), false, (head) => {
      if (head.readUInt32BE(0) !== this.info.allocationContext) throw protocolError('block status for an unknown metadata context');
      if (ext && head.readUInt32BE(4) !== count) throw protocolError('block status descriptor count does not match its length');
      nextBatch();
    });
  }
}

/** The longest payload a chunk of `type` may carry for request `p`. */
function maxChunkLength(p: Pending, type: number): number {
  if (type === NBD_REPLY_TYPE_OFFSET_DATA) return 8 + p.length;
  if (type === NBD_REPLY_TYPE_BLOCK_STATUS) return 4 + 8 * MAX_STATUS_DESCRIPTORS;
  if (type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT) return 8 + 16 * MAX_STATUS_DESCRIPTORS;
  if (type & NBD_REPLY_TYPE_ERROR_BIT) return MAX_ERROR_CHUNK;
  return 12;
}

function chunkOffset(b: Buffer, at: number): number {
  const v = b.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError('reply chunk offset out of range');
  return Number(v);
}

/** Records that [at, at + n) of a read is answered: inside the request, no overlap. */
function claim(p: Pending, at: number, n: number): void {
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

function errorChunk(p: Pending, type: number, b: Buffer): void {
  const length = b.length;
  const code = b.readUInt32BE(0);
  const msgLen = b.readUInt16BE(4);
  const fits = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 6 + msgLen + 8 === length : 6 + msgLen <= length;
  if (code === 0 || msgLen > NBD_MAX_STRING || !fits) throw protocolError('invalid error chunk');
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
    const at = chunkOffset(b, 6 + msgLen);
    if (at < p.offset || at >= p.offset + Math.max(1, p.length)) throw protocolError('error offset outside the requested range');
  }
  p.error ??= commandError(code, b.subarray(6, 6 + msgLen).toString('utf8'));
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
