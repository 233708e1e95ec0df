/**
 * The qcow2 write path at the cluster level: allocating writes with copy-on-write
 * (from the backing chain, zeros, a compressed cluster or a cluster shared with a
 * snapshot), in-place writes to clusters this layer owns alone (OFLAG_COPIED),
 * subcluster writes for extended L2, zero writes and discards.
 *
 * Order of effects for each request: data reaches the file first, then the L2 entry
 * changes in memory (written by the driver's ordered flush), and references dropped
 * are only queued for release (refcounts lowered after the L2/L1 change is durable).
 */
import { CorruptImageError } from '../../core/errors.js';
import { compressedDescriptor, decodeCluster, lookupRun, Sub } from './entries.js';
import type { Qcow2Image } from './driver.js';
import { allocateFile } from '../../io/allocate.js';
import * as C from './constants.js';

const COPIED = 0x80000000;
const COMPRESSED = 0x40000000;
const ZERO_FLAG = 0x1;
const ALL_SUBCLUSTERS = 0xffffffff;

/** One L2 table opened for modification. */
interface L2Slot {
  offset: number;
  table: Buffer;
}

/** The raw fields of L2 entry `i`. */
interface RawEntry {
  hi: number;
  lo: number;
  zeroBits: number;
  allocBits: number;
}

function rawEntry(l2: Buffer, i: number, ext: boolean): RawEntry {
  const pos = i * (ext ? 16 : 8);
  return {
    hi: l2.readUInt32BE(pos),
    lo: l2.readUInt32BE(pos + 4),
    zeroBits: ext ? l2.readUInt32BE(pos + 8) : 0,
    allocBits: ext ? l2.readUInt32BE(pos + 12) : 0,
  };
}

function storeEntry(l2: Buffer, i: number, ext: boolean, e: RawEntry): void {
  const pos = i * (ext ? 16 : 8);
  l2.writeUInt32BE(e.hi >>> 0, pos);
  l2.writeUInt32BE(e.lo >>> 0, pos + 4);
  if (ext) {
    l2.writeUInt32BE(e.zeroBits >>> 0, pos + 8);
    l2.writeUInt32BE(e.allocBits >>> 0, pos + 12);
  }
}

/** An L2 entry's standard half for a host cluster (COPIED: this layer owns it alone). */
function hostEntry(host: number, copied: boolean, zero = false): { hi: number; lo: number } {
  const hi = Math.floor(host / 0x100000000) | (copied ? COPIED : 0);
  return { hi: hi >>> 0, lo: ((host % 0x100000000) | (zero ? ZERO_FLAG : 0)) >>> 0 };
}

function hostOf(e: RawEntry): number {
  return (e.hi & 0x00ffffff) * 0x100000000 + ((e.lo & 0xfffffe00) >>> 0);
}

/** Bits of the subclusters that [from, to) touches within a cluster. */
function subclusterMask(from: number, to: number, sc: number): number {
  const first = Math.floor(from / sc);
  const last = Math.floor((to - 1) / sc);
  let mask = 0;
  for (let i = first; i <= last; i++) mask |= 1 << i;
  return mask >>> 0;
}

export class ClusterWriter {
  constructor(private readonly img: Qcow2Image) {}

  private get g() {
    return this.img.geometry;
  }

  /** Drops this layer's reference to the data of entry `e` (queued until durable). */
  private release(e: RawEntry, l2Offset: number, index: number): void {
    const img = this.img;
    if (e.hi & COMPRESSED) {
      const c = compressedDescriptor(e.hi, e.lo, this.g.clusterBits, img.filename);
      const start = c.hostOffset - (c.hostOffset % 512);
      img.refcounts.free(start, c.hostOffset + c.size - start);
      return;
    }
    if (this.g.hasDataFile) return; // data-file clusters are not refcounted
    const host = hostOf(e);
    if (host === 0) return;
    if (host % this.g.clusterSize !== 0) {
      throw new CorruptImageError(
        img.filename,
        `Image is corrupt: Cluster allocation offset 0x${host.toString(16)} unaligned (L2 offset: 0x${l2Offset.toString(16)}, L2 index: 0x${index.toString(16)})`,
      );
    }
    img.refcounts.free(host);
  }

  /** Writes `data` at guest `offset`. */
  async write(offset: number, data: Buffer): Promise<void> {
    if (this.img.encryption) [offset, data] = await this.sectorAligned(offset, data);
    const cs = this.g.clusterSize;
    const span = cs * this.g.l2Entries;
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const slot = await this.img.l2ForWrite(Math.floor(pos / span));
      const tableEnd = (Math.floor(pos / span) + 1) * span;
      const n = Math.min(data.length - done, tableEnd - pos);
      const part = data.subarray(done, done + n);
      if (this.g.extendedL2) await this.writeExtended(slot, pos, part);
      else await this.writeStandard(slot, pos, part);
      done += n;
    }
  }

  /**
   * Encrypted data is ciphered in whole 512-byte sectors: a request that starts or ends
   * inside one takes the rest of that sector from the current content (QEMU's block
   * layer pads the same way for encrypted images). Every write path (zero writes done by
   * writing zeros too) comes through here.
   */
  private async sectorAligned(offset: number, data: Buffer): Promise<[number, Buffer]> {
    const sector = C.ENCRYPTION_SECTOR;
    const head = offset % sector;
    const end = offset + data.length;
    const tail = (sector - (end % sector)) % sector;
    if (head === 0 && tail === 0) return [offset, data];
    const start = offset - head;
    const buf = Buffer.alloc(head + data.length + tail);
    if (head > 0) await this.readCurrent(start, buf.subarray(0, head));
    if (tail > 0) await this.readCurrent(end, buf.subarray(head + data.length));
    data.copy(buf, head);
    return [start, buf];
  }

  /** Standard L2: clusters needing allocation are grouped so that one run is one write. */
  private async writeStandard(slot: L2Slot, offset: number, data: Buffer): Promise<void> {
    const cs = this.g.clusterSize;
    const span = cs * this.g.l2Entries;
    const base = Math.floor(offset / span) * span;
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const index = Math.floor((pos - base) / cs);
      const e = rawEntry(slot.table, index, false);
      const kind = decodeCluster(slot.table, slot.offset, index, this.g, this.img.filename).type;
      const clusterStart = base + index * cs;
      const inPlace = (kind === Sub.Normal || kind === Sub.ZeroAlloc) && (e.hi & COPIED) !== 0;
      if (inPlace) {
        const host = hostOf(e);
        const n = Math.min(end, clusterStart + cs) - pos;
        if (kind === Sub.ZeroAlloc) {
          // A preallocated zero cluster: the rest of it must read as zeros afterwards.
          const buf = Buffer.alloc(cs);
          data.copy(buf, pos - clusterStart, pos - offset, pos - offset + n);
          await this.img.writeData(buf, host, clusterStart);
          storeEntry(slot.table, index, false, { ...e, ...hostEntry(host, true) });
          this.img.markL2Dirty(slot);
        } else {
          // Following clusters that are allocated right after this one on the host go
          // out in the same request (commit and convert -n overwrite long runs).
          let runEnd = Math.min(end, clusterStart + cs);
          for (let k = 1; runEnd < end && index + k < this.g.l2Entries; k++) {
            const next = rawEntry(slot.table, index + k, false);
            if ((next.hi & COPIED) === 0 || hostOf(next) !== host + k * cs) break;
            if (decodeCluster(slot.table, slot.offset, index + k, this.g, this.img.filename).type !== Sub.Normal) break;
            runEnd = Math.min(end, clusterStart + (k + 1) * cs);
          }
          await this.img.writeData(data.subarray(pos - offset, runEnd - offset), host + (pos - clusterStart), pos);
          pos = runEnd;
          continue;
        }
        pos += n;
        continue;
      }
      // Collect the run of consecutive clusters that all need a new host cluster.
      let count = 1;
      while (clusterStart + count * cs < end && index + count < this.g.l2Entries) {
        const next = rawEntry(slot.table, index + count, false);
        const nextKind = decodeCluster(slot.table, slot.offset, index + count, this.g, this.img.filename).type;
        if ((nextKind === Sub.Normal || nextKind === Sub.ZeroAlloc) && (next.hi & COPIED) !== 0) break;
        count++;
      }
      const runEnd = Math.min(end, clusterStart + count * cs);
      const host = await this.allocateData(clusterStart, count);
      const buf = await this.composeRun(clusterStart, count, data, offset, pos, runEnd);
      await this.img.writeData(buf, host, clusterStart);
      for (let k = 0; k < count; k++) {
        const old = rawEntry(slot.table, index + k, false);
        storeEntry(slot.table, index + k, false, { ...old, ...hostEntry(host + k * cs, true) });
        this.releaseReplaced(old, slot.offset, index + k, host + k * cs);
      }
      this.img.markL2Dirty(slot);
      pos = runEnd;
    }
  }

  /** Releases the old mapping of an entry that now points elsewhere. */
  private releaseReplaced(old: RawEntry, l2Offset: number, index: number, newHost: number): void {
    if (this.g.hasDataFile) return;
    if (old.hi & COMPRESSED) return this.release(old, l2Offset, index);
    const host = hostOf(old);
    if (host !== 0 && host !== newHost) this.release(old, l2Offset, index);
  }

  /** Host clusters for `count` guest clusters from `guestStart`. */
  private async allocateData(guestStart: number, count: number): Promise<number> {
    // With an external data file, guest and host offsets coincide and nothing is refcounted.
    if (this.g.hasDataFile) return guestStart;
    return this.img.refcounts.allocate(count);
  }

  /**
   * The full content of `count` clusters from `clusterStart`: the guest's current data
   * where the request does not cover it (copy-on-write), the request's data elsewhere.
   */
  private async composeRun(clusterStart: number, count: number, data: Buffer, dataOffset: number, from: number, to: number): Promise<Buffer> {
    const cs = this.g.clusterSize;
    const runEnd = clusterStart + count * cs;
    // Whole clusters covered by the request: its data is the content, no copy needed.
    if (from === clusterStart && to === runEnd) return data.subarray(from - dataOffset, to - dataOffset);
    const buf = Buffer.allocUnsafe(count * cs);
    const virtualEnd = this.img.virtualSize;
    // Head and tail that the request leaves untouched keep the guest's current data.
    if (from > clusterStart) await this.readCurrent(clusterStart, buf.subarray(0, from - clusterStart));
    if (to < runEnd) {
      const tail = buf.subarray(to - clusterStart);
      const readable = Math.max(0, Math.min(runEnd, virtualEnd) - to);
      if (readable > 0) await this.readCurrent(to, tail.subarray(0, readable));
      tail.fill(0, readable);
    }
    data.copy(buf, from - clusterStart, from - dataOffset, to - dataOffset);
    return buf;
  }

  /** The guest's current content (read through this layer and its backing chain). */
  private async readCurrent(offset: number, buf: Buffer): Promise<void> {
    const end = Math.min(offset + buf.length, this.img.virtualSize);
    if (end > offset) await this.img.read(offset, buf.subarray(0, end - offset));
    if (end - offset < buf.length) buf.fill(0, Math.max(0, end - offset));
  }

  /** Extended L2: allocation and copy-on-write at subcluster granularity. */
  private async writeExtended(slot: L2Slot, offset: number, data: Buffer): Promise<void> {
    const cs = this.g.clusterSize;
    const sc = this.g.subclusterSize;
    const span = cs * this.g.l2Entries;
    const base = Math.floor(offset / span) * span;
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const index = Math.floor((pos - base) / cs);
      const clusterStart = base + index * cs;
      const n = Math.min(end, clusterStart + cs) - pos;
      // Validates the entry first: invalid bitmaps are corruption, as on reads.
      lookupRun(slot.table, slot.offset, clusterStart, 1, this.g, this.img.filename);
      const e = rawEntry(slot.table, index, true);
      const inCluster = pos - clusterStart;
      const touched = subclusterMask(inCluster, inCluster + n, sc);
      // The subcluster-aligned span the request touches.
      const spanFrom = clusterStart + Math.floor(inCluster / sc) * sc;
      const spanTo = clusterStart + Math.ceil((inCluster + n) / sc) * sc;
      const host = hostOf(e);
      const allocated = host !== 0 || (this.g.hasDataFile && (e.hi & COPIED) !== 0);
      const owned = allocated && (e.hi & COPIED) !== 0 && !(e.hi & COMPRESSED);
      if (owned || (!allocated && !(e.hi & COMPRESSED))) {
        const target = owned ? host : await this.allocateData(clusterStart, 1);
        const piece = Buffer.allocUnsafe(spanTo - spanFrom);
        if (pos > spanFrom) await this.readCurrent(spanFrom, piece.subarray(0, pos - spanFrom));
        if (pos + n < spanTo) await this.readCurrent(pos + n, piece.subarray(pos + n - spanFrom));
        data.copy(piece, pos - spanFrom, pos - offset, pos - offset + n);
        await this.img.writeData(piece, target + (spanFrom - clusterStart), spanFrom);
        storeEntry(slot.table, index, true, {
          ...hostEntry(target, true),
          allocBits: (e.allocBits | touched) >>> 0,
          zeroBits: (e.zeroBits & ~touched) >>> 0,
        });
      } else {
        // Compressed or shared with a snapshot: copy the whole cluster.
        const target = await this.allocateData(clusterStart, 1);
        const buf = await this.composeRun(clusterStart, 1, data, offset, pos, pos + n);
        await this.img.writeData(buf, target, clusterStart);
        storeEntry(slot.table, index, true, { ...hostEntry(target, true), allocBits: ALL_SUBCLUSTERS, zeroBits: 0 });
        this.releaseReplaced(e, slot.offset, index, target);
      }
      this.img.markL2Dirty(slot);
      pos += n;
    }
  }

  /**
   * Makes [offset, offset+length) read as zeros. Whole clusters (subclusters with
   * extended L2) get the zero flag; with `mayUnmap` their host clusters are released.
   * Partial clusters are written with zeros. v2 images have no zero flag.
   */
  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    const g = this.g;
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const unitStart = Math.floor(pos / unit) * unit;
      const unitEnd = Math.min(unitStart + unit, this.img.virtualSize);
      const partEnd = Math.min(end, unitEnd);
      const whole = pos === unitStart && partEnd === unitEnd;
      if (!whole || g.version < 3 || this.img.dataFileRaw) {
        await this.zeroByWriting(pos, partEnd - pos);
        pos = partEnd;
        continue;
      }
      // Whole units up to the end of this L2 table (or of the request).
      const span = g.clusterSize * g.l2Entries;
      const tableEnd = (Math.floor(pos / span) + 1) * span;
      const wholeEnd = end >= this.img.virtualSize ? this.img.virtualSize : Math.floor(end / unit) * unit;
      const runEnd = Math.min(wholeEnd, tableEnd);
      await this.zeroUnits(pos, runEnd, mayUnmap);
      pos = runEnd;
    }
  }

  /**
   * Writes real zeros, skipping ranges that already read as zeros (a raw external data
   * file must hold the zeros itself, so there everything is written).
   */
  private async zeroByWriting(offset: number, length: number): Promise<void> {
    const CHUNK = 4 * 1024 * 1024;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const st = await this.img.extentAt(pos, Math.min(end - pos, CHUNK));
      if (st.kind === 'data' || this.img.dataFileRaw) await this.write(pos, Buffer.alloc(st.length));
      pos += st.length;
    }
  }

  /** How this layer holds the cluster of entry `e`. */
  private ownership(e: RawEntry): 'compressed' | 'owned' | 'shared' | 'none' {
    if (e.hi & COMPRESSED) return 'compressed';
    const allocated = hostOf(e) !== 0 || (this.g.hasDataFile && (e.hi & COPIED) !== 0);
    if (!allocated) return 'none';
    return e.hi & COPIED ? 'owned' : 'shared';
  }

  private async zeroUnits(from: number, to: number, mayUnmap: boolean): Promise<void> {
    const g = this.g;
    const cs = g.clusterSize;
    const span = cs * g.l2Entries;
    const base = Math.floor(from / span) * span;
    const slot = await this.img.l2ForWrite(Math.floor(from / span));
    for (let pos = from; pos < to; ) {
      const index = Math.floor((pos - base) / cs);
      const clusterStart = base + index * cs;
      const clusterEnd = Math.min(clusterStart + cs, this.img.virtualSize);
      const upto = Math.min(to, clusterEnd);
      const e = rawEntry(slot.table, index, g.extendedL2);
      if (g.extendedL2) {
        lookupRun(slot.table, slot.offset, clusterStart, 1, g, this.img.filename);
        const mask = subclusterMask(pos - clusterStart, upto - clusterStart, g.subclusterSize);
        const whole = pos === clusterStart && upto === clusterEnd;
        const how = this.ownership(e);
        if (whole && (mayUnmap || how === 'compressed' || how === 'shared')) {
          this.releaseReplaced(e, slot.offset, index, -1);
          storeEntry(slot.table, index, true, { hi: 0, lo: 0, zeroBits: ALL_SUBCLUSTERS, allocBits: 0 });
        } else if (how === 'compressed' || how === 'shared') {
          // Part of a compressed or shared cluster: copy it first, then zero the part.
          await this.write(pos, Buffer.alloc(upto - pos));
        } else {
          storeEntry(slot.table, index, true, { ...e, zeroBits: (e.zeroBits | mask) >>> 0, allocBits: (e.allocBits & ~mask) >>> 0 });
        }
      } else {
        const kind = decodeCluster(slot.table, slot.offset, index, g, this.img.filename).type;
        const owned = (kind === Sub.Normal || kind === Sub.ZeroAlloc) && (e.hi & COPIED) !== 0;
        if (owned && !mayUnmap) {
          storeEntry(slot.table, index, false, { ...e, ...hostEntry(hostOf(e), true, true) });
        } else {
          this.releaseReplaced(e, slot.offset, index, -1);
          storeEntry(slot.table, index, false, { ...e, hi: 0, lo: ZERO_FLAG });
        }
      }
      pos = upto;
    }
    this.img.markL2Dirty(slot);
  }

  /**
   * Discards whole clusters: they become unallocated (reading the backing file), or
   * zero clusters when a backing file would otherwise show through (v3), as QEMU.
   */
  async discard(offset: number, length: number): Promise<void> {
    const g = this.g;
    const cs = g.clusterSize;
    const first = Math.ceil(offset / cs) * cs;
    let end = Math.floor((offset + length) / cs) * cs;
    if (offset + length >= this.img.virtualSize) end = Math.max(end, Math.min(offset + length, this.img.virtualSize));
    // data_file_raw: unmapping would leave the old bytes in the data file, which must
    // stay the guest disk as a raw image; the discarded clusters are zeroed there instead.
    if (this.img.dataFileRaw) {
      if (end > first) await this.zeroByWriting(first, end - first);
      return;
    }
    const span = cs * g.l2Entries;
    for (let pos = first; pos < end; ) {
      const tableEnd = (Math.floor(pos / span) + 1) * span;
      const l1Index = Math.floor(pos / span);
      if (!this.img.hasL2(l1Index) && !this.img.backing) {
        pos = tableEnd;
        continue;
      }
      const slot = await this.img.l2ForWrite(l1Index);
      const upto = Math.min(end, tableEnd);
      for (let p = pos; p < upto; p += cs) {
        const index = Math.floor((p % span) / cs);
        const e = rawEntry(slot.table, index, g.extendedL2);
        // as qemu: a cluster that neither holds data nor hides a backing file stays as it is;
        // the others read as zeros afterwards (v3: the zero flag; v2 can only unmap)
        if (this.img.backing === null && this.ownership(e) === 'none') continue;
        this.releaseReplaced(e, slot.offset, index, -1);
        if (g.extendedL2) storeEntry(slot.table, index, true, { hi: 0, lo: 0, zeroBits: ALL_SUBCLUSTERS, allocBits: 0 });
        else storeEntry(slot.table, index, false, { ...e, hi: 0, lo: g.version >= 3 ? ZERO_FLAG : 0 });
      }
      this.img.markL2Dirty(slot);
      pos = upto;
    }
  }

  /**
   * Allocates every cluster of the image (preallocation=metadata|falloc|full): L2
   * tables and data clusters, with falloc reserving and full zeroing the data space.
   * With extended L2 the subclusters stay unallocated (as QEMU does), so a backing
   * file still shows through and the rest reads as zeros.
   */
  async preallocate(mode: 'metadata' | 'falloc' | 'full', from = 0): Promise<void> {
    const g = this.g;
    const cs = g.clusterSize;
    const span = cs * g.l2Entries;
    const size = this.img.virtualSize;
    // Clusters that start at or after `from` (resize preallocates only the new part).
    const firstCluster = Math.ceil(from / cs);
    let end = 0;
    // All L2 tables first, then the data: the data clusters then lie in one run.
    const slots = [];
    for (let l1Index = Math.floor((firstCluster * cs) / span); l1Index * span < size; l1Index++) {
      slots.push({ l1Index, slot: await this.img.l2ForWrite(l1Index) });
    }
    for (const { l1Index, slot } of slots) {
      const tableFirst = l1Index * g.l2Entries;
      const k0 = Math.max(0, firstCluster - tableFirst);
      const first = (tableFirst + k0) * cs;
      const n = Math.min(g.l2Entries - k0, Math.ceil((size - first) / cs));
      if (n <= 0) continue;
      const host = await this.allocateData(first, n);
      for (let k = 0; k < n; k++) {
        const e = { ...hostEntry(host + k * cs, true), zeroBits: 0, allocBits: 0 };
        const old = rawEntry(slot.table, k0 + k, g.extendedL2);
        this.releaseReplaced(old, slot.offset, k0 + k, host + k * cs);
        storeEntry(slot.table, k0 + k, g.extendedL2, e);
      }
      this.img.markL2Dirty(slot);
      const length = g.hasDataFile ? Math.min(n * cs, size - first) : n * cs;
      if (mode === 'falloc') await allocateFile(this.img.dataTarget.fd, host + length, host);
      if (mode === 'full') {
        const zeros = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
        for (let p = 0; p < length; p += zeros.length) {
          await this.img.dataTarget.write(zeros.subarray(0, Math.min(zeros.length, length - p)), host + p);
        }
      }
      end = Math.max(end, host + length);
    }
    // Metadata preallocation still makes the file as long as the data it maps.
    if (this.img.dataTarget.size < end) await this.img.dataTarget.truncate(end);
  }

  /** Where the next compressed cluster may be packed (0 = start a new host cluster). */
  private compressedCursor = 0;

  /**
   * Stores one guest cluster as compressed data (convert -c). Compressed clusters are
   * packed byte after byte; a host cluster holding parts of k of them has refcount k.
   */
  async writeCompressed(offset: number, compressed: Buffer): Promise<void> {
    const g = this.g;
    const cs = g.clusterSize;
    if (g.hasDataFile) throw new CorruptImageError(this.img.filename, 'compressed clusters are not possible with an external data file');
    if (offset % cs !== 0) throw new Error('compressed writes must be cluster aligned');
    const size = compressed.length;
    const refcounts = this.img.refcounts;
    let host = this.compressedCursor;
    let fits = host !== 0 && cs - (host % cs) >= size;
    if (host !== 0 && !fits) {
      // Spill into the clusters right after the current one when they are free.
      const next = Math.ceil(host / cs);
      const extra = Math.ceil((size - (cs - (host % cs))) / cs);
      let free = true;
      for (let c = next; c < next + extra && free; c++) free = (await refcounts.get(c)) === 0;
      if (free) {
        for (let c = next; c < next + extra; c++) await refcounts.set(c, 1);
        await refcounts.add(Math.floor(host / cs), 1);
        fits = true;
      }
    } else if (fits) {
      await refcounts.add(Math.floor(host / cs), 1);
    }
    if (!fits) host = await refcounts.allocate(Math.ceil(size / cs));
    await this.img.dataTarget.write(compressed, host);
    this.compressedCursor = (host + size) % cs === 0 ? 0 : host + size;

    const span = cs * g.l2Entries;
    const slot = await this.img.l2ForWrite(Math.floor(offset / span));
    const index = Math.floor((offset % span) / cs);
    const old = rawEntry(slot.table, index, g.extendedL2);
    const x = BigInt(62 - (g.clusterBits - 8));
    const sectors = BigInt(Math.floor((host + size - 1) / 512) - Math.floor(host / 512));
    const entry = (1n << 62n) | (sectors << x) | BigInt(host);
    storeEntry(slot.table, index, g.extendedL2, {
      hi: Number(entry >> 32n),
      lo: Number(entry & 0xffffffffn),
      zeroBits: 0,
      allocBits: 0,
    });
    this.releaseReplaced(old, slot.offset, index, -1);
    this.img.markL2Dirty(slot);
  }

  /**
   * Releases every cluster from guest offset `from` (cluster aligned) to the end of the
   * L1 table: entries become unallocated and L2 tables left empty are freed.
   */
  async unmapFrom(from: number): Promise<void> {
    const g = this.g;
    const cs = g.clusterSize;
    const span = cs * g.l2Entries;
    for (let l1Index = Math.floor(from / span); l1Index < this.img.header.l1Size; l1Index++) {
      if (!this.img.hasL2(l1Index)) continue;
      const slot = await this.img.l2ForWrite(l1Index);
      const k0 = l1Index * span >= from ? 0 : Math.ceil((from - l1Index * span) / cs);
      for (let k = k0; k < g.l2Entries; k++) {
        const e = rawEntry(slot.table, k, g.extendedL2);
        this.releaseReplaced(e, slot.offset, k, -1);
        storeEntry(slot.table, k, g.extendedL2, { hi: 0, lo: 0, zeroBits: 0, allocBits: 0 });
      }
      this.img.markL2Dirty(slot);
      if (k0 === 0) this.img.dropL2(l1Index, slot.offset);
    }
  }
}
