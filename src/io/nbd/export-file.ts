/**
 * An NBD export as host storage: formats read and write it as they would a local
 * file. Requests are split to the server's maximum block size and aligned to its
 * minimum (read-modify-write at unaligned edges); block status comes from
 * base:allocation, the last answer cached so per-extent questions cost no round trip.
 */
import { QimgError } from '../../core/errors.js';
import type { HostFile, HostRun } from '../host.js';
import type { FileRun } from '../sparse.js';
import { NbdConnection, type NbdExtent } from './connection.js';
import { NbdError } from './errors.js';
import {
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
} from './protocol.js';
import type { NbdClientTls } from './tls-client.js';
import { parseNbdName } from './uri.js';

/** The longest zeroing, trim or block-status request (lengths are 32-bit on the wire). */
const MAX_COMMAND_LENGTH = 2 ** 31;
/**
 * Writes left in flight behind the caller (write-behind): a copy that writes one chunk
 * at a time then waits for the round trip only when this many are outstanding. Few:
 * a server writing many requests to one file at once makes its threads contend for
 * the file's lock (nbdkit: 8 ms a 2 MiB request with 16 in flight, 1 ms one at a
 * time); measured against qemu-nbd, 4 was faster than 1, 2, 8 or 16.
 */
const MAX_WRITES_BEHIND = 4;
const MAX_BYTES_BEHIND = 64 * 1024 * 1024;
/**
 * Reads and writes go out in requests of this size (nbdcopy's default). A server answers
 * several smaller reads concurrently, its reading of one overlapping its sending of
 * another, where one large request is read, then sent, whole (measured against
 * qemu-nbd: 4 GiB in 1.3 s in 256 KiB requests, 1.8 s in 2 MiB ones). For writes, a
 * server's pwrite of 2 MiB at a 2 MiB boundary makes Linux 6.x (ext4 with large folios)
 * allocate 2 MiB page-cache folios, which on the VM measured here came from memory the
 * host had not mapped yet: qemu-nbd spent 4.4 s of system time on a 2.4 GiB copy in
 * 2 MiB requests (nbdcopy --request-size=2M alike), 2 s in 256 KiB ones.
 */
const REQUEST_PIECE = 256 * 1024;

export class NbdExportFile implements HostFile {
  readonly remote = true;
  /** the last block-status answer: extents from cacheStart, consecutive */
  private statusCache: { start: number; extents: NbdExtent[]; ends: number[] } | undefined;
  /** unaligned writes run one at a time (each reads, patches and writes whole blocks) */
  private rmwChain: Promise<void> = Promise.resolve();
  /** written since the last flush (close flushes then, as qemu's block layer does) */
  private dirty = false;
  /** aligned writes sent and not yet answered (write-behind) */
  private behind: Array<{ start: number; end: number; done: Promise<void> }> = [];
  private bytesBehind = 0;
  /** the first write-behind failure: every later request reports it */
  private failure: unknown;

  private constructor(
    readonly path: string,
    private readonly conn: NbdConnection,
    readonly writable: boolean,
  ) {}

  /** Connects to the export `name` denotes (see uri.ts for the names). */
  static async open(name: string, opts: { writable: boolean; tls?: NbdClientTls }): Promise<NbdExportFile> {
    const addr = parseNbdName(name);
    let conn: NbdConnection;
    try {
      conn = await NbdConnection.connect(addr, opts.tls ? { tls: opts.tls } : {});
    } catch (err) {
      throw new QimgError(`Could not open '${name}': ${messageOf(err)}`, { file: name, cause: err });
    }
    if (opts.writable && conn.info.flags & NBD_FLAG_READ_ONLY) {
      await conn.close().catch(() => undefined);
      throw new QimgError(`Could not open '${name}': Permission denied (the NBD export is read-only)`, { file: name });
    }
    return new NbdExportFile(name, conn, opts.writable);
  }

  /** The request size reads and writes are split to (whole server blocks, at most the maximum). */
  private get requestPiece(): number {
    const { minBlock, maxBlock } = this.conn.info;
    return Math.max(minBlock, Math.min(maxBlock, alignDown(REQUEST_PIECE, minBlock)));
  }

  get size(): number {
    return this.conn.info.size;
  }

  /** The negotiated export (size, flags, block sizes, reply kinds): for `info` and tests. */
  get exportInfo(): NbdConnection['info'] {
    return this.conn.info;
  }

  async read(buf: Buffer, pos: number): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.size - pos));
    buf.fill(0, inside);
    if (inside === 0) return;
    await this.settle(pos, pos + inside);
    await this.guard('read', async () => {
      const { minBlock } = this.conn.info;
      const start = alignDown(pos, minBlock);
      const end = Math.min(alignUp(pos + inside, minBlock), this.size);
      if (start === pos && (end === pos + inside || end === this.size)) return this.readAligned(buf.subarray(0, inside), pos);
      const bounce = Buffer.allocUnsafe(end - start);
      await this.readAligned(bounce, start);
      bounce.copy(buf, 0, pos - start, pos - start + inside);
    });
  }

  async readBytes(pos: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.read(buf, pos);
    return buf;
  }

  async write(buf: Buffer, pos: number): Promise<void> {
    this.checkWrite(pos, buf.length);
    if (buf.length === 0) return;
    this.statusCache = undefined;
    this.dirty = true;
    const end = pos + buf.length;
    if (!this.isAligned(pos, end)) {
      await this.settle(pos, end);
      return this.guard('write', () => this.readModifyWrite(buf, pos));
    }
    // Write-behind without a copy: this returns once the kernel holds the payload (the
    // caller may reuse `buf` then); the server's answer is awaited later. A copy per
    // request would be one more pass over every byte, competing for the memory
    // bandwidth the server on the same machine needs.
    await this.sendBehind(pos, end, buf.length, () => {
      const piece = this.requestPiece;
      const requests: Array<{ sent: Promise<void>; done: Promise<void> }> = [];
      for (let at = pos; at < end; at += piece) requests.push(this.conn.writeBehind(at, buf.subarray(at - pos, Math.min(end, at + piece) - pos)));
      return {
        sent: this.guard('write', () => settleAll(requests.map((r) => r.sent))),
        done: this.guard('write', () => settleAll(requests.map((r) => r.done))),
      };
    });
  }

  /**
   * Write-behind: a write, zeroing or trim goes out now and the caller goes on; overlapping
   * ones wait for each other (a server may reorder requests in flight), reads of the range
   * and flushes wait for them, and a failure surfaces at the next request (at the latest at
   * the flush every writer ends with).
   */
  private async sendBehind(start: number, end: number, bytes: number, send: () => { sent: Promise<void>; done: Promise<void> }): Promise<void> {
    await this.settle(start, end);
    while (this.behind.length >= MAX_WRITES_BEHIND || (this.behind.length > 0 && this.bytesBehind + bytes > MAX_BYTES_BEHIND)) {
      await Promise.race(this.behind.map((w) => w.done));
    }
    this.throwFailure();
    const { sent, done } = send();
    const entry = { start, end, done: Promise.resolve() };
    entry.done = done
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => {
        this.behind.splice(this.behind.indexOf(entry), 1);
        this.bytesBehind -= bytes;
      });
    this.behind.push(entry);
    this.bytesBehind += bytes;
    await sent;
  }

  /** Waits for the writes behind that overlap [start, end) (all when omitted); then reports a failed one. */
  private async settle(start = 0, end = Number.MAX_SAFE_INTEGER): Promise<void> {
    for (;;) {
      const overlapping = this.behind.filter((w) => w.start < end && start < w.end);
      if (overlapping.length === 0) break;
      await Promise.all(overlapping.map((w) => w.done));
    }
    this.throwFailure();
  }

  private isAligned(start: number, end: number): boolean {
    const { minBlock } = this.conn.info;
    return start % minBlock === 0 && (end % minBlock === 0 || end === this.size);
  }

  private throwFailure(): void {
    if (this.failure !== undefined) throw this.failure;
  }

  async writeZeroes(pos: number, length: number, opts: { mayUnmap?: boolean; fast?: boolean }): Promise<void> {
    this.checkWrite(pos, length);
    if (length === 0) return;
    await this.settle(pos, pos + length);
    this.statusCache = undefined;
    this.dirty = true;
    const flags = this.conn.info.flags;
    if (opts.fast && !(flags & NBD_FLAG_SEND_FAST_ZERO && flags & NBD_FLAG_SEND_WRITE_ZEROES)) {
      throw new QimgError('Could not zero: Operation not supported', { file: this.path });
    }
    if (!(flags & NBD_FLAG_SEND_WRITE_ZEROES)) return this.writeZeroBuffers(pos, length);
    const cmdFlags = (opts.mayUnmap ? 0 : NBD_CMD_FLAG_NO_HOLE) | (opts.fast ? NBD_CMD_FLAG_FAST_ZERO : 0);
    // a fast zeroing's answer decides what the caller does next: it waits for it
    if (!opts.fast && this.isAligned(pos, pos + length)) {
      return this.sendBehind(pos, pos + length, 0, () => ({
        sent: Promise.resolve(),
        done: this.guard('write zeroes', () => this.split(pos, length, alignDown(MAX_COMMAND_LENGTH, this.conn.info.minBlock), (at, n) => this.conn.writeZeroes(at, n, cmdFlags))),
      }));
    }
    await this.onAlignedBody(pos, length, 'write zeroes', async (at, n) => this.conn.writeZeroes(at, n, cmdFlags), (at, n) => this.writeZeroBuffers(at, n));
  }

  async discard(pos: number, length: number): Promise<void> {
    this.checkWrite(pos, length);
    // TRIM is advisory: without it (or at unaligned edges) nothing is done
    if (!(this.conn.info.flags & NBD_FLAG_SEND_TRIM) || length === 0) return;
    await this.settle(pos, pos + length);
    this.statusCache = undefined;
    this.dirty = true;
    await this.onAlignedBody(pos, length, 'discard', (at, n) => this.conn.trim(at, n), async () => undefined);
  }

  async truncate(): Promise<void> {
    throw new QimgError('Cannot change the size of an NBD export', { file: this.path });
  }

  async flush(): Promise<void> {
    await this.settle();
    if (!this.writable || !(this.conn.info.flags & NBD_FLAG_SEND_FLUSH)) return;
    this.dirty = false;
    await this.guard('flush', () => this.conn.flush());
  }

  async allocatedSize(): Promise<undefined> {
    return undefined;
  }

  /** Without a local file: all data (statusAt answers for the export). */
  runAt(pos: number, length: number): FileRun {
    const max = Math.max(0, Math.min(length, this.size - pos));
    return { data: max > 0, length: max, eof: pos + max >= this.size };
  }

  async statusAt(pos: number, length: number): Promise<HostRun> {
    const max = Math.max(0, Math.min(length, this.size - pos));
    if (this.conn.info.allocationContext === undefined || max === 0) return { length: max, data: true, zero: false };
    let hit = this.cachedStatus(pos);
    if (!hit) {
      await this.settle();
      const start = alignDown(pos, this.conn.info.minBlock);
      const askFor = Math.min(this.size - start, alignDown(MAX_COMMAND_LENGTH, this.conn.info.minBlock));
      const extents = await this.guard('get block status', () => this.conn.blockStatus(start, askFor));
      const ends: number[] = [];
      let at = start;
      for (const e of extents) ends.push((at += e.length));
      this.statusCache = { start, extents, ends };
      hit = this.cachedStatus(pos);
      if (!hit) throw new QimgError('Could not get block status: NBD protocol error: the reply does not cover the requested offset', { file: this.path });
    }
    return { length: Math.min(hit.end - pos, max), data: !(hit.flags & NBD_STATE_HOLE), zero: !!(hit.flags & NBD_STATE_ZERO) };
  }

  async close(): Promise<void> {
    try {
      await this.settle();
      if (this.dirty) await this.flush();
    } finally {
      await this.conn.close();
    }
  }

  private cachedStatus(pos: number): { end: number; flags: number } | undefined {
    const c = this.statusCache;
    if (!c || pos < c.start || c.ends.length === 0 || pos >= c.ends[c.ends.length - 1]) return undefined;
    let lo = 0;
    let hi = c.ends.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (c.ends[mid] <= pos) lo = mid + 1;
      else hi = mid;
    }
    return { end: c.ends[lo], flags: c.extents[lo].flags };
  }

  private checkWrite(pos: number, length: number): void {
    if (!this.writable) throw new QimgError('Could not write: the NBD export is opened read-only', { file: this.path });
    if (pos + length > this.size) throw new QimgError(`Could not write: the range ${pos}+${length} lies past the end of the NBD export (${this.size} bytes)`, { file: this.path });
  }

  private async readAligned(buf: Buffer, pos: number): Promise<void> {
    await this.split(pos, buf.length, this.requestPiece, (at, n) => this.conn.read(at, buf.subarray(at - pos, at - pos + n)));
  }

  /** Writes `buf` at an unaligned `pos` by whole server blocks. */
  private readModifyWrite(buf: Buffer, pos: number): Promise<void> {
    const run = async (): Promise<void> => {
      const { minBlock } = this.conn.info;
      const start = alignDown(pos, minBlock);
      const end = Math.min(alignUp(pos + buf.length, minBlock), this.size);
      const whole = Buffer.allocUnsafe(end - start);
      await this.readAligned(whole, start);
      buf.copy(whole, pos - start);
      await this.split(start, whole.length, this.conn.info.maxBlock, (at, n) => this.conn.write(at, whole.subarray(at - start, at - start + n)));
    };
    const next = this.rmwChain.then(run, run);
    this.rmwChain = next.catch(() => undefined);
    return next;
  }

  /** Runs `body` on the aligned middle of a range (in command-sized pieces), `edge` on its unaligned ends. */
  private async onAlignedBody(
    pos: number,
    length: number,
    verb: string,
    body: (at: number, n: number) => Promise<void>,
    edge: (at: number, n: number) => Promise<void>,
  ): Promise<void> {
    const { minBlock } = this.conn.info;
    const end = pos + length;
    const first = Math.min(alignUp(pos, minBlock), end);
    const last = end === this.size ? end : Math.max(first, alignDown(end, minBlock));
    if (first > pos) await edge(pos, first - pos);
    if (last > first) await this.guard(verb, () => this.split(first, last - first, alignDown(MAX_COMMAND_LENGTH, minBlock), body));
    if (end > last) await edge(last, end - last);
  }

  private async writeZeroBuffers(pos: number, length: number): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, this.conn.info.maxBlock));
    for (let at = pos; at < pos + length; at += zeros.length) await this.write(zeros.subarray(0, Math.min(zeros.length, pos + length - at)), at);
  }

  /** Issues `op` over [pos, pos + length) in pieces of at most `piece`, all in flight together. */
  private async split(pos: number, length: number, piece: number, op: (at: number, n: number) => Promise<void>): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let at = pos; at < pos + length; at += piece) parts.push(op(at, Math.min(piece, pos + length - at)));
    await settleAll(parts);
  }

  /** Runs a request; an NBD failure becomes one QimgError naming the export. */
  private async guard<T>(verb: string, run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (err) {
      if (err instanceof QimgError) throw err;
      const what = verb === 'read' || verb === 'write' ? `${verb} image` : verb;
      throw new QimgError(`Could not ${what}: ${messageOf(err)}`, { file: this.path, cause: err });
    }
  }
}

/** Waits for every promise; the first failure (by position) is thrown. */
async function settleAll(all: Array<Promise<void>>): Promise<void> {
  const results = await Promise.allSettled(all);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

function messageOf(err: unknown): string {
  return err instanceof NbdError || err instanceof Error ? err.message : String(err);
}

function alignDown(n: number, a: number): number {
  return n - (n % a);
}

function alignUp(n: number, a: number): number {
  return n % a === 0 ? n : n + a - (n % a);
}
