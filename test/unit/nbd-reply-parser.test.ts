/**
 * The client's reply parser on its own: replies arriving in reads of every size (one
 * byte at a time, odd sizes, all at once) land whole in the requests' buffers, payloads
 * read straight into them; protocol violations fail the connection once.
 */
import { describe, expect, it } from 'vitest';
import { NbdError } from '../../src/io/nbd/errors.js';
import type { NegotiatedExport } from '../../src/io/nbd/handshake.js';
import * as P from '../../src/io/nbd/protocol.js';
import { ReplyParser, type NbdExtent, type Pending, type ReplyRequests } from '../../src/io/nbd/reply-parser.js';

const INFO = { size: 1 << 20, flags: 0, minBlock: 1, preferredBlock: 4096, maxBlock: 1 << 25, structuredReplies: true, extendedHeaders: false, allocationContext: 7 } as NegotiatedExport;

/** Requests by cookie, their results, and the failure the parser reported. */
class Requests implements ReplyRequests {
  readonly pending = new Map<bigint, Pending>();
  readonly results = new Map<bigint, { extents?: NbdExtent[]; error?: string }>();
  failure: NbdError | undefined;
  failures = 0;

  add(cookie: bigint, command: number, offset: number, length: number): Pending {
    const p: Pending = {
      command,
      offset,
      length,
      cost: 0,
      buffer: command === P.NBD_CMD_READ ? Buffer.alloc(length, 0xee) : undefined,
      filled: command === P.NBD_CMD_READ ? [] : undefined,
      resolve: (extents) => this.results.set(cookie, { extents }),
      reject: (err) => this.results.set(cookie, { error: err.message }),
    };
    this.pending.set(cookie, p);
    return p;
  }
  lookup(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new NbdError(`NBD protocol error: reply for unknown cookie ${cookie}`);
    return p;
  }
  complete(cookie: bigint, p: Pending): void {
    this.pending.delete(cookie);
    if (p.error) p.reject(p.error);
    else p.resolve(p.extents);
  }
  fail(err: NbdError): void {
    this.failures++;
    this.failure ??= err;
  }
}

function structured(flags: number, type: number, cookie: bigint, payload: Buffer): Buffer {
  const h = Buffer.alloc(P.STRUCTURED_REPLY_HEADER_SIZE);
  h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

function simple(error: number, cookie: bigint, payload: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(P.SIMPLE_REPLY_HEADER_SIZE);
  h.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(cookie, 8);
  return Buffer.concat([h, payload]);
}

function dataChunk(cookie: bigint, offset: number, data: Buffer, done: boolean): Buffer {
  const off = Buffer.alloc(8);
  off.writeBigUInt64BE(BigInt(offset));
  return structured(done ? P.NBD_REPLY_FLAG_DONE : 0, P.NBD_REPLY_TYPE_OFFSET_DATA, cookie, Buffer.concat([off, data]));
}

function holeChunk(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset));
  b.writeUInt32BE(length, 8);
  return structured(done ? P.NBD_REPLY_FLAG_DONE : 0, P.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, b);
}

function statusChunk(cookie: bigint, context: number, descs: Array<[number, number]>): Buffer {
  const b = Buffer.alloc(4 + 8 * descs.length);
  b.writeUInt32BE(context);
  descs.forEach(([len, flags], i) => {
    b.writeUInt32BE(len, 4 + 8 * i);
    b.writeUInt32BE(flags, 8 + 8 * i);
  });
  return structured(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, b);
}

/**
 * Delivers `stream` as a socket would, in reads of at most `step` bytes into the buffer
 * the parser names; with `foreign`, every other read lands in a buffer of the test's.
 */
function deliver(parser: ReplyParser, stream: Buffer, step: number, foreign = false): void {
  let pos = 0;
  let turn = 0;
  while (pos < stream.length) {
    const own = parser.nextBuffer();
    const target = foreign && turn++ % 2 === 1 ? Buffer.alloc(step) : own;
    const n = Math.min(target.length, step, stream.length - pos);
    stream.copy(target, 0, pos, pos + n);
    pos += n;
    if (!parser.received(target.subarray(0, n))) return;
  }
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe('ReplyParser', () => {
  for (const [step, foreign] of [
    [1, false],
    [7, false],
    [4096, false],
    [1 << 20, false],
    [13, true],
    [65536, true],
  ] as Array<[number, boolean]>) {
    it(`assembles interleaved replies read ${step} bytes at a time${foreign ? ' (some into other buffers)' : ''}`, () => {
      const reqs = new Requests();
      const parser = new ReplyParser(INFO, reqs);
      const a = reqs.add(1n, P.NBD_CMD_READ, 1000, 300_000);
      const b = reqs.add(2n, P.NBD_CMD_READ, 0, 5000);
      reqs.add(3n, P.NBD_CMD_BLOCK_STATUS, 0, 1 << 20);
      reqs.add(4n, P.NBD_CMD_WRITE, 0, 512);
      reqs.add(5n, P.NBD_CMD_FLUSH, 0, 0);
      const msg = Buffer.from('no space');
      const err = Buffer.alloc(6 + msg.length);
      err.writeUInt32BE(P.NBD_ENOSPC, 0);
      err.writeUInt16BE(msg.length, 4);
      msg.copy(err, 6);
      const first = pattern(100_000, 1);
      const last = pattern(150_000, 2);
      const stream = Buffer.concat([
        dataChunk(1n, 1000, first, false),
        dataChunk(2n, 0, pattern(5000, 3), true),
        holeChunk(1n, 101_000, 50_000, false),
        statusChunk(3n, 7, [
          [4096, 0],
          [1 << 20, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO],
        ]),
        simple(0, 5n),
        structured(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 4n, err),
        dataChunk(1n, 151_000, last, true),
      ]);
      deliver(parser, stream, step, foreign);
      expect(reqs.failure).toBeUndefined();
      expect(reqs.pending.size).toBe(0);
      expect(Buffer.compare(a.buffer!, Buffer.concat([first, Buffer.alloc(50_000), last]))).toBe(0);
      expect(Buffer.compare(b.buffer!, pattern(5000, 3))).toBe(0);
      // the last descriptor is cut at the end of the request
      expect(reqs.results.get(3n)?.extents).toEqual([
        { length: 4096, flags: 0 },
        { length: (1 << 20) - 4096, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO },
      ]);
      expect(reqs.results.get(4n)?.error).toMatch(/No space left on device.*no space/);
      expect(reqs.results.get(5n)).toEqual({ extents: undefined });
    });
  }

  it('reads a simple reply payload (no structured replies) straight into the request buffer', () => {
    const reqs = new Requests();
    const parser = new ReplyParser({ ...INFO, structuredReplies: false, allocationContext: undefined }, reqs);
    const p = reqs.add(9n, P.NBD_CMD_READ, 0, 200_000);
    const data = pattern(200_000, 5);
    const stream = simple(0, 9n, data);
    // the header goes to scratch; after it, the parser names the request's own buffer
    const head = parser.nextBuffer();
    stream.copy(head, 0, 0, P.SIMPLE_REPLY_HEADER_SIZE);
    parser.received(head.subarray(0, P.SIMPLE_REPLY_HEADER_SIZE));
    const direct = parser.nextBuffer();
    expect(direct.buffer).toBe(p.buffer!.buffer);
    expect(direct.length).toBe(200_000);
    deliver(parser, stream.subarray(P.SIMPLE_REPLY_HEADER_SIZE), 65536);
    expect(reqs.failure).toBeUndefined();
    expect(Buffer.compare(p.buffer!, data)).toBe(0);
  });

  const violations: Array<[string, (r: Requests) => Buffer, RegExp]> = [
    ['a bad magic', () => Buffer.alloc(32, 0x41), /invalid reply magic/],
    ['an unknown cookie', () => simple(0, 77n), /unknown cookie 77/],
    ['data outside the request', (r) => (r.add(1n, P.NBD_CMD_READ, 0, 100), dataChunk(1n, 50, Buffer.alloc(100), true)), /outside the requested range/],
    ['overlapping chunks', (r) => (r.add(1n, P.NBD_CMD_READ, 0, 100), Buffer.concat([dataChunk(1n, 0, Buffer.alloc(60), false), holeChunk(1n, 50, 50, true)])), /overlapping/],
    ['a read left short', (r) => (r.add(1n, P.NBD_CMD_READ, 0, 100), dataChunk(1n, 0, Buffer.alloc(60), true)), /missing data/],
    ['a simple reply to a read', (r) => (r.add(1n, P.NBD_CMD_READ, 0, 100), simple(0, 1n, Buffer.alloc(100))), /simple reply to a read/],
    ['status for another context', (r) => (r.add(1n, P.NBD_CMD_BLOCK_STATUS, 0, 100), statusChunk(1n, 8, [[100, 0]])), /unknown metadata context/],
    ['descriptors past the request', (r) => (r.add(1n, P.NBD_CMD_BLOCK_STATUS, 0, 100), statusChunk(1n, 7, [[100, 0], [100, 0]])), /beyond the requested range/],
    ['an oversized chunk', (r) => (r.add(1n, P.NBD_CMD_READ, 0, 100), structured(0, P.NBD_REPLY_TYPE_OFFSET_DATA, 1n, Buffer.alloc(200))), /too long/],
  ];
  for (const [what, build, message] of violations) {
    it(`fails the connection once on ${what}, whatever follows`, () => {
      const reqs = new Requests();
      const parser = new ReplyParser(INFO, reqs);
      const stream = Buffer.concat([build(reqs), Buffer.alloc(1000, 0x55)]);
      deliver(parser, stream, 3);
      expect(reqs.failure?.message).toMatch(message);
      expect(reqs.failures).toBe(1);
      // a failed parser reads no more into request buffers
      expect(parser.received(Buffer.alloc(10))).toBe(false);
    });
  }
});
