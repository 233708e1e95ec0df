/**
 * Reference counts: the refcount table and refcount blocks of any entry width (1 to
 * 64 bits), read and written; the cluster allocator (free-cluster hint, self-describing
 * refcount blocks, growth of the refcount table); deferred frees.
 *
 * Ordering rules this module keeps (DESIGN.md "qcow2 writes and crash safety"):
 * - raised refcounts may reach the disk at any time (a crash then only leaks);
 * - lowered refcounts are held back (`free` queues them) until the caller has made
 *   the L2/L1 entries that dropped the reference durable, then `applyFrees` runs;
 * - a moved refcount table is written, then the header is switched, then the old
 *   table is freed.
 */
import { CorruptImageError, QimgError } from '../../core/errors.js';
import type { HostFile } from '../../io/host.js';
import { TableCache } from './table-cache.js';

// Refcount entries of every width the spec allows (refcount_order 0..6: 1 to 64 bits).
// One codec for the driver, create, amend, the metadata switch and check. Entries of
// 8 bits and more are big endian; narrower ones pack from the least significant bit
// (entry 0 of a byte in bit 0). Plain byte arithmetic, so any Uint8Array will do.

const TWO32 = 0x100000000;

/** Largest refcount an entry of `bits` bits holds (64-bit entries: as far as a number is exact). */
export function maxRefcount(bits: number): number {
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

function u32(block: Uint8Array, p: number): number {
  return ((block[p] << 24) | (block[p + 1] << 16) | (block[p + 2] << 8) | block[p + 3]) >>> 0;
}

function putU32(block: Uint8Array, p: number, v: number): void {
  block[p] = v >>> 24;
  block[p + 1] = (v >>> 16) & 0xff;
  block[p + 2] = (v >>> 8) & 0xff;
  block[p + 3] = v & 0xff;
}

/**
 * Entry `i` of a refcount block with `bits`-wide entries. A 64-bit entry beyond 2^53
 * (no real count is that high) saturates at Number.MAX_SAFE_INTEGER instead of losing
 * precision; `refcountEntryText` gives its exact value for messages.
 */
export function readRefcountEntry(block: Uint8Array, i: number, bits: number): number {
  switch (bits) {
    case 64: {
      const hi = u32(block, i * 8);
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * TWO32 + u32(block, i * 8 + 4);
    }
    case 32:
      return u32(block, i * 4);
    case 16:
      return (block[i * 2] << 8) | block[i * 2 + 1];
    case 8:
      return block[i];
    default: {
      const perByte = 8 / bits;
      const shift = (i % perByte) * bits;
      return (block[Math.floor(i / perByte)] >> shift) & ((1 << bits) - 1);
    }
  }
}

/** Entry `i` in decimal, exact for every width (qemu prints refcounts as uint64). */
export function refcountEntryText(block: Uint8Array, i: number, bits: number): string {
  if (bits !== 64) return String(readRefcountEntry(block, i, bits));
  return ((BigInt(u32(block, i * 8)) << 32n) | BigInt(u32(block, i * 8 + 4))).toString();
}

/** Sets entry `i` to `value` (0..maxRefcount(bits)); the neighbours of a sub-byte entry keep theirs. */
export function writeRefcountEntry(block: Uint8Array, i: number, bits: number, value: number): void {
  switch (bits) {
    case 64: {
      const hi = Math.floor(value / TWO32);
      putU32(block, i * 8, hi);
      putU32(block, i * 8 + 4, value - hi * TWO32);
      return;
    }
    case 32:
      putU32(block, i * 4, value);
      return;
    case 16:
      block[i * 2] = value >>> 8;
      block[i * 2 + 1] = value & 0xff;
      return;
    case 8:
      block[i] = value;
      return;
    default: {
      const perByte = 8 / bits;
      const pos = Math.floor(i / perByte);
      const shift = (i % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[pos] = (block[pos] & ~mask) | ((value << shift) & mask);
    }
  }
}

export interface RefcountLayout {
  tableOffset: number;
  tableClusters: number;
  clusterSize: number;
  refcountOrder: number;
}

export class Refcounts {
  readonly bits: number;
  /** refcount entries per refcount block */
  readonly blockEntries: number;
  readonly maxRefcount: number;
  readonly clusterSize: number;
  private table: Buffer;
  private tableOffset: number;
  private tableClusters: number;
  private readonly blocks: TableCache;
  private readonly dirtyTableEntries = new Set<number>();
  /** on-disk table to free once the header points at the moved one */
  private moved: { oldOffset: number; oldClusters: number } | null = null;
  private readonly pendingFrees = new Map<number, number>();
  private freeHint = 0;

  /**
   * @param onTableMoved writes the header's refcount_table_offset/clusters (durably)
   */
  constructor(
    private readonly file: HostFile,
    table: Buffer,
    layout: RefcountLayout,
    private readonly onTableMoved?: (offset: number, clusters: number) => Promise<void>,
    private readonly sync?: () => Promise<void>,
  ) {
    this.table = table;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.clusterSize = layout.clusterSize;
    this.bits = 1 << layout.refcountOrder;
    this.blockEntries = (layout.clusterSize * 8) / this.bits;
    this.maxRefcount = maxRefcount(this.bits);
    this.blocks = new TableCache(256, (off) => file.readBytes(off, this.clusterSize), (off, buf) => this.file.write(buf, off));
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Host offset of refcount block `index` (0 = none), validated. */
  blockOffset(index: number): number {
    if (index >= this.tableEntries) return 0;
    const hi = this.table.readUInt32BE(index * 8);
    const lo = this.table.readUInt32BE(index * 8 + 4);
    if (hi >= 0x200000) {
      throw new CorruptImageError(this.file.path, `Image is corrupt: refcount block offset beyond 2^53 (reftable index: 0x${index.toString(16)})`);
    }
    const off = hi * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
    if (off % this.clusterSize !== 0) {
      throw new CorruptImageError(
        this.file.path,
        `Image is corrupt: Refblock offset 0x${off.toString(16)} unaligned (reftable index: 0x${index.toString(16)})`,
      );
    }
    return off;
  }

  /** Refcount of host cluster `cluster`. */
  async get(cluster: number): Promise<number> {
    const off = this.blockOffset(Math.floor(cluster / this.blockEntries));
    if (off === 0) return 0;
    const block = await this.blocks.get(off);
    return readRefcountEntry(block, cluster % this.blockEntries, this.bits);
  }

  /**
   * How many of clusters [0, limit) have a refcount, counting block by block (no
   * per-cluster await); stops early once `stopAt` is reached.
   */
  async countInUse(limit: number, stopAt = Infinity): Promise<number> {
    let n = 0;
    for (let index = 0; index * this.blockEntries < limit; index++) {
      const off = this.blockOffset(index);
      if (off === 0) continue;
      const block = await this.blocks.get(off);
      const end = Math.min(this.blockEntries, limit - index * this.blockEntries);
      for (let i = 0; i < end; i++) {
        if (readRefcountEntry(block, i, this.bits) !== 0 && ++n >= stopAt) return n;
      }
    }
    return n;
  }

  /** Sets the refcount of `cluster`, creating its refcount block when needed. */
  async set(cluster: number, value: number): Promise<void> {
    if (value > this.maxRefcount || value < 0) {
      throw new QimgError(`refcount overflow: ${value} does not fit in ${this.bits}-bit refcounts`, { file: this.file.path });
    }
    const index = Math.floor(cluster / this.blockEntries);
    let off = this.blockOffset(index);
    if (off === 0) {
      if (value === 0) return;
      off = await this.createBlock(index, cluster);
    }
    const block = await this.blocks.get(off);
    writeRefcountEntry(block, cluster % this.blockEntries, this.bits, value);
    this.blocks.markDirty(off, block);
    if (value === 0 && cluster < this.freeHint) this.freeHint = cluster;
  }

  /** Sets the refcount of `n` clusters from `first`, whose blocks exist, block by block. */
  private async setRange(first: number, n: number, value: number): Promise<void> {
    for (let c = first; c < first + n; ) {
      const index = Math.floor(c / this.blockEntries);
      const off = this.blockOffset(index);
      const block = await this.blocks.get(off);
      const end = Math.min(first + n, (index + 1) * this.blockEntries);
      for (; c < end; c++) writeRefcountEntry(block, c % this.blockEntries, this.bits, value);
      this.blocks.markDirty(off, block);
    }
  }

  /** Adds `delta` (may be negative, applied at once: only for clusters nothing references yet). */
  async add(cluster: number, delta: number): Promise<void> {
    await this.set(cluster, (await this.get(cluster)) + delta);
  }

  /**
   * A new refcount block for table index `index`, placed inside the range it covers so
   * that it describes itself. `avoid` is a cluster the caller is about to use.
   */
  private async createBlock(index: number, avoid: number): Promise<number> {
    if (index >= this.tableEntries) await this.growTable(index + 1);
    const first = index * this.blockEntries;
    // No block yet means every cluster of the range is free; skip the one being set.
    return this.placeBlock(index, first === avoid ? first + 1 : first);
  }

  /**
   * Puts the refcount block for range `index` at free cluster `at`. When `at` lies in
   * another range, that range's (existing) block records the new block's refcount.
   */
  private async placeBlock(index: number, at: number): Promise<number> {
    const off = at * this.clusterSize;
    const block = Buffer.alloc(this.clusterSize);
    const home = Math.floor(at / this.blockEntries);
    if (home === index) writeRefcountEntry(block, at - index * this.blockEntries, this.bits, 1);
    await this.blocks.add(off, block);
    this.setTableEntry(index, off);
    if (home !== index) await this.set(at, 1);
    return off;
  }

  private setTableEntry(index: number, offset: number): void {
    this.table.writeUInt32BE(Math.floor(offset / 0x100000000), index * 8);
    this.table.writeUInt32BE(offset % 0x100000000, index * 8 + 4);
    this.dirtyTableEntries.add(index);
  }

  /**
   * Grows the in-memory table to at least `entries`; it is written to newly allocated
   * clusters at the next flush, and the header switched to it then.
   */
  private async growTable(entries: number): Promise<void> {
    const perCluster = this.clusterSize / 8;
    const clusters = Math.max(Math.ceil(entries / perCluster), Math.ceil((this.tableClusters * 3) / 2), this.tableClusters + 1);
    const bigger = Buffer.alloc(clusters * this.clusterSize);
    this.table.copy(bigger);
    this.table = bigger;
    if (!this.moved) this.moved = { oldOffset: this.tableOffset, oldClusters: this.tableClusters };
    else {
      // A table grown twice before a flush: the intermediate one was never on disk.
      await this.releaseNow(this.tableOffset, this.tableClusters);
    }
    this.tableClusters = clusters;
    this.tableOffset = await this.allocate(clusters);
  }

  /** Frees clusters that nothing on disk references (refcount lowered at once). */
  private async releaseNow(offset: number, clusters: number): Promise<void> {
    const first = offset / this.clusterSize;
    for (let c = first; c < first + clusters; c++) await this.set(c, Math.max(0, (await this.get(c)) - 1));
  }

  /** Index of the first of `n` consecutive free clusters at or after `from`. */
  private async findFree(n: number, from: number): Promise<number> {
    let start = from;
    let run = 0;
    let c = from;
    for (;;) {
      const index = Math.floor(c / this.blockEntries);
      const off = this.blockOffset(index);
      const end = (index + 1) * this.blockEntries;
      if (off === 0) {
        // A whole range without a block is free.
        if (run === 0) start = c;
        run += end - c;
        if (run >= n) return start;
        c = end;
        continue;
      }
      const block = await this.blocks.get(off);
      for (; c < end; c++) {
        if (readRefcountEntry(block, c % this.blockEntries, this.bits) === 0) {
          if (run === 0) start = c;
          if (++run >= n) return start;
        } else {
          run = 0;
        }
      }
    }
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the host offset. */
  async allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n, this.freeHint);
      // Every range the run touches needs a refcount block. A missing one is put at the
      // run's first cluster (outside what is then searched again), so long runs that
      // cross ranges still come out contiguous.
      const first = Math.floor(start / this.blockEntries);
      const last = Math.floor((start + n - 1) / this.blockEntries);
      let missing = -1;
      for (let index = first; index <= last; index++) {
        if (this.blockOffset(index) === 0) {
          missing = index;
          break;
        }
      }
      if (missing < 0) {
        await this.setRange(start, n, 1);
        this.freeHint = start + n;
        return start * this.clusterSize;
      }
      if (missing >= this.tableEntries) {
        await this.growTable(missing + 1);
        continue;
      }
      // `missing` is the run's own range when that lacks a block: then it describes itself.
      await this.placeBlock(missing, start);
    }
  }

  /** Queues one reference of each cluster in [offset, offset+length) for release. */
  free(offset: number, length = this.clusterSize): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.pendingFrees.set(c, (this.pendingFrees.get(c) ?? 0) + 1);
  }

  get hasPendingFrees(): boolean {
    return this.pendingFrees.size > 0;
  }

  /** Lowers the queued refcounts: call only once the dropped references are durable. */
  async applyFrees(): Promise<void> {
    const frees = [...this.pendingFrees];
    this.pendingFrees.clear();
    for (const [c, n] of frees) {
      const rc = await this.get(c);
      if (rc < n) {
        throw new CorruptImageError(this.file.path, `Image is corrupt: refcount of cluster ${c} would drop below zero`);
      }
      await this.set(c, rc - n);
    }
  }

  /** True when refcount blocks or table entries wait to be written. */
  get dirty(): boolean {
    return this.blocks.dirtyCount > 0 || this.dirtyTableEntries.size > 0 || this.moved !== null;
  }

  /**
   * Writes refcount blocks, then the table (moved tables: write, sync, switch the
   * header, then free the old one).
   */
  async flush(): Promise<void> {
    await this.blocks.flush();
    if (this.moved) {
      const { oldOffset, oldClusters } = this.moved;
      await this.file.write(this.table, this.tableOffset);
      await this.sync?.();
      await this.onTableMoved?.(this.tableOffset, this.tableClusters);
      this.moved = null;
      this.dirtyTableEntries.clear();
      await this.releaseNow(oldOffset, oldClusters);
      await this.blocks.flush();
      return;
    }
    if (this.dirtyTableEntries.size > 0) {
      for (const index of [...this.dirtyTableEntries].sort((a, b) => a - b)) {
        await this.file.write(this.table.subarray(index * 8, index * 8 + 8), this.tableOffset + index * 8);
      }
      this.dirtyTableEntries.clear();
    }
  }

  /** The refcount table as it currently stands (for check and amend). */
  get tableBuffer(): Buffer {
    return this.table;
  }

  get currentTableOffset(): number {
    return this.tableOffset;
  }

  get currentTableClusters(): number {
    return this.tableClusters;
  }
}
