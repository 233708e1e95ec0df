/**
 * Persistent dirty bitmaps of a qcow2 image open for writing: loaded into memory,
 * kept in step with every guest write, changed by `qimg bitmap`, and stored back on
 * close (docs/interop/qcow2.txt, "Bitmaps").
 *
 * Crash safety follows QEMU's order:
 * - before the first guest write, every consistent bitmap is flagged in_use in the
 *   directory, rewritten in place while the header's autoclear bit is off (a torn
 *   directory is then ignored rather than trusted), and the bit is set again;
 * - on close, bitmap data and tables go to new clusters, then a new directory, then
 *   the header is switched to it in one write, and only then are the old clusters freed.
 * A crash at any point leaves either the old directory (bitmaps in_use: not trusted)
 * or the new one, never a bitmap that misses a write.
 *
 * Bitmaps already in_use when the image was opened are inconsistent: they are kept as
 * they are (flags, table) and only `--remove` touches them, as in QEMU.
 */
import { CorruptImageError, QimgError } from '../../core/errors.js';
import * as C from './constants.js';
import {
  BITMAP_TYPE_DIRTY_TRACKING,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  BME_MIN_GRANULARITY_BITS,
  loadBitmapDirectory,
} from './bitmaps.js';
import { serializeHeader } from './header-serialize.js';
import type { Qcow2Image } from './driver.js';

/** Bits 9..55 of a bitmap table entry: the data cluster's offset. */
const TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
/** Bits 1..8 and 56..63 must be zero. */
const TABLE_RESERVED_MASK = 0xff000000000001fen;
const TABLE_ALL_ONES = 1n;
const DIR_ENTRY_HEADER = 24;

export interface PersistentBitmap {
  name: string;
  /** the name as stored (rewritten byte for byte) */
  nameBytes: Buffer;
  granularityBits: number;
  /** the auto flag: writes set bits */
  enabled: boolean;
  /** in_use on disk when the image was opened: left as it is */
  inconsistent: boolean;
  /** the table on disk (0 for a bitmap not stored yet) */
  tableOffset: number;
  tableSize: number;
  /** the bits in memory (bit n of the disk = byte n/8, bit n%8), or null while only on disk */
  bits: Buffer | null;
  /** the bits or size differ from the table on disk */
  changed: boolean;
}

/** Bytes of bitmap data covering `size` bytes of disk at 2^bits granularity. */
export function bitmapBytes(size: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / 8);
}

/** Sets the bits covering [offset, offset+length) in `bits` (granularity 2^gBits). */
export function setBitRange(bits: Buffer, gBits: number, offset: number, length: number): void {
  if (length <= 0) return;
  const g = 2 ** gBits;
  let first = Math.floor(offset / g);
  const last = Math.min(Math.floor((offset + length - 1) / g), bits.length * 8 - 1);
  while (first <= last && first % 8 !== 0) {
    bits[first >> 3] |= 1 << (first & 7);
    first++;
  }
  const wholeEnd = Math.floor((last + 1) / 8);
  if (first <= last && first / 8 < wholeEnd) {
    bits.fill(0xff, first / 8, wholeEnd);
    first = wholeEnd * 8;
  }
  for (; first <= last; first++) bits[first >> 3] |= 1 << (first & 7);
}

/** ORs `src` (granularity 2^srcBits) into `dst` (2^dstBits); both cover `size` bytes. */
export function mergeBits(dst: Buffer, dstBits: number, src: Buffer, srcBits: number, size: number): void {
  if (dstBits === srcBits) {
    for (let i = 0; i < Math.min(dst.length, src.length); i++) dst[i] |= src[i];
    return;
  }
  const g = 2 ** srcBits;
  const count = Math.ceil(size / g);
  for (let n = 0; n < count; n++) {
    if (src[n >> 3] === 0) {
      n |= 7; // a whole empty byte
      continue;
    }
    if (src[n >> 3] & (1 << (n & 7))) setBitRange(dst, dstBits, n * g, Math.min(g, size - n * g));
  }
}

/** Clears the unused tail bits past bit `count` (the spec wants them zero). */
function clearTail(bits: Buffer, count: number): void {
  if (count % 8 !== 0 && count >> 3 < bits.length) bits[count >> 3] &= (1 << (count % 8)) - 1;
  bits.fill(0, Math.ceil(count / 8));
}

export class Qcow2BitmapSet {
  private list: PersistentBitmap[] | null = null;
  /** consistent bitmaps are flagged in_use on disk (guest writes may be under way) */
  private tracking = false;
  /** the bitmaps must be stored on close (in-use flags to clear, or changes) */
  private dirty = false;
  /** bits, sizes or the directory changed (not only the in-use flags) */
  private changed = false;
  /** the directory as the header's extension describes it, without the in-use flags this
   * set adds (written back in place when nothing else changed) */
  private directoryOnDisk: Buffer | null = null;
  /** clusters the current directory references that the next store releases */
  private readonly retired: Array<{ offset: number; length: number }> = [];

  constructor(private readonly img: Qcow2Image) {}

  /** The bitmaps in directory order (read on first use). */
  async bitmaps(): Promise<PersistentBitmap[]> {
    if (this.list) return this.list;
    const img = this.img;
    const ext = img.header.bitmaps;
    if (!ext) return (this.list = []);
    const { entries, bytes } = await loadBitmapDirectory(img.file, ext, img.geometry.clusterSize, img.virtualSize);
    this.directoryOnDisk = bytes;
    this.list = entries.map((e) => {
      return {
        name: e.name,
        nameBytes: e.nameBytes,
        granularityBits: e.granularityBits,
        enabled: e.auto,
        inconsistent: e.inUse,
        tableOffset: e.tableOffset,
        tableSize: e.tableSize,
        bits: null,
        changed: false,
      };
    });
    return this.list;
  }

  /** How many bitmaps the image has (in memory). */
  async count(): Promise<number> {
    return (await this.bitmaps()).length;
  }

  async find(name: string): Promise<PersistentBitmap | undefined> {
    return (await this.bitmaps()).find((b) => b.name === name);
  }

  /**
   * Before the first guest write: flag every consistent bitmap in_use on disk (QEMU's
   * in-place update with the autoclear bit dropped around it) and load the bits of the
   * enabled ones.
   */
  async beginTracking(): Promise<void> {
    if (this.tracking) return;
    const list = await this.bitmaps();
    for (const b of list) if (b.enabled && !b.inconsistent) await this.loadBits(b);
    await this.flagInUse();
    this.tracking = true;
  }

  /** Sets the bits of every enabled, consistent bitmap for a guest write. */
  markDirty(offset: number, length: number): void {
    for (const b of this.list ?? []) {
      if (!b.enabled || b.inconsistent || !b.bits) continue;
      setBitRange(b.bits, b.granularityBits, offset, Math.min(length, this.img.virtualSize - offset));
      b.changed = true;
      this.touch();
    }
  }

  /**
   * QEMU's checks before a resize: every bitmap must be usable (an inconsistent one
   * stops it). Loads every bitmap's bits so they can follow the new size.
   */
  async prepareResize(): Promise<void> {
    const list = await this.bitmaps();
    for (const b of list) if (b.inconsistent) throw inconsistentError(b);
    for (const b of list) await this.loadBits(b);
    if (list.length > 0) await this.flagInUse();
  }

  /** The bitmaps follow a new virtual size: bits past the end dropped, new ones clear. */
  resized(newSize: number): void {
    for (const b of this.list ?? []) {
      if (!b.bits) continue;
      const bytes = bitmapBytes(newSize, b.granularityBits);
      const next = Buffer.alloc(bytes);
      b.bits.copy(next, 0, 0, Math.min(bytes, b.bits.length));
      clearTail(next, Math.ceil(newSize / 2 ** b.granularityBits));
      b.bits = next;
      b.changed = true;
      this.touch();
    }
  }

  // --- operations of `qimg bitmap` (QEMU's QMP checks, in its order) ---

  /**
   * block-dirty-bitmap-add for a persistent bitmap; `position`: its place in the
   * directory (default: last).
   */
  async add(name: string, granularity: number | undefined, disabled: boolean, nodeName: string, position?: number): Promise<void> {
    const img = this.img;
    if (name === '') throw new QimgError('Bitmap name cannot be empty');
    const list = await this.bitmaps();
    if (list.some((b) => b.name === name)) throw new QimgError(`Bitmap already exists: ${name}`);
    const cs = img.geometry.clusterSize;
    const g = granularity ?? Math.min(65536, Math.max(4096, cs));
    if (g < 512 || (g & (g - 1)) !== 0) throw new QimgError('Granularity must be power of 2 and at least 512');
    const persist = (why: string): never => {
      throw new QimgError(`Can't make bitmap '${name}' persistent in '${nodeName}': ${why}`);
    };
    if (img.header.version < 3) persist('Cannot store dirty bitmaps in qcow2 v2 files');
    const gBits = Math.log2(g);
    if (gBits > BME_MAX_GRANULARITY_BITS) persist(`Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
    if (gBits < BME_MIN_GRANULARITY_BITS) persist(`Granularity is under minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`);
    const bytes = bitmapBytes(img.virtualSize, gBits);
    if (bytes > BME_MAX_PHYS_SIZE || bytes > BME_MAX_TABLE_SIZE * cs) persist('Too much space will be occupied by the bitmap. Use larger granularity');
    const nameBytes = Buffer.from(name, 'utf8');
    if (nameBytes.length > BME_MAX_NAME_SIZE) persist(`Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
    if (list.length >= C.MAX_BITMAPS) persist('Maximum number of persistent bitmaps is already reached');
    if (directorySize(list) + entrySize(nameBytes.length) > C.MAX_BITMAP_DIRECTORY) persist('Not enough space in the bitmap directory');
    list.splice(position ?? list.length, 0, {
      name,
      nameBytes,
      granularityBits: gBits,
      enabled: !disabled,
      inconsistent: false,
      tableOffset: 0,
      tableSize: 0,
      bits: Buffer.alloc(bytes),
      changed: true,
    });
    this.touch();
  }

  /** block-dirty-bitmap-remove: also for inconsistent bitmaps (the way out QEMU suggests). */
  async remove(name: string): Promise<void> {
    const list = await this.bitmaps();
    const i = list.findIndex((b) => b.name === name);
    if (i < 0) throw notFound(name);
    const [b] = list.splice(i, 1);
    await this.retireData(b);
    this.touch();
  }

  async clear(name: string): Promise<void> {
    const b = await this.usable(name);
    b.bits = Buffer.alloc(bitmapBytes(this.img.virtualSize, b.granularityBits));
    b.changed = true;
    this.touch();
  }

  async setEnabled(name: string, enabled: boolean): Promise<void> {
    const b = await this.usable(name);
    if (b.enabled !== enabled) {
      b.enabled = enabled;
      // a bitmap enabled while guest writes are under way starts tracking them now
      if (enabled && this.tracking) await this.loadBits(b);
      this.touch();
    }
  }

  /** block-dirty-bitmap-merge of `source` (any image's bitmap) into bitmap `name`. */
  async merge(name: string, source: { bits: Buffer; granularityBits: number; size: number }): Promise<void> {
    const b = await this.usable(name);
    const size = this.img.virtualSize;
    if (source.size !== size) {
      throw new QimgError(`Bitmaps are of different sizes (destination size is ${size}, source size is ${source.size}) and can't be merged`);
    }
    await this.loadBits(b);
    mergeBits(b.bits!, b.granularityBits, source.bits, source.granularityBits, size);
    clearTail(b.bits!, Math.ceil(size / 2 ** b.granularityBits));
    b.changed = true;
    this.touch();
  }

  /** A merge target must exist and be usable (checked before the source, as QEMU). */
  async checkMergeTarget(name: string): Promise<void> {
    await this.usable(name);
  }

  /** The bits of bitmap `name` for a merge source (checked as QEMU checks a source). */
  async sourceBits(name: string): Promise<{ bits: Buffer; granularityBits: number; size: number }> {
    const b = await this.usable(name);
    await this.loadBits(b);
    return { bits: b.bits!, granularityBits: b.granularityBits, size: this.img.virtualSize };
  }

  private async usable(name: string): Promise<PersistentBitmap> {
    const b = await this.find(name);
    if (!b) throw notFound(name);
    if (b.inconsistent) throw inconsistentError(b);
    return b;
  }

  /** Reads a bitmap's data from its table (validated as QEMU validates it). */
  async loadBits(b: PersistentBitmap): Promise<void> {
    if (b.bits) return;
    const img = this.img;
    const bytes = bitmapBytes(img.virtualSize, b.granularityBits);
    const bits = Buffer.alloc(bytes);
    const cs = img.geometry.clusterSize;
    const table = await this.readTable(b);
    for (let i = 0; i < b.tableSize && i * cs < bytes; i++) {
      const entry = table.readBigUInt64BE(i * 8);
      const offset = Number(entry & TABLE_OFFSET_MASK);
      const part = bits.subarray(i * cs, Math.min(bytes, (i + 1) * cs));
      if (offset === 0) {
        if (entry & TABLE_ALL_ONES) part.fill(0xff);
        continue;
      }
      await img.file.read(part, offset);
    }
    clearTail(bits, Math.ceil(img.virtualSize / 2 ** b.granularityBits));
    b.bits = bits;
  }

  /** A bitmap's table, every entry checked (reserved bits, alignment, the all-ones flag). */
  private async readTable(b: PersistentBitmap): Promise<Buffer> {
    const img = this.img;
    const cs = img.geometry.clusterSize;
    if (b.tableOffset + b.tableSize * 8 > img.file.size) {
      throw new CorruptImageError(img.filename, `Could not read bitmap '${b.name}': its table lies beyond the end of the file`);
    }
    const table = await img.file.readBytes(b.tableOffset, b.tableSize * 8);
    for (let i = 0; i < b.tableSize; i++) {
      const entry = table.readBigUInt64BE(i * 8);
      const offset = entry & TABLE_OFFSET_MASK;
      if (entry & TABLE_RESERVED_MASK || (offset !== 0n && (entry & TABLE_ALL_ONES || offset % BigInt(cs) !== 0n))) {
        throw new CorruptImageError(img.filename, `Could not read bitmap '${b.name}': bitmap table entry ${i} is invalid (0x${entry.toString(16).padStart(16, '0')})`);
      }
      if (offset !== 0n && Number(offset) + cs > img.file.size) {
        throw new CorruptImageError(img.filename, `Could not read bitmap '${b.name}': data cluster at 0x${offset.toString(16)} lies beyond the end of the file`);
      }
    }
    return table;
  }

  /** Queues a stored bitmap's table and data clusters for release at the next store. */
  private async retireData(b: PersistentBitmap): Promise<void> {
    if (b.tableOffset === 0) return;
    const cs = this.img.geometry.clusterSize;
    const table = await this.readTable(b);
    for (let i = 0; i < b.tableSize; i++) {
      const offset = Number(table.readBigUInt64BE(i * 8) & TABLE_OFFSET_MASK);
      if (offset !== 0) this.retired.push({ offset, length: cs });
    }
    this.retired.push({ offset: b.tableOffset, length: b.tableSize * 8 });
    b.tableOffset = 0;
    b.tableSize = 0;
  }

  /**
   * QEMU's update in place: autoclear bit off, every directory entry flagged in_use
   * (entries of inconsistent bitmaps already are), autoclear bit on again.
   */
  private async flagInUse(): Promise<void> {
    const img = this.img;
    const ext = img.header.bitmaps;
    if (!ext || this.tracking || !(this.list ?? []).some((b) => !b.inconsistent && b.tableOffset !== 0)) return;
    this.directoryOnDisk ??= await img.file.readBytes(ext.directoryOffset, ext.directorySize);
    const dir = Buffer.from(this.directoryOnDisk);
    for (let pos = 0; pos + DIR_ENTRY_HEADER <= dir.length; pos += entrySize(dir.readUInt16BE(pos + 18) + dir.readUInt32BE(pos + 20))) {
      dir.writeUInt32BE((dir.readUInt32BE(pos + 12) | BME_FLAG_IN_USE) >>> 0, pos + 12);
    }
    await this.writeAutoclear(img.header.autoclearFeatures & ~C.AUTOCLEAR_BITMAPS);
    await img.file.write(dir, ext.directoryOffset);
    await img.sync();
    await this.writeAutoclear(img.header.autoclearFeatures | C.AUTOCLEAR_BITMAPS);
    this.tracking = true;
    this.dirty = true;
  }

  private async writeAutoclear(value: bigint): Promise<void> {
    const img = this.img;
    img.header.autoclearFeatures = value;
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64BE(value, 0);
    await img.file.write(buf, 88);
    await img.sync();
  }

  private touch(): void {
    this.dirty = true;
    this.changed = true;
  }

  /** True when close must store the bitmaps. */
  get needsStore(): boolean {
    return this.dirty;
  }

  /**
   * Stores every bitmap: changed data to new clusters, a new directory, the header
   * switched to it, then the clusters no longer referenced released.
   */
  async store(): Promise<void> {
    if (!this.dirty) return;
    const img = this.img;
    const ext = img.header.bitmaps;
    if (!this.changed && this.directoryOnDisk && ext) {
      // Nothing but the in-use flags: the directory goes back in place, byte for byte
      // (the same autoclear-bit dance), so an image opened for writing and left alone
      // (a refused operation) ends as it was.
      await this.writeAutoclear(img.header.autoclearFeatures & ~C.AUTOCLEAR_BITMAPS);
      await img.file.write(this.directoryOnDisk, ext.directoryOffset);
      await img.sync();
      await this.writeAutoclear(img.header.autoclearFeatures | C.AUTOCLEAR_BITMAPS);
      this.dirty = false;
      this.tracking = false;
      return;
    }
    const cs = img.geometry.clusterSize;
    const rc = img.refcounts;
    const list = this.list ?? [];
    const oldExt = img.header.bitmaps;
    if (oldExt) this.retired.push({ offset: oldExt.directoryOffset, length: oldExt.directorySize });

    const rewrite = list.filter((b) => b.changed && b.bits && !b.inconsistent);
    // every old table is read (and validated) before anything is written
    for (const b of rewrite) await this.retireData(b);
    for (const b of rewrite) {
      const bits = b.bits!;
      const tableSize = Math.max(1, Math.ceil(bits.length / cs));
      const table = Buffer.alloc(tableSize * 8);
      for (let i = 0; i < tableSize; i++) {
        const part = bits.subarray(i * cs, (i + 1) * cs);
        if (!part.some((x) => x !== 0)) continue; // all zeros: no cluster
        const at = await rc.allocate(1);
        const cluster = Buffer.alloc(cs);
        part.copy(cluster);
        await img.file.write(cluster, at);
        table.writeBigUInt64BE(BigInt(at), i * 8);
      }
      const tableAt = await rc.allocate(Math.ceil(table.length / cs));
      await img.file.write(table, tableAt);
      b.tableOffset = tableAt;
      b.tableSize = tableSize;
      b.changed = false;
    }

    const h = img.header;
    // a stale extension (its autoclear bit was cleared by a program without bitmap
    // support) is replaced, as QEMU drops it, never written twice
    h.unknownExtensions = h.unknownExtensions.filter((e) => e.type !== C.EXT_BITMAPS);
    const dir = list.length > 0 ? buildDirectory(list) : null;
    const dirAt = dir ? await rc.allocate(Math.ceil(dir.length / cs)) : 0;
    if (dir) await img.file.write(dir, dirAt);
    await rc.flush();
    await img.sync();
    if (dir) {
      h.bitmaps = { nbBitmaps: list.length, directorySize: dir.length, directoryOffset: dirAt };
      h.autoclearFeatures |= C.AUTOCLEAR_BITMAPS;
    } else {
      h.bitmaps = undefined;
      h.autoclearFeatures &= ~C.AUTOCLEAR_BITMAPS;
    }
    const head = serializeHeader(h);
    if (head.length > cs) throw new QimgError('the header does not fit in the first cluster', { file: img.filename });
    await img.file.write(head, 0);
    await img.sync();

    for (const r of this.retired.splice(0)) rc.free(r.offset, r.length);
    await rc.applyFrees();
    await rc.flush();
    await img.sync();
    this.dirty = false;
    this.changed = false;
    this.tracking = false;
    this.directoryOnDisk = dir;
  }
}

function entrySize(nameAndExtra: number): number {
  return Math.ceil((DIR_ENTRY_HEADER + nameAndExtra) / 8) * 8;
}

function directorySize(list: readonly PersistentBitmap[]): number {
  return list.reduce((n, b) => n + entrySize(b.nameBytes.length), 0);
}

/** The directory for `list`: consistent bitmaps stored clean, inconsistent ones as they were. */
function buildDirectory(list: readonly PersistentBitmap[]): Buffer {
  const dir = Buffer.alloc(directorySize(list));
  let pos = 0;
  for (const b of list) {
    dir.writeBigUInt64BE(BigInt(b.tableOffset), pos);
    dir.writeUInt32BE(b.tableSize, pos + 8);
    const flags = (b.inconsistent ? BME_FLAG_IN_USE : 0) | (b.enabled ? BME_FLAG_AUTO : 0);
    dir.writeUInt32BE(flags, pos + 12);
    dir[pos + 16] = BITMAP_TYPE_DIRTY_TRACKING;
    dir[pos + 17] = b.granularityBits;
    dir.writeUInt16BE(b.nameBytes.length, pos + 18);
    dir.writeUInt32BE(0, pos + 20);
    b.nameBytes.copy(dir, pos + DIR_ENTRY_HEADER);
    pos += entrySize(b.nameBytes.length);
  }
  return dir;
}

function notFound(name: string): QimgError {
  return new QimgError(`Dirty bitmap '${name}' not found`);
}

/** QEMU's refusal for a bitmap left in_use (two lines: the error and its hint). */
function inconsistentError(b: PersistentBitmap): QimgError {
  return new QimgError(`Bitmap '${b.name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`, { file: '' });
}
