/**
 * An open QED image: lookups through L1/L2 tables, reads through the backing chain,
 * allocating writes at the end of the file. Crash-safe order: data clusters, then L2
 * tables, then L1 entries, each made durable before the next; images without a
 * backing file also carry QED_F_NEED_CHECK while metadata is in flight, as QEMU does.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { fullBackingName } from '../../core/open.js';
import { Mutex } from '../../core/mutex.js';
import type { HostFile } from '../../io/host.js';
import {
  isClusterOffsetValid,
  isImageSizeValid,
  isTableOffsetValid,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_F_NEED_CHECK,
  QED_COMPAT_FEATURE_MASK,
  QED_HEADER_BYTES,
  QED_ZERO_CLUSTER,
  serializeQedHeader,
  type QedBounds,
  type QedHeader,
} from './header.js';
import { L2Cache, setTableEntry, tableEntry } from './tables.js';

/** Budget for cached L2 tables. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;
/** Largest zero buffer written at once. */
const ZERO_CHUNK = 4 * 1024 * 1024;

type RunKind = 'unallocated' | 'zero' | 'data';
interface Run {
  kind: RunKind;
  length: number;
  /** host offset of the run's first byte (data runs) */
  host?: number;
  /** the L2 table does not exist */
  noL2?: boolean;
}

export class QedImage implements BlockImage {
  readonly format = 'qed';
  readonly tableBytes: number;
  readonly tableEntries: number;
  /** guest bytes one L2 table maps */
  readonly l2Span: number;
  private readonly cache: L2Cache;
  private readonly lock = new Mutex();
  private readonly l1Dirty = new Set<number>();
  /** next free byte at the end of the file (QEMU's s->file_size) */
  private fileEnd: number;
  /** skip fsync barriers (convert's target, as qemu-img's cache=unsafe) */
  unsafeCache = false;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly header: QedHeader,
    readonly backingName: string | undefined,
    readonly l1: Buffer,
    readonly backing: BlockImage | null,
  ) {
    const h = header;
    this.tableBytes = h.clusterSize * h.tableSize;
    this.tableEntries = this.tableBytes / 8;
    this.l2Span = this.tableEntries * h.clusterSize;
    this.fileEnd = Math.floor(file.size / h.clusterSize) * h.clusterSize;
    this.cache = new L2Cache(
      Math.max(4, Math.floor(L2_CACHE_BYTES / this.tableBytes)),
      (off) => file.readBytes(off, this.tableBytes),
      async (entries) => {
        await this.sync(); // the data they point at first
        for (const [off, t] of entries) await this.file.write(t, off);
      },
    );
  }

  get virtualSize(): number {
    return this.header.imageSize;
  }
  get readOnly(): boolean {
    return !this.file.writable;
  }
  get allocationUnit(): number {
    return this.header.clusterSize;
  }

  private get bounds(): QedBounds {
    const h = this.header;
    return { clusterSize: h.clusterSize, tableSize: h.tableSize, headerSize: h.headerSize, fileSize: this.fileEnd };
  }

  /** The L2 table offset for `l1Index` (0 when none), validated. */
  private l2OffsetAt(l1Index: number): number {
    const off = tableEntry(this.l1, l1Index);
    if (off === 0) return 0;
    if (off < 0 || !isTableOffsetValid(this.bounds, off)) {
      throw new CorruptImageError(this.filename, `Invalid L2 table offset 0x${this.l1.readBigUInt64LE(l1Index * 8).toString(16)} in L1 entry ${l1Index}`);
    }
    return off;
  }

  /** The run of same-kind clusters at `offset` (QEMU's qed_find_cluster), within one L2 table. */
  private async lookup(offset: number, maxLen: number): Promise<Run> {
    const cs = this.header.clusterSize;
    const l1Index = Math.floor(offset / this.l2Span);
    const len = Math.min(maxLen, (l1Index + 1) * this.l2Span - offset);
    const l2Offset = this.l2OffsetAt(l1Index);
    if (l2Offset === 0) return { kind: 'unallocated', length: len, noL2: true };
    const table = await this.cache.get(l2Offset);
    const first = Math.floor((offset % this.l2Span) / cs);
    const inCluster = offset % cs;
    const n = Math.ceil((inCluster + len) / cs);
    const e0 = tableEntry(table, first);
    let i = first + 1;
    if (e0 === 0 || e0 === QED_ZERO_CLUSTER) {
      while (i < first + n && tableEntry(table, i) === e0) i++;
      return { kind: e0 === 0 ? 'unallocated' : 'zero', length: Math.min(len, (i - first) * cs - inCluster) };
    }
    if (e0 < 0 || !isClusterOffsetValid(this.bounds, e0)) {
      throw new CorruptImageError(this.filename, `Invalid data cluster offset 0x${table.readBigUInt64LE(first * 8).toString(16)} for guest offset ${offset - inCluster}`);
    }
    let last = e0;
    while (i < first + n && tableEntry(table, i) === last + cs && isClusterOffsetValid(this.bounds, last + cs)) {
      last += cs;
      i++;
    }
    return { kind: 'data', length: Math.min(len, (i - first) * cs - inCluster), host: e0 + inCluster };
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const run = await this.lookup(offset, Math.min(length, this.virtualSize - offset));
    if (run.kind === 'data') return { length: run.length, data: true, zero: false, hostOffset: run.host, file: this.filename };
    if (run.kind === 'zero') return { length: run.length, data: false, zero: true };
    return { length: run.length, data: false, zero: false };
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.virtualSize) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    for (let done = 0; done < buf.length; ) {
      const run = await this.lookup(offset + done, buf.length - done);
      const part = buf.subarray(done, done + run.length);
      if (run.kind === 'data') await this.file.read(part, run.host!);
      else if (run.kind === 'zero') part.fill(0);
      else await this.readBacking(offset + done, part);
      done += run.length;
    }
  }

  private async readBacking(offset: number, part: Buffer): Promise<void> {
    const b = this.backing;
    const n = b ? Math.max(0, Math.min(part.length, b.virtualSize - offset)) : 0;
    if (n > 0) await b!.read(offset, part.subarray(0, n));
    part.fill(0, n);
  }

  private assertWritable(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (data.length === 0) return;
    await this.lock.run(async () => {
      for (let done = 0; done < data.length; ) {
        const pos = offset + done;
        const run = await this.lookup(pos, data.length - done);
        const piece = data.subarray(done, done + run.length);
        if (run.kind === 'data') await this.file.write(piece, run.host!);
        else await this.allocate(pos, run, piece);
        done += run.length;
      }
    });
  }

  /**
   * Writes `data` at guest `pos` into new clusters at the end of the file: the rest of
   * the first and last cluster comes from the backing file (unallocated) or is zero
   * (zero clusters). `data` null makes the run's clusters zero clusters instead.
   */
  private async allocate(pos: number, run: Run, data: Buffer | null): Promise<void> {
    const cs = this.header.clusterSize;
    const start = pos - (pos % cs);
    const end = Math.min(Math.ceil((pos + run.length) / cs) * cs, Math.ceil(this.virtualSize / cs) * cs);
    const n = (end - start) / cs;
    await this.beginAllocation();
    let host = QED_ZERO_CLUSTER;
    if (data) {
      host = this.fileEnd;
      this.fileEnd += n * cs;
      const buf = Buffer.alloc(end - start);
      if (run.kind === 'unallocated') {
        if (pos > start) await this.readBacking(start, buf.subarray(0, pos - start));
        const tail = pos + data.length;
        if (tail < end) await this.readBacking(tail, buf.subarray(tail - start));
      }
      data.copy(buf, pos - start);
      await this.file.write(buf, host);
    }
    const table = await this.l2ForWrite(Math.floor(pos / this.l2Span));
    const first = Math.floor((start % this.l2Span) / cs);
    for (let i = 0; i < n; i++) setTableEntry(table.table, first + i, data ? host + i * cs : QED_ZERO_CLUSTER);
    this.cache.markDirty(table.offset);
  }

  /** The L2 table for `l1Index`, allocated (after the data just placed) when missing. */
  private async l2ForWrite(l1Index: number): Promise<{ offset: number; table: Buffer }> {
    const existing = this.l2OffsetAt(l1Index);
    if (existing !== 0) return { offset: existing, table: await this.cache.get(existing) };
    const offset = this.fileEnd;
    this.fileEnd += this.tableBytes;
    const table = Buffer.alloc(this.tableBytes);
    // The file must cover the table before its L1 entry can be valid.
    await this.file.write(table, offset);
    await this.cache.add(offset, table);
    setTableEntry(this.l1, l1Index, offset);
    this.l1Dirty.add(l1Index);
    return { offset, table };
  }

  /** Without a backing file QEMU flags the image as needing a check while allocating. */
  private async beginAllocation(): Promise<void> {
    const h = this.header;
    if (this.backing || this.backingName !== undefined || h.features & QED_F_NEED_CHECK) return;
    h.features |= QED_F_NEED_CHECK;
    await this.writeHeaderFields();
    await this.sync();
  }

  /** Rewrites the 64 header bytes in place (the backing name after them stays). */
  private async writeHeaderFields(): Promise<void> {
    await this.file.write(serializeQedHeader(this.header), 0);
  }

  async writeZeroes(offset: number, length: number, _opts: { mayUnmap?: boolean } = {}): Promise<void> {
    this.assertWritable(offset, length);
    if (length === 0) return;
    const cs = this.header.clusterSize;
    const end = offset + length;
    // Whole clusters become zero clusters; partial ones get zeros written (as QEMU).
    const alignedStart = Math.ceil(offset / cs) * cs;
    const alignedEnd = end === this.virtualSize ? Math.max(alignedStart, Math.ceil(end / cs) * cs) : Math.floor(end / cs) * cs;
    if (alignedStart >= alignedEnd) return this.writeZeroData(offset, length);
    if (offset < alignedStart) await this.writeZeroData(offset, alignedStart - offset);
    await this.lock.run(async () => {
      const stop = Math.min(alignedEnd, this.virtualSize);
      for (let pos = alignedStart; pos < stop; ) {
        const run = await this.lookup(pos, stop - pos);
        if (run.kind === 'data') await this.fillZeros(run.host!, run.length);
        else if (run.kind === 'unallocated') await this.allocate(pos, run, null);
        pos += run.length;
      }
    });
    if (alignedEnd < end) await this.writeZeroData(alignedEnd, end - alignedEnd);
  }

  private async writeZeroData(offset: number, length: number): Promise<void> {
    for (let p = offset; p < offset + length; p += ZERO_CHUNK) {
      await this.write(p, Buffer.alloc(Math.min(ZERO_CHUNK, offset + length - p)));
    }
  }

  private async fillZeros(host: number, length: number): Promise<void> {
    for (let p = 0; p < length; p += ZERO_CHUNK) await this.file.write(Buffer.alloc(Math.min(ZERO_CHUNK, length - p)), host + p);
  }

  /** QEMU's QED has no discard: the data stays. */
  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
  }

  /** Growing only, as QEMU: the header gets the new size. */
  async resize(size: number, opts: { preallocation?: 'off' | 'metadata' | 'falloc' | 'full' } = {}): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    const mode = opts.preallocation ?? 'off';
    if (mode !== 'off') throw new QimgError(`Unsupported preallocation mode '${mode}'`, { file: this.filename });
    const h = this.header;
    if (!isImageSizeValid(BigInt(size), h.clusterSize, h.tableSize)) throw new QimgError('Invalid image size specified', { file: this.filename });
    if (size < h.imageSize) throw new QimgError('Shrinking images is currently not supported', { file: this.filename });
    await this.lock.run(async () => {
      await this.flushMetadata();
      const old = h.imageSize;
      h.imageSize = size;
      try {
        await this.writeHeaderFields();
        await this.sync();
      } catch (err) {
        h.imageSize = old;
        throw err;
      }
    });
  }

  /** Rewrites the header with a new backing file name (QEMU stores only "raw" as a format). */
  async setBacking(name: string | undefined, format: string | undefined): Promise<void> {
    await this.lock.run(async () => {
      const h = this.header;
      const fail = (why: string) => new QimgError(`Could not change the backing file to '${name ?? ''}': ${why}`, { file: this.filename });
      if (name !== undefined && h.compatFeatures & ~QED_COMPAT_FEATURE_MASK) throw fail('Operation not supported');
      const nameBytes = Buffer.from(name ?? '', 'utf8');
      if (QED_HEADER_BYTES + nameBytes.length > h.headerSize * h.clusterSize) throw fail('No space left on device');
      await this.flushMetadata();
      const next: QedHeader = { ...h, features: h.features & ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE) };
      if (name !== undefined) {
        next.features |= QED_F_BACKING_FILE;
        if (format === 'raw') next.features |= QED_F_BACKING_FORMAT_NO_PROBE;
      }
      next.backingFilenameOffset = QED_HEADER_BYTES;
      next.backingFilenameSize = nameBytes.length;
      await this.file.write(Buffer.concat([serializeQedHeader(next), nameBytes]), 0);
      await this.file.flush();
      Object.assign(h, next);
    });
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = {
      filename: this.filename,
      format: 'qed',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      clusterSize: this.header.clusterSize,
      // QEMU 7.2 reports QED images as clean even with QED_F_NEED_CHECK set
      dirtyFlag: false,
    };
    if (this.backingName !== undefined) {
      info.backingFilename = this.backingName;
      info.fullBackingFilename = fullBackingName(this.backingName, this.filename);
      if (this.header.features & QED_F_BACKING_FORMAT_NO_PROBE) info.backingFilenameFormat = 'raw';
    }
    return info;
  }

  async sync(): Promise<void> {
    if (!this.unsafeCache && this.file.writable) await this.file.flush();
  }

  /** Data, then L2 tables, then L1 entries. */
  private async flushMetadata(): Promise<void> {
    if (!this.file.writable) return;
    await this.cache.flush();
    if (this.l1Dirty.size > 0) {
      await this.sync();
      for (const i of [...this.l1Dirty].sort((a, b) => a - b)) {
        await this.file.write(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8);
      }
      this.l1Dirty.clear();
    }
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(async () => {
      await this.flushMetadata();
      await this.sync();
    });
  }

  /** Writes everything back; a clean close clears QED_F_NEED_CHECK. */
  async close(): Promise<void> {
    let failure: unknown;
    if (this.file.writable) {
      try {
        await this.lock.run(async () => {
          await this.flushMetadata();
          await this.file.flush();
          if (this.header.features & QED_F_NEED_CHECK) {
            this.header.features &= ~QED_F_NEED_CHECK;
            await this.writeHeaderFields();
            await this.file.flush();
          }
        });
      } catch (err) {
        failure = err;
      }
    }
    await this.file.close().catch(() => undefined);
    if (this.backing) await this.backing.close();
    if (failure) throw failure;
  }
}
