/**
 * The client side of the NBD fixed newstyle handshake: extended headers when the
 * server has them (else structured replies), the base:allocation metadata context,
 * then NBD_OPT_GO with block-size information (NBD_OPT_EXPORT_NAME for servers that
 * know no GO). Every length the server sends is bounded before it is read.
 */
import type { Socket } from 'node:net';
import type { ByteReader } from './byte-reader.js';
import {
  BASE_ALLOCATION,
  IHAVEOPT,
  NBDMAGIC,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_REP_SERVER,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_LIST,
  NBD_OPT_INFO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_EXT_HEADER_REQD,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  OPTION_REPLY_MAGIC,
} from './protocol.js';
import { NbdError } from './errors.js';

/** What the handshake settled for the transmission phase. */
export interface NegotiatedExport {
  /** export size in bytes */
  size: number;
  /** transmission flags (NBD_FLAG_*) */
  flags: number;
  /** block-size constraints (1 / 4096 / 32 MiB when the server gives none) */
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  /** the id of base:allocation, when the server has that context */
  allocationContext?: number;
}

/** Oldstyle servers greet with this instead of IHAVEOPT. */
const OLDSTYLE_MAGIC = 0x00420281861253n;
/** The largest option reply qimg reads (a listed export's name and description; an error message is far less). */
const MAX_OPTION_REPLY = 2 * NBD_MAX_STRING + 64;

/**
 * The handshake on `socket`; with `startTls`, NBD_OPT_STARTTLS comes first and every
 * later option goes over the TLS session it returns (which then carries the reader's bytes).
 */
export async function negotiate(socket: Socket, reader: ByteReader, exportName: string, startTls?: () => Promise<Socket>): Promise<NegotiatedExport> {
  const { options, noZeroes } = await begin(socket, reader, startTls);
  // extended headers when offered (they include structured replies), else structured replies
  const extendedHeaders = (await options.simple(NBD_OPT_EXTENDED_HEADERS)) === NBD_REP_ACK;
  const structuredReplies = !extendedHeaders && (await options.simple(NBD_OPT_STRUCTURED_REPLY)) === NBD_REP_ACK;
  const allocationContext = extendedHeaders || structuredReplies ? await setMetaContext(options, exportName) : undefined;
  const result = await go(options, exportName, noZeroes);
  if (!result) {
    options.abortQuietly();
    throw new NbdError('The NBD server did not answer NBD_OPT_GO');
  }
  // qimg sends at most NBD_MAX_PAYLOAD per request, rounded to the server's granularity
  const { blockSizesSent: _sent, ...negotiated } = result;
  let maxBlock = Math.min(negotiated.maxBlock, NBD_MAX_PAYLOAD);
  maxBlock -= maxBlock % negotiated.minBlock;
  return { ...negotiated, maxBlock, structuredReplies: structuredReplies || extendedHeaders, extendedHeaders, allocationContext };
}

/** The greeting, the client flags and (with `startTls`) NBD_OPT_STARTTLS: the option phase begins. */
async function begin(socket: Socket, reader: ByteReader, startTls?: () => Promise<Socket>): Promise<{ options: OptionChannel; noZeroes: boolean }> {
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdError('Not an NBD server: invalid magic received');
  const second = greeting.readBigUInt64BE(8);
  if (second === OLDSTYLE_MAGIC) throw new NbdError('The NBD server uses the oldstyle handshake, which qimg does not support');
  if (second !== IHAVEOPT) throw new NbdError('Not an NBD server: invalid magic received');
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbdError('The NBD server does not support the fixed newstyle handshake');
  const noZeroes = !!(serverFlags & NBD_FLAG_NO_ZEROES);
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  socket.write(clientFlags);

  const options = new OptionChannel(socket, reader);
  if (startTls) {
    options.send(NBD_OPT_STARTTLS);
    const { type, data } = await options.reply(NBD_OPT_STARTTLS);
    if (type !== NBD_REP_ACK) {
      const detail = data.length > 0 ? ` (server reported: ${data.toString('utf8')})` : '';
      throw new NbdError(type === NBD_REP_ERR_POLICY || type === NBD_REP_ERR_UNSUP || type === NBD_REP_ERR_INVALID ? `The NBD server does not support TLS${detail}` : `The NBD server refused TLS (reply ${type >>> 0})${detail}`);
    }
    options.socket = await startTls();
  }
  return { options, noZeroes };
}

/** One export a server lists, with what NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT say of it. */
export interface ListedExport {
  name: string;
  description: string;
  /** size and transmission flags: absent when the server gave no NBD_OPT_INFO answer */
  size?: number;
  flags?: number;
  /** block sizes: absent when the server sent none */
  blockSizes?: { min: number; preferred: number; max: number };
  contexts: string[];
}

/** The most exports (and contexts per export) a listing takes from a server. */
const MAX_LISTED = 4096;

/**
 * The exports a server offers (qemu-nbd -L): NBD_OPT_LIST, then per export NBD_OPT_INFO
 * and NBD_OPT_LIST_META_CONTEXT, after structured replies are negotiated (so the flags
 * are those a transmission would see); NBD_OPT_ABORT ends the session.
 */
export async function listExports(socket: Socket, reader: ByteReader, startTls?: () => Promise<Socket>): Promise<ListedExport[]> {
  const { options } = await begin(socket, reader, startTls);
  await options.simple(NBD_OPT_STRUCTURED_REPLY);
  options.send(NBD_OPT_LIST);
  const listed: ListedExport[] = [];
  for (;;) {
    const { type, data } = await options.reply(NBD_OPT_LIST);
    if (type === NBD_REP_ACK) break;
    if (type & NBD_REP_FLAG_ERROR) throw optionError(type, data, '');
    if (type !== NBD_REP_SERVER || data.length < 4 || data.readUInt32BE(0) > data.length - 4) throw new NbdError('NBD protocol error: invalid export list reply');
    if (listed.length >= MAX_LISTED) throw new NbdError('NBD protocol error: too many exports listed');
    const nameLength = data.readUInt32BE(0);
    listed.push({ name: data.subarray(4, 4 + nameLength).toString('utf8'), description: data.subarray(4 + nameLength).toString('utf8'), contexts: [] });
  }
  for (const exp of listed) {
    const info = await go(options, exp.name, false, NBD_OPT_INFO);
    if (info) {
      exp.size = info.size;
      exp.flags = info.flags;
      if (info.blockSizesSent) exp.blockSizes = { min: info.minBlock, preferred: info.preferredBlock, max: info.maxBlock };
    }
    exp.contexts = await listMetaContexts(options, exp.name);
  }
  options.abortQuietly();
  return listed;
}

/** The data of NBD_OPT_SET/LIST_META_CONTEXT: the export's name, then the queries, each with its length. */
function metaContextRequest(exportName: string, queries: string[]): Buffer {
  const parts = [Buffer.from(exportName), ...queries.map((q) => Buffer.from(q))];
  const data = Buffer.alloc(4 + parts[0].length + 4 + parts.slice(1).reduce((n, q) => n + 4 + q.length, 0));
  let p = data.writeUInt32BE(parts[0].length, 0);
  p += parts[0].copy(data, p);
  p = data.writeUInt32BE(queries.length, p);
  for (const q of parts.slice(1)) {
    p = data.writeUInt32BE(q.length, p);
    p += q.copy(data, p);
  }
  return data;
}

/** Every metadata context the server has for `exportName` (a query-less NBD_OPT_LIST_META_CONTEXT). */
async function listMetaContexts(options: OptionChannel, exportName: string): Promise<string[]> {
  options.send(NBD_OPT_LIST_META_CONTEXT, metaContextRequest(exportName, []));
  const out: string[] = [];
  for (;;) {
    const { type, data: reply } = await options.reply(NBD_OPT_LIST_META_CONTEXT);
    if (type === NBD_REP_ACK) return out;
    if (type & NBD_REP_FLAG_ERROR) return []; // (no contexts to show)
    if (type !== NBD_REP_META_CONTEXT || reply.length < 5) throw new NbdError('NBD protocol error: invalid metadata context reply');
    if (out.length >= MAX_LISTED) throw new NbdError('NBD protocol error: too many metadata context replies');
    out.push(reply.subarray(4).toString('utf8'));
  }
}

/** Option requests and their replies. */
class OptionChannel {
  constructor(
    public socket: Socket,
    readonly reader: ByteReader,
  ) {}

  send(option: number, data: Buffer = Buffer.alloc(0)): void {
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(IHAVEOPT, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
  }

  /** One reply to `option`: its type and payload (bounded). */
  async reply(option: number): Promise<{ type: number; data: Buffer }> {
    const head = await this.reader.read(20);
    if (head.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdError('NBD protocol error: invalid option reply magic');
    const echoed = head.readUInt32BE(8);
    if (echoed !== option) throw new NbdError(`NBD protocol error: reply for option ${echoed}, expected ${option}`);
    const type = head.readUInt32BE(12);
    const length = head.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw new NbdError(`NBD protocol error: option reply of ${length} bytes is too long`);
    const data = length > 0 ? Buffer.from(await this.reader.read(length)) : Buffer.alloc(0);
    return { type, data };
  }

  /** An option without data that the server acknowledges or refuses: the reply type. */
  async simple(option: number): Promise<number> {
    this.send(option);
    const { type } = await this.reply(option);
    if (type !== NBD_REP_ACK && !(type & NBD_REP_FLAG_ERROR)) throw new NbdError(`NBD protocol error: unexpected reply ${type} to option ${option}`);
    return type;
  }

  abortQuietly(): void {
    try {
      this.send(NBD_OPT_ABORT);
    } catch {
      // the connection is being dropped anyway
    }
  }
}

/** Asks for base:allocation; its context id, or undefined when the server has none. */
async function setMetaContext(options: OptionChannel, exportName: string): Promise<number | undefined> {
  options.send(NBD_OPT_SET_META_CONTEXT, metaContextRequest(exportName, [BASE_ALLOCATION]));
  let id: number | undefined;
  for (let replies = 0; ; replies++) {
    if (replies > 16) throw new NbdError('NBD protocol error: too many metadata context replies');
    const { type, data: reply } = await options.reply(NBD_OPT_SET_META_CONTEXT);
    if (type === NBD_REP_ACK) return id;
    if (type & NBD_REP_FLAG_ERROR) return undefined; // no block status: everything reads as data
    if (type !== NBD_REP_META_CONTEXT || reply.length < 5) throw new NbdError('NBD protocol error: invalid metadata context reply');
    if (reply.subarray(4).toString() !== BASE_ALLOCATION) throw new NbdError('NBD protocol error: the server chose a metadata context qimg did not ask for');
    id = reply.readUInt32BE(0);
  }
}

type GoResult = Omit<NegotiatedExport, 'structuredReplies' | 'extendedHeaders' | 'allocationContext'> & { blockSizesSent?: boolean };

/** NBD_OPT_GO (or NBD_OPT_EXPORT_NAME when the server knows no GO), or NBD_OPT_INFO (undefined when the server knows none). */
async function go(options: OptionChannel, exportName: string, noZeroes: boolean, option = NBD_OPT_GO): Promise<GoResult | undefined> {
  const name = Buffer.from(exportName);
  const data = Buffer.alloc(4 + name.length + 2 + 2);
  let p = data.writeUInt32BE(name.length, 0);
  p += name.copy(data, p);
  p = data.writeUInt16BE(1, p);
  data.writeUInt16BE(NBD_INFO_BLOCK_SIZE, p);
  options.send(option, data);
  let size: number | undefined;
  let blockSizesSent = false;
  let flags = 0;
  let minBlock = 1;
  let preferredBlock = 4096;
  let maxBlock = NBD_MAX_PAYLOAD;
  for (let replies = 0; ; replies++) {
    if (replies > 64) throw new NbdError('NBD protocol error: too many replies to NBD_OPT_GO');
    const { type, data: reply } = await options.reply(option);
    if (type === NBD_REP_ACK) break;
    if (type === NBD_REP_ERR_UNSUP) return option === NBD_OPT_GO ? exportNameFallback(options, name, noZeroes) : undefined;
    if (type & NBD_REP_FLAG_ERROR) throw optionError(type, reply, exportName);
    if (type !== NBD_REP_INFO || reply.length < 2) throw new NbdError(`NBD protocol error: unexpected reply ${type} to NBD_OPT_GO`);
    const info = reply.readUInt16BE(0);
    if (info === NBD_INFO_EXPORT) {
      if (reply.length !== 12) throw new NbdError('NBD protocol error: invalid export information');
      size = checkedSize(reply.readBigUInt64BE(2));
      flags = reply.readUInt16BE(10);
      // without NBD_FLAG_HAS_FLAGS the other bits mean nothing
      if (!(flags & NBD_FLAG_HAS_FLAGS)) flags = 0;
    } else if (info === NBD_INFO_BLOCK_SIZE) {
      if (reply.length !== 14) throw new NbdError('NBD protocol error: invalid block size information');
      minBlock = reply.readUInt32BE(2);
      preferredBlock = reply.readUInt32BE(6);
      maxBlock = reply.readUInt32BE(10);
      blockSizesSent = true;
      if (!isPowerOf2(minBlock) || minBlock > 65536 || !isPowerOf2(preferredBlock) || preferredBlock < minBlock || maxBlock < preferredBlock || maxBlock % minBlock !== 0) {
        throw new NbdError(`NBD protocol error: invalid block sizes ${minBlock}/${preferredBlock}/${maxBlock}`);
      }
    }
    // other information (name, description) is not needed
  }
  if (size === undefined) throw new NbdError('NBD protocol error: the server sent no export size');
  return { size, flags, minBlock, preferredBlock, maxBlock, blockSizesSent };
}

/** The pre-GO way to choose an export: the server answers with size and flags at once. */
async function exportNameFallback(options: OptionChannel, name: Buffer, noZeroes: boolean): Promise<GoResult> {
  options.send(NBD_OPT_EXPORT_NAME, name);
  const reply = await options.reader.read(noZeroes ? 10 : 134);
  const flags = reply.readUInt16BE(8);
  return { size: checkedSize(reply.readBigUInt64BE(0)), flags: flags & NBD_FLAG_HAS_FLAGS ? flags : 0, minBlock: 1, preferredBlock: 4096, maxBlock: NBD_MAX_PAYLOAD };
}

function checkedSize(size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdError(`NBD export size ${size} is too large`);
  return Number(size);
}

function isPowerOf2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** An option error as a message (qemu's words where it has them). */
function optionError(type: number, data: Buffer, exportName: string): NbdError {
  const detail = data.length > 0 ? ` (server reported: ${data.toString('utf8')})` : '';
  switch (type) {
    case NBD_REP_ERR_UNKNOWN:
      return new NbdError(`Requested export not available${detail || ` (export '${exportName}' not present)`}`);
    case NBD_REP_ERR_POLICY:
      return new NbdError(`Requested export '${exportName}' is forbidden by server policy${detail}`);
    case NBD_REP_ERR_TLS_REQD:
      return new NbdError(`The NBD server requires TLS: name credentials with tls-creds=ID in --image-opts${detail}`);
    case NBD_REP_ERR_INVALID:
      return new NbdError(`The NBD server rejected the request as invalid${detail}`);
    case NBD_REP_ERR_PLATFORM:
      return new NbdError(`The NBD server does not support this on its platform${detail}`);
    case NBD_REP_ERR_SHUTDOWN:
      return new NbdError(`The NBD server is shutting down${detail}`);
    case NBD_REP_ERR_BLOCK_SIZE_REQD:
      return new NbdError(`The NBD server requires block size negotiation${detail}`);
    case NBD_REP_ERR_TOO_BIG:
      return new NbdError(`The NBD server reports the request is too big${detail}`);
    case NBD_REP_ERR_EXT_HEADER_REQD:
      return new NbdError(`The NBD server requires extended headers${detail}`);
    default:
      return new NbdError(`The NBD server refused the export (error ${type >>> 0})${detail}`);
  }
}
