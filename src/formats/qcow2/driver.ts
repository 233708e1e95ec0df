/**
 * The qcow2 driver: opens an image (header, L1, refcount table, snapshot table,
 * external data file, backing file), answers block status from L1/L2 metadata and
 * reads guest data through L2 lookups, compressed clusters and the backing chain.
 */
import { Qcow2StreamWriter } from './stream-writer.js';
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus, type SnapshotInfo } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { resolveRelative, type OpenContext, fullBackingName } from '../../core/open.js';
import { existsSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { ImageFile } from '../../io/file.js';
import type { HostFile } from '../../io/host.js';
import { isRemoteName } from '../../io/remote.js';
import { openStorage } from '../../io/storage.js';
import * as C from './constants.js';
import { decompressCluster, DecompressError } from './compress.js';
import { lookupRun, l2OffsetFromL1, Sub, type Geometry, type Run } from './entries.js';
import { probeQcow2, readHeader, type Qcow2Header } from './header.js';
import { Refcounts } from './refcount.js';
import { ClusterWriter } from './cluster.js';
import { extentAt } from '../../core/block-status.js';
import type { Extent } from '../../core/block-image.js';
import { Mutex } from '../../core/mutex.js';
import { readSnapshotTable, type Qcow2Snapshot } from './snapshot.js';
import { TableCache } from './table-cache.js';
import { L1_WHOLE_MAX_BYTES, PagedL1, zeroEntriesFrom } from './l1-pages.js';
import type { CacheBudget } from '../../core/cache-budget.js';
import { writeSizeU64, writeU64 } from '../../core/units.js';
import { cloneHeader, serializeHeader } from './header-serialize.js';
import { readBitmapDirectory, bitmapInfoForQemu } from './bitmaps.js';
import { Qcow2BitmapSet } from './bitmap-store.js';
import { readLuksInfo } from './luks.js';
import type { Qcow2Encryption } from './encryption.js';
import { checkQcow2, FIX_ERRORS, FIX_LEAKS } from './check.js';
import { assertReferenceAllowed, untrustedMode } from '../../core/open-policy.js';
import { qcow2AmendOptions, qcow2CreateOptions } from './options.js';
import { createQcow2, describeQcow2Create, qcow2SpecFromOptions } from './create.js';

/** L2 cache budget: enough tables to map 256 GiB with 64 KiB clusters (QEMU's default max 32 MiB). */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

export class Qcow2Image implements BlockImage {
  readonly format = 'qcow2';
  readonly geometry: Geometry;
  private readonly l2Cache: TableCache;
  private compressedCache: { hostOffset: number; data: Buffer } | null = null;
  private metadataPrealloc: boolean | undefined;
  private refcounts_: Refcounts | null = null;
  /** the active L1 table, whole (every writable image, and small tables) ... */
  private l1_: Buffer | null;
  /** ... or read a page at a time (large tables of read-only images) */
  private readonly pagedL1: PagedL1 | null;
  /** null until needed: read-only layers of a chain never use their refcounts */
  private refcountTable_: Buffer | null;
  private readonly l1Dirty = new Set<number>();
  private readonly writer = new ClusterWriter(this);
  private readonly lock = new Mutex();
  /** set once the first modification prepared the header (dirty bit, autoclear bits) */
  private modified = false;
  /** the metadata was switched to a new generation; see adoptGeneration */
  private switched = false;
  /** a snapshot view sharing another image's files (closing it closes nothing) */
  private isView = false;
  /** skip fsync barriers (convert's target, like qemu-img's cache=unsafe) */
  unsafeCache = false;
  /** the data cipher of an encrypted image (null: plain, or opened for metadata only) */
  encryption: Qcow2Encryption | null = null;
  /** persistent dirty bitmaps, loaded by the first write or bitmap operation */
  private bitmapSet_: Qcow2BitmapSet | null = null;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly header: Qcow2Header,
    l1: Buffer | PagedL1,
    refcountTable: Buffer | null,
    public snapshots: Qcow2Snapshot[],
    readonly dataFile: HostFile | null,
    readonly backing: BlockImage | null,
    budget?: CacheBudget,
  ) {
    this.l1_ = l1 instanceof PagedL1 ? null : l1;
    this.pagedL1 = l1 instanceof PagedL1 ? l1 : null;
    this.refcountTable_ = refcountTable;
    const extendedL2 = (header.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n;
    const clusterSize = 2 ** header.clusterBits;
    const l2EntrySize = extendedL2 ? 16 : 8;
    this.geometry = {
      clusterBits: header.clusterBits,
      clusterSize,
      l2EntrySize,
      l2Entries: clusterSize / l2EntrySize,
      extendedL2,
      subclusterSize: extendedL2 ? clusterSize / 32 : clusterSize,
      version: header.version,
      hasDataFile: (header.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n,
    };
    const tables = Math.max(16, Math.floor(L2_CACHE_BYTES / clusterSize));
    this.l2Cache = new TableCache(
      tables,
      (off) => file.readBytes(off, clusterSize),
      // An L2 table may reach the disk only after the refcounts it relies on.
      async (off, buf) => {
        if (!this.lazyRefcounts) {
          await this.refcounts.flush();
          await this.sync();
        }
        await this.file.write(buf, off);
      },
      // Only read-only layers share the chain's budget: a writable image's dirty
      // tables leave its cache in QEMU's write order, not at the budget's whim.
      file.writable ? undefined : budget,
    );
  }

  /** The whole active L1 table (write paths; such images always hold it whole). */
  get l1(): Buffer {
    if (!this.l1_) throw new QimgError('internal error: the L1 table of a read-only image is paged', { file: this.filename });
    return this.l1_;
  }

  set l1(table: Buffer) {
    this.l1_ = table;
  }

  /** The refcount table, read on first use. */
  async loadRefcountTable(): Promise<Buffer> {
    this.refcountTable_ ??= await this.file.readBytes(this.header.refcountTableOffset, this.header.refcountTableClusters * this.geometry.clusterSize);
    return this.refcountTable_;
  }

  get virtualSize(): number {
    return this.header.size;
  }

  get statusSpan(): number {
    return this.geometry.clusterSize * this.geometry.l2Entries;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  /** Refcounts: writable images have the table from open; others call loadRefcountTable first. */
  get refcounts(): Refcounts {
    if (!this.refcountTable_) throw new QimgError('internal error: refcount table not loaded', { file: this.filename });
    this.refcounts_ ??= new Refcounts(
      this.file,
      this.refcountTable_,
      {
        tableOffset: this.header.refcountTableOffset,
        tableClusters: this.header.refcountTableClusters,
        clusterSize: this.geometry.clusterSize,
        refcountOrder: this.header.refcountOrder,
      },
      async (offset, clusters) => {
        const buf = Buffer.alloc(12);
        writeU64(buf, 0, offset);
        buf.writeUInt32BE(clusters, 8);
        await this.file.write(buf, 48);
        this.header.refcountTableOffset = offset;
        this.header.refcountTableClusters = clusters;
        await this.sync();
      },
      () => this.sync(),
    );
    return this.refcounts_;
  }

  get lazyRefcounts(): boolean {
    return (this.header.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  /** Where guest data lives: the external data file, or the image itself. */
  get dataTarget(): HostFile {
    return this.dataFile ?? this.file;
  }

  get dataFileRaw(): boolean {
    return (this.header.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  }

  /** Chain-resolved status at `offset` (used by zero writes to skip what reads zero). */
  extentAt(offset: number, length: number): Promise<Extent> {
    return extentAt(this, offset, length);
  }

  hasL2(l1Index: number): boolean {
    return l1Index < this.header.l1Size && l2OffsetFromL1(this.l1, l1Index, this.geometry, this.filename) !== 0;
  }

  /** The L2 table for `l1Index`, made writable: allocated, or copied when shared. */
  async l2ForWrite(l1Index: number): Promise<{ offset: number; table: Buffer }> {
    const g = this.geometry;
    if (l1Index >= this.header.l1Size) {
      throw new QimgError(`write beyond the L1 table (index ${l1Index})`, { file: this.filename });
    }
    const current = l2OffsetFromL1(this.l1, l1Index, g, this.filename);
    const copied = (this.l1.readUInt32BE(l1Index * 8) & 0x80000000) !== 0;
    if (current !== 0 && copied) return { offset: current, table: await this.l2Cache.get(current) };
    const offset = await this.refcounts.allocate(1);
    let table: Buffer;
    if (current === 0) {
      table = Buffer.alloc(g.clusterSize);
    } else {
      // Shared with a snapshot: this layer gets its own copy; the data clusters keep
      // their counts (now referenced by both tables).
      table = Buffer.from(await this.l2Cache.get(current));
      this.refcounts.free(current);
    }
    await this.l2Cache.add(offset, table);
    this.l1.writeUInt32BE((Math.floor(offset / 0x100000000) | 0x80000000) >>> 0, l1Index * 8);
    this.l1.writeUInt32BE(offset % 0x100000000, l1Index * 8 + 4);
    this.l1Dirty.add(l1Index);
    return { offset, table };
  }

  /** Unlinks an (emptied) L2 table from the L1 table and releases its cluster. */
  dropL2(l1Index: number, offset: number): void {
    this.l1.writeUInt32BE(0, l1Index * 8);
    this.l1.writeUInt32BE(0, l1Index * 8 + 4);
    this.l1Dirty.add(l1Index);
    this.l2Cache.drop(offset);
    this.refcounts.free(offset);
  }

  markL2Dirty(slot: { offset: number; table: Buffer }): void {
    this.l2Cache.markDirty(slot.offset, slot.table);
  }

  private assertWritable(offset: number, length: number): void {
    if (this.switched) throw new QimgError('image metadata was replaced; reopen the image to write', { file: this.filename });
    assertWritableRange(this, this.file.writable && !this.isView, offset, length);
  }

  /**
   * Before the first change: mark the image dirty when refcounts are lazy and clear
   * autoclear bits qimg does not know. (Persistent bitmaps are flagged in use by the
   * first guest write: trackWrite.)
   */
  private async beginModification(): Promise<void> {
    if (this.modified) return;
    this.modified = true;
    const h = this.header;
    let changed = false;
    const keepAutoclear = C.AUTOCLEAR_DATA_FILE_RAW | (h.bitmaps ? C.AUTOCLEAR_BITMAPS : 0n);
    if ((h.autoclearFeatures & ~keepAutoclear) !== 0n) {
      h.autoclearFeatures &= keepAutoclear;
      changed = true;
    }
    if (this.lazyRefcounts && !(h.incompatibleFeatures & C.INCOMPAT_DIRTY)) {
      h.incompatibleFeatures |= C.INCOMPAT_DIRTY;
      changed = true;
    }
    if (changed && h.version >= 3) {
      const buf = Buffer.alloc(24);
      buf.writeBigUInt64BE(h.incompatibleFeatures, 0);
      buf.writeBigUInt64BE(h.compatibleFeatures, 8);
      buf.writeBigUInt64BE(h.autoclearFeatures, 16);
      await this.file.write(buf, 72);
      await this.sync();
    }
  }

  /** The persistent bitmaps of this (writable) image, for changes; the image is then modified. */
  async bitmapsForUpdate(): Promise<Qcow2BitmapSet> {
    if (!this.file.writable || this.isView) throw new QimgError('image is opened read-only', { file: this.filename });
    await this.lock.run(() => this.beginModification());
    return (this.bitmapSet_ ??= new Qcow2BitmapSet(this));
  }

  /** A read-only look at the persistent bitmaps (merge sources, convert --bitmaps). */
  bitmapsForReading(): Qcow2BitmapSet {
    return (this.bitmapSet_ ??= new Qcow2BitmapSet(this));
  }

  /**
   * Opened for writing: as QEMU, the persistent bitmaps are flagged in use on disk
   * until they are stored on close, and the enabled ones are loaded to track writes.
   */
  async trackBitmapsFromOpen(): Promise<void> {
    if (!this.header.bitmaps || !this.file.writable) return;
    await (this.bitmapSet_ ??= new Qcow2BitmapSet(this)).beginTracking();
  }

  /**
   * Every guest write sets the bits of the enabled persistent bitmaps (a bitmap added
   * while open starts tracking with the first write).
   */
  private async trackWrite(offset: number, length: number): Promise<void> {
    if (!this.header.bitmaps && !this.bitmapSet_) return;
    const set = (this.bitmapSet_ ??= new Qcow2BitmapSet(this));
    await set.beginTracking();
    set.markDirty(offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (data.length === 0) return;
    await this.lock.run(async () => {
      await this.beginModification();
      await this.trackWrite(offset, data.length);
      this.compressedCache = null;
      await this.writer.write(offset, data);
    });
  }

  /** Writes guest data at host offset `host` (guest offset `guest`), encrypted when the image is. */
  async writeData(data: Buffer, host: number, guest: number): Promise<void> {
    const out = this.encryption ? this.encryption.encrypt(data, host, guest) : data;
    await this.dataTarget.write(out, host);
  }

  async writeZeroes(offset: number, length: number, opts: { mayUnmap?: boolean } = {}): Promise<void> {
    await this.zeroRange(offset, length, opts, true);
  }

  /** Zero writes; `track`: a guest write (resize's own zeroing is not, as in QEMU). */
  private async zeroRange(offset: number, length: number, opts: { mayUnmap?: boolean }, track: boolean): Promise<void> {
    this.assertWritable(offset, length);
    if (length === 0) return;
    await this.lock.run(async () => {
      await this.beginModification();
      if (track) await this.trackWrite(offset, length);
      this.compressedCache = null;
      await this.writer.writeZeroes(offset, length, !!opts.mayUnmap);
    });
  }

  async persistentBitmaps(): Promise<Array<{ name: string; granularity: number }>> {
    if (!this.header.bitmaps) return [];
    const entries = await readBitmapDirectory(this.file, this.header.bitmaps, this.geometry.clusterSize);
    return entries.map((e) => ({ name: e.name, granularity: e.granularity }));
  }

  /** Compression algorithm and unit for convert -c. */
  get compression(): { algorithm: 'deflate' | 'zstd'; clusterSize: number } {
    return { algorithm: this.header.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'deflate', clusterSize: this.geometry.clusterSize };
  }

  /** Zeroing writes zero flags in L2 entries (v3), not data (BlockImage.zeroesInMetadata). */
  get zeroesInMetadata(): boolean {
    return this.header.version >= 3 && !this.encryption;
  }

  /** A persistent bitmap's bits (BlockImage.dirtyBitmap); an in-use one is refused. */
  async dirtyBitmap(name: string): Promise<{ granularity: number; enabled: boolean; bits: Buffer }> {
    const set = this.bitmapsForReading();
    const found = await set.find(name);
    const { bits, granularityBits } = await set.sourceBits(name);
    return { granularity: 2 ** granularityBits, enabled: !!found?.enabled, bits };
  }

  /** Persistent bitmaps record this image's writes (BlockImage.tracksWrites). */
  get tracksWrites(): boolean {
    return this.file.writable && !!this.header.bitmaps;
  }

  /** The unit in which this image allocates: zero detection never splits one. */
  get allocationUnit(): number {
    return this.geometry.subclusterSize;
  }

  async writeCompressed(offset: number, compressed: Buffer): Promise<void> {
    this.assertWritable(offset, Math.min(this.geometry.clusterSize, this.virtualSize - offset));
    // compressed clusters are stored as they are: they would bypass the cipher (convert -n -c, rebase -c)
    if (this.header.cryptMethod !== C.CRYPT_NONE) throw new QimgError('Compression and encryption not supported at the same time', { file: this.filename });
    await this.lock.run(async () => {
      await this.beginModification();
      await this.trackWrite(offset, Math.min(this.geometry.clusterSize, this.virtualSize - offset));
      this.compressedCache = null;
      await this.writer.writeCompressed(offset, compressed);
    });
  }

  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
    if (length === 0) return;
    await this.lock.run(async () => {
      await this.beginModification();
      await this.trackWrite(offset, length);
      this.compressedCache = null;
      await this.writer.discard(offset, length);
    });
  }

  /** Allocates every cluster from `from` on (create's and resize's preallocation modes). */
  async preallocate(mode: 'metadata' | 'falloc' | 'full', from = 0): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    await this.lock.run(async () => {
      await this.beginModification();
      await this.writer.preallocate(mode, from);
    });
  }

  /**
   * Changes the virtual size. Growing makes room in the L1 table (written anew, then
   * the header switched) and makes the new area read as zeros even where a longer
   * backing file lies below; shrinking releases every cluster past the new end.
   */
  async resize(size: number, opts: { preallocation?: 'off' | 'metadata' | 'falloc' | 'full' } = {}): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    if (size % 512 !== 0) throw new QimgError('The new size must be a multiple of 512', { file: this.filename });
    const g = this.geometry;
    const old = this.virtualSize;
    const needed = Math.ceil(size / (g.clusterSize * g.l2Entries));
    // Persistent bitmaps follow the size (QEMU refuses while one is inconsistent).
    const bitmaps = this.header.bitmaps || this.bitmapSet_ ? (this.bitmapSet_ ??= new Qcow2BitmapSet(this)) : null;
    if (size < old) {
      // Whole clusters past the new end are released (full discard, as QEMU's truncate).
      await this.lock.run(async () => {
        await this.beginModification();
        await bitmaps?.prepareResize();
        await this.writer.unmapFrom(Math.ceil(size / g.clusterSize) * g.clusterSize);
        await this.flushMetadata(true);
        await this.setVirtualSize(size);
        bitmaps?.resized(size);
      });
      return;
    }
    if (size === old) return;
    if (needed * 8 > C.MAX_L1_BYTES) throw new QimgError('Failed to grow the L1 table: File too large', { file: this.filename });
    await this.lock.run(async () => {
      await this.beginModification();
      await bitmaps?.prepareResize();
      await this.growL1(needed);
      await this.setVirtualSize(size);
      bitmaps?.resized(size);
    });
    // The tail of the old last cluster and anything a longer backing file would show
    // (QEMU's truncate zeroes them below the block layer: no bitmap bits).
    const tailEnd = Math.min(size, Math.ceil(old / g.clusterSize) * g.clusterSize);
    if (tailEnd > old) await this.zeroRange(old, tailEnd - old, {}, false);
    // As qemu (BDRV_REQ_ZERO_WRITE on truncate): a backing file longer than the old size
    // makes the whole new area zero clusters, not only the part the backing file covers.
    if (this.backing && this.backing.virtualSize > old) await this.zeroRange(old, size - old, {}, false);
    if (opts.preallocation && opts.preallocation !== 'off') await this.preallocate(opts.preallocation, old);
    await this.flush();
  }

  /** Drops every cluster of the active L1 (commit's "make empty"), keeping snapshots intact. */
  async makeEmpty(): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    await this.lock.run(async () => {
      await this.beginModification();
      await this.writer.unmapFrom(0);
      await this.flushMetadata(true);
      // Give the space back: cut the file after the last cluster still in use.
      const cs = this.geometry.clusterSize;
      let last = Math.ceil(this.file.size / cs) - 1;
      while (last > 0 && (await this.refcounts.get(last)) === 0) last--;
      const end = Math.max((last + 1) * cs, this.header.l1TableOffset + this.header.l1Size * 8);
      // (an NBD export keeps its size)
      if (end < this.file.size && !this.file.remote) {
        await this.file.truncate(end);
        await this.sync();
      }
    });
  }

  /** Allocates zeroed clusters for a LUKS header area of `length` bytes (image creation). */
  async reserveCryptoArea(length: number): Promise<{ offset: number; length: number }> {
    return this.lock.run(async () => {
      await this.beginModification();
      const cs = this.geometry.clusterSize;
      const clusters = Math.ceil(length / cs);
      const offset = await this.refcounts.allocate(clusters);
      const zeros = Buffer.alloc(Math.min(clusters * cs, 1024 * 1024));
      for (let p = 0; p < clusters * cs; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, clusters * cs - p)), offset + p);
      return { offset, length };
    });
  }

  /** Switches the header to LUKS encryption with its header at `area` (image creation). */
  async enableLuks(area: { offset: number; length: number }): Promise<void> {
    await this.lock.run(async () => {
      await this.flushMetadata(true);
      const h = cloneHeader(this.header);
      h.cryptMethod = C.CRYPT_LUKS;
      h.crypto = { ...area };
      const head = Buffer.alloc(this.geometry.clusterSize);
      serializeHeader(h).copy(head);
      await this.file.write(head, 0);
      await this.sync();
      Object.assign(this.header, h);
    });
  }

  /** Rewrites cluster 0 with a new backing file name and format (rebase). */
  async setBacking(name: string | undefined, format: string | undefined): Promise<void> {
    await this.lock.run(async () => {
      await this.flushMetadata(true);
      const h = cloneHeader(this.header);
      h.backingFile = name;
      h.backingFormat = name === undefined ? undefined : format;
      const head = Buffer.alloc(this.geometry.clusterSize);
      serializeHeader(h).copy(head);
      await this.file.write(head, 0);
      await this.sync();
      Object.assign(this.header, h);
    });
  }

  /**
   * Replaces every zero cluster (active and snapshot L1 tables) by what v2 can express:
   * preallocated ones get zeros written, plain ones become unallocated, or zero-filled
   * clusters when a backing file would otherwise show through. For compat downgrades.
   */
  async expandZeroClusters(): Promise<void> {
    const g = this.geometry;
    if (g.extendedL2) throw new QimgError('cannot expand zero clusters of an image with extended L2 entries', { file: this.filename });
    await this.lock.run(async () => {
      await this.beginModification();
      const l1s = [this.l1];
      for (const s of this.snapshots) l1s.push(await this.file.readBytes(s.l1TableOffset, s.l1Size * 8));
      const seen = new Set<number>();
      const zeros = Buffer.alloc(g.clusterSize);
      for (const l1 of l1s) {
        for (let i = 0; i < l1.length / 8; i++) {
          const off = l2OffsetFromL1(l1, i, g, this.filename);
          if (off === 0 || seen.has(off)) continue;
          seen.add(off);
          const table = await this.l2Cache.get(off);
          let changed = false;
          for (let k = 0; k < g.l2Entries; k++) {
            const hi = table.readUInt32BE(k * 8);
            const lo = table.readUInt32BE(k * 8 + 4);
            if (hi & C.OFLAG_COMPRESSED_HI || !(lo & C.OFLAG_ZERO_LO)) continue;
            const host = (hi & C.OFFSET_MASK_HI) * 0x100000000 + ((lo & C.OFFSET_MASK_LO) >>> 0);
            if (host !== 0) {
              await this.file.write(zeros, host);
              table.writeUInt32BE((lo & ~C.OFLAG_ZERO_LO) >>> 0, k * 8 + 4);
            } else if (this.header.backingFile !== undefined) {
              const fresh = await this.refcounts.allocate(1);
              await this.file.write(zeros, fresh);
              table.writeUInt32BE((Math.floor(fresh / 0x100000000) | C.OFLAG_COPIED_HI) >>> 0, k * 8);
              table.writeUInt32BE(fresh % 0x100000000, k * 8 + 4);
            } else {
              table.writeUInt32BE(0, k * 8);
              table.writeUInt32BE(0, k * 8 + 4);
            }
            changed = true;
          }
          if (changed) this.l2Cache.markDirty(off, table);
        }
      }
      await this.flushMetadata(true);
    });
  }

  /**
   * A read-only view of an internal snapshot (convert -l): the snapshot's L1 table
   * and the virtual size it recorded, sharing this image's files and backing chain.
   * Closing the view leaves this image open.
   */
  async snapshot(spec: { id?: string; name?: string }): Promise<BlockImage> {
    const sn = this.snapshots.find((s) => (spec.id === undefined || s.id === spec.id) && (spec.name === undefined || s.name === spec.name));
    if (!sn) throw new QimgError("Failed to load snapshot: Can't find snapshot", { file: this.filename });
    const g = this.geometry;
    const needed = Math.ceil(sn.diskSize / (g.clusterSize * g.l2Entries));
    if (sn.l1Size < needed) throw new CorruptImageError(this.filename, `Snapshot L1 table of '${sn.name}' is too small`);
    if (sn.l1TableOffset % g.clusterSize !== 0) throw new CorruptImageError(this.filename, 'Snapshot L1 table offset invalid');
    const l1 = await this.file.readBytes(sn.l1TableOffset, sn.l1Size * 8);
    const header = { ...this.header, size: sn.diskSize, l1Size: sn.l1Size, l1TableOffset: sn.l1TableOffset };
    const view = new Qcow2Image(this.file, this.filename, header, l1, this.refcountTable_, this.snapshots, this.dataFile, this.backing);
    view.isView = true;
    view.encryption = this.encryption;
    return view;
  }

  // --- pieces for internal snapshots and resizing (snapshot-ops.ts, resize) ---

  /** L2 table offset of entry `index` of any L1 table (validated). */
  l2OffsetAt(l1: Buffer, index: number): number {
    return l2OffsetFromL1(l1, index, this.geometry, this.filename);
  }

  loadL2(offset: number): Promise<Buffer> {
    return this.l2Cache.get(offset);
  }

  /**
   * After an atomic metadata switch (metadata-switch.ts) the caches describe the old
   * generation: nothing more may be flushed from them, the image only gets closed.
   */
  adoptGeneration(): void {
    this.switched = true;
    this.l2Cache.clear();
    this.l1Dirty.clear();
  }

  /**
   * Stores the persistent bitmaps now (before a metadata switch, after which nothing
   * can be flushed from this generation's caches).
   */
  async storeBitmaps(): Promise<void> {
    if (this.bitmapSet_?.needsStore) await this.lock.run(() => this.bitmapSet_!.store());
  }

  /** Writes every change with the ordered flush (refcounts, L2, L1, then frees). */
  async flushAll(): Promise<void> {
    await this.beginModification();
    await this.flushMetadata(true);
  }

  private async writeHeaderBytes(offset: number, bytes: Buffer): Promise<void> {
    await this.file.write(bytes, offset);
    await this.sync();
  }

  /**
   * A bigger active L1 table: written to new clusters, then the header switched to it,
   * then the old one freed.
   */
  async growL1(entries: number): Promise<void> {
    if (entries <= this.header.l1Size) return;
    // qemu-img's words when a resize needs more than QCOW_MAX_L1_SIZE (EFBIG)
    if (entries * 8 > C.MAX_L1_BYTES) throw new QimgError('Failed to grow the L1 table: File too large', { file: this.filename });
    await this.flushMetadata(true);
    const cs = this.geometry.clusterSize;
    const next = Buffer.alloc(entries * 8);
    this.l1.copy(next);
    const offset = await this.refcounts.allocate(Math.ceil(next.length / cs));
    await this.refcounts.flush();
    await this.file.write(next, offset);
    await this.sync();
    const b = Buffer.alloc(12);
    b.writeUInt32BE(entries, 0);
    writeU64(b, 4, offset);
    await this.writeHeaderBytes(36, b);
    const old = { offset: this.header.l1TableOffset, size: this.header.l1Size };
    this.header.l1Size = entries;
    this.header.l1TableOffset = offset;
    this.l1 = next;
    if (old.size > 0) {
      const first = old.offset / cs;
      for (let c = first; c < first + Math.ceil((old.size * 8) / cs); c++) await this.refcounts.add(c, -1);
    }
    await this.refcounts.flush();
  }

  /** Writes the virtual size into the header. */
  async setVirtualSize(size: number): Promise<void> {
    const b = Buffer.alloc(8);
    writeSizeU64(b, 0, size);
    await this.writeHeaderBytes(24, b);
    this.header.size = size;
  }

  /** fdatasync of the image (and data file), unless the cache mode is unsafe. */
  async sync(): Promise<void> {
    if (this.unsafeCache || !this.file.writable) return;
    if (this.dataFile) await this.dataFile.flush();
    await this.file.flush();
  }

  /**
   * Ordered write-back: refcounts, then L2 tables, then L1 entries, each made durable
   * before the next; references dropped are released only after that.
   */
  private async flushMetadata(final: boolean): Promise<void> {
    if (!this.modified) return;
    if (this.dataFile) await this.sync();
    if (!this.lazyRefcounts || final) {
      await this.refcounts.flush();
      await this.sync();
    }
    await this.l2Cache.flush();
    if (this.l1Dirty.size > 0) {
      await this.sync();
      for (const i of [...this.l1Dirty].sort((a, b) => a - b)) {
        await this.file.write(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8);
      }
      this.l1Dirty.clear();
    }
    await this.sync();
    if (this.refcounts.hasPendingFrees) {
      await this.refcounts.applyFrees();
      if (!this.lazyRefcounts || final) {
        await this.refcounts.flush();
        await this.sync();
      }
    }
  }

  /** The run of this layer's mapping at guest offset `offset`. */
  async lookup(offset: number, maxLen: number): Promise<Run> {
    const g = this.geometry;
    const span = g.clusterSize * g.l2Entries;
    const l1Index = Math.floor(offset / span);
    if (l1Index >= this.header.l1Size) {
      return { type: Sub.UnallocatedPlain, length: Math.min(maxLen, span - (offset % span)) };
    }
    let table = this.l1_;
    let first = 0;
    if (!table) ({ page: table, first } = await this.pagedL1!.pageOf(l1Index));
    const l2Offset = l2OffsetFromL1(table, l1Index - first, g, this.filename, first);
    if (l2Offset === 0) {
      // No L2 table: this entry and every empty entry after it (within the table or
      // page at hand) are one unallocated run, so sparse terabytes take one step.
      let length = span - (offset % span);
      if (length < maxLen) {
        const more = zeroEntriesFrom(table, l1Index - first + 1, Math.ceil((maxLen - length) / span));
        length += more * span;
        // Past the end of the L1 table nothing is allocated either.
        if (l1Index + 1 + more >= this.header.l1Size) length = maxLen;
      }
      return { type: Sub.UnallocatedPlain, length: Math.min(maxLen, length) };
    }
    const l2 = await this.l2Cache.get(l2Offset);
    return lookupRun(l2, l2Offset, offset, maxLen, g, this.filename);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const run = await this.lookup(offset, Math.min(length, this.virtualSize - offset));
    const file = this.dataFile ? this.dataFile.path : this.filename;
    // QEMU reports no host offsets for encrypted images (their data is not readable raw).
    if (this.encryption || this.header.cryptMethod !== C.CRYPT_NONE) return encryptedStatus(run);
    switch (run.type) {
      case Sub.Normal: {
        const st: LayerStatus = { length: run.length, data: true, zero: false, hostOffset: run.hostOffset, file };
        if (await this.hasMetadataPreallocation()) this.refineFromHostFile(st);
        return st;
      }
      case Sub.Compressed:
        return { length: run.length, data: true, zero: false, compressed: true };
      case Sub.ZeroPlain:
        return { length: run.length, data: false, zero: true };
      case Sub.ZeroAlloc:
        return { length: run.length, data: false, zero: true, hostOffset: run.hostOffset, file };
      case Sub.UnallocatedAlloc:
        return { length: run.length, data: false, zero: false, hostOffset: run.hostOffset, file };
      default:
        return { length: run.length, data: false, zero: false };
    }
  }

  /**
   * For metadata-preallocated images QEMU asks the host file whether allocated data
   * clusters are holes (then they read as zeros) — reproduced here for equal maps.
   */
  private refineFromHostFile(st: LayerStatus): void {
    const host = this.dataFile ?? this.file;
    const run = host.runAt(st.hostOffset!, st.length);
    if (run.eof && (run.length === 0 || !run.data)) {
      st.zero = true;
      return;
    }
    st.length = run.length;
    st.zero = !run.data;
  }

  /** QEMU's heuristic: far more clusters referenced than the file has allocated on disk. */
  private async hasMetadataPreallocation(): Promise<boolean> {
    if (this.metadataPrealloc !== undefined) return this.metadataPrealloc;
    this.metadataPrealloc = false;
    try {
      const cs = this.geometry.clusterSize;
      const allocated = await this.file.allocatedSize();
      if (allocated === undefined) return false; // remote storage: no allocation to compare
      const realClusters = Math.floor(allocated / cs);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const nbClusters = Math.ceil(this.file.size / cs);
      await this.loadRefcountTable();
      this.metadataPrealloc = (await this.refcounts.countInUse(nbClusters, threshold + 1)) > threshold;
    } catch {
      // Refcounts are not needed for reading; a damaged table only loses this refinement.
    }
    if (!this.file.writable) {
      // A read-only layer needed them only for this answer: a deep chain should not keep
      // every layer's refcount table and blocks.
      this.refcounts_ = null;
      this.refcountTable_ = null;
    }
    return this.metadataPrealloc;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.virtualSize) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const run = await this.lookup(pos, buf.length - done);
      const part = buf.subarray(done, done + run.length);
      switch (run.type) {
        case Sub.Normal:
          if (this.encryption) await this.encryption.read(this.dataTarget, part, run.hostOffset!, pos);
          else await (this.dataFile ?? this.file).read(part, run.hostOffset!);
          break;
        case Sub.ZeroPlain:
        case Sub.ZeroAlloc:
          part.fill(0);
          break;
        case Sub.Compressed:
          await this.readCompressed(pos, part, run.compressed!);
          break;
        default:
          await this.readBacking(pos, part);
      }
      done += run.length;
    }
  }

  private async readBacking(offset: number, part: Buffer): Promise<void> {
    const b = this.backing;
    if (!b || offset >= b.virtualSize) {
      part.fill(0);
      return;
    }
    const n = Math.min(part.length, b.virtualSize - offset);
    await b.read(offset, part.subarray(0, n));
    if (n < part.length) part.fill(0, n);
  }

  private async readCompressed(offset: number, part: Buffer, c: { hostOffset: number; size: number }): Promise<void> {
    const cs = this.geometry.clusterSize;
    let cluster = this.compressedCache?.hostOffset === c.hostOffset ? this.compressedCache.data : null;
    if (!cluster) {
      if (c.hostOffset >= this.file.size) {
        throw new CorruptImageError(this.filename, `error while reading at byte ${offset}: compressed cluster at 0x${c.hostOffset.toString(16)} lies beyond the end of the file`);
      }
      const raw = await this.file.readBytes(c.hostOffset, c.size);
      try {
        cluster = decompressCluster(this.header.compressionType, raw, cs);
      } catch (err) {
        if (err instanceof DecompressError) {
          throw new CorruptImageError(this.filename, `error while reading at byte ${offset}: ${err.message}`);
        }
        throw err;
      }
      this.compressedCache = { hostOffset: c.hostOffset, data: cluster };
    }
    const inCluster = offset % cs;
    cluster.copy(part, 0, inCluster, inCluster + part.length);
  }

  async info(): Promise<ImageInfo> {
    const h = this.header;
    const info: ImageInfo = {
      filename: this.filename,
      format: 'qcow2',
      virtualSize: h.size,
      actualSize: await this.file.allocatedSize(),
      clusterSize: this.geometry.clusterSize,
      dirtyFlag: (h.incompatibleFeatures & C.INCOMPAT_DIRTY) !== 0n,
    };
    if (h.cryptMethod !== C.CRYPT_NONE) info.encrypted = true;
    if (h.backingFile !== undefined) {
      info.backingFilename = h.backingFile;
      info.fullBackingFilename = fullBackingName(h.backingFile, this.filename);
      if (h.backingFormat !== undefined) info.backingFilenameFormat = h.backingFormat;
    }
    if (this.snapshots.length > 0) info.snapshots = this.snapshots.map(snapshotInfo);
    info.formatSpecific = { type: 'qcow2', data: await this.formatSpecific() };
    return info;
  }

  private async formatSpecific(): Promise<Record<string, unknown>> {
    const h = this.header;
    const compressionType = h.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'zlib';
    const encrypt = h.cryptMethod === C.CRYPT_LUKS && h.crypto ? await readLuksInfo(this.file, h.crypto) : h.cryptMethod === C.CRYPT_AES ? { format: 'aes' } : undefined;
    if (h.version === 2) {
      const d: Record<string, unknown> = { compat: '0.10', 'compression-type': compressionType, 'refcount-bits': 1 << h.refcountOrder };
      if (encrypt) d.encrypt = encrypt;
      return d;
    }
    const d: Record<string, unknown> = {
      compat: '1.1',
      'compression-type': compressionType,
      'lazy-refcounts': (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n,
    };
    if (h.bitmaps) {
      const entries = await readBitmapDirectory(this.file, h.bitmaps, this.geometry.clusterSize);
      if (entries.length > 0) d.bitmaps = bitmapInfoForQemu(entries);
    }
    d['refcount-bits'] = 1 << h.refcountOrder;
    if (encrypt) d.encrypt = encrypt;
    if (h.dataFile !== undefined) d['data-file'] = h.dataFile;
    if (this.geometry.hasDataFile) d['data-file-raw'] = (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    d.corrupt = (h.incompatibleFeatures & C.INCOMPAT_CORRUPT) !== 0n;
    d['extended-l2'] = this.geometry.extendedL2;
    return d;
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(() => this.flushMetadata(false));
  }

  /** Flushes everything; a lazy-refcount image is marked clean again. */
  async close(): Promise<void> {
    if (this.isView) return;
    let failure: unknown;
    if (this.file.writable && (this.modified || this.bitmapSet_?.needsStore)) {
      try {
        await this.lock.run(async () => {
          if (!this.switched) await this.flushMetadata(true);
          // the bitmaps go last: they may claim writes that did not land, never miss one
          if (!this.switched && this.bitmapSet_?.needsStore) await this.bitmapSet_.store();
          const h = this.header;
          if (this.lazyRefcounts && h.incompatibleFeatures & C.INCOMPAT_DIRTY) {
            h.incompatibleFeatures &= ~C.INCOMPAT_DIRTY;
            const buf = Buffer.alloc(8);
            buf.writeBigUInt64BE(h.incompatibleFeatures, 0);
            await this.file.write(buf, 72);
          }
          await this.sync();
        });
      } catch (err) {
        failure = err;
      }
    }
    await this.file.close().catch(() => undefined);
    if (this.dataFile) await this.dataFile.close().catch(() => undefined);
    this.encryption?.destroy();
    if (this.backing) await this.backing.close();
    if (failure) throw failure;
  }
}

/** Block status of an encrypted image: the mapping without host offsets. */
function encryptedStatus(run: Run): LayerStatus {
  switch (run.type) {
    case Sub.Normal:
      return { length: run.length, data: true, zero: false };
    case Sub.Compressed:
      return { length: run.length, data: true, zero: false, compressed: true };
    case Sub.ZeroPlain:
    case Sub.ZeroAlloc:
      return { length: run.length, data: false, zero: true };
    default:
      return { length: run.length, data: false, zero: false };
  }
}

function snapshotInfo(s: Qcow2Snapshot): SnapshotInfo {
  const info: SnapshotInfo = {
    id: s.id,
    name: s.name,
    vmStateSize: s.vmStateSize,
    dateSec: s.dateSec,
    dateNsec: s.dateNsec,
    vmClockSec: Number(s.vmClockNsec / 1_000_000_000n),
    vmClockNsec: Number(s.vmClockNsec % 1_000_000_000n),
  };
  if (s.icount !== -1n) info.icount = Number(s.icount);
  return info;
}

async function openQcow2(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const name = file.path;
  const h = await readHeader(file);
  const clusterSize = 2 ** h.clusterBits;
  const metadataOnly = !!ctx.options.metadataOnly;

  if (ctx.options.writable && h.incompatibleFeatures & C.INCOMPAT_CORRUPT) {
    throw new QimgError('qcow2: Image is corrupt; cannot be opened read/write', { file: name });
  }
  if (ctx.options.writable && h.incompatibleFeatures & C.INCOMPAT_DIRTY && !ctx.repairedDirty) {
    // Lazy refcounts left stale by an unclean shutdown: rebuild them first, as QEMU does.
    const result = await checkQcow2(name, { fix: FIX_LEAKS | FIX_ERRORS, log: () => undefined }).catch((err: unknown) => {
      throw new QimgError(`Could not repair dirty image: ${err instanceof Error ? err.message : String(err)}`, { file: name });
    });
    if (result.corruptions > 0 || result.checkErrors > 0) throw new QimgError('Could not repair dirty image', { file: name });
    return openQcow2(file, { ...ctx, repairedDirty: true });
  }
  if (h.cryptMethod === C.CRYPT_LUKS && !h.crypto && !metadataOnly) {
    throw new CorruptImageError(name, 'Missing CRYPTO header for crypt method 2');
  }
  // encrypt.format (--image-opts) must name what the header says, even for `info`
  const wantFormat = ctx.options.imageOptions?.['encrypt.format'];
  if (wantFormat !== undefined) {
    if (h.cryptMethod === C.CRYPT_NONE) throw new QimgError(`No encryption in image header, but options specified format '${wantFormat}'`, { file: name });
    const actual = h.cryptMethod === C.CRYPT_LUKS ? 'luks' : 'aes';
    if (wantFormat !== actual) throw new QimgError(`Header reported '${actual}' encryption format but options specify '${wantFormat}'`, { file: name });
  }
  // The key is unlocked before anything else is read: a wrong passphrase fails fast.
  // (the crypto code loads only for encrypted images: it costs every other command's start-up)
  const encryption =
    !metadataOnly && h.cryptMethod !== C.CRYPT_NONE
      ? await (await import('./encryption.js')).openQcow2Encryption(file, h.cryptMethod, h.crypto, ctx.options)
      : null;

  // A read-only layer reads a large L1 table page by page and its refcount table only
  // if it ever needs it: a deep chain of huge images stays within the chain's budget.
  const l1 =
    file.writable || h.l1Size * 8 <= L1_WHOLE_MAX_BYTES
      ? await file.readBytes(h.l1TableOffset, h.l1Size * 8)
      : new PagedL1(file, h.l1TableOffset, h.l1Size, ctx.cacheBudget);
  const refcountTable = file.writable ? await file.readBytes(h.refcountTableOffset, h.refcountTableClusters * clusterSize) : null;
  const snapshots = await readSnapshotTable(file, h.snapshotsOffset, h.nbSnapshots, h.version, h.size);

  let dataFile: HostFile | null = null;
  let backing: BlockImage | null = null;
  try {
    if (!metadataOnly && h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) {
      if (h.dataFile === undefined) throw new QimgError("'data-file' is required for this image", { file: name });
      dataFile = await openDataFile(h.dataFile, name, !!ctx.options.writable);
    }
    if (!metadataOnly && !ctx.options.noBacking && h.backingFile !== undefined) {
      const format = h.backingFormat ?? (ctx.chain.length === 1 ? ctx.options.backingFormat : undefined);
      backing = await ctx.openBacking(h.backingFile, format, name);
    }
  } catch (err) {
    if (dataFile) await dataFile.close().catch(() => undefined);
    encryption?.destroy();
    throw err;
  }
  const img = new Qcow2Image(file, name, h, l1, refcountTable, snapshots, dataFile, backing, ctx.cacheBudget);
  img.encryption = encryption;
  if (file.writable && !metadataOnly) {
    try {
      await img.trackBitmapsFromOpen();
    } catch (err) {
      await img.close().catch(() => undefined);
      throw err;
    }
  }
  return img;
}

/**
 * The external data file: its name is taken relative to the image's directory; QEMU
 * 7.2 used the working directory, so that is tried second for images made that way.
 */
async function openDataFile(dataName: string, imagePath: string, writable: boolean): Promise<HostFile> {
  const candidates = [resolveRelative(dataName, imagePath)];
  // QEMU 7.2 also looked in the working directory; never for untrusted images.
  // (an image behind a URL has no working directory to fall back to)
  if (!isAbsolute(dataName) && !isRemoteName(imagePath) && !candidates.includes(dataName) && !untrustedMode()) candidates.push(dataName);
  assertReferenceAllowed(candidates[0], imagePath, 'data file');
  for (const path of candidates.slice(0, -1)) {
    if (existsSync(path)) return ImageFile.open(path, { writable });
  }
  return openStorage(candidates[candidates.length - 1], { writable });
}

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe: (head) => probeQcow2(head),
  createOptions: qcow2CreateOptions,
  amendOptions: qcow2AmendOptions,
  open: openQcow2,
  describeCreate: describeQcow2Create,
  create: (path, size, options, ctx) => createQcow2(path, qcow2SpecFromOptions(size, options, ctx?.secrets)),
  // check is the largest module of the driver: loaded only by `check`
  check: async (filename, opts) => (await import('./check.js')).checkQcow2(filename, opts),
  supportsCompression: true,
  supportsMeasure: true,
  createStream: (out, size, options) => new Qcow2StreamWriter(out, size, options),
};
