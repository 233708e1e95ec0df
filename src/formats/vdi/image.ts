/**
 * An open VDI image: the block map in memory (QEMU keeps it whole too, bounded by its
 * limit of 2 GiB and here also by the file's size), reads and block status from it,
 * and QEMU's allocating writes: a new block goes to index `blocks_allocated` (data
 * padded with zeros to the whole 1 MiB), then the header's count, then the block map
 * sectors — each durable before the next, so a crash can only leave a block that
 * nothing references yet.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import type { HostFile } from '../../io/host.js';
import {
  F,
  SECTOR_SIZE,
  VDI_BLOCK_SIZE,
  VDI_DISCARDED,
  VDI_TYPE_STATIC,
  isAllocated,
  type VdiHeader,
} from './header.js';

const BS = VDI_BLOCK_SIZE;
/** Largest buffer of zeros written at once for a zero write. */
const ZERO_CHUNK = 4 * BS;

/** A piece of a request: `length` bytes at guest `offset`, in one run of the block map. */
interface Run {
  length: number;
  /** host offset of the first byte, or undefined where the blocks are not allocated */
  host?: number;
}

export class VdiImage implements BlockImage {
  readonly format = 'vdi';
  readonly backing = null;
  /** skip fsync barriers (convert's target, like qemu-img's cache=unsafe) */
  unsafeCache = false;
  private readonly lock = new Mutex();
  /** highest block index the map uses (found on the first allocation) */
  private highestUsed: number | undefined;
  /** block map sectors changed in memory and not yet written */
  private dirty: { first: number; last: number } | null = null;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly header: VdiHeader,
    /** the header as read (rewritten with the new count on allocation, as QEMU does) */
    private readonly headerBytes: Buffer,
    /** the block map, little-endian u32 entries, blocks_in_image of them */
    private readonly bmap: Buffer,
  ) {}

  get virtualSize(): number {
    return this.header.diskSize;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  /**
   * Dynamic images allocate whole blocks; a static one has every block in place, so
   * like a raw file it stores what is written and leaves the rest of the file sparse.
   */
  get allocationUnit(): number {
    return this.isStatic ? SECTOR_SIZE : BS;
  }

  get isStatic(): boolean {
    return this.header.imageType === VDI_TYPE_STATIC;
  }

  private entry(block: number): number {
    return this.bmap.readUInt32LE(block * 4);
  }

  /**
   * The run at `offset` (at most `max` bytes): unallocated blocks together, or
   * allocated blocks whose data lies back to back in the file.
   */
  private runAt(offset: number, max: number): Run {
    const first = Math.floor(offset / BS);
    const e = this.entry(first);
    const end = offset + max;
    let blockEnd = (first + 1) * BS;
    if (!isAllocated(e)) {
      for (let b = first + 1; blockEnd < end && !isAllocated(this.entry(b)); b++) blockEnd += BS;
      return { length: Math.min(end, blockEnd) - offset };
    }
    for (let b = first + 1, next = e + 1; blockEnd < end && this.entry(b) === next; b++, next++) blockEnd += BS;
    return { length: Math.min(end, blockEnd) - offset, host: this.header.offsetData + e * BS + (offset % BS) };
  }

  /**
   * One block at a time for allocated data, as QEMU answers: convert then reads and
   * zero-checks each block on its own (1 MiB requests), which is what makes `-S`
   * larger than a block skip the same all-zero blocks as qemu-img.
   */
  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const max = Math.min(length, this.virtualSize - offset);
    const run = this.runAt(offset, isAllocated(this.entry(Math.floor(offset / BS))) ? Math.min(max, BS - (offset % BS)) : max);
    // Unallocated and discarded blocks read as zeros: QEMU reports them as zero (present).
    if (run.host === undefined) return { length: run.length, data: false, zero: true };
    const st: LayerStatus = { length: run.length, data: true, zero: false, hostOffset: run.host, file: this.filename };
    // Static images ask the file too (QEMU's BDRV_BLOCK_RECURSE): holes read as zeros.
    if (this.isStatic) {
      const f = this.file.runAt(run.host, run.length);
      if (f.eof && (f.length === 0 || !f.data)) st.zero = true;
      else {
        st.length = f.length;
        st.zero = !f.data;
      }
    }
    return st;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.virtualSize) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length; ) {
      const run = this.runAt(offset + done, buf.length - done);
      const part = buf.subarray(done, done + run.length);
      if (run.host === undefined) part.fill(0);
      else reads.push(this.file.read(part, run.host));
      done += run.length;
    }
    await Promise.all(reads);
  }

  private assertWritable(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (data.length === 0) return;
    await this.lock.run(() => this.writeLocked(offset, data));
  }

  private async writeLocked(offset: number, data: Buffer): Promise<void> {
    const h = this.header;
    const pieces: Array<{ host: number; buf: Buffer }> = [];
    /** blocks allocated by this request: [block, entry] */
    const fresh: Array<[number, number]> = [];
    let next = h.blocksAllocated;
    for (let done = 0; done < data.length; ) {
      const pos = offset + done;
      const block = Math.floor(pos / BS);
      const inBlock = pos % BS;
      const n = Math.min(BS - inBlock, data.length - done);
      const src = data.subarray(done, done + n);
      const e = this.entry(block);
      if (isAllocated(e)) {
        // QEMU would write wherever a damaged entry points (up to 4 PiB into the file)
        if (e >= h.blocksInImage) {
          throw new QimgError(`block map entry of block ${block} is out of range (${e}, ${h.blocksInImage} blocks); qemu-img check reports it`, { file: this.filename });
        }
        pieces.push({ host: h.offsetData + e * BS + inBlock, buf: src });
      } else {
        this.checkAllocation(next);
        let buf = src;
        if (n < BS) {
          // A new block is written whole: the rest of it reads as zeros.
          buf = Buffer.alloc(BS);
          src.copy(buf, inBlock);
        }
        pieces.push({ host: h.offsetData + next * BS, buf });
        fresh.push([block, next]);
        next++;
      }
      done += n;
    }
    await Promise.all(coalesce(pieces).map((p) => this.file.write(p.buf, p.host)));
    if (fresh.length === 0) return;

    // The data is in place; now the count, then the entries that point at it.
    for (const [block, entry] of fresh) this.bmap.writeUInt32LE(entry, block * 4);
    h.blocksAllocated = next;
    this.highestUsed = next - 1;
    this.headerBytes.writeUInt32LE(next, F.blocksAllocated);
    const perSector = SECTOR_SIZE / 4;
    const first = Math.floor(fresh[0][0] / perSector);
    const last = Math.floor(fresh[fresh.length - 1][0] / perSector);
    this.dirty = this.dirty ? { first: Math.min(first, this.dirty.first), last: Math.max(last, this.dirty.last) } : { first, last };
    // Under cache=unsafe (convert's target) the metadata waits for flush or close.
    if (!this.unsafeCache) await this.writeMetadata();
  }

  /** Header count, then the block map sectors changed since the last time (after the data). */
  private async writeMetadata(): Promise<void> {
    const d = this.dirty;
    if (!d) return;
    await this.sync();
    await this.file.write(this.headerBytes, 0);
    await this.sync();
    const bytes = this.bmap.subarray(d.first * SECTOR_SIZE, (d.last + 1) * SECTOR_SIZE);
    await this.file.write(bytes, this.header.offsetBmap + d.first * SECTOR_SIZE);
    this.dirty = null;
  }

  /**
   * QEMU allocates at index blocks_allocated whatever the header says; a count that
   * cannot be a block index (a damaged header) or a data area laid over the header
   * or the block map would make it overwrite other blocks or the metadata, so qimg
   * refuses to allocate there.
   */
  private checkAllocation(index: number): void {
    const h = this.header;
    if (index >= h.blocksInImage || index >= VDI_DISCARDED) {
      throw new QimgError(`cannot allocate a block: allocated block count ${h.blocksAllocated} is not below the block count ${h.blocksInImage}`, { file: this.filename });
    }
    if (this.highestUsed === undefined) {
      let high = -1;
      for (let b = 0; b < h.blocksInImage; b++) {
        const e = this.entry(b);
        if (isAllocated(e) && e > high) high = e;
      }
      this.highestUsed = high;
    }
    if (index <= this.highestUsed) {
      throw new QimgError(`cannot allocate a block: allocated block count ${h.blocksAllocated} does not cover block ${this.highestUsed} in use (qemu-img check reports it)`, { file: this.filename });
    }
    const bmapEnd = h.offsetBmap + Math.ceil((h.blocksInImage * 4) / SECTOR_SIZE) * SECTOR_SIZE;
    if (h.offsetBmap < SECTOR_SIZE || h.offsetData < bmapEnd) {
      throw new QimgError(`cannot allocate a block: the data area (offset 0x${h.offsetData.toString(16)}) overlaps the header or the block map`, { file: this.filename });
    }
  }

  /** QEMU's VDI has no zero writes: zeros are written as data, allocating blocks. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
    const zeros = Buffer.alloc(Math.min(length, ZERO_CHUNK));
    for (let p = 0; p < length; p += zeros.length) {
      await this.write(offset + p, zeros.subarray(0, Math.min(zeros.length, length - p)));
    }
  }

  /** QEMU's VDI driver ignores discards; so does qimg (the data stays). */
  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
  }

  async info(): Promise<ImageInfo> {
    return {
      filename: this.filename,
      format: 'vdi',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      clusterSize: BS,
      dirtyFlag: false,
    };
  }

  private async sync(): Promise<void> {
    if (!this.unsafeCache && this.file.writable) await this.file.flush();
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(async () => {
      await this.writeMetadata();
      await this.file.flush();
    });
  }

  async close(): Promise<void> {
    let failure: unknown;
    if (this.file.writable) {
      try {
        await this.lock.run(async () => {
          await this.writeMetadata();
          await this.sync();
        });
      } catch (err) {
        failure = err;
      }
    }
    await this.file.close().catch(() => undefined);
    if (failure) throw failure;
  }
}

/** Joins pieces that continue each other both in the file and in the caller's buffer. */
function coalesce(pieces: Array<{ host: number; buf: Buffer }>): Array<{ host: number; buf: Buffer }> {
  const out: Array<{ host: number; buf: Buffer }> = [];
  for (const p of pieces) {
    const last = out[out.length - 1];
    if (
      last &&
      last.host + last.buf.length === p.host &&
      last.buf.buffer === p.buf.buffer &&
      last.buf.byteOffset + last.buf.length === p.buf.byteOffset
    ) {
      last.buf = Buffer.from(last.buf.buffer, last.buf.byteOffset, last.buf.length + p.buf.length);
    } else {
      out.push({ ...p });
    }
  }
  return out;
}
