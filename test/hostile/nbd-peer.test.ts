/**
 * qimg against an NBD server that lies: a fake server written here (a unix socket in a
 * temp dir) that speaks the handshake and transmission phases correctly except for
 * one deliberate violation per case. Each case: qimg exits non-zero within seconds
 * with one `qimg: ...` line and no stack trace. The same fake server, honest and with
 * extended headers, checks the extended-header paths no installed server has.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG, plainEnv, tempDir } from '../helpers/qemu.js';

const NBDMAGIC = Buffer.from('NBDMAGIC');
const IHAVEOPT = Buffer.from('IHAVEOPT');
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 0x80000001;
const OPT_GO = 7;
const OPT_LIST = 3;
const REP_SERVER = 2;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;
const OPT_EXTENDED_HEADERS = 11;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_BLOCK_STATUS = 7;
const FLAG_HAS_FLAGS = 1;
const FLAG_SEND_FLUSH = 4;
const REPLY_FLAG_DONE = 1;
const TYPE_NONE = 0;
const TYPE_OFFSET_DATA = 1;
const TYPE_BLOCK_STATUS = 5;
const TYPE_BLOCK_STATUS_EXT = 6;
const TYPE_ERROR = 32769;
const STRUCTURED_MAGIC = 0x668e33ef;
const EXTENDED_REPLY_MAGIC = 0x6e8a278c;
const SIMPLE_MAGIC = 0x67446698;
const EXPORT_SIZE = 1024 * 1024;

interface Request {
  type: number;
  flags: number;
  cookie: bigint;
  offset: number;
  length: number;
}

interface Behaviour {
  /** bytes sent instead of the greeting */
  greeting?: Buffer;
  /** say nothing at all */
  silent?: boolean;
  extended?: boolean;
  exportSize?: bigint;
  /** raw reply to an option instead of the honest one */
  onOption?: (option: number, sock: Socket) => Buffer | undefined;
  /** answer a request (the honest answer when it returns false) */
  onRequest?: (req: Request, sock: Socket, reply: Replies) => boolean;
}

/** Encoders of honest replies for the negotiated header style. */
class Replies {
  constructor(
    private readonly sock: Socket,
    private readonly extended: boolean,
  ) {}

  chunk(req: Request, flags: number, type: number, payload: Buffer, lengthField = payload.length): void {
    let head: Buffer;
    if (this.extended) {
      head = Buffer.alloc(32);
      head.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
      head.writeUInt16BE(flags, 4);
      head.writeUInt16BE(type, 6);
      head.writeBigUInt64BE(req.cookie, 8);
      head.writeBigUInt64BE(BigInt(req.offset), 16);
      head.writeBigUInt64BE(BigInt(lengthField), 24);
    } else {
      head = Buffer.alloc(20);
      head.writeUInt32BE(STRUCTURED_MAGIC, 0);
      head.writeUInt16BE(flags, 4);
      head.writeUInt16BE(type, 6);
      head.writeBigUInt64BE(req.cookie, 8);
      head.writeUInt32BE(lengthField, 16);
    }
    this.sock.write(Buffer.concat([head, payload]));
  }

  data(req: Request, at: number, bytes: Buffer, flags = REPLY_FLAG_DONE): void {
    const p = Buffer.alloc(8 + bytes.length);
    p.writeBigUInt64BE(BigInt(at), 0);
    bytes.copy(p, 8);
    this.chunk(req, flags, TYPE_OFFSET_DATA, p);
  }

  status(req: Request, extents: Array<[number, number]>): void {
    if (this.extended) {
      const p = Buffer.alloc(8 + 16 * extents.length);
      p.writeUInt32BE(1, 0);
      p.writeUInt32BE(extents.length, 4);
      extents.forEach(([len, fl], i) => {
        p.writeBigUInt64BE(BigInt(len), 8 + 16 * i);
        p.writeBigUInt64BE(BigInt(fl), 16 + 16 * i);
      });
      this.chunk(req, REPLY_FLAG_DONE, TYPE_BLOCK_STATUS_EXT, p);
    } else {
      const p = Buffer.alloc(4 + 8 * extents.length);
      p.writeUInt32BE(1, 0);
      extents.forEach(([len, fl], i) => {
        p.writeUInt32BE(len, 4 + 8 * i);
        p.writeUInt32BE(fl, 8 + 8 * i);
      });
      this.chunk(req, REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, p);
    }
  }

  done(req: Request): void {
    if (this.extended) this.chunk(req, REPLY_FLAG_DONE, TYPE_NONE, Buffer.alloc(0));
    else {
      const r = Buffer.alloc(16);
      r.writeUInt32BE(SIMPLE_MAGIC, 0);
      r.writeBigUInt64BE(req.cookie, 8);
      this.sock.write(r);
    }
  }
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0), lengthField = data.length): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(lengthField >>> 0, 16);
  return Buffer.concat([h, data]);
}

/** The export's bytes: a pattern, so a wrong offset shows. */
function exportBytes(at: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (at + i) % 251;
  return b;
}

/** Serves one behaviour on every connection. */
function serve(sock: Socket, how: Behaviour): void {
  if (how.silent) return;
  let pending = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  let extended = false;
  const replies = () => new Replies(sock, extended);
  sock.on('error', () => undefined);
  if (how.greeting) {
    sock.write(how.greeting);
    return;
  }
  sock.write(Buffer.concat([NBDMAGIC, IHAVEOPT, Buffer.from([0, 3])]));
  sock.on('data', (d: Buffer) => {
    pending = Buffer.concat([pending, d]);
    for (;;) {
      if (phase === 'flags') {
        if (pending.length < 4) return;
        pending = pending.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (pending.length < 16) return;
        const option = pending.readUInt32BE(8);
        const len = pending.readUInt32BE(12);
        if (pending.length < 16 + len) return;
        pending = pending.subarray(16 + len);
        const custom = how.onOption?.(option, sock);
        if (custom) {
          if (!sock.writableEnded) sock.write(custom);
          continue;
        }
        if (option === OPT_EXTENDED_HEADERS) {
          extended = !!how.extended;
          sock.write(optionReply(option, extended ? REP_ACK : REP_ERR_UNSUP));
        } else if (option === OPT_STRUCTURED_REPLY) {
          sock.write(optionReply(option, REP_ACK));
        } else if (option === OPT_SET_META_CONTEXT) {
          const ctx = Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('base:allocation')]);
          sock.write(Buffer.concat([optionReply(option, REP_META_CONTEXT, ctx), optionReply(option, REP_ACK)]));
        } else if (option === OPT_GO) {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(0, 0);
          info.writeBigUInt64BE(how.exportSize ?? BigInt(EXPORT_SIZE), 2);
          info.writeUInt16BE(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, 10);
          sock.write(Buffer.concat([optionReply(option, REP_INFO, info), optionReply(option, REP_ACK)]));
          phase = 'transmission';
        } else {
          sock.write(optionReply(option, REP_ERR_UNSUP));
        }
      } else {
        const headLen = extended ? 32 : 28;
        if (pending.length < headLen) return;
        const req: Request = {
          flags: pending.readUInt16BE(4),
          type: pending.readUInt16BE(6),
          cookie: pending.readBigUInt64BE(8),
          offset: Number(pending.readBigUInt64BE(16)),
          length: extended ? Number(pending.readBigUInt64BE(24)) : pending.readUInt32BE(24),
        };
        const payload = req.type === CMD_WRITE ? req.length : 0;
        if (pending.length < headLen + payload) return;
        pending = pending.subarray(headLen + payload);
        if (req.type === CMD_DISC) {
          sock.end();
          return;
        }
        const r = replies();
        if (how.onRequest?.(req, sock, r)) continue;
        if (req.type === CMD_READ) r.data(req, req.offset, exportBytes(req.offset, req.length));
        else if (req.type === CMD_BLOCK_STATUS) r.status(req, [[Math.min(req.length, 65536), 0], [Math.max(1, req.length - 65536), 3]]);
        else r.done(req);
      }
    }
  });
}

interface Outcome {
  status: number;
  stdout: string;
  stderr: string;
  ms: number;
}

describe('qimg against a lying NBD server', () => {
  const tmp = tempDir('qimg-nbd-peer-');
  const servers: Server[] = [];
  let count = 0;

  afterAll(async () => {
    for (const s of servers) await new Promise((r) => s.close(r));
    tmp.cleanup();
  });

  async function withServer(how: Behaviour, args: (uri: string, dir: string) => string[], env: NodeJS.ProcessEnv = {}): Promise<Outcome> {
    const sockPath = join(tmp.path, `s${count++}.sock`);
    const sockets = new Set<Socket>();
    const server = createServer((sock) => {
      sockets.add(sock);
      serve(sock, how);
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(sockPath, r));
    const started = Date.now();
    const child = spawn(process.execPath, [QIMG, ...args(`nbd+unix:///?socket=${sockPath}`, tmp.path)], { env: { ...plainEnv(), ...env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const killer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    const status = await new Promise<number>((resolve) => child.on('close', (code) => resolve(code ?? 128)));
    clearTimeout(killer);
    for (const s of sockets) s.destroy();
    return { status, stdout, stderr, ms: Date.now() - started };
  }

  function expectRefused(o: Outcome, pattern: RegExp): void {
    expect(o.status, o.stderr).not.toBe(0);
    expect(o.status).not.toBe(128);
    const lines = o.stderr.trim().split('\n');
    expect(lines, o.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^qimg: /);
    expect(lines[0]).toMatch(pattern);
    expect(o.ms).toBeLessThan(10_000);
  }

  const info = (uri: string) => ['info', '-f', 'raw', uri];
  const map = (uri: string) => ['map', '-f', 'raw', '--output=json', uri];
  const convert = (uri: string, dir: string) => ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, `out${count}.raw`)];

  it('refuses a bad handshake: wrong magic, an impossible size, a 4 GiB option reply', async () => {
    expectRefused(await withServer({ greeting: Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n') }, info), /invalid magic/);
    expectRefused(await withServer({ exportSize: 1n << 63n }, info), /export size 9223372036854775808 is too large/);
    expectRefused(await withServer({ onOption: (o) => (o === OPT_EXTENDED_HEADERS ? optionReply(o, REP_ACK, Buffer.alloc(0), 0xffffffff) : undefined) }, info), /option reply of 4294967295 bytes/);
    // a server that closes in the middle of the handshake
    expectRefused(
      await withServer({ onOption: (o, sock) => (o === OPT_GO ? (sock.end(Buffer.from([0x00, 0x03])), Buffer.alloc(0)) : undefined) }, info),
      /closed the connection during the handshake/,
    );
  });

  it('serve -L: a lying export list (a name past its reply, thousands of exports) is one error', async () => {
    const list = (uri: string) => ['serve', '-L', '-k', uri.slice(uri.indexOf('socket=') + 'socket='.length)];
    const server = (name: Buffer, count: number) => {
      const entry = Buffer.concat([Buffer.alloc(4), name]);
      entry.writeUInt32BE(name.length, 0);
      return Array.from({ length: count }, () => optionReply(OPT_LIST, REP_SERVER, entry));
    };
    const badLength = Buffer.alloc(8);
    badLength.writeUInt32BE(1000, 0);
    expectRefused(await withServer({ onOption: (o) => (o === OPT_LIST ? optionReply(o, REP_SERVER, badLength) : undefined) }, list), /invalid export list reply/);
    expectRefused(await withServer({ onOption: (o) => (o === OPT_LIST ? Buffer.concat(server(Buffer.from('x'), 5000)) : undefined) }, list), /too many exports listed/);
    // a well-formed list of two exports the server then knows nothing about: names only
    const two = await withServer({ onOption: (o) => (o === OPT_LIST ? Buffer.concat([...server(Buffer.from('a'), 1), ...server(Buffer.from('b'), 1), optionReply(o, REP_ACK)]) : undefined) }, list);
    expect(two.status, two.stderr).toBe(0);
    expect(two.stdout).toBe("exports available: 2\n export: 'a'\n export: 'b'\n");
  });

  it('gives up on a server that never completes the handshake (QIMG_NBD_TIMEOUT)', async () => {
    const o = await withServer({ silent: true }, info, { QIMG_NBD_TIMEOUT: '1' });
    expectRefused(o, /did not complete the handshake within 1 s/);
    expect(o.ms).toBeLessThan(6_000);
  });

  it('refuses lying replies: unknown cookie, data outside the request, too many descriptors, descriptors past the request', async () => {
    expectRefused(
      await withServer({ onRequest: (req, _s, r) => (req.type === CMD_READ ? (r.data({ ...req, cookie: req.cookie + 1000n }, req.offset, Buffer.alloc(req.length)), true) : false) }, convert),
      /reply for unknown cookie/,
    );
    expectRefused(
      await withServer({ onRequest: (req, _s, r) => (req.type === CMD_READ ? (r.data(req, req.offset + 512, Buffer.alloc(req.length)), true) : false) }, convert),
      /outside the requested range/,
    );
    // a block-status chunk announcing five million descriptors (40 MB) is refused unread
    expectRefused(
      await withServer({ onRequest: (req, _s, r) => (req.type === CMD_BLOCK_STATUS ? (r.chunk(req, REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, Buffer.alloc(64), 4 + 8 * 5_000_000), true) : false) }, map),
      /reply chunk of 40000004 bytes is too long/,
    );
    expectRefused(
      await withServer({ onRequest: (req, _s, r) => (req.type === CMD_BLOCK_STATUS ? (r.status(req, [[req.length, 0], [4096, 0]]), true) : false) }, map),
      /descriptors beyond the requested range/,
    );
  });

  it('fails once when the server truncates a reply or closes mid-transfer', async () => {
    expectRefused(
      await withServer({ onRequest: (req, sock) => (req.type === CMD_READ ? (sock.end(Buffer.from([0x66, 0x8e])), true) : false) }, convert),
      /NBD server closed the connection/,
    );
    expectRefused(
      await withServer(
        {
          onRequest: (req, sock, r) => {
            if (req.type !== CMD_READ) return false;
            // a data chunk announcing the whole request, then only part of it
            r.chunk(req, REPLY_FLAG_DONE, TYPE_OFFSET_DATA, Buffer.alloc(1000), 8 + req.length);
            sock.end();
            return true;
          },
        },
        convert,
      ),
      /NBD server closed the connection/,
    );
  });

  it('waits a bounded time for a reply, and reports a server error for one request as the server words it', async () => {
    const silent = await withServer({ onRequest: (req) => req.type === CMD_READ }, convert, { QIMG_NBD_TIMEOUT: '1' });
    expectRefused(silent, /NBD server did not reply within 1 s/);
    const message = Buffer.from('disk on fire');
    const payload = Buffer.alloc(6 + message.length);
    payload.writeUInt32BE(5, 0);
    payload.writeUInt16BE(message.length, 4);
    message.copy(payload, 6);
    expectRefused(
      await withServer({ onRequest: (req, _s, r) => (req.type === CMD_READ ? (r.chunk(req, REPLY_FLAG_DONE, TYPE_ERROR, payload), true) : false) }, convert),
      /Could not read image: Input\/output error \(server reported: disk on fire\)/,
    );
  });

  it('speaks extended headers with a server that offers them', async () => {
    const m = await withServer({ extended: true }, map);
    expect(m.status, m.stderr).toBe(0);
    expect(JSON.parse(m.stdout)).toEqual([
      { start: 0, length: 65536, depth: 0, present: true, zero: false, data: true, compressed: false, offset: 0 },
      { start: 65536, length: EXPORT_SIZE - 65536, depth: 0, present: true, zero: true, data: false, compressed: false, offset: 65536 },
    ]);
    const c = await withServer({ extended: true }, (uri, dir) => ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'ext.raw')]);
    expect(c.status, c.stderr).toBe(0);
    // the data extent is read, the zero extent is not
    const expected = Buffer.alloc(EXPORT_SIZE);
    exportBytes(0, 65536).copy(expected);
    expect(readFileSync(join(tmp.path, 'ext.raw')).equals(expected)).toBe(true);
    expectRefused(
      await withServer({ extended: true, onRequest: (req, _s, r) => (req.type === CMD_BLOCK_STATUS ? (r.chunk(req, REPLY_FLAG_DONE, TYPE_BLOCK_STATUS_EXT, Buffer.from([0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])), true) : false) }, map),
      /descriptor count does not match/,
    );
  });
});
