/**
 * An open Parallels image: BAT lookups for reads and block status, allocation at the
 * end of the data area for writes, and the in_use flag as qemu handles it (set on
 * read-write open, cleared on clean close; a set flag refuses read-write opens).
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import type { HostFile } from '../../io/host.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import {
  Bat,
  HEADER_INUSE_MAGIC,
  HEADER_SIZE,
  SECTOR_SIZE,
  batEntryOffset,
  parseHeader,
  serializeHeader,
  type ParallelsHeader,
} from './header.js';
import { validateFormatExtension } from './ext.js';

/** Largest single host request. */
const MAX_IO = 4 * 1024 * 1024;

/** qemu's BDRV_REQUEST_MAX_BYTES */
const MAX_REQUEST = 0x7ffffe00;

/** What open found, shared with `check`. */
export interface ParallelsState {
  header: ParallelsHeader;
  bat: Bat;
  clusterSize: number;
  /** entries count clusters (ext magic) or sectors */
  offMultiplier: number;
  /** end of the data area, in sectors (next allocation goes here) */
  dataEnd: number;
}

/** Reads header and BAT with qemu's checks (shared by open and check). */
export async function loadState(file: HostFile, name: string): Promise<ParallelsState> {
  const header = parseHeader(await file.readBytes(0, HEADER_SIZE), name);
  // qemu reads header and BAT in one request, which its block layer caps below 2 GiB
  if (batEntryOffset(header.batEntries) > MAX_REQUEST) throw new CorruptImageError(name, 'Input/output error');
  const bat = await Bat.read(file, header.batEntries);
  const offMultiplier = header.ext ? header.tracks : 1;
  let dataEnd = header.dataOff;
  if (dataEnd === 0) dataEnd = Math.ceil(batEntryOffset(header.batEntries) / SECTOR_SIZE);
  for (let i = 0; i < Math.min(bat.size, header.batEntries); i++) {
    const e = bat.get(i);
    if (e === 0) continue;
    const sector = e * offMultiplier;
    if (sector >= dataEnd) dataEnd = sector + header.tracks;
  }
  return { header, bat, clusterSize: header.tracks * SECTOR_SIZE, offMultiplier, dataEnd };
}

export interface ParallelsOpenOptions {
  writable: boolean;
}

export class ParallelsImage implements BlockImage {
  readonly format = 'parallels';
  readonly backing = null;
  readonly virtualSize: number;
  readonly allocationUnit: number;
  private readonly lock = new Mutex();
  /** BAT entries changed since the last flush (written after their data is durable) */
  private dirty = new Set<number>();
  private closed = false;

  private constructor(
    readonly file: HostFile,
    readonly filename: string,
    private readonly s: ParallelsState,
  ) {
    this.virtualSize = s.header.nbSectors * SECTOR_SIZE;
    this.allocationUnit = s.clusterSize;
  }

  static async open(file: HostFile, opts: ParallelsOpenOptions): Promise<ParallelsImage> {
    const name = file.path;
    const s = await loadState(file, name);
    if (s.header.inUse === HEADER_INUSE_MAGIC && opts.writable) {
      throw new QimgError('parallels: Image was not closed correctly; cannot be opened read/write', { file: name });
    }
    // qemu ignores the extension when writing (with a warning) and checks it otherwise
    if (s.header.extOff !== 0n && !opts.writable) {
      const off = s.header.extOff * 512n;
      // beyond any file: reads as zeros, so the magic is wrong
      const at = off > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(off);
      await validateFormatExtension(file, at, s.clusterSize, s.header.nbSectors, name);
    }
    const img = new ParallelsImage(file, name, s);
    if (opts.writable) {
      s.header.inUse = HEADER_INUSE_MAGIC;
      await file.write(serializeHeader(s.header), 0);
      await file.flush();
    }
    return img;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  private get tracks(): number {
    return this.s.header.tracks;
  }

  /** Host byte offset of guest cluster `idx`, or 0 when it is not allocated. */
  private hostCluster(idx: number): number {
    if (idx >= this.s.header.batEntries) return 0;
    const e = this.s.bat.get(idx);
    return e === 0 ? 0 : e * this.s.offMultiplier * SECTOR_SIZE;
  }

  /** Guest range [offset, offset+len) within one cluster, with its host offset (0: none). */
  private run(offset: number, length: number): { length: number; host: number } {
    const cs = this.s.clusterSize;
    const idx = Math.floor(offset / cs);
    const inCluster = offset - idx * cs;
    const first = this.hostCluster(idx);
    let len = Math.min(length, cs - inCluster);
    // extend while the next clusters continue the same way (contiguous or unallocated)
    for (let i = idx + 1; len < length; i++) {
      // past the BAT nothing is allocated: the rest of the request is one hole
      if (first === 0 && i >= this.s.header.batEntries) {
        len = length;
        break;
      }
      const h = this.hostCluster(i);
      if (first === 0 ? h !== 0 : h !== first + (i - idx) * cs) break;
      len = Math.min(length, len + cs);
    }
    return { length: len, host: first === 0 ? 0 : first + inCluster };
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const jobs: Promise<void>[] = [];
    for (let done = 0; done < buf.length; ) {
      const r = this.run(offset + done, Math.min(buf.length - done, MAX_IO));
      const part = buf.subarray(done, done + r.length);
      if (r.host === 0) part.fill(0);
      else jobs.push(this.file.read(part, r.host));
      done += r.length;
    }
    await Promise.all(jobs);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const r = this.run(offset, Math.min(length, this.virtualSize - offset));
    if (r.host === 0) return { length: r.length, data: false, zero: false };
    return { length: r.length, data: true, zero: false, hostOffset: r.host, file: this.filename };
  }

  private checkWrite(offset: number, length: number): void {
    assertWritableRange(this, !this.readOnly, offset, length);
  }

  /**
   * Allocates clusters [idx, idx+count) at the end of the data area and stores `data`
   * at byte `skip` of the first one (the rest reads as zeros). The BAT entries are
   * only marked dirty: they reach the disk at flush, after the data.
   */
  private async allocate(idx: number, count: number, skip: number, data: Buffer): Promise<void> {
    const cs = this.s.clusterSize;
    // ext images address clusters: keep the data area cluster-aligned
    let start = this.s.dataEnd;
    if (this.s.offMultiplier > 1) start = Math.ceil(start / this.tracks) * this.tracks;
    const host = start * SECTOR_SIZE;
    const end = host + count * cs;
    if (end / SECTOR_SIZE / this.s.offMultiplier > 0xffffffff) {
      throw new QimgError('Image file is too large for its BAT entries', { file: this.filename });
    }
    this.s.dataEnd = start + count * this.tracks;
    // old bytes past the data area (leaked space) must not show through
    await this.zeroHost(host, skip);
    await this.file.write(data, host + skip);
    await this.zeroHost(host + skip + data.length, end - (host + skip + data.length));
    if (this.file.size < end && !this.file.isBlockDevice) await this.file.truncate(end);
    for (let i = 0; i < count; i++) {
      this.s.bat.set(idx + i, (host / SECTOR_SIZE + i * this.tracks) / this.s.offMultiplier);
      this.dirty.add(idx + i);
    }
  }

  /** Writes zeros over the part of [pos, pos+len) that lies inside the file. */
  private async zeroHost(pos: number, len: number): Promise<void> {
    const end = Math.min(pos + len, this.file.size);
    if (end <= pos) return;
    const zeros = Buffer.alloc(Math.min(end - pos, MAX_IO));
    for (let p = pos; p < end; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, end - p)), p);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkWrite(offset, data.length);
    const cs = this.s.clusterSize;
    for (let done = 0; done < data.length; ) {
      const pos = offset + done;
      const r = this.run(pos, Math.min(data.length - done, MAX_IO));
      if (r.host !== 0) {
        await this.file.write(data.subarray(done, done + r.length), r.host);
        done += r.length;
        continue;
      }
      done += await this.lock.run(async () => {
        // another request may have allocated meanwhile: look again under the lock
        const r2 = this.run(pos, r.length);
        const chunk = data.subarray(done, done + r2.length);
        if (r2.host !== 0) {
          await this.file.write(chunk, r2.host);
        } else {
          const idx = Math.floor(pos / cs);
          const last = Math.floor((pos + chunk.length - 1) / cs);
          await this.allocate(idx, last - idx + 1, pos - idx * cs, chunk);
        }
        return r2.length;
      });
    }
  }

  /** Parallels has no zero flag: allocated clusters get zeros, holes read as zeros. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
    const zeros = Buffer.alloc(Math.min(length, MAX_IO));
    for (let done = 0; done < length; ) {
      const r = this.run(offset + done, Math.min(length - done, MAX_IO));
      if (r.host !== 0) await this.file.write(zeros.subarray(0, r.length), r.host);
      done += r.length;
    }
  }

  /** qemu's parallels driver has no discard: a no-op, the data stays. */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
  }

  async info(): Promise<ImageInfo> {
    // qemu 7.2 has no bdrv_get_info for parallels: no cluster size, no dirty flag
    return {
      filename: this.filename,
      format: 'parallels',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
    };
  }

  /** Data first (fsync), then the BAT entries that point at it. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.lock.run(async () => {
      if (this.dirty.size === 0) {
        await this.file.flush();
        return;
      }
      await this.file.flush();
      const idx = [...this.dirty].sort((a, b) => a - b);
      this.dirty.clear();
      // contiguous runs of dirty entries in one write each
      for (let i = 0; i < idx.length; ) {
        let j = i + 1;
        while (j < idx.length && idx[j] === idx[j - 1] + 1) j++;
        await this.file.write(this.s.bat.encode(idx[i], idx[j - 1] + 1), batEntryOffset(idx[i]));
        i = j;
      }
      await this.file.flush();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) {
        await this.flush();
        // clean close: in_use cleared, the file ends at the data area's end
        this.s.header.inUse = 0;
        await this.file.write(serializeHeader(this.s.header), 0);
        if (this.file.size > this.s.dataEnd * SECTOR_SIZE && !this.file.isBlockDevice) {
          await this.file.truncate(this.s.dataEnd * SECTOR_SIZE);
        }
        await this.file.flush();
      }
    } finally {
      await this.file.close();
    }
  }
}

export function corrupt(file: string, msg: string): CorruptImageError {
  return new CorruptImageError(file, msg);
}
