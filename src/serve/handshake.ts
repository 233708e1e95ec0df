/**
 * The fixed newstyle handshake, server side (NetworkBlockDevice/nbd doc/proto.md):
 * greeting, option haggling (LIST, ABORT, EXPORT_NAME, INFO, GO, STRUCTURED_REPLY,
 * EXTENDED_HEADERS, LIST/SET_META_CONTEXT, STARTTLS), ending in the transmission phase
 * or a closed connection. Every length a client sends is bounded before anything is
 * buffered; a protocol violation closes the connection.
 */
import type { Duplex } from 'node:stream';
import * as P from '../io/nbd/protocol.js';
import type { MetaContext, NbdExport } from './export.js';
import { SocketReader, send } from './wire.js';
import type { TlsServerCreds } from './tls.js';

/** Options longer than this close the connection (a META_CONTEXT list of long names fits). */
const MAX_OPTION_LENGTH = 64 * 1024;
/** A handshake that does not reach transmission within this time is dropped (as qemu-nbd's 10 s). */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

/** What the handshake settled, for the transmission phase. */
export interface Session {
  socket: Duplex;
  reader: SocketReader;
  structured: boolean;
  extended: boolean;
  contexts: MetaContext[];
  tls: boolean;
}

/** The client broke the protocol: drop the connection. */
export class ProtocolViolation extends Error {}

/** What the handshake serves: the export, TLS (required when given), the server's state. */
export interface HandshakeContext {
  exp: NbdExport;
  tls?: TlsServerCreds;
  /** the server is stopping: options get ERR_SHUTDOWN */
  shuttingDown(): boolean;
}

export async function handshake(socket: Duplex, ctx: HandshakeContext): Promise<Session | null> {
  const s: Session = { socket, reader: new SocketReader(socket), structured: false, extended: false, contexts: [], tls: false };
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
  greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
  greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
  await send(socket, greeting);
  const clientFlags = (await s.reader.read(4)).readUInt32BE(0);
  if (clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) throw new ProtocolViolation('unknown client flags');
  const noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
  const exp = ctx.exp;

  for (;;) {
    const head = await s.reader.read(16);
    if (head.readBigUInt64BE(0) !== P.IHAVEOPT) throw new ProtocolViolation('bad option magic');
    const option = head.readUInt32BE(8);
    const length = head.readUInt32BE(12);
    if (length > MAX_OPTION_LENGTH) throw new ProtocolViolation('option too long');
    const data = await s.reader.read(length);
    const reply = (type: number, payload: Buffer = Buffer.alloc(0)) => sendOptionReply(s.socket, option, type, payload);
    const fail = (type: number, message: string) => reply(type, Buffer.from(message, 'utf8'));

    if (option === P.NBD_OPT_ABORT) {
      await reply(P.NBD_REP_ACK).catch(() => undefined);
      return null;
    }
    if (ctx.tls && !s.tls) {
      // FORCEDTLS: nothing but STARTTLS (and ABORT) before TLS is up
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolViolation('export requested without TLS');
      if (option !== P.NBD_OPT_STARTTLS) {
        await fail(P.NBD_REP_ERR_TLS_REQD, 'TLS is required');
        continue;
      }
    }
    if (ctx.shuttingDown()) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolViolation('server shutting down');
      await fail(P.NBD_REP_ERR_SHUTDOWN, 'Server shutting down');
      continue;
    }

    switch (option) {
      case P.NBD_OPT_STARTTLS: {
        if (length !== 0) await fail(P.NBD_REP_ERR_INVALID, 'STARTTLS takes no data');
        else if (!ctx.tls) await fail(P.NBD_REP_ERR_POLICY, 'TLS not configured');
        else if (s.tls) await fail(P.NBD_REP_ERR_INVALID, 'TLS already active');
        else {
          await reply(P.NBD_REP_ACK);
          if (s.reader.detach().length > 0) throw new ProtocolViolation('data sent before the TLS handshake');
          s.socket = await ctx.tls.upgrade(s.socket);
          s.reader = new SocketReader(s.socket);
          s.tls = true;
        }
        break;
      }
      case P.NBD_OPT_LIST: {
        if (length !== 0) {
          await fail(P.NBD_REP_ERR_INVALID, 'LIST takes no data');
          break;
        }
        const name = Buffer.from(exp.name, 'utf8');
        const desc = Buffer.from(exp.opts.description ?? '', 'utf8');
        const body = Buffer.alloc(4 + name.length + desc.length);
        body.writeUInt32BE(name.length, 0);
        name.copy(body, 4);
        desc.copy(body, 4 + name.length);
        await reply(P.NBD_REP_SERVER, body);
        await reply(P.NBD_REP_ACK);
        break;
      }
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (length !== 0) await fail(P.NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        else if (s.extended) await fail(P.NBD_REP_ERR_EXT_HEADER_REQD, 'extended headers already negotiated');
        else {
          s.structured = true;
          await reply(P.NBD_REP_ACK);
        }
        break;
      case P.NBD_OPT_EXTENDED_HEADERS:
        if (length !== 0) await fail(P.NBD_REP_ERR_INVALID, 'EXTENDED_HEADERS takes no data');
        else {
          s.extended = true;
          s.structured = true;
          await reply(P.NBD_REP_ACK);
        }
        break;
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT: {
        const listing = option === P.NBD_OPT_LIST_META_CONTEXT;
        if (!s.structured) {
          await fail(P.NBD_REP_ERR_INVALID, 'structured replies not negotiated');
          break;
        }
        const parsed = parseMetaRequest(data);
        if (!parsed) {
          await fail(P.NBD_REP_ERR_INVALID, 'malformed meta context request');
          break;
        }
        if (parsed.name !== exp.name) {
          await fail(P.NBD_REP_ERR_UNKNOWN, `export '${parsed.name}' not present`);
          break;
        }
        let selected: MetaContext[];
        if (listing && parsed.queries.length === 0) selected = exp.contexts;
        else {
          const set = new Set<MetaContext>();
          for (const q of parsed.queries) for (const c of exp.matchContexts(q, listing)) set.add(c);
          selected = [...set];
        }
        for (const c of selected) {
          const name = Buffer.from(c.name, 'utf8');
          const body = Buffer.alloc(4 + name.length);
          body.writeUInt32BE(listing ? 0 : c.id, 0);
          name.copy(body, 4);
          await reply(P.NBD_REP_META_CONTEXT, body);
        }
        if (!listing) s.contexts = selected;
        await reply(P.NBD_REP_ACK);
        break;
      }
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const parsed = parseInfoRequest(data);
        if (!parsed) {
          await fail(P.NBD_REP_ERR_INVALID, 'malformed INFO/GO request');
          break;
        }
        if (parsed.name !== exp.name) {
          await fail(P.NBD_REP_ERR_UNKNOWN, `export '${parsed.name}' not present`);
          break;
        }
        const info = Buffer.alloc(12);
        info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
        info.writeBigUInt64BE(BigInt(exp.size), 2);
        info.writeUInt16BE(exp.flags(s.structured), 10);
        await reply(P.NBD_REP_INFO, info);
        if (parsed.requests.includes(P.NBD_INFO_NAME)) {
          await reply(P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_NAME), Buffer.from(exp.name, 'utf8')]));
        }
        if (parsed.requests.includes(P.NBD_INFO_DESCRIPTION) && exp.opts.description !== undefined) {
          await reply(P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_DESCRIPTION), Buffer.from(exp.opts.description, 'utf8')]));
        }
        const bs = Buffer.alloc(14);
        bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
        bs.writeUInt32BE(1, 2);
        bs.writeUInt32BE(4096, 6);
        bs.writeUInt32BE(P.NBD_MAX_PAYLOAD, 10);
        await reply(P.NBD_REP_INFO, bs);
        await reply(P.NBD_REP_ACK);
        if (option === P.NBD_OPT_GO) return s;
        break;
      }
      case P.NBD_OPT_EXPORT_NAME: {
        if (data.toString('utf8') !== exp.name) throw new ProtocolViolation('unknown export');
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(exp.size), 0);
        out.writeUInt16BE(exp.flags(s.structured), 8);
        await send(s.socket, out);
        return s;
      }
      default:
        await fail(P.NBD_REP_ERR_UNSUP, `option ${option} not supported`);
    }
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

function sendOptionReply(socket: Duplex, option: number, type: number, payload: Buffer): Promise<void> {
  const head = Buffer.alloc(20);
  head.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
  head.writeUInt32BE(option, 8);
  head.writeUInt32BE(type >>> 0, 12);
  head.writeUInt32BE(payload.length, 16);
  return send(socket, payload.length ? Buffer.concat([head, payload]) : head);
}

/** A string of `len` bytes at `at` inside `data`, or undefined past its end or over the spec's limit. */
function stringAt(data: Buffer, at: number, len: number): string | undefined {
  if (len > P.NBD_MAX_STRING || at + len > data.length) return undefined;
  return data.toString('utf8', at, at + len);
}

/** INFO/GO data: export name, then the information requests. */
function parseInfoRequest(data: Buffer): { name: string; requests: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLen = data.readUInt32BE(0);
  const name = stringAt(data, 4, nameLen);
  if (name === undefined || 4 + nameLen + 2 > data.length) return undefined;
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * count) return undefined;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, requests };
}

/** LIST/SET_META_CONTEXT data: export name, then the queries. */
function parseMetaRequest(data: Buffer): { name: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLen = data.readUInt32BE(0);
  const name = stringAt(data, 4, nameLen);
  if (name === undefined || 4 + nameLen + 4 > data.length) return undefined;
  let at = 4 + nameLen;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const len = data.readUInt32BE(at);
    const q = stringAt(data, at + 4, len);
    if (q === undefined) return undefined;
    queries.push(q);
    at += 4 + len;
  }
  return at === data.length ? { name, queries } : undefined;
}
