/**
 * An opened VHDX image: reads by payload block state (as qemu reads them), sector
 * bitmaps and the parent for differencing images, writes that allocate blocks at the
 * end of the file and commit BAT changes through the log on flush (data flushed
 * before any BAT entry points at it).
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import type { HostFile } from '../../io/host.js';
import { QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import { fullBackingName } from '../../core/open.js';
import { zeroFileRange } from '../../io/allocate.js';
import {
  BITMAP_BLOCK_SIZE,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_SECTION_END,
  MiB,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_NOT_PRESENT,
  PAYLOAD_BLOCK_PARTIALLY_PRESENT,
  PAYLOAD_BLOCK_UNDEFINED,
  PAYLOAD_BLOCK_UNMAPPED,
  PAYLOAD_BLOCK_UNMAPPED_V095,
  PAYLOAD_BLOCK_ZERO,
  SB_BLOCK_PRESENT,
  ZERO_GUID,
  batOffset,
  batState,
  bitmapBatIndex,
  newGuid,
  payloadBatIndex,
  serializeHeader,
  setBatEntry,
  type VhdxHeader,
} from './format.js';
import { currentHeader, isDifferencing, type VhdxMeta } from './open.js';
import { LOG_SECTOR, buildLogEntry, entrySectors, type LogWrite } from './log.js';

export interface HeaderChange {
  newDataWriteGuid?: boolean;
  logGuid?: Buffer;
}

/**
 * Writes a new header over the non-current one (sequence number + 1) and makes it
 * current; done twice, so both headers hold the update (the spec's procedure).
 * Each header write is flushed before the next step.
 */
export async function updateHeaders(
  file: HostFile,
  hs: { headers: [VhdxHeader | undefined, VhdxHeader | undefined]; current: 0 | 1 },
  sessionGuid: Buffer,
  change: HeaderChange,
): Promise<void> {
  const dataWriteGuid = change.newDataWriteGuid ? newGuid() : currentHeader(hs).dataWriteGuid;
  for (let round = 0; round < 2; round++) {
    const cur = currentHeader(hs);
    const target: 0 | 1 = hs.current === 0 ? 1 : 0;
    const next: VhdxHeader = {
      ...cur,
      sequenceNumber: cur.sequenceNumber + 1n,
      fileWriteGuid: sessionGuid,
      dataWriteGuid,
      logGuid: change.logGuid ?? cur.logGuid,
    };
    await file.write(serializeHeader(next), target === 0 ? HEADER1_OFFSET : HEADER2_OFFSET);
    await file.flush();
    hs.headers[target] = next;
    hs.current = target;
  }
}

/** How a range of one payload block reads. */
type Source = 'data' | 'zero' | 'parent' | 'error';

export class VhdxImage implements BlockImage {
  readonly format = 'vhdx';
  readonly allocationUnit: number;
  private readonly lock = new Mutex();
  /** GUID written as FileWriteGuid by every header update of this session */
  readonly sessionGuid: Buffer;
  private visibleWriteDone = false;
  /** BAT sectors (4 KiB) changed in memory but not yet committed through the log */
  private readonly dirtyBatSectors = new Set<number>();
  /** end of the space blocks have been allocated in (the file may not have grown yet) */
  private allocEnd = 0;
  private bitmapCache = new Map<number, Buffer>();
  private closed = false;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly meta: VhdxMeta,
    readonly bat: Buffer,
    readonly backing: BlockImage | null,
    /** the parent name as info reports it (differencing images) */
    readonly backingName: string | undefined,
    sessionGuid?: Buffer,
  ) {
    this.sessionGuid = sessionGuid ?? newGuid();
    this.allocationUnit = meta.g.logicalSectorSize;
  }

  get virtualSize(): number {
    return this.meta.g.virtualSize;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  get dataWriteGuid(): Buffer {
    return currentHeader(this.meta).dataWriteGuid;
  }

  private get differencing(): boolean {
    return isDifferencing(this.meta);
  }

  /** How a block in `state` reads (qemu's rules for non-differencing images). */
  private sourceOf(state: number): Source | 'bitmap' {
    switch (state) {
      case PAYLOAD_BLOCK_FULLY_PRESENT:
        return 'data';
      case PAYLOAD_BLOCK_ZERO:
      case PAYLOAD_BLOCK_UNMAPPED:
      case PAYLOAD_BLOCK_UNMAPPED_V095:
        return 'zero';
      case PAYLOAD_BLOCK_NOT_PRESENT:
      case PAYLOAD_BLOCK_UNDEFINED:
        return this.differencing ? 'parent' : 'zero';
      case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        return this.differencing ? 'bitmap' : 'error';
      default:
        return 'error';
    }
  }

  private blockEntry(block: number): { state: number; offset: number } {
    const i = payloadBatIndex(this.meta.g, block);
    return { state: batState(this.bat, i), offset: batOffset(this.bat, i) };
  }

  private ioError(offset: number): QimgError {
    return new QimgError(`error while reading at byte ${offset}: Input/output error`, { file: this.filename });
  }

  /** The sector bitmap of a chunk (differencing images), cached. */
  private async bitmap(chunk: number): Promise<Buffer> {
    let b = this.bitmapCache.get(chunk);
    if (b) return b;
    const i = bitmapBatIndex(this.meta.g, chunk);
    if (batState(this.bat, i) !== SB_BLOCK_PRESENT) {
      throw new QimgError(`VHDX sector bitmap of chunk ${chunk} is missing for a partially present block`, { file: this.filename });
    }
    b = await this.file.readBytes(batOffset(this.bat, i), BITMAP_BLOCK_SIZE);
    if (this.bitmapCache.size >= 8) this.bitmapCache.delete(this.bitmapCache.keys().next().value!);
    this.bitmapCache.set(chunk, b);
    return b;
  }

  /** Sectors from `offset` (inside one block) whose bitmap bit equals the first one's. */
  private async bitmapRun(offset: number, length: number): Promise<{ present: boolean; length: number }> {
    const g = this.meta.g;
    const sector = Math.floor(offset / g.logicalSectorSize);
    const perChunk = g.chunkRatio * (g.blockSize / g.logicalSectorSize);
    const bm = await this.bitmap(Math.floor(sector / perChunk));
    const first = sector % perChunk;
    const bit = (s: number) => (bm[s >> 3] >> (s & 7)) & 1;
    const present = bit(first) === 1;
    const end = offset + length;
    let s = first + 1;
    let pos = (sector + 1) * g.logicalSectorSize;
    while (pos < end && (bit(s) === 1) === present) {
      s++;
      pos += g.logicalSectorSize;
    }
    return { present, length: Math.min(pos, end) - offset };
  }

  private async readParent(offset: number, buf: Buffer): Promise<void> {
    const parent = this.backing;
    if (!parent || offset >= parent.virtualSize) {
      buf.fill(0);
      return;
    }
    const n = Math.min(buf.length, parent.virtualSize - offset);
    await parent.read(offset, buf.subarray(0, n));
    buf.fill(0, n);
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const g = this.meta.g;
    if (offset < 0 || offset + buf.length > g.virtualSize) throw new QimgError(`read beyond the end of the image (offset ${offset})`, { file: this.filename });
    let done = 0;
    const pending: Promise<void>[] = [];
    while (done < buf.length) {
      const pos = offset + done;
      const block = Math.floor(pos / g.blockSize);
      const inBlock = pos - block * g.blockSize;
      const n = Math.min(buf.length - done, g.blockSize - inBlock);
      const part = buf.subarray(done, done + n);
      const { state, offset: host } = this.blockEntry(block);
      const src = this.sourceOf(state);
      if (src === 'data') pending.push(this.file.read(part, host + inBlock));
      else if (src === 'zero') part.fill(0);
      else if (src === 'parent') pending.push(this.readParent(pos, part));
      else if (src === 'error') throw this.ioError(pos);
      else {
        let p = 0;
        while (p < n) {
          const run = await this.bitmapRun(pos + p, n - p);
          const sub = part.subarray(p, p + run.length);
          pending.push(run.present ? this.file.read(sub, host + inBlock + p) : this.readParent(pos + p, sub));
          p += run.length;
        }
      }
      done += n;
    }
    await Promise.all(pending);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const g = this.meta.g;
    const max = Math.min(length, g.virtualSize - offset);
    const block = Math.floor(offset / g.blockSize);
    const inBlock = offset - block * g.blockSize;
    const first = this.blockEntry(block);
    const src = this.sourceOf(first.state);
    if (!this.differencing) {
      // qemu's vhdx driver has no block status: every range is data, without an
      // offset; blocks that hold none are marked so that copies skip reading them
      let len = Math.min(max, g.blockSize - inBlock);
      for (let b = block + 1; len < max && this.sourceOf(this.blockEntry(b).state) === src; b++) len = Math.min(max, len + g.blockSize);
      return { length: len, data: true, zero: false, readsAsZero: src === 'zero' ? true : undefined };
    }
    const status = (s: Source | 'bitmap', host: number, len: number): LayerStatus => {
      if (s === 'data') return { length: len, data: true, zero: false, hostOffset: host, file: this.filename };
      if (s === 'zero') return { length: len, data: false, zero: true };
      return { length: len, data: false, zero: false };
    };
    if (src === 'bitmap') {
      const run = await this.bitmapRun(offset, Math.min(max, g.blockSize - inBlock));
      return status(run.present ? 'data' : 'parent', first.offset + inBlock, run.length);
    }
    if (src === 'error') throw this.ioError(offset);
    // extend over following blocks that read the same way (and, for data, contiguously)
    let len = Math.min(max, g.blockSize - inBlock);
    for (let b = block + 1; len < max; b++) {
      const e = this.blockEntry(b);
      if (this.sourceOf(e.state) !== src) break;
      if (src === 'data' && e.offset !== first.offset + (b - block) * g.blockSize) break;
      len = Math.min(max, len + g.blockSize);
    }
    return status(src, first.offset + inBlock, len);
  }

  private assertWritable(offset: number, length: number): void {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    if (this.differencing) throw new QimgError('Writing to differencing VHDX images is not supported', { file: this.filename });
    assertWritableRange(this, true, offset, length);
  }

  private updateHeaders(change: HeaderChange): Promise<void> {
    return updateHeaders(this.file, this.meta, this.sessionGuid, change);
  }

  /** Before the first change of guest-visible data: new FileWriteGuid and DataWriteGuid. */
  private async beforeVisibleWrite(): Promise<void> {
    if (this.visibleWriteDone) return;
    await this.updateHeaders({ newDataWriteGuid: true });
    this.visibleWriteDone = true;
  }

  /** Allocates a payload block at the end of the file (1 MiB aligned); returns its offset. */
  private async allocateBlock(block: number): Promise<number> {
    const g = this.meta.g;
    const start = Math.ceil(Math.max(this.allocEnd, this.file.size) / MiB) * MiB;
    this.allocEnd = start + g.blockSize;
    // the new space reads as zeros: a partial write leaves the rest of the block zero
    await this.file.truncate(this.allocEnd);
    const i = payloadBatIndex(g, block);
    setBatEntry(this.bat, i, PAYLOAD_BLOCK_FULLY_PRESENT, start);
    this.dirtyBatSectors.add(Math.floor((i * 8) / LOG_SECTOR));
    return start;
  }

  /** Host offset of `block`, allocating it when it has no data yet. */
  private hostBlock(block: number): Promise<number> {
    const e = this.blockEntry(block);
    if (e.state === PAYLOAD_BLOCK_FULLY_PRESENT) {
      if (e.offset < HEADER_SECTION_END) {
        return Promise.reject(new QimgError(`VHDX BAT entry of block ${block} points into the header section`, { file: this.filename }));
      }
      return Promise.resolve(e.offset);
    }
    if (this.sourceOf(e.state) === 'error') return Promise.reject(new QimgError(`VHDX block ${block} has an invalid state ${e.state}`, { file: this.filename }));
    return this.lock.run(async () => {
      await this.beforeVisibleWrite();
      const again = this.blockEntry(block);
      return again.state === PAYLOAD_BLOCK_FULLY_PRESENT ? again.offset : this.allocateBlock(block);
    });
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (!this.visibleWriteDone) await this.lock.run(() => this.beforeVisibleWrite());
    const g = this.meta.g;
    const pending: Promise<void>[] = [];
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const block = Math.floor(pos / g.blockSize);
      const inBlock = pos - block * g.blockSize;
      const n = Math.min(data.length - done, g.blockSize - inBlock);
      const host = await this.hostBlock(block);
      pending.push(this.file.write(data.subarray(done, done + n), host + inBlock));
      done += n;
    }
    await Promise.all(pending);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
    const g = this.meta.g;
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const block = Math.floor(pos / g.blockSize);
      const inBlock = pos - block * g.blockSize;
      const n = Math.min(length - done, g.blockSize - inBlock);
      const e = this.blockEntry(block);
      // blocks that already read as zeros stay as they are; data blocks get zeros
      if (this.sourceOf(e.state) === 'data') {
        if (!this.visibleWriteDone) await this.lock.run(() => this.beforeVisibleWrite());
        const host = e.offset + inBlock;
        if (!(await zeroFileRange(this.file, host, n, false))) {
          const zeros = Buffer.alloc(Math.min(n, 4 * MiB));
          for (let p = 0; p < n; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, n - p)), host + p);
        }
      } else if (this.sourceOf(e.state) === 'error') {
        throw new QimgError(`VHDX block ${block} has an invalid state ${e.state}`, { file: this.filename });
      }
      done += n;
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  /**
   * Commits changed BAT sectors: data is flushed first, then each group of sectors
   * goes through one log entry (log GUID set in the headers, entry written and
   * flushed, sectors written in place and flushed, log GUID cleared). A crash at any
   * point leaves either the old BAT, or a log that the next writable open replays.
   */
  private async commitBat(): Promise<void> {
    if (this.dirtyBatSectors.size === 0) return;
    await this.file.flush();
    const sectors = [...this.dirtyBatSectors].sort((a, b) => a - b);
    this.dirtyBatSectors.clear();
    const writes: LogWrite[] = sectors.map((s) => {
      const data = Buffer.alloc(LOG_SECTOR);
      this.bat.copy(data, 0, s * LOG_SECTOR, (s + 1) * LOG_SECTOR);
      return { fileOffset: this.meta.bat.fileOffset + s * LOG_SECTOR, data };
    });
    const h = currentHeader(this.meta);
    const logSectors = h.logLength / LOG_SECTOR;
    if (logSectors < 3) {
      // no usable log: the BAT is written in place (still after the data is stable)
      for (const w of writes) await this.file.write(w.data, w.fileOffset);
      await this.file.flush();
      return;
    }
    // one sector of the circular log always stays open
    let per = 1;
    while (entrySectors(per + 1) <= logSectors - 1) per++;
    for (let i = 0; i < writes.length; i += per) await this.logTransaction(writes.slice(i, i + per));
  }

  async logTransaction(writes: LogWrite[], stopBeforeApply = false): Promise<void> {
    const h = currentHeader(this.meta);
    const guid = newGuid();
    await this.updateHeaders({ logGuid: guid });
    const entry = buildLogEntry({
      guid,
      sequenceNumber: 1n,
      tail: 0,
      flushedFileOffset: this.file.size,
      lastFileOffset: this.file.size,
      writes,
    });
    await this.file.write(entry, h.logOffset);
    await this.file.flush();
    if (stopBeforeApply) return;
    for (const w of writes) await this.file.write(w.data, w.fileOffset);
    await this.file.flush();
    await this.updateHeaders({ logGuid: ZERO_GUID });
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(async () => {
      await this.commitBat();
      await this.file.flush();
    });
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = {
      filename: this.filename,
      format: 'vhdx',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      clusterSize: this.meta.g.blockSize,
      dirtyFlag: false,
    };
    if (this.backingName !== undefined) {
      info.backingFilename = this.backingName;
      info.fullBackingFilename = fullBackingName(this.backingName, this.filename);
      info.backingFilenameFormat = 'vhdx';
    }
    return info;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.flush();
    } finally {
      await this.file.close();
      await this.backing?.close();
    }
  }
}
