/**
 * One NBD export over a BlockImage: its size and transmission flags, the bounds checks
 * every request passes, the metadata contexts it offers, and the operations the
 * transmission phase runs. Shared by every connection to the export: writes, zeroing,
 * trims and flushes go through one queue (in arrival order), except that writes to
 * disjoint ranges of an image that allows it (raw) run beside each other; reads run
 * beside them all.
 */
import type { BlockImage } from '../core/block-image.js';
import { extentAt } from '../core/block-status.js';
import { allocIoBuffer } from '../io/buffers.js';
import * as P from '../io/nbd/protocol.js';
import { isAllZero } from '../io/zero-detect.js';

/** A persistent dirty bitmap as the export reads it (live while the image is open). */
export interface ExportedBitmap {
  name: string;
  granularity: number;
  /** bit n covers bytes [n*granularity, (n+1)*granularity), bit n of byte n/8 (LSB first) */
  bits: Buffer;
}

export interface ExportOptions {
  name: string;
  description?: string;
  readOnly: boolean;
  /** more than one client may connect (CAN_MULTI_CONN is offered) */
  shared: boolean;
  allocationDepth: boolean;
  bitmap?: ExportedBitmap;
  /** qemu-nbd's --discard: 'ignore' (its default) answers TRIM without freeing anything
   * and keeps zeroed ranges allocated; 'unmap' frees them */
  discard?: 'ignore' | 'unmap';
  /** qemu-nbd's --detect-zeroes: writes of zeros become zeroing ('unmap': freeing, with discard=unmap) */
  detectZeroes?: 'off' | 'on' | 'unmap';
  /** qemu-nbd's --cache: 'writethrough' flushes after every change, 'unsafe' never flushes */
  flushPolicy?: 'writeback' | 'writethrough' | 'unsafe';
}

/** One content piece of a read reply. */
export type ReadChunk = { offset: number; data: Buffer } | { offset: number; hole: number };

/** A block status descriptor: `length` bytes from the previous one's end with `flags`. */
export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** A metadata context the export offers, with the id it has on every connection. */
export interface MetaContext {
  id: number;
  name: string;
}

/** At most this many descriptors per context in one reply (the spec allows fewer than asked). */
const MAX_DESCRIPTORS = 16384;

/** An operation failure carrying the NBD error to reply with. */
export class NbdRequestError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

/** Writes to disjoint ranges of one export run at once, at most this many. */
const CONCURRENT_WRITES = 4;

export class NbdExport {
  readonly size: number;
  readonly contexts: MetaContext[];
  private queue: Promise<unknown> = Promise.resolve();
  /** writes running beside each other (see concurrentWrite), since the last queued mutation */
  private readonly writing = new Set<{ start: number; end: number; done: Promise<void> }>();
  private running = 0;
  private readonly slotWaiters: Array<() => void> = [];

  constructor(
    readonly image: BlockImage,
    readonly opts: ExportOptions,
  ) {
    this.size = image.virtualSize;
    const names = [P.BASE_ALLOCATION];
    if (opts.allocationDepth) names.push(P.QEMU_ALLOCATION_DEPTH);
    if (opts.bitmap) names.push(P.QEMU_DIRTY_BITMAP_PREFIX + opts.bitmap.name);
    this.contexts = names.map((name, i) => ({ id: i + 1, name }));
  }

  get name(): string {
    return this.opts.name;
  }

  /** Transmission flags (structured: the client negotiated structured replies). */
  flags(structured: boolean): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE;
    if (this.opts.readOnly) f |= P.NBD_FLAG_READ_ONLY;
    else f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    if (structured) f |= P.NBD_FLAG_SEND_DF;
    // one image object serves every connection: a write is in it before it is answered
    // and a flush waits for every queued change, whichever connection sent it, so several
    // connections are coherent (qemu-nbd offers it likewise whenever -e is not 1)
    if (this.opts.shared) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    return f;
  }

  /** The contexts a query selects: exact names, or (listing only) a namespace prefix. */
  matchContexts(query: string, listing: boolean): MetaContext[] {
    if (listing) {
      if (query === '') return this.contexts;
      if (query === 'base:') return this.contexts.filter((c) => c.name.startsWith('base:'));
      if (query === 'qemu:') return this.contexts.filter((c) => c.name.startsWith('qemu:'));
      if (query === P.QEMU_DIRTY_BITMAP_PREFIX) return this.contexts.filter((c) => c.name.startsWith(P.QEMU_DIRTY_BITMAP_PREFIX));
    }
    return this.contexts.filter((c) => c.name === query);
  }

  /** EINVAL for a range that leaves the export (checked without overflow: numbers are exact below 2^53). */
  checkRange(offset: number | bigint, length: number | bigint, forWrite: boolean): void {
    const off = BigInt(offset);
    const len = BigInt(length);
    if (off + len > BigInt(this.size)) {
      // the spec asks ENOSPC for writes past the end, EINVAL for everything else
      throw new NbdRequestError(forWrite && off <= BigInt(this.size) ? P.NBD_ENOSPC : P.NBD_EINVAL, `request [${off}, +${len}) is outside the export (size ${this.size})`);
    }
  }

  private assertWritable(): void {
    if (this.opts.readOnly) throw new NbdRequestError(P.NBD_EPERM, 'the export is read-only');
  }

  /** Runs a mutation after every mutation queued before it (writes running beside each other included). */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const before = [this.queue, ...[...this.writing].map((w) => w.done)];
    const next = Promise.all(before).then(fn, fn);
    this.queue = next.catch(() => undefined);
    this.writing.clear();
    return next;
  }

  /**
   * A write to an image that takes writes to disjoint ranges at once (raw): it waits for
   * the mutations queued before it that are not such writes, for the writes before it
   * that overlap it, and for a free slot; several run at once, so the dispatch of one
   * overlaps another's system call.
   */
  private async concurrentWrite(offset: number, data: Buffer): Promise<void> {
    const barrier = this.queue;
    const overlapping = [...this.writing].filter((w) => w.start < offset + data.length && offset < w.end).map((w) => w.done);
    const entry = { start: offset, end: offset + data.length, done: Promise.resolve() };
    const run = async (): Promise<void> => {
      await barrier;
      await Promise.all(overlapping.map((p) => p.catch(() => undefined)));
      while (this.running >= CONCURRENT_WRITES) await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
      this.running++;
      try {
        await this.image.write(offset, data);
      } finally {
        this.running--;
        this.slotWaiters.shift()?.();
      }
    };
    const done = run();
    entry.done = done.catch(() => undefined);
    this.writing.add(entry);
    void entry.done.then(() => this.writing.delete(entry));
    return done;
  }

  /** Waits until every queued mutation finished (shutdown). */
  async drain(): Promise<void> {
    await Promise.all([this.queue, ...[...this.writing].map((w) => w.done)]);
  }

  /**
   * The content of [offset, offset+length): ranges the image knows read as zeros become
   * holes when `holes`; data ranges are read (adjacent ones as one chunk).
   */
  async read(offset: number, length: number, holes: boolean): Promise<ReadChunk[]> {
    if (!holes) {
      // every byte is overwritten by the read: no zero-fill (the allocation is on the hot path)
      const data = allocIoBuffer(length);
      if (length > 0) await this.image.read(offset, data);
      return [{ offset, data }];
    }
    const spans: Array<{ offset: number; length: number; zero: boolean }> = [];
    for (let pos = offset; pos < offset + length; ) {
      const e = await extentAt(this.image, pos, offset + length - pos);
      const zero = e.kind !== 'data' || !!e.knownZero;
      const last = spans[spans.length - 1];
      if (last && last.zero === zero) last.length += e.length;
      else spans.push({ offset: pos, length: e.length, zero });
      pos += e.length;
    }
    const out: ReadChunk[] = [];
    for (const s of spans) {
      if (s.zero) {
        out.push({ offset: s.offset, hole: s.length });
        continue;
      }
      const data = allocIoBuffer(s.length);
      await this.image.read(s.offset, data);
      out.push({ offset: s.offset, data });
    }
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable();
    const detect = this.opts.detectZeroes ?? 'off';
    if (detect !== 'off' && isAllZero(data)) {
      const mayUnmap = detect === 'unmap' && this.opts.discard === 'unmap';
      await this.serial(() => this.image.writeZeroes(offset, data.length, { mayUnmap }));
    } else if (this.image.concurrentWrites) await this.concurrentWrite(offset, data);
    else await this.serial(() => this.image.write(offset, data));
    await this.writtenThrough();
  }

  /** WRITE_ZEROES: `fast` (FAST_ZERO) fails with ENOTSUP unless the zeroing is cheap. */
  async writeZeroes(offset: number, length: number, noHole: boolean, fast: boolean): Promise<void> {
    this.assertWritable();
    // The client allows freeing unless NO_HOLE. As in qemu, a format frees clusters in its
    // own metadata whatever --discard says; freeing the file's blocks under a raw image
    // takes --discard=unmap (the protocol layer drops the request otherwise).
    const mayUnmap = !noHole && (this.image.format !== 'raw' || this.opts.discard === 'unmap');
    await this.serial(async () => {
      if (fast && !(await this.zeroingIsFast(offset, length))) {
        throw new NbdRequestError(P.NBD_ENOTSUP, 'zeroing this range would not be fast');
      }
      await this.image.writeZeroes(offset, length, { mayUnmap });
    });
    await this.writtenThrough();
  }

  /** --cache=writethrough|directsync: every change is flushed before it is answered. */
  private async writtenThrough(): Promise<void> {
    if (this.opts.flushPolicy === 'writethrough') await this.serial(() => this.image.flush());
  }

  /**
   * Zeroing is cheap where the range already reads as zeros from metadata, or where the
   * format records zeros in metadata (qcow2 v3 zero clusters).
   */
  private async zeroingIsFast(offset: number, length: number): Promise<boolean> {
    if (this.image.zeroesInMetadata) return true;
    for (let pos = offset; pos < offset + length; ) {
      const e = await extentAt(this.image, pos, offset + length - pos);
      if (e.kind === 'data' && !e.knownZero) return false;
      pos += e.length;
    }
    return true;
  }

  async trim(offset: number, length: number): Promise<void> {
    this.assertWritable();
    // --discard=ignore (qemu-nbd's default): a trim is a hint the server may drop
    if (this.opts.discard !== 'unmap') return;
    await this.serial(() => this.image.discard(offset, length));
    await this.writtenThrough();
  }

  /** FLUSH (and FUA); --cache=unsafe drops them, as qemu's cache.no-flush does. */
  flush(): Promise<void> {
    if (this.opts.flushPolicy === 'unsafe') return Promise.resolve();
    return this.serial(() => this.image.flush());
  }

  /** Descriptors of context `ctx` for [offset, offset+length): at most one with `one`. */
  async blockStatus(ctx: MetaContext, offset: number, length: number, one: boolean): Promise<StatusDescriptor[]> {
    const out: StatusDescriptor[] = [];
    const limit = one ? 1 : MAX_DESCRIPTORS;
    const push = (len: number, flags: number): boolean => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else {
        if (out.length >= limit) return false;
        out.push({ length: len, flags });
      }
      return true;
    };
    if (ctx.name.startsWith(P.QEMU_DIRTY_BITMAP_PREFIX)) {
      this.bitmapStatus(offset, length, push);
      return out;
    }
    const depthContext = ctx.name === P.QEMU_ALLOCATION_DEPTH;
    for (let pos = offset; pos < offset + length; ) {
      const e = await extentAt(this.image, pos, offset + length - pos);
      const flags = depthContext
        ? e.present
          ? e.depth + 1
          : 0
        : (e.data ? 0 : P.NBD_STATE_HOLE) | (e.zero || e.knownZero ? P.NBD_STATE_ZERO : 0);
      if (!push(e.length, flags)) break;
      pos += e.length;
    }
    return out;
  }

  /** Runs of equal bits of the exported bitmap over [offset, offset+length). */
  private bitmapStatus(offset: number, length: number, push: (len: number, flags: number) => boolean): void {
    const { granularity: g, bits } = this.opts.bitmap!;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      let n = Math.floor(pos / g);
      const dirty = (bits[n >> 3] >> (n & 7)) & 1;
      n++;
      // whole bytes of the same bit value are skipped at once
      const same = dirty ? 0xff : 0x00;
      while (n * g < end) {
        if ((n & 7) === 0 && bits[n >> 3] === same && (n + 8) * g <= end) {
          n += 8;
          continue;
        }
        if (((bits[n >> 3] >> (n & 7)) & 1) !== dirty) break;
        n++;
      }
      const next = Math.min(end, n * g);
      if (!push(next - pos, dirty ? P.NBD_STATE_DIRTY : 0)) return;
      pos = next;
    }
  }
}

/** The NBD error for a failed image operation. */
export function nbdErrorOf(err: unknown): number {
  if (err instanceof NbdRequestError) return err.code;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const cause = ((err as { cause?: NodeJS.ErrnoException } | undefined)?.cause)?.code;
  switch (code ?? cause) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return P.NBD_ENOSPC;
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return P.NBD_EPERM;
    case 'ENOMEM':
      return P.NBD_ENOMEM;
    default:
      return P.NBD_EIO;
  }
}
