/**
 * A hostile NBD client against `qimg serve`: out-of-range and overflowing requests,
 * 4 GiB lengths, bad magics, huge option lengths, truncated packets and a flood of
 * requests whose replies are never read. After each the server still serves a
 * well-behaved client, its memory stays bounded, and images nobody was allowed to
 * write are unchanged.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as net from 'node:net';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, sha256File, tempDir } from '../helpers/qemu.js';
import { serveForeground, stopAll, stopPid, type Served } from '../helpers/nbd-serve.js';
import * as P from '../../src/io/nbd/protocol.js';

const enabled = qemuAvailable();
const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

/** A byte-level NBD client that does whatever it is told. */
class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  closed = false;
  private constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    sock.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  async read(n: number, ms = 5000): Promise<Buffer> {
    const end = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.closed) throw new Error('closed by the server');
      if (Date.now() > end) throw new Error('timed out');
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 50);
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true once the server closed the connection (false after `ms`). */
  async closedWithin(ms: number): Promise<boolean> {
    const end = Date.now() + ms;
    while (!this.closed && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  destroy(): void {
    this.sock.destroy();
  }

  /** The greeting and client flags. */
  async greet(): Promise<void> {
    const g = await this.read(18);
    expect(g.readBigUInt64BE(0)).toBe(P.NBDMAGIC);
    expect(g.readBigUInt64BE(8)).toBe(P.IHAVEOPT);
    this.write(u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    expect(h.readBigUInt64BE(0)).toBe(P.OPTION_REPLY_MAGIC);
    const data = await this.read(h.readUInt32BE(16));
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Option replies up to the final one (ACK or an error). */
  async optionReplies(): Promise<Array<{ type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === P.NBD_REP_ACK || r.type & P.NBD_REP_FLAG_ERROR) return out;
    }
  }

  /** A full handshake to transmission; returns the size and flags. */
  async open(opts: { structured?: boolean; extended?: boolean; contexts?: string[] } = {}): Promise<{ size: bigint; flags: number }> {
    await this.greet();
    if (opts.extended) {
      this.sendOption(P.NBD_OPT_EXTENDED_HEADERS);
      expect((await this.optionReply()).type).toBe(P.NBD_REP_ACK);
    } else if (opts.structured) {
      this.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
      expect((await this.optionReply()).type).toBe(P.NBD_REP_ACK);
    }
    if (opts.contexts) {
      this.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaRequest('', opts.contexts));
      await this.optionReplies();
    }
    this.sendOption(P.NBD_OPT_GO, Buffer.concat([u32(0), u16(0)]));
    let size = 0n;
    let flags = 0;
    for (const r of await this.optionReplies()) {
      if (r.type === P.NBD_REP_INFO && r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
      expect(r.type & P.NBD_REP_FLAG_ERROR).toBe(0);
    }
    return { size, flags };
  }

  request(type: number, offset: bigint, length: bigint, opts: { flags?: number; cookie?: bigint; payload?: Buffer; extended?: boolean; magic?: number } = {}): void {
    const ext = !!opts.extended;
    const h = Buffer.alloc(ext ? 32 : 28);
    h.writeUInt32BE(opts.magic ?? (ext ? P.NBD_EXTENDED_REQUEST_MAGIC : P.NBD_REQUEST_MAGIC), 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(opts.cookie ?? 1n, 8);
    h.writeBigUInt64BE(offset, 16);
    if (ext) h.writeBigUInt64BE(length, 24);
    else h.writeUInt32BE(Number(length), 24);
    this.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
  }

  /** A simple reply: error and cookie (and `dataLength` bytes of data when it succeeded). */
  async simpleReply(dataLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
    const h = await this.read(16);
    expect(h.readUInt32BE(0)).toBe(P.NBD_SIMPLE_REPLY_MAGIC);
    const error = h.readUInt32BE(4);
    const data = error === 0 && dataLength > 0 ? await this.read(dataLength) : Buffer.alloc(0);
    return { error, cookie: h.readBigUInt64BE(8), data };
  }

  /** The chunks of one structured (or extended) reply, up to DONE. */
  async chunks(extended = false): Promise<Array<{ type: number; payload: Buffer }>> {
    const out = [];
    for (;;) {
      const h = await this.read(extended ? 32 : 20);
      expect(h.readUInt32BE(0)).toBe(extended ? P.NBD_EXTENDED_REPLY_MAGIC : P.NBD_STRUCTURED_REPLY_MAGIC);
      const flags = h.readUInt16BE(4);
      const len = extended ? Number(h.readBigUInt64BE(24)) : h.readUInt32BE(16);
      out.push({ type: h.readUInt16BE(6), payload: await this.read(len) });
      if (flags & P.NBD_REPLY_FLAG_DONE) return out;
    }
  }
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}
function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}
function metaRequest(name: string, queries: string[]): Buffer {
  const parts = [u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length)];
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

let dir: { path: string; cleanup: () => void };
let rw: Served;
let ro: Served;
let rwSock: string;
let roSock: string;
let rwSha: string;
let roSha: string;

/** A well-behaved client still gets the right bytes. */
function wellBehaved(sock: string, pattern: number): void {
  const r = ok(qemuIo(['-r', '-f', 'raw', '-c', `read -P ${pattern} 0 64k`, `nbd+unix:///?socket=${sock}`]), 'well-behaved client');
  expect(r.stdout).not.toMatch(/Pattern verification failed/);
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : 0;
}

describe.skipIf(!enabled)('qimg serve against a hostile client', () => {
  beforeAll(async () => {
    dir = tempDir('qimg-serve-hostile-');
    const raw = join(dir.path, 'w.raw');
    writeFileSync(raw, Buffer.alloc(SIZE, 0x61));
    const qcow = join(dir.path, 'ro.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', qcow, '4M']));
    ok(qemuIo(['-c', 'write -P 0x62 0 1M', qcow]));
    rwSock = join(dir.path, 'rw.sock');
    roSock = join(dir.path, 'ro.sock');
    rwSha = sha256File(raw);
    roSha = sha256File(qcow);
    [rw, ro] = await Promise.all([
      serveForeground(['-t', '-e', '0', '-f', 'raw', '-k', rwSock, raw], join(dir.path, 'rw.pid')),
      serveForeground(['-t', '-e', '0', '-r', '-k', roSock, qcow], join(dir.path, 'ro.pid')),
    ]);
  });
  afterAll(async () => {
    await stopAll();
    dir?.cleanup();
  });

  it('refuses reads and writes outside the export, overflowing ranges and 4 GiB lengths', async () => {
    const c = await RawClient.connect(rwSock);
    const { size } = await c.open();
    expect(size).toBe(BigInt(SIZE));
    const top = 2n ** 64n;
    const cases: Array<[number, bigint, bigint, Buffer?]> = [
      [P.NBD_CMD_READ, BigInt(SIZE), 512n],
      [P.NBD_CMD_READ, BigInt(SIZE) - 256n, 512n],
      [P.NBD_CMD_READ, top - 512n, 1024n],
      [P.NBD_CMD_READ, 0n, 0xffffffffn],
      [P.NBD_CMD_WRITE, BigInt(SIZE) - 256n, 512n, Buffer.alloc(512, 0x7a)],
      [P.NBD_CMD_WRITE, top - 512n, 1024n, Buffer.alloc(1024, 0x7a)],
      [P.NBD_CMD_TRIM, top - 512n, 1024n],
      [P.NBD_CMD_TRIM, 0n, 0xffffffffn],
      [P.NBD_CMD_WRITE_ZEROES, BigInt(SIZE), 0xffffffffn],
      [P.NBD_CMD_CACHE, top - 1n, 2n],
      [99, 0n, 512n],
    ];
    for (const [type, offset, length, payload] of cases) {
      c.request(type, offset, length, { payload });
      const r = await c.simpleReply(type === P.NBD_CMD_READ ? Number(length) : 0);
      expect([P.NBD_EINVAL, P.NBD_ENOSPC], `${type} at ${offset} +${length}`).toContain(r.error);
    }
    // unknown command flags
    c.request(P.NBD_CMD_READ, 0n, 512n, { flags: 1 << 9 });
    expect((await c.simpleReply(512)).error).toBe(P.NBD_EINVAL);
    // the connection still works
    c.request(P.NBD_CMD_READ, 0n, 4096n, { cookie: 7n });
    const good = await c.simpleReply(4096);
    expect(good.error).toBe(0);
    expect(good.cookie).toBe(7n);
    expect(good.data.equals(Buffer.alloc(4096, 0x61))).toBe(true);
    // a write header announcing a 4 GiB payload: the client is dropped, not waited for
    c.request(P.NBD_CMD_WRITE, 0n, 0xffffffffn);
    expect(await c.closedWithin(5000)).toBe(true);
    wellBehaved(rwSock, 0x61);
    expect(sha256File(join(dir.path, 'w.raw'))).toBe(rwSha);
  });

  it('closes connections with bad magic, huge option lengths or truncated packets, and keeps serving', async () => {
    // bad option magic
    let c = await RawClient.connect(roSock);
    await c.greet();
    c.write(Buffer.alloc(16, 0x41));
    expect(await c.closedWithin(5000)).toBe(true);
    // unknown client flags
    c = await RawClient.connect(roSock);
    await c.read(18);
    c.write(u32(0xffff));
    expect(await c.closedWithin(5000)).toBe(true);
    // a 4 GiB option
    c = await RawClient.connect(roSock);
    await c.greet();
    c.sendOption(P.NBD_OPT_GO, Buffer.alloc(16), 0xffffffff);
    expect(await c.closedWithin(5000)).toBe(true);
    // bad request magic in transmission
    c = await RawClient.connect(roSock);
    await c.open();
    c.request(P.NBD_CMD_READ, 0n, 512n, { magic: 0xdeadbeef });
    expect(await c.closedWithin(5000)).toBe(true);
    // truncated: half an option header, half a request header, half a write payload
    c = await RawClient.connect(roSock);
    await c.greet();
    c.write(Buffer.alloc(7));
    c.destroy();
    c = await RawClient.connect(roSock);
    await c.open();
    c.write(Buffer.alloc(10));
    c.destroy();
    c = await RawClient.connect(rwSock);
    await c.open();
    c.request(P.NBD_CMD_WRITE, 0n, 65536n, { payload: Buffer.alloc(100, 0x7a) });
    c.destroy();
    // garbage instead of a greeting reply
    c = await RawClient.connect(roSock);
    c.write(Buffer.alloc(4096, 0xff));
    expect(await c.closedWithin(5000)).toBe(true);
    wellBehaved(roSock, 0x62);
    wellBehaved(rwSock, 0x61);
    expect(sha256File(join(dir.path, 'w.raw'))).toBe(rwSha);
    expect(rssMiB(ro.pid)).toBeGreaterThan(0); // still running
  });

  it('answers bad options with errors and refuses writes on a read-only export', async () => {
    const c = await RawClient.connect(roSock);
    await c.greet();
    c.sendOption(77);
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_UNSUP);
    c.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaRequest('', ['base:allocation']));
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID); // no structured replies yet
    c.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ACK);
    c.sendOption(P.NBD_OPT_SET_META_CONTEXT, Buffer.concat([u32(0), u32(5), u32(0xffffff)]));
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    c.sendOption(P.NBD_OPT_INFO, Buffer.concat([u32(4), Buffer.from('nope'), u16(0)]));
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_UNKNOWN);
    c.sendOption(P.NBD_OPT_INFO, Buffer.concat([u32(1000), u16(0)]));
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_INVALID);
    c.sendOption(P.NBD_OPT_LIST);
    const list = await c.optionReplies();
    expect(list.map((r) => r.type)).toEqual([P.NBD_REP_SERVER, P.NBD_REP_ACK]);
    c.sendOption(P.NBD_OPT_STARTTLS);
    expect((await c.optionReply()).type).toBe(P.NBD_REP_ERR_POLICY);
    c.sendOption(P.NBD_OPT_SET_META_CONTEXT, metaRequest('', ['base:allocation']));
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
    c.sendOption(P.NBD_OPT_GO, Buffer.concat([u32(0), u16(0)]));
    const go = await c.optionReplies();
    const flags = go.find((r) => r.type === P.NBD_REP_INFO && r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT)!.data.readUInt16BE(10);
    expect(flags & P.NBD_FLAG_READ_ONLY).not.toBe(0);
    expect(flags & P.NBD_FLAG_SEND_TRIM).toBe(0);
    for (const [type, payload] of [
      [P.NBD_CMD_WRITE, Buffer.alloc(512)],
      [P.NBD_CMD_TRIM, undefined],
      [P.NBD_CMD_WRITE_ZEROES, undefined],
    ] as const) {
      c.request(type, 0n, 512n, { payload });
      const [chunk] = await c.chunks();
      if (chunk.type === P.NBD_REPLY_TYPE_ERROR) expect(chunk.payload.readUInt32BE(0)).toBe(P.NBD_EPERM);
      else throw new Error(`command ${type} on a read-only export answered ${chunk.type}`);
    }
    // structured read: data then a hole; block status with REQ_ONE
    c.request(P.NBD_CMD_READ, 1023n * 1024n, 2n * 1024n);
    const parts = await c.chunks();
    expect(parts.map((p) => p.type)).toEqual([P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE]);
    c.request(P.NBD_CMD_BLOCK_STATUS, 0n, BigInt(SIZE), { flags: P.NBD_CMD_FLAG_REQ_ONE });
    const [bs] = await c.chunks();
    expect(bs.type).toBe(P.NBD_REPLY_TYPE_BLOCK_STATUS);
    expect(bs.payload.length).toBe(12);
    expect(bs.payload.readUInt32BE(4)).toBe(MiB);
    c.request(P.NBD_CMD_BLOCK_STATUS, BigInt(SIZE), 512n);
    expect((await c.chunks())[0].type).toBe(P.NBD_REPLY_TYPE_ERROR);
    c.request(P.NBD_CMD_DISC, 0n, 0n);
    expect(await c.closedWithin(5000)).toBe(true);
    expect(sha256File(join(dir.path, 'ro.qcow2'))).toBe(roSha);
  });

  it('speaks extended headers', async () => {
    const c = await RawClient.connect(roSock);
    await c.open({ extended: true, contexts: ['base:allocation'] });
    c.request(P.NBD_CMD_READ, 0n, 4096n, { extended: true });
    const [data] = await c.chunks(true);
    expect(data.type).toBe(P.NBD_REPLY_TYPE_OFFSET_DATA);
    expect(data.payload.subarray(8).equals(Buffer.alloc(4096, 0x62))).toBe(true);
    c.request(P.NBD_CMD_BLOCK_STATUS, 0n, BigInt(SIZE), { extended: true });
    const [bs] = await c.chunks(true);
    expect(bs.type).toBe(P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
    expect(bs.payload.readUInt32BE(4)).toBe(2);
    expect(bs.payload.readBigUInt64BE(8)).toBe(BigInt(MiB));
    // a 64-bit read length is refused, not allocated
    c.request(P.NBD_CMD_READ, 0n, 2n ** 40n, { extended: true });
    expect((await c.chunks(true))[0].type).toBe(P.NBD_REPLY_TYPE_ERROR);
    // a payload on a command that takes none is consumed and refused; the stream stays in step
    c.request(P.NBD_CMD_BLOCK_STATUS, 0n, 16n, { extended: true, flags: P.NBD_CMD_FLAG_PAYLOAD_LEN, payload: Buffer.alloc(16, 0xee) });
    const [refused] = await c.chunks(true);
    expect(refused.type).toBe(P.NBD_REPLY_TYPE_ERROR);
    expect(refused.payload.readUInt32BE(0)).toBe(P.NBD_EINVAL);
    c.request(P.NBD_CMD_READ, 512n, 512n, { extended: true, cookie: 9n });
    expect((await c.chunks(true))[0].payload.subarray(8).equals(Buffer.alloc(512, 0x62))).toBe(true);
    // ... and a 4 GiB one drops the client
    c.request(P.NBD_CMD_BLOCK_STATUS, 0n, 2n ** 32n, { extended: true, flags: P.NBD_CMD_FLAG_PAYLOAD_LEN });
    expect(await c.closedWithin(5000)).toBe(true);
  });

  it('with TLS required, answers every option but STARTTLS and ABORT with TLS_REQD and drops EXPORT_NAME', async () => {
    const pskDir = join(dir.path, 'psk');
    mkdirSync(pskDir);
    writeFileSync(join(pskDir, 'keys.psk'), 'qemu:00112233445566778899aabbccddeeff\n');
    const tlsSock = join(dir.path, 'tls.sock');
    const tls = await serveForeground(['-t', '-r', '-k', tlsSock, '--object', `tls-creds-psk,id=t0,dir=${pskDir},endpoint=server`, '--tls-creds', 't0', join(dir.path, 'ro.qcow2')], join(dir.path, 'tls.pid'));
    try {
      let c = await RawClient.connect(tlsSock);
      await c.greet();
      for (const option of [P.NBD_OPT_LIST, P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_INFO, P.NBD_OPT_GO, 77]) {
        c.sendOption(option, option === P.NBD_OPT_GO || option === P.NBD_OPT_INFO ? Buffer.concat([u32(0), u16(0)]) : undefined);
        expect((await c.optionReply()).type, `option ${option}`).toBe(P.NBD_REP_ERR_TLS_REQD);
      }
      c.sendOption(P.NBD_OPT_ABORT);
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ACK);
      expect(await c.closedWithin(5000)).toBe(true);
      c = await RawClient.connect(tlsSock);
      await c.greet();
      c.sendOption(P.NBD_OPT_EXPORT_NAME);
      expect(await c.closedWithin(5000)).toBe(true);
      // STARTTLS is acknowledged; garbage instead of a TLS handshake ends that connection only
      c = await RawClient.connect(tlsSock);
      await c.greet();
      c.sendOption(P.NBD_OPT_STARTTLS);
      expect((await c.optionReply()).type).toBe(P.NBD_REP_ACK);
      c.write(Buffer.alloc(64, 0x42));
      expect(await c.closedWithin(5000)).toBe(true);
      expect(rssMiB(tls.pid)).toBeGreaterThan(0);
    } finally {
      await stopPid(tls.pid);
    }
  });

  it('keeps its memory bounded under thousands of requests whose replies are never read', async () => {
    const flood = await RawClient.connect(rwSock);
    await flood.open();
    flood.sock.pause(); // never read a reply
    const before = rssMiB(rw.pid);
    const header = Buffer.alloc(28);
    header.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    header.writeUInt16BE(P.NBD_CMD_READ, 6);
    header.writeUInt32BE(MiB, 24);
    // 5000 reads of 1 MiB: 5 GiB of replies nobody takes
    for (let i = 0; i < 5000; i++) flood.write(header);
    await new Promise((r) => setTimeout(r, 1500));
    wellBehaved(rwSock, 0x61);
    const after = rssMiB(rw.pid);
    expect(after - before).toBeLessThan(400);
    flood.destroy();
    await new Promise((r) => setTimeout(r, 200));
    wellBehaved(rwSock, 0x61);
    expect(sha256File(join(dir.path, 'w.raw'))).toBe(rwSha);
  });
});
