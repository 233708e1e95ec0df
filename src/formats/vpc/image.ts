/**
 * An open VHD: fixed (the file is the disk, a footer at its end), dynamic (blocks
 * through the BAT, each behind its sector bitmap) and differencing (a dynamic disk
 * whose sectors with a clear bitmap bit come from the parent disk).
 *
 * Reads follow qemu 7.2 for fixed and dynamic disks: an allocated block is data as a
 * whole (qemu ignores the bitmap), an unallocated one reads as zeros. Only
 * differencing disks consult the bitmap (qemu 7.2 reads them as standalone disks).
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import { resolveRelative } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { zeroFileRange } from '../../io/allocate.js';
import { BAT_UNUSED, FOOTER_SIZE, SECTOR, VHD_FIXED, type DynHeader, type Footer } from './structs.js';

/** What open() established about the file (every value validated there). */
export interface VpcLayout {
  footer: Footer;
  virtualSize: number;
  /** footer type 2: guest offset = file offset (qemu passes I/O straight through) */
  fixedIo: boolean;
  /** the footer was found at the end of the file only (a fixed disk) */
  footerAtEnd: boolean;
  dynamic?: DynamicLayout;
}

export interface DynamicLayout {
  header: DynHeader;
  headerOffset: number;
  blockSize: number;
  bitmapSize: number;
  batOffset: number;
  bat: Uint32Array;
  /** where the next block goes (qemu's free_data_block_offset, moved past any metadata) */
  freeDataBlockOffset: number;
  /** differencing: the parent name to show and whether reads fall through to a parent */
  differencing: boolean;
  parentName?: string;
}

/** Bitmaps kept in memory at most (bytes). */
const BITMAP_CACHE_BYTES = 8 * 1024 * 1024;
/** Zero buffers written at most at once. */
const ZERO_CHUNK = 4 * 1024 * 1024;

export class VpcImage implements BlockImage {
  readonly format = 'vpc';
  readonly virtualSize: number;
  readonly allocationUnit: number;
  /** skip fsync barriers (convert's target, like qemu-img's cache=unsafe) */
  unsafeCache = false;
  private readonly bitmaps = new Map<number, Buffer>();
  private bitmapBytesCached = 0;
  private readonly lock = new Mutex();
  /** range of BAT entries changed but not yet written (unsafe cache only) */
  private dirtyBat?: [number, number];
  private footerDirty = false;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly layout: VpcLayout,
    readonly backing: BlockImage | null,
  ) {
    this.virtualSize = layout.virtualSize;
    this.allocationUnit = layout.dynamic && !layout.fixedIo ? layout.dynamic.blockSize : SECTOR;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  get uniqueId(): Buffer {
    return this.layout.footer.uniqueId;
  }

  private get dyn(): DynamicLayout {
    return this.layout.dynamic!;
  }

  private get passthrough(): boolean {
    return this.layout.fixedIo || !this.layout.dynamic;
  }

  /** Sectors whose clear bitmap bit means "ask the parent" (differencing disks only). */
  private get usesBitmaps(): boolean {
    return !this.passthrough && this.dyn.differencing;
  }

  // ------------------------------------------------------------------ reading

  async read(offset: number, buf: Buffer): Promise<void> {
    if (this.passthrough) {
      await this.file.read(buf, offset);
      return;
    }
    const { blockSize, bitmapSize, bat } = this.dyn;
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < buf.length; ) {
      const off = offset + pos;
      const index = Math.floor(off / blockSize);
      const within = off - index * blockSize;
      const n = Math.min(buf.length - pos, blockSize - within);
      const part = buf.subarray(pos, pos + n);
      const entry = index < bat.length ? bat[index] : BAT_UNUSED;
      if (entry === BAT_UNUSED) parts.push(this.readUnallocated(off, part));
      else if (!this.usesBitmaps) parts.push(this.file.read(part, entry * SECTOR + bitmapSize + within));
      else parts.push(this.readWithBitmap(index, entry, within, off, part));
      pos += n;
    }
    await Promise.all(parts);
  }

  /** A range this layer does not hold: the parent's data (differencing) or zeros. */
  private async readUnallocated(offset: number, part: Buffer): Promise<void> {
    const parent = this.usesBitmaps ? this.backing : null;
    const inParent = parent ? Math.max(0, Math.min(part.length, parent.virtualSize - offset)) : 0;
    if (inParent > 0) await parent!.read(offset, part.subarray(0, inParent));
    part.fill(0, inParent);
  }

  private async readWithBitmap(index: number, entry: number, within: number, offset: number, part: Buffer): Promise<void> {
    const bitmap = await this.bitmap(index, entry);
    const base = entry * SECTOR + this.dyn.bitmapSize;
    const jobs: Promise<void>[] = [];
    for (let pos = 0; pos < part.length; ) {
      const run = bitRun(bitmap, Math.floor((within + pos) / SECTOR), this.dyn.blockSize / SECTOR);
      const runEnd = Math.min(part.length, (run.first + run.count) * SECTOR - within);
      const piece = part.subarray(pos, runEnd);
      jobs.push(run.set ? this.file.read(piece, base + within + pos) : this.readUnallocated(offset + pos, piece));
      pos = runEnd;
    }
    await Promise.all(jobs);
  }

  /** The sector bitmap of an allocated block (cached; bounded in memory). */
  private async bitmap(index: number, entry: number): Promise<Buffer> {
    const hit = this.bitmaps.get(index);
    if (hit) return hit;
    const size = Math.max(this.dyn.bitmapSize, Math.ceil(this.dyn.blockSize / SECTOR / 8));
    const bitmap = Buffer.alloc(size);
    // qemu's formula gives blocks under 4 KiB no stored bitmap: all their sectors are present
    if (this.dyn.bitmapSize === 0) bitmap.fill(0xff);
    else await this.file.read(bitmap.subarray(0, this.dyn.bitmapSize), entry * SECTOR);
    this.remember(index, bitmap);
    return bitmap;
  }

  private remember(index: number, bitmap: Buffer): void {
    const old = this.bitmaps.get(index);
    if (old) this.bitmapBytesCached -= old.length;
    this.bitmaps.delete(index);
    while (this.bitmapBytesCached + bitmap.length > BITMAP_CACHE_BYTES && this.bitmaps.size > 0) {
      const [k, v] = this.bitmaps.entries().next().value as [number, Buffer];
      this.bitmaps.delete(k);
      this.bitmapBytesCached -= v.length;
    }
    this.bitmaps.set(index, bitmap);
    this.bitmapBytesCached += bitmap.length;
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const max = Math.min(length, this.virtualSize - offset);
    if (this.passthrough) {
      // qemu answers "raw, ask the file": data, zero where the file has holes
      const run = this.file.runAt(offset, max);
      if (run.length === 0) return { length: max, data: true, zero: true, hostOffset: offset, file: this.filename };
      return { length: run.length, data: true, zero: !run.data, hostOffset: offset, file: this.filename };
    }
    const { blockSize, bitmapSize, bat } = this.dyn;
    const index = Math.floor(offset / blockSize);
    const within = offset - index * blockSize;
    const entry = index < bat.length ? bat[index] : BAT_UNUSED;
    if (entry === BAT_UNUSED) {
      let n = blockSize - within;
      for (let i = index + 1; n < max && (i >= bat.length || bat[i] === BAT_UNUSED); i++) n += blockSize;
      // qemu: an unallocated block of a dynamic disk reads as zeros (present)
      return { length: Math.min(n, max), data: false, zero: !this.usesBitmaps };
    }
    const hostOffset = entry * SECTOR + bitmapSize + within;
    let n = Math.min(max, blockSize - within);
    if (this.usesBitmaps) {
      const bitmap = await this.bitmap(index, entry);
      const run = bitRun(bitmap, Math.floor(within / SECTOR), blockSize / SECTOR);
      n = Math.min(n, (run.first + run.count) * SECTOR - within);
      if (!run.set) return { length: n, data: false, zero: false };
    }
    return { length: n, data: true, zero: false, hostOffset, file: this.filename };
  }

  // ------------------------------------------------------------------ writing

  private checkWrite(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkWrite(offset, data.length);
    if (data.length === 0) return;
    if (this.passthrough) {
      if (this.layout.footerAtEnd && offset + data.length > this.file.size - FOOTER_SIZE) {
        throw new QimgError('write would overwrite the VHD footer (the virtual size exceeds the file)', { file: this.filename });
      }
      await this.file.write(data, offset);
      return;
    }
    if (offset % SECTOR !== 0 || data.length % SECTOR !== 0) {
      // bitmaps have sector granularity: merge a partial sector with what it reads now
      const start = Math.floor(offset / SECTOR) * SECTOR;
      const end = Math.ceil((offset + data.length) / SECTOR) * SECTOR;
      const whole = Buffer.alloc(end - start);
      await this.read(start, whole);
      data.copy(whole, offset - start);
      return this.write(start, whole);
    }
    await this.lock.run(async () => {
      const { blockSize } = this.dyn;
      for (let pos = 0; pos < data.length; ) {
        const off = offset + pos;
        const index = Math.floor(off / blockSize);
        const within = off - index * blockSize;
        const n = Math.min(data.length - pos, blockSize - within);
        await this.writeInBlock(index, within, data.subarray(pos, pos + n));
        pos += n;
      }
    });
  }

  private async writeInBlock(index: number, within: number, data: Buffer): Promise<void> {
    const { bat, bitmapSize } = this.dyn;
    const entry = bat[index];
    if (entry === BAT_UNUSED) return this.allocateBlock(index, within, data);
    // data first, then the bitmap bits that make it visible
    await this.file.write(data, entry * SECTOR + bitmapSize + within);
    if (bitmapSize === 0) return;
    const bitmap = await this.bitmap(index, entry);
    if (setBits(bitmap, within / SECTOR, data.length / SECTOR)) {
      await this.barrier();
      await this.file.write(bitmap.subarray(0, bitmapSize), entry * SECTOR);
    }
  }

  /**
   * A new block at the end of the file. Crash-safe order: the footer moves behind
   * the new block first (the file ends with a footer at every instant), then the
   * data, then the block's bitmap over the old footer, and only then the BAT entry
   * that makes the block part of the disk. A crash before the BAT write leaves an
   * unused area, never a block pointing at unwritten data.
   */
  private async allocateBlock(index: number, within: number, data: Buffer): Promise<void> {
    const d = this.dyn;
    const start = d.freeDataBlockOffset;
    const dataStart = start + d.bitmapSize;
    const end = dataStart + d.blockSize;
    if (end / SECTOR > 0xffffffff) throw new QimgError('the image file is full (BAT offsets are 32-bit sector numbers)', { file: this.filename });
    const oldSize = this.file.size;
    const deferred = this.unsafeCache;
    // convert's target (qemu's cache=unsafe) moves the footer once, at flush
    if (!deferred && end > oldSize - FOOTER_SIZE) await this.file.write(this.layout.footer.raw, end);
    // bytes already in the file where the new block's data goes must read as zeros
    if (oldSize > dataStart) {
      await this.zeroHost(dataStart, within);
      await this.zeroHost(dataStart + within + data.length, d.blockSize - within - data.length, oldSize);
    }
    const bitmap = Buffer.alloc(Math.max(d.bitmapSize, Math.ceil(d.blockSize / SECTOR / 8)));
    // a new block of a dynamic disk is all valid (zeros where not written); a
    // differencing disk marks only what was written, the rest stays the parent's
    if (this.usesBitmaps) setBits(bitmap, within / SECTOR, data.length / SECTOR);
    else bitmap.fill(0xff);
    if (deferred && within === 0 && d.bitmapSize > 0) {
      // one request for bitmap and data: order within it does not matter without barriers
      await this.file.write(Buffer.concat([bitmap.subarray(0, d.bitmapSize), data]), start);
    } else {
      await this.file.write(data, dataStart + within);
      if (d.bitmapSize > 0) await this.file.write(bitmap.subarray(0, d.bitmapSize), start);
    }
    await this.barrier();
    d.bat[index] = start / SECTOR;
    d.freeDataBlockOffset = end;
    this.remember(index, bitmap);
    if (deferred) {
      this.dirtyBat = [Math.min(this.dirtyBat?.[0] ?? index, index), Math.max(this.dirtyBat?.[1] ?? index, index)];
      this.footerDirty = true;
      return;
    }
    const entry = Buffer.alloc(4);
    entry.writeUInt32BE(start / SECTOR);
    await this.file.write(entry, d.batOffset + 4 * index);
    await this.barrier();
  }

  /** BAT entries and the footer that unsafe-cache writes left for the flush. */
  private async writeDeferred(): Promise<void> {
    const d = this.layout.dynamic;
    if (!d) return;
    if (this.dirtyBat) {
      const [a, b] = this.dirtyBat;
      const buf = Buffer.alloc((b - a + 1) * 4);
      for (let i = a; i <= b; i++) buf.writeUInt32BE(d.bat[i], (i - a) * 4);
      await this.file.write(buf, d.batOffset + 4 * a);
      this.dirtyBat = undefined;
    }
    if (this.footerDirty) {
      if (d.freeDataBlockOffset > this.file.size - FOOTER_SIZE) await this.file.write(this.layout.footer.raw, d.freeDataBlockOffset);
      this.footerDirty = false;
    }
  }

  /** Writes zeros over [pos, pos+length) of the file, only below `limit` (the old end). */
  private async zeroHost(pos: number, length: number, limit = Infinity): Promise<void> {
    const end = Math.min(pos + length, limit);
    if (end <= pos) return;
    if (await zeroFileRange(this.file, pos, end - pos, false)) return;
    const zeros = Buffer.alloc(Math.min(end - pos, ZERO_CHUNK));
    for (let p = pos; p < end; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, end - p)), p);
  }

  private async barrier(): Promise<void> {
    if (!this.unsafeCache) await this.file.flush();
  }

  async writeZeroes(offset: number, length: number, _opts: { mayUnmap?: boolean } = {}): Promise<void> {
    this.checkWrite(offset, length);
    if (this.passthrough) {
      const footerAt = this.layout.footerAtEnd ? this.file.size - FOOTER_SIZE : Infinity;
      if (offset + length <= footerAt && (await zeroFileRange(this.file, offset, length, false))) return;
      return this.writeZeroBuffers(offset, length);
    }
    // a dynamic disk's unallocated blocks already read as zeros; only allocated
    // blocks (or any block of a differencing disk) need zeros written
    const { blockSize, bat } = this.dyn;
    for (let pos = offset; pos < offset + length; ) {
      const index = Math.floor(pos / blockSize);
      const n = Math.min(offset + length - pos, (index + 1) * blockSize - pos);
      if (this.usesBitmaps || bat[index] !== BAT_UNUSED) await this.writeZeroBuffers(pos, n);
      pos += n;
    }
  }

  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, ZERO_CHUNK));
    for (let p = offset; p < offset + length; p += zeros.length) await this.write(p, zeros.subarray(0, Math.min(zeros.length, offset + length - p)));
  }

  async discard(offset: number, length: number): Promise<void> {
    // VHD cannot free a block (qemu's vpc driver has no discard either): advisory only
    this.checkWrite(offset, length);
  }

  // ------------------------------------------------------------------ the rest

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = {
      filename: this.filename,
      format: 'vpc',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      dirtyFlag: false,
    };
    if (this.layout.dynamic && this.layout.footer.diskType !== VHD_FIXED) info.clusterSize = this.layout.dynamic.blockSize;
    const parent = this.layout.dynamic?.differencing ? this.layout.dynamic.parentName : undefined;
    if (parent !== undefined) {
      info.backingFilename = parent;
      info.fullBackingFilename = resolveRelative(parent, this.filename);
      info.backingFilenameFormat = 'vpc';
    }
    return info;
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(() => this.writeDeferred());
    await this.file.flush();
  }

  async close(): Promise<void> {
    try {
      if (this.file.writable) await this.lock.run(() => this.writeDeferred());
    } finally {
      await this.closeFiles();
    }
  }

  private async closeFiles(): Promise<void> {
    try {
      if (this.backing) await this.backing.close();
    } finally {
      await this.file.close();
    }
  }
}

/** The run of equal bits from `first` (at most up to `limit` sectors): VHD bitmaps are MSB first. */
export function bitRun(bitmap: Buffer, first: number, limit: number): { set: boolean; first: number; count: number } {
  const bit = (i: number) => (bitmap[i >> 3] >> (7 - (i & 7))) & 1;
  const set = bit(first) === 1;
  let i = first + 1;
  while (i < limit) {
    // whole bytes at once where possible
    if ((i & 7) === 0 && i + 8 <= limit && bitmap[i >> 3] === (set ? 0xff : 0)) {
      i += 8;
      continue;
    }
    if ((bit(i) === 1) !== set) break;
    i++;
  }
  return { set, first, count: i - first };
}

/** Sets `count` bits from `first`; whether any bit changed. */
export function setBits(bitmap: Buffer, first: number, count: number): boolean {
  let changed = false;
  for (let i = first; i < first + count; i++) {
    const mask = 0x80 >> (i & 7);
    if ((i & 7) === 0 && i + 8 <= first + count) {
      if (bitmap[i >> 3] !== 0xff) changed = true;
      bitmap[i >> 3] = 0xff;
      i += 7;
      continue;
    }
    if (!(bitmap[i >> 3] & mask)) changed = true;
    bitmap[i >> 3] |= mask;
  }
  return changed;
}
