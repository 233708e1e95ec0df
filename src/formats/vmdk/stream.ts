/**
 * Writing compressed (stream-optimized) extents. Grains are deflated in zlib's thread
 * pool while later ones are queued (or arrive compressed from convert's workers), and
 * appended in submission order as grain markers (LBA, size, zlib data, padded to a
 * sector), gathered into large writes. Partial grains wait in memory until they are
 * complete or the image is flushed.
 *
 * Two layouts: a VMware stream (header gdOffset = GD_AT_END) gets its grain tables,
 * directory, footer and end-of-stream marker rewritten after the last grain when the
 * image is closed; an image whose tables sit before the grains (qemu's layout) has its
 * table entries updated in place after each grain is written, as qemu does.
 */
import { promisify } from 'node:util';
import { QimgError } from '../../core/errors.js';
import { FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, MARKER_FOOTER, MARKER_GRAIN_DIRECTORY, MARKER_GRAIN_TABLE, SECTOR } from './constants.js';
import { metadataMarker, serializeVmdk4Header, type Vmdk4Header } from './header.js';
import type { SparseExtentRef } from './open.js';
import { zlib } from '../../core/lazy-builtins.js';

/** zlib's deflate on the threadpool, promisified once zlib is first needed (per grain after that). */
let deflatePromised: ((buf: Buffer, opts: { chunkSize: number }) => Promise<Buffer>) | undefined;
const deflateAsync = (buf: Buffer, opts: { chunkSize: number }): Promise<Buffer> =>
  (deflatePromised ??= promisify(zlib().deflate) as (buf: Buffer, opts: { chunkSize: number }) => Promise<Buffer>)(buf, opts);

/** Bytes of grains waiting for compression or writing before write() waits. */
const MAX_QUEUED = 4 * 1024 * 1024;
/** Grain records gathered into one file write. */
const BATCH_BYTES = 2 * 1024 * 1024;

interface Partial {
  buf: Buffer;
  covered: number;
  /** byte coverage per sector-sized slot, so overlapping writes are not double counted */
  slots: Uint8Array;
}

export class StreamWriter {
  private readonly pending = new Map<number, Partial>();
  /** grains handed over but not yet on disk: their data, or their zlib stream */
  private readonly inflight = new Map<number, Buffer | { zlib: Buffer }>();
  private chain: Promise<void> = Promise.resolve();
  private failure: unknown = null;
  private queued = 0;
  private waiters: Array<() => void> = [];
  private appendPos = -1;
  private modified = false;
  private tailMode = false;
  /** grain records collected for one large write at `batchAt` */
  private batch: Buffer | null = null;
  private batchLen = 0;
  private batchAt = 0;
  private batchGrains: Array<[grain: number, sector: number]> = [];
  private batchBytes = 0;

  constructor(
    private readonly ext: SparseExtentRef,
    /** fills a grain's unwritten parts (backing file or zeros) */
    private readonly fill: (rel: number, dst: Buffer) => Promise<void>,
  ) {}

  private get grainSize(): number {
    return this.ext.sparse.grainSize;
  }

  /** Data of a grain written but not yet on disk. */
  held(grain: number): Buffer | undefined {
    const f = this.inflight.get(grain);
    if (f && !Buffer.isBuffer(f)) {
      // handed over compressed (convert): inflated only if someone reads it before it lands
      const plain = Buffer.alloc(this.grainSize);
      zlib().inflateSync(f.zlib, { maxOutputLength: this.grainSize }).copy(plain);
      return plain;
    }
    return f ?? this.pending.get(grain)?.buf;
  }

  /**
   * Where the first new grain goes. A stream with its directory at the end, or one
   * without any grain yet, is rewritten from its first free sector with a new tail on
   * close; a stream with tables before its grains (qemu's layout) is appended to and
   * its tables updated in place, as qemu does.
   */
  private async begin(): Promise<void> {
    if (this.appendPos >= 0) return;
    const sp = this.ext.sparse;
    await sp.pinAll();
    let last = 0;
    for (const t of sp.pinned.values()) {
      for (let j = 0; j < t.length; j += 4) {
        const e = t.readUInt32LE(j);
        if (e > last && !(e === 1 && sp.layout.zeroGrain)) last = e;
      }
    }
    this.tailMode = this.ext.gdAtEnd || last === 0;
    if (!this.tailMode) {
      sp.pinned.clear();
      this.appendPos = sp.nextSector * SECTOR;
      return;
    }
    const h = this.ext.header!;
    let end = Math.max(Number(h.grainOffset), Number(h.descOffset + h.descSize), 1) * SECTOR;
    if (last > 0) {
      const marker = await this.ext.file.readBytes(last * SECTOR, 12);
      end = Math.max(end, Math.ceil((last * SECTOR + 12 + marker.readUInt32LE(8)) / SECTOR) * SECTOR);
    }
    this.appendPos = end;
  }

  /** Whether `grain` may be written (a stream never rewrites a grain it holds). */
  private async fresh(grain: number): Promise<{ kind: string } | null> {
    if (this.inflight.has(grain)) throw allocatedError();
    const st = this.pending.has(grain) ? null : await this.ext.sparse.lookup(grain);
    if (st && (st.kind === 'compressed' || st.kind === 'data')) throw allocatedError();
    return st;
  }

  async write(rel: number, data: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    await this.begin();
    const g = this.grainSize;
    for (let pos = 0; pos < data.length; ) {
      const at = rel + pos;
      const grain = Math.floor(at / g);
      const inGrain = at - grain * g;
      const n = Math.min(data.length - pos, g - inGrain);
      const grainEnd = Math.min(g, this.ext.size - grain * g);
      const st = await this.fresh(grain);
      if (st && inGrain === 0 && n >= grainEnd) {
        const plain = Buffer.alloc(g);
        data.copy(plain, 0, pos, pos + n);
        this.submit(grain, plain);
      } else {
        let p = this.pending.get(grain);
        if (!p) {
          const buf = Buffer.alloc(g);
          // an unallocated grain shows the backing file where it is not written
          if (st?.kind !== 'zero') await this.fill(grain * g, buf.subarray(0, grainEnd));
          p = { buf, covered: 0, slots: new Uint8Array(Math.ceil(g / SECTOR)) };
          this.pending.set(grain, p);
        }
        data.copy(p.buf, inGrain, pos, pos + n);
        p.covered += markCovered(p.slots, inGrain, n);
        if (p.covered >= grainEnd) {
          this.pending.delete(grain);
          this.submit(grain, p.buf);
        }
      }
      pos += n;
    }
    await this.backpressure();
  }

  /**
   * A whole grain already compressed as a zlib stream (convert's worker threads did
   * it): appended as it is, in call order with the other grains.
   */
  async writeCompressed(rel: number, compressed: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    await this.begin();
    const grain = rel / this.grainSize;
    if (this.pending.has(grain)) {
      // part of it was written before: merge the plain data instead
      const plain = zlib().inflateSync(compressed, { maxOutputLength: this.grainSize });
      return this.write(rel, plain.subarray(0, Math.min(plain.length, this.ext.size - rel)));
    }
    await this.fresh(grain);
    this.modified = true;
    this.inflight.set(grain, { zlib: compressed });
    this.queued += compressed.length;
    this.chain = this.chain.then(() => this.append(grain, compressed, compressed.length));
    await this.backpressure();
  }

  private async backpressure(): Promise<void> {
    if (this.queued >= MAX_QUEUED) await new Promise<void>((resolve) => this.waiters.push(resolve));
    if (this.failure) throw this.failure;
  }

  private submit(grain: number, plain: Buffer): void {
    this.modified = true;
    this.inflight.set(grain, plain);
    this.queued += plain.length;
    // one output chunk for the whole grain (each chunk is a thread-pool round trip)
    const task = deflateAsync(plain, { chunkSize: plain.length + 1024 });
    task.catch(() => undefined);
    this.chain = this.chain.then(async () => {
      let compressed: Buffer;
      try {
        compressed = await task;
      } catch (err) {
        this.failure ??= err;
        this.release([grain], plain.length);
        return;
      }
      await this.append(grain, compressed, plain.length);
    });
  }

  /**
   * Adds a grain marker (LBA, size, data, padded to a sector) to the batch; a full
   * batch goes to the file in one request. Runs on the chain, in submission order.
   */
  private async append(grain: number, compressed: Buffer, accounted: number): Promise<void> {
    if (this.failure) {
      this.release([grain], accounted);
      return;
    }
    const recordLen = Math.ceil((12 + compressed.length) / SECTOR) * SECTOR;
    if (this.batch && this.batchLen + recordLen > this.batch.length) await this.writeBatch();
    if (!this.batch) {
      this.batch = Buffer.allocUnsafe(Math.max(BATCH_BYTES, recordLen));
      this.batchLen = 0;
      this.batchAt = this.appendPos;
    }
    const at = this.appendPos;
    if (at / SECTOR + recordLen / SECTOR > 2 ** 32) {
      this.failure ??= new QimgError('stream-optimized extent is full (grain offsets are limited to 2 TiB)');
      this.release([grain], accounted);
      return;
    }
    const b = this.batch;
    const o = this.batchLen;
    b.writeBigUInt64LE(BigInt((this.ext.start + grain * this.grainSize) / SECTOR), o);
    b.writeUInt32LE(compressed.length, o + 8);
    compressed.copy(b, o + 12);
    b.fill(0, o + 12 + compressed.length, o + recordLen);
    this.batchLen += recordLen;
    this.appendPos += recordLen;
    this.batchGrains.push([grain, at / SECTOR]);
    this.batchBytes += accounted;
    // Tables updated in place (qemu's layout) point at each grain as soon as it is
    // written, as qemu does; in memory (tail mode) nothing waits on a batch.
    if (this.batchLen >= BATCH_BYTES || !this.tailMode) await this.writeBatch();
  }

  /** Writes the batch, then points the grain tables at its grains (data before metadata). */
  private async writeBatch(): Promise<void> {
    const b = this.batch;
    if (!b || this.batchLen === 0) return;
    const grains = this.batchGrains;
    const bytes = this.batchBytes;
    const at = this.batchAt;
    const len = this.batchLen;
    this.batch = null;
    this.batchGrains = [];
    this.batchBytes = 0;
    try {
      await this.ext.file.write(b.subarray(0, len), at);
      await this.ext.sparse.setEntries(grains, !this.tailMode);
      this.ext.sparse.nextSector = Math.ceil((at + len) / SECTOR);
    } catch (err) {
      this.failure ??= err;
    } finally {
      this.release(
        grains.map(([g]) => g),
        bytes,
      );
    }
  }

  private release(grains: number[], bytes: number): void {
    for (const g of grains) this.inflight.delete(g);
    this.queued -= bytes;
    while (this.waiters.length > 0 && this.queued < MAX_QUEUED) this.waiters.shift()!();
  }

  /** Stores partial grains as they are and waits for every queued grain. */
  async flush(): Promise<void> {
    for (const [grain, p] of this.pending) {
      this.pending.delete(grain);
      this.submit(grain, p.buf);
    }
    this.chain = this.chain.then(() => this.writeBatch());
    await this.chain;
    if (this.failure) throw this.failure;
  }

  /** Writes everything, then (VMware layout) the tables, directory, footer and end marker. */
  async finish(): Promise<void> {
    await this.flush();
    if (!this.tailMode || !this.modified) return;
    await writeStreamTail(this.ext, this.appendPos);
    this.modified = false;
  }
}

function allocatedError(): QimgError {
  return new QimgError('Could not write to allocated cluster for streamOptimized');
}

function markCovered(slots: Uint8Array, start: number, len: number): number {
  let added = 0;
  for (let p = start; p < start + len; ) {
    const s = Math.floor(p / SECTOR);
    const inSlot = p - s * SECTOR;
    const n = Math.min(SECTOR - inSlot, start + len - p);
    // partial sectors are counted as covered only when a write ends the slot exactly
    if (slots[s] === 0 && inSlot === 0 && n === SECTOR) {
      slots[s] = 1;
      added += SECTOR;
    } else if (slots[s] === 0 && n < SECTOR) {
      slots[s] = 2;
    }
    p += n;
  }
  return added;
}

/** The stream header for both the start of the file and the footer. */
export function streamHeader(capacitySectors: number, gdOffset: bigint): Vmdk4Header {
  return {
    version: 3,
    flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
    capacity: BigInt(capacitySectors),
    granularity: 128n,
    descOffset: 1n,
    descSize: 20n,
    numGTEsPerGT: 512,
    rgdOffset: 0n,
    gdOffset,
    grainOffset: 128n,
    uncleanShutdown: 0,
    compressAlgorithm: 1,
  };
}

/**
 * The tail of a stream at `pos`: every grain table (each after a table marker; empty
 * ones too, so that writers updating tables in place find one for every directory
 * entry), the directory (after its marker), the footer (marker + header with the real
 * directory offset) and the end-of-stream marker.
 */
export function buildStreamTail(tables: Array<Buffer | null>, gtBytes: number, pos: number, header: Vmdk4Header): { tail: Buffer; gdSector: number } {
  const gtSectors = Math.ceil(gtBytes / SECTOR);
  const gdSectors = Math.ceil((tables.length * 4) / SECTOR);
  const gd = Buffer.alloc(gdSectors * SECTOR);
  const parts: Buffer[] = [];
  let at = pos;
  const push = (b: Buffer) => {
    parts.push(b);
    at += b.length;
  };
  tables.forEach((t, i) => {
    push(metadataMarker(gtSectors, MARKER_GRAIN_TABLE));
    gd.writeUInt32LE(at / SECTOR, i * 4);
    const padded = Buffer.alloc(gtSectors * SECTOR);
    t?.copy(padded);
    push(padded);
  });
  if ((at + gd.length) / SECTOR >= 2 ** 32) throw new QimgError('stream-optimized extent is full (table offsets are limited to 2 TiB)');
  push(metadataMarker(gdSectors, MARKER_GRAIN_DIRECTORY));
  const gdSector = at / SECTOR;
  push(gd);
  push(metadataMarker(1, MARKER_FOOTER));
  push(serializeVmdk4Header({ ...header, gdOffset: BigInt(gdSector) }));
  push(Buffer.alloc(SECTOR)); // end of stream
  return { tail: Buffer.concat(parts), gdSector };
}

/**
 * Writes the tail after the last grain, cuts the file there, and points the header
 * at the new directory (qemu reads the header's directory; VMware finds the same one
 * through the footer).
 */
export async function writeStreamTail(ext: SparseExtentRef, pos: number): Promise<void> {
  const sp = ext.sparse;
  const tables: Array<Buffer | null> = [];
  for (let i = 0; i < sp.layout.gdEntries; i++) tables.push(await sp.table(i));
  const header = ext.header ?? streamHeader(ext.size / SECTOR, 0n);
  const { tail, gdSector } = buildStreamTail(tables, sp.gtBytes, pos, header);
  await ext.file.write(tail, pos);
  await ext.file.truncate(pos + tail.length);
  await ext.file.flush();
  await ext.file.write(serializeVmdk4Header({ ...header, gdOffset: BigInt(gdSector) }), 0);
}

