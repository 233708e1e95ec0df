/**
 * `check` for qcow2: a consistency check of the reference counts and of the cluster
 * mapping, and its repair (`-r leaks`, `-r all`).
 *
 * The check works on the image file directly, independent of the driver and its
 * caches: it reads the header, walks every structure that uses host clusters (header,
 * active and snapshot L1 tables, their L2 tables and data clusters, compressed
 * clusters, the refcount table and blocks, the snapshot table, the bitmap directory,
 * bitmap tables and their data, the LUKS header area) and counts the references to
 * each host cluster in memory (the "in-memory refcount table", one typed-array slot
 * per cluster of the file). It then compares those counts with the refcounts stored
 * in the image, and checks the OFLAG_COPIED flags of the active L1/L2 tables.
 *
 * Diagnostics follow qemu-img 7.2: the same per-problem lines on stderr (through
 * `log`), the same counting of corruptions, leaks and internal errors, the same
 * fragmentation statistics and image end offset. Repairs write raw bytes to the file:
 * refcount entries, OFLAG_COPIED bits, misaligned preallocated L2 entries, and, when
 * the refcount structure itself is broken, a complete new refcount table and blocks
 * placed after the end of the file (written and synced before the header is switched
 * to them, so that a crash leaves either the old or the new structure in place).
 */
import { emptyCheckCounts, type ImageCheckCounts } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import { openStorage } from '../../io/storage.js';
import type { HostFile } from '../../io/host.js';
import * as C from './constants.js';
import { parseBitmapDirectory } from './bitmaps.js';
import { readHeader, type Qcow2Header } from './header.js';
import { maxRefcount, readRefcountEntry, refcountEntryText, writeRefcountEntry } from './refcount.js';
import { snapshotString } from './snapshot.js';

/** Repair leaked clusters (refcount > references). */
export const FIX_LEAKS = 1;
/** Repair everything else that can be repaired (implies nothing about leaks). */
export const FIX_ERRORS = 2;

/** What one check pass found (BdrvCheckResult in qemu's terms). */
/** qemu's BdrvCheckResult, as every format's check reports it. */
export type Qcow2CheckResult = ImageCheckCounts;

export interface Qcow2CheckOptions {
  /** FIX_LEAKS | FIX_ERRORS, or 0 for a read-only check */
  fix: number;
  /** receives each per-problem line (qemu prints them on stderr), without newline */
  log: (line: string) => void;
}

/** Memory the in-memory refcount table may take (1, 2 or 4 bytes per host cluster). */
export const MAX_REFCOUNT_ARRAY_BYTES = 512 * 1024 * 1024;

/** Most host clusters a check handles for a refcount width (qemu's limit is INT_MAX). */
export function maxCheckClusters(refcountBits: number): number {
  const bytesPerCluster = refcountBits <= 8 ? 1 : refcountBits === 16 ? 2 : 4;
  return Math.min(0x7fffffff, MAX_REFCOUNT_ARRAY_BYTES / bytesPerCluster);
}

const TWO32 = 0x100000000;

export function emptyCheckResult(): Qcow2CheckResult {
  return emptyCheckCounts();
}

/** A failure that stops the check (qemu-img: "Check failed: <reason>", exit 1). */
export class CheckFailedError extends QimgError {
  constructor(reason: string, file?: string) {
    super(`Check failed: ${reason}`, { file, exitCode: 1 });
    this.name = 'CheckFailedError';
  }
}

const EIO = 'Input/output error';
const EINVAL = 'Invalid argument';

/**
 * The in-memory refcount table: one slot per host cluster, as narrow as the image's
 * refcount width allows (64-bit widths are counted in 32 bits: no image has 2^32
 * references to one cluster).
 */
export class RefArray {
  private a: Uint8Array | Uint16Array | Uint32Array;
  length: number;
  readonly max: number;

  constructor(
    readonly bits: number,
    length: number,
  ) {
    this.max = Math.min(maxRefcount(bits), 0xffffffff);
    this.length = length;
    this.a = this.alloc(Math.max(length, 1));
  }

  private alloc(n: number): Uint8Array | Uint16Array | Uint32Array {
    if (this.bits <= 8) return new Uint8Array(n);
    if (this.bits === 16) return new Uint16Array(n);
    return new Uint32Array(n);
  }

  get(i: number): number {
    return i < this.length ? this.a[i] : 0;
  }

  set(i: number, v: number): void {
    if (i >= this.length) this.ensure(i + 1);
    this.a[i] = v;
  }

  /** Grows to at least `n` slots (new slots are 0). */
  ensure(n: number): void {
    if (n <= this.length) return;
    if (n > this.a.length) {
      const bigger = this.alloc(Math.max(n, Math.floor(this.a.length * 1.25) + 16));
      bigger.set(this.a.subarray(0, this.length));
      this.a = bigger;
    }
    this.length = n;
  }

  /** Whether any slot in [from, to) is non-zero. */
  anyInRange(from: number, to: number): boolean {
    const end = Math.min(to, this.length);
    for (let i = from; i < end; i++) if (this.a[i] !== 0) return true;
    return false;
  }
}

// ---------------------------------------------------------------------------------
// Formatting helpers (qemu prints 64-bit values with %lx / %lu)

/** Hex of the 64-bit value hi:lo, without prefix, as printf's %lx. */
function hex64(hi: number, lo: number): string {
  hi >>>= 0;
  lo >>>= 0;
  return hi !== 0 ? hi.toString(16) + lo.toString(16).padStart(8, '0') : lo.toString(16);
}

/** printf %#x: "0" for zero, "0x..." otherwise. */
function altHex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

// ---------------------------------------------------------------------------------

interface SnapshotRef {
  id: string;
  name: string;
  l1Hi: number;
  l1Lo: number;
  l1Offset: number;
  l1Size: number;
  extraSize: number;
}

interface CachedBlock {
  buf: Buffer;
  dirty: boolean;
}

/** Memory for cached refcount blocks (at least 4 blocks). */
const REFBLOCK_CACHE_BYTES = 32 * 1024 * 1024;
/** Marker for a refcount block whose offset is unusable (unaligned). */
const BAD_BLOCK = Symbol('bad refblock');

class Qcow2Checker {
  readonly cs: number;
  readonly cb: number;
  readonly bits: number;
  readonly blockEntries: number;
  readonly extL2: boolean;
  readonly entrySize: number;
  readonly l2Entries: number;
  readonly hasDataFile: boolean;
  readonly csizeShift: number;
  readonly csizeMask: number;

  reftable: Buffer;
  reftableOffset: number;
  reftableEntries: number;
  imrt: RefArray;
  res: Qcow2CheckResult = emptyCheckResult();
  rebuild = false;
  highest = 0;
  snapshots: SnapshotRef[] = [];
  snapshotsSize = 0;
  /** L2 table offsets of the active L1 (for the overlap check) */
  activeL2: number[] = [];
  private readonly blocks = new Map<number, CachedBlock>();
  private corruptionSignalled = false;

  constructor(
    readonly file: HostFile,
    readonly h: Qcow2Header,
    reftable: Buffer,
    public log: (line: string) => void,
  ) {
    this.cb = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.bits = 1 << h.refcountOrder;
    this.blockEntries = (this.cs * 8) / this.bits;
    this.extL2 = (h.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n;
    this.entrySize = this.extL2 ? 16 : 8;
    this.l2Entries = this.cs / this.entrySize;
    this.hasDataFile = (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n;
    this.csizeShift = 62 - (this.cb - 8);
    this.csizeMask = (1 << (this.cb - 8)) - 1;
    this.reftable = reftable;
    this.reftableOffset = h.refcountTableOffset;
    this.reftableEntries = reftable.length / 8;
    // sized by checkRefcounts, once the file is known not to be too large
    this.imrt = new RefArray(this.bits, 0);
  }

  get path(): string {
    return this.file.path;
  }

  fileClusters(): number {
    return Math.ceil(this.file.size / this.cs);
  }

  // ------------------------------------------------------------------ reading

  /** Reads `len` bytes at `pos`; unreadable positions (beyond 2^53) read as zeros. */
  async read(pos: number, len: number): Promise<Buffer> {
    if (len === 0) return Buffer.alloc(0);
    if (!Number.isSafeInteger(pos + len) || pos >= this.file.size) return Buffer.alloc(len);
    return this.file.readBytes(pos, len);
  }

  async loadSnapshots(): Promise<void> {
    const h = this.h;
    let pos = h.snapshotsOffset;
    for (let i = 0; i < h.nbSnapshots; i++) {
      const head = await this.read(pos, 40);
      const idSize = head.readUInt16BE(12);
      const nameSize = head.readUInt16BE(14);
      const extraSize = head.readUInt32BE(36);
      if (extraSize > C.MAX_SNAPSHOT_EXTRA) {
        throw new CheckFailedError(`Too much extra metadata in snapshot table entry ${i}`, this.path);
      }
      const strings = await this.read(pos + 40 + extraSize, idSize + nameSize);
      const l1Hi = head.readUInt32BE(0);
      const l1Lo = head.readUInt32BE(4);
      this.snapshots.push({
        id: snapshotString(strings.subarray(0, idSize)),
        name: snapshotString(strings.subarray(idSize)),
        l1Hi,
        l1Lo,
        l1Offset: l1Hi * TWO32 + l1Lo,
        l1Size: head.readUInt32BE(8),
        extraSize,
      });
      pos += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
      if (pos - h.snapshotsOffset > C.MAX_SNAPSHOT_TABLE_BYTES) {
        throw new CheckFailedError('Snapshot table is too big', this.path);
      }
    }
    this.snapshotsSize = pos - h.snapshotsOffset;
  }

  /** The snapshot table check that precedes the refcount check. */
  checkSnapshotTable(): void {
    if (this.h.version < 3) return;
    this.snapshots.forEach((s, i) => {
      // v3 entries must record at least vm_state_size_large and disk_size.
      if (s.extraSize < 16) {
        this.log(`ERROR snapshot table entry ${i} is incomplete`);
        this.res.corruptions++;
      }
    });
  }

  // ------------------------------------------------------------------ refcounts on disk

  /** Refcount block `index`: null = none (all refcounts 0), BAD_BLOCK = unusable. */
  async refblock(index: number): Promise<Buffer | null | typeof BAD_BLOCK> {
    if (index >= this.reftableEntries) return null;
    const hi = this.reftable.readUInt32BE(index * 8);
    const lo = this.reftable.readUInt32BE(index * 8 + 4) & 0xfffffe00;
    if (hi === 0 && lo === 0) return null;
    if ((lo >>> 0) % this.cs !== 0) {
      this.signalCorruption(`Refblock offset 0x${hex64(hi, lo)} unaligned (reftable index: ${altHex(index)})`);
      return BAD_BLOCK;
    }
    const off = hi * TWO32 + (lo >>> 0);
    const hit = this.blocks.get(off);
    if (hit) {
      this.blocks.delete(off);
      this.blocks.set(off, hit);
      return hit.buf;
    }
    const buf = await this.read(off, this.cs);
    this.blocks.set(off, { buf, dirty: false });
    if (this.blocks.size > Math.max(4, REFBLOCK_CACHE_BYTES / this.cs)) {
      const [oldOff, old] = this.blocks.entries().next().value as [number, CachedBlock];
      this.blocks.delete(oldOff);
      if (old.dirty) await this.file.write(old.buf, oldOff);
    }
    return buf;
  }

  /** Stored refcount of cluster `k`, or null when it cannot be read. */
  async getRefcount(k: number): Promise<number | null> {
    const block = await this.refblock(Math.floor(k / this.blockEntries));
    if (block === BAD_BLOCK) return null;
    if (block === null) return 0;
    return readRefcountEntry(block, k % this.blockEntries, this.bits);
  }

  /** A stored refcount as qemu prints it (exact, also where `rc` saturated). */
  private async refcountText(k: number, rc: number): Promise<string> {
    if (rc < Number.MAX_SAFE_INTEGER) return String(rc);
    const block = await this.refblock(Math.floor(k / this.blockEntries));
    return block === BAD_BLOCK || block === null ? String(rc) : refcountEntryText(block, k % this.blockEntries, this.bits);
  }

  private markBlockDirty(buf: Buffer): void {
    for (const e of this.blocks.values()) if (e.buf === buf) e.dirty = true;
  }

  async flushBlocks(): Promise<void> {
    let wrote = false;
    for (const [off, e] of this.blocks) {
      if (!e.dirty) continue;
      await this.file.write(e.buf, off);
      e.dirty = false;
      wrote = true;
    }
    if (wrote) await this.file.flush();
  }

  // ------------------------------------------------------------------ reference counting

  /**
   * Counts one reference to every host cluster overlapped by [offset, offset+size).
   * A range reaching a cluster or more past the end of the file is a corruption and
   * is not counted (the last cluster of a file may be partly allocated).
   */
  inc(offset: number, size: number, hexOffset?: string): void {
    if (size <= 0) return;
    if (offset + size - this.file.size >= this.cs) {
      this.log(
        'ERROR: counting reference for region exceeding the end of the file by one cluster or more: ' +
          `offset 0x${hexOffset ?? offset.toString(16)} size 0x${size.toString(16)}`,
      );
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    const imrt = this.imrt;
    if (last >= imrt.length) imrt.ensure(last + 1);
    for (let k = first; k <= last; k++) {
      const rc = imrt.get(k);
      if (rc >= imrt.max) {
        this.log(`ERROR: overflow cluster offset=0x${(k * this.cs).toString(16)}`);
        this.log(
          'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
        );
        this.res.corruptions++;
        continue;
      }
      imrt.set(k, rc + 1);
    }
  }

  /** Everything that uses clusters, counted into the in-memory refcount table. */
  async calculateRefcounts(fix: number, countRefcountStructures = true): Promise<void> {
    const h = this.h;
    this.activeL2 = [];
    this.inc(0, this.cs); // header
    await this.checkL1(h.l1TableOffset, h.l1Size, true, true, fix);

    if (this.hasDataFile && this.snapshots.length > 0) {
      this.log(`ERROR ${this.snapshots.length} snapshots in image with data file`);
      this.res.corruptions++;
    }
    for (const sn of this.snapshots) {
      if ((sn.l1Lo >>> 0) % this.cs !== 0) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex64(sn.l1Hi, sn.l1Lo)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > C.MAX_L1_BYTES / 8) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=${altHex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1Offset, sn.l1Size, false, false, fix, hex64(sn.l1Hi, sn.l1Lo));
    }
    this.inc(h.snapshotsOffset, this.snapshotsSize);

    if (countRefcountStructures) this.inc(this.reftableOffset, this.reftableEntries * 8);

    if (h.crypto && h.crypto.length > 0) this.inc(h.crypto.offset, h.crypto.length);

    await this.countBitmaps();

    if (countRefcountStructures) await this.checkRefblocks(fix);
  }

  /** The L1 table at `offset` and everything it references. */
  async checkL1(offset: number, size: number, fragInfo: boolean, active: boolean, fix: number, hexOffset?: string): Promise<void> {
    this.inc(offset, size * 8, hexOffset);
    if (size === 0) return;
    const l1 = await this.read(offset, size * 8);
    for (let i = 0; i < size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi & 0x7f000000 || lo & 0x1ff) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      // qemu 7.2 follows any non-zero entry, even one whose offset bits are all 0.
      if (hi === 0 && lo === 0) continue;
      const offHi = hi & 0x00ffffff;
      const offLo = (lo & 0xfffffe00) >>> 0;
      const l2Offset = offHi * TWO32 + offLo;
      const l2Hex = hex64(offHi, offLo);
      this.inc(l2Offset, this.cs, l2Hex);
      if (active && this.activeL2.length < 1 << 22) this.activeL2.push(l2Offset);
      if (offLo % this.cs !== 0) {
        this.log(`ERROR l2_offset=${l2Hex}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, fragInfo, active, fix);
    }
  }

  /** One L2 table: entry checks, references, and (active L1) fragmentation statistics. */
  async checkL2(l2Offset: number, fragInfo: boolean, active: boolean, fix: number): Promise<void> {
    const cs = this.cs;
    // A table past the end of the file reads as zeros: nothing to count or check.
    if (l2Offset >= this.file.size) return;
    const table = await this.read(l2Offset, cs);
    const res = this.res;
    let nextContiguous = 0;
    for (let i = 0; i < this.l2Entries; i++) {
      const p = i * this.entrySize;
      const hi = table.readUInt32BE(p);
      const lo = table.readUInt32BE(p + 4);
      // Extended L2: bits 32..63 of the bitmap say "reads as zero", bits 0..31 "allocated".
      const zeroBits = this.extL2 ? table.readUInt32BE(p + 8) : 0;
      const allocBits = this.extL2 ? table.readUInt32BE(p + 12) : 0;
      if (hi === 0 && lo === 0 && zeroBits === 0 && allocBits === 0) continue;

      if (hi & 0x40000000) {
        // compressed cluster
        let eHi = hi;
        if (hi & 0x80000000) {
          eHi = hi & 0x7fffffff;
          const co = this.compressedOffset(eHi, lo);
          this.log(`ERROR: coffset=0x${hex64(co.hi, co.lo)}: copied flag must never be set for compressed clusters`);
          res.corruptions++;
        }
        if (this.hasDataFile) {
          this.log(`ERROR compressed cluster ${i} with data file, entry=0x${hex64(eHi, lo)}`);
          res.corruptions++;
          continue;
        }
        if (zeroBits !== 0 || allocBits !== 0) {
          this.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(eHi, lo)}`);
          res.corruptions++;
          continue;
        }
        const co = this.compressedOffset(eHi, lo);
        const nbSectors = ((eHi >>> (this.csizeShift - 32)) & this.csizeMask) + 1;
        const coffset = co.hi * TWO32 + co.lo;
        const csize = nbSectors * 512 - (co.lo & 511);
        this.inc(coffset, csize, hex64(co.hi, co.lo));
        if (fragInfo) {
          res.allocatedClusters++;
          res.compressedClusters++;
          // Compressed clusters are fragmented by nature.
          res.fragmentedClusters++;
        }
        continue;
      }

      if (hi & 0x3f000000 || lo & 0x1fe) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
        res.corruptions++;
      }

      const offHi = hi & 0x00ffffff;
      const offLo = (lo & 0xfffffe00) >>> 0;
      const zeroFlag = !this.extL2 && (lo & 1) !== 0;
      const hasOffset = offHi !== 0 || offLo !== 0;
      let allocated: boolean;
      if (zeroFlag) allocated = hasOffset; // preallocated zero cluster, or plain zero
      else allocated = hasOffset || (this.hasDataFile && (hi & 0x80000000) !== 0);

      if (!allocated) {
        if (!zeroFlag && allocBits !== 0) {
          this.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          res.corruptions++;
        }
        continue;
      }

      // normal or preallocated-zero cluster
      const offset = offHi * TWO32 + offLo;
      const offHex = hex64(offHi, offLo);
      if ((zeroBits & allocBits) !== 0) {
        this.log(`ERROR offset=${offHex}: Allocated cluster has corrupted subcluster allocation bitmap`);
        res.corruptions++;
      }
      if (offLo % cs !== 0) {
        res.corruptions++;
        const containsData = this.extL2 ? allocBits !== 0 : !zeroFlag;
        if (!containsData) {
          const repair = (fix & FIX_ERRORS) !== 0;
          this.log(`${repair ? 'Repairing' : 'ERROR'} offset=${offHex}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (repair) {
            await this.zeroL2Entry(table, l2Offset, i, active);
            continue;
          }
        } else {
          this.log(`ERROR offset=${offHex}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (fragInfo) {
        res.allocatedClusters++;
        if (nextContiguous !== 0 && offset !== nextContiguous) res.fragmentedClusters++;
        nextContiguous = offset + cs;
      }
      if (!this.hasDataFile) this.inc(offset, cs, offHex);
    }
  }

  /** Host byte offset of a compressed descriptor (bits 0..csizeShift-1), as hi:lo. */
  private compressedOffset(hi: number, lo: number): { hi: number; lo: number } {
    return { hi: hi & ((1 << (this.csizeShift - 32)) - 1), lo: lo >>> 0 };
  }

  /**
   * Turns a misaligned preallocated entry into a plain zero cluster (nothing read from
   * the bad offset, nothing lost). Throws when the write would hit other metadata.
   */
  private async zeroL2Entry(table: Buffer, l2Offset: number, i: number, active: boolean): Promise<void> {
    const p = i * this.entrySize;
    if (this.extL2) {
      // Allocated subclusters become zero subclusters.
      const zeroBits = (table.readUInt32BE(p + 8) | table.readUInt32BE(p + 12)) >>> 0;
      table.writeUInt32BE(0, p);
      table.writeUInt32BE(0, p + 4);
      table.writeUInt32BE(zeroBits, p + 8);
      table.writeUInt32BE(0, p + 12);
    } else {
      table.writeUInt32BE(0, p);
      table.writeUInt32BE(C.OFLAG_ZERO_LO, p + 4);
    }
    const at = l2Offset + p;
    const overlap = this.overlapsMetadata(at, this.entrySize, active ? 'active-l2' : 'inactive-l2');
    if (overlap) {
      // Something is seriously wrong: stop the check, as qemu does.
      this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${overlap})`);
      this.log('ERROR: Overlap check failed');
      throw new CheckFailedError(EIO, this.path);
    }
    await this.file.write(table.subarray(p, p + this.entrySize), at);
    await this.file.flush();
    this.res.corruptions--;
    this.res.corruptionsFixed++;
  }

  /** Bitmap directory, bitmap tables and the clusters they reference. */
  async countBitmaps(): Promise<void> {
    const ext = this.h.bitmaps;
    if (!ext) return;
    this.inc(ext.directoryOffset, ext.directorySize);
    let entries;
    try {
      const dir = await this.read(ext.directoryOffset, ext.directorySize);
      entries = parseBitmapDirectory(dir, ext.nbBitmaps, this.cs, this.path);
    } catch {
      this.res.corruptions++;
      throw new CheckFailedError(EINVAL, this.path);
    }
    for (const bm of entries) {
      this.inc(bm.tableOffset, bm.tableSize * 8);
      const table = await this.read(bm.tableOffset, bm.tableSize * 8);
      for (let i = 0; i < bm.tableSize; i++) {
        const hi = table.readUInt32BE(i * 8);
        const lo = table.readUInt32BE(i * 8 + 4);
        if (hi & 0xff000000 || lo & 0x1fe) {
          this.res.corruptions++;
          continue;
        }
        const offHi = hi & 0x00ffffff;
        const offLo = (lo & 0xfffffe00) >>> 0;
        if (offHi === 0 && offLo === 0) continue;
        if (lo & 1 || offLo % this.cs !== 0) {
          this.res.corruptions++;
          continue;
        }
        this.inc(offHi * TWO32 + offLo, this.cs, hex64(offHi, offLo));
      }
    }
  }

  /** Each refcount block: usable, counted, and referenced exactly once. */
  async checkRefblocks(fix: number): Promise<void> {
    for (let i = 0; i < this.reftableEntries; i++) {
      const hi = this.reftable.readUInt32BE(i * 8);
      const rawLo = this.reftable.readUInt32BE(i * 8 + 4);
      if (rawLo & 0x1ff) {
        this.log(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      const lo = rawLo >>> 0;
      if (lo % this.cs !== 0) {
        this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      const offset = hi * TWO32 + lo;
      const cluster = Math.floor(offset / this.cs);
      if (cluster >= this.imrt.length) {
        this.res.corruptions++;
        const repair = (fix & FIX_ERRORS) !== 0;
        this.log(`${repair ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        // qemu grows the file to make room for the block; qimg rebuilds the whole
        // structure instead (a hostile offset must not create a huge file).
        if (repair) this.rebuild = true;
        continue;
      }
      if (offset !== 0) {
        this.inc(offset, this.cs);
        const rc = this.imrt.get(cluster);
        if (rc !== 1) {
          this.log(`ERROR refcount block ${i} refcount=${rc}`);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  // ------------------------------------------------------------------ comparison

  /** Stored refcounts against counted references, block by block; repairs per `fix`. */
  async compareRefcounts(fix: number): Promise<void> {
    const res = this.res;
    const imrt = this.imrt;
    const E = this.blockEntries;
    const n = imrt.length;
    this.highest = 0;
    for (let first = 0; first < n; first += E) {
      const block = await this.refblock(first / E);
      const end = Math.min(n, first + E);
      // No refcount block and no reference: nothing to compare in this range.
      if (block === null && !imrt.anyInRange(first, end)) continue;
      for (let k = first; k < end; k++) {
        if (block === BAD_BLOCK) {
          this.log(`Can't get refcount for cluster ${k}: ${EIO}`);
          res.checkErrors++;
          continue;
        }
        const rc1 = block === null ? 0 : readRefcountEntry(block, k - first, this.bits);
        const rc2 = imrt.get(k);
        if (rc1 > 0 || rc2 > 0) this.highest = k;
        if (rc1 === rc2) continue;
        let fixed: 'leaksFixed' | 'corruptionsFixed' | null = null;
        if (rc1 === 0) this.rebuild = true;
        else if (rc1 > rc2 && fix & FIX_LEAKS) fixed = 'leaksFixed';
        else if (rc1 < rc2 && fix & FIX_ERRORS) fixed = 'corruptionsFixed';
        this.log(`${fixed ? 'Repairing' : rc1 < rc2 ? 'ERROR' : 'Leaked'} cluster ${k} refcount=${block === null ? 0 : refcountEntryText(block, k - first, this.bits)} reference=${rc2}`);
        if (fixed && block) {
          writeRefcountEntry(block, k - first, this.bits, rc2);
          this.markBlockDirty(block);
          res[fixed]++;
          continue;
        }
        if (rc1 < rc2) res.corruptions++;
        else res.leaks++;
      }
    }
    await this.flushBlocks();
  }

  /** OFLAG_COPIED of the active L1 and L2 entries must say "refcount is exactly 1". */
  async checkOflagCopied(fix: number): Promise<void> {
    const res = this.res;
    // With -r leaks, repair only when the refcounts can be trusted.
    const repair = fix & FIX_ERRORS ? true : fix & FIX_LEAKS ? !res.checkErrors && !res.corruptions && !res.leaks : false;
    const { l1TableOffset, l1Size } = this.h;
    const l1 = await this.read(l1TableOffset, l1Size * 8);
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const offHi = hi & 0x00ffffff;
      const offLo = (lo & 0xfffffe00) >>> 0;
      if (offHi === 0 && offLo === 0) continue;
      const l2Offset = offHi * TWO32 + offLo;
      const l2Cluster = Math.floor(l2Offset / this.cs);
      const rc = await this.getRefcount(l2Cluster);
      if (rc === null) continue;
      const copied = (hi & 0x80000000) !== 0;
      if ((rc === 1) !== copied) {
        this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${await this.refcountText(l2Cluster, rc)}`);
        if (repair) {
          const entry = Buffer.alloc(8);
          entry.writeUInt32BE((rc === 1 ? hi | 0x80000000 : hi & 0x7fffffff) >>> 0, 0);
          entry.writeUInt32BE(lo >>> 0, 4);
          await this.file.write(entry, l1TableOffset + i * 8);
          await this.file.flush();
          res.corruptionsFixed++;
        } else {
          res.corruptions++;
        }
      }

      if (l2Offset >= this.file.size) continue; // reads as zeros
      const table = await this.read(l2Offset, this.cs);
      let dirty = false;
      for (let j = 0; j < this.l2Entries; j++) {
        const p = j * this.entrySize;
        const eHi = table.readUInt32BE(p);
        const eLo = table.readUInt32BE(p + 4);
        if (eHi & 0x40000000) continue; // compressed
        const dHi = eHi & 0x00ffffff;
        const dLo = (eLo & 0xfffffe00) >>> 0;
        const hasOffset = dHi !== 0 || dLo !== 0;
        const zeroFlag = !this.extL2 && (eLo & 1) !== 0;
        const allocated = zeroFlag ? hasOffset : hasOffset || (this.hasDataFile && (eHi & 0x80000000) !== 0);
        if (!allocated) continue;
        const dataCluster = Math.floor((dHi * TWO32 + dLo) / this.cs);
        const drc = this.hasDataFile ? 1 : await this.getRefcount(dataCluster);
        if (drc === null) continue;
        const eCopied = (eHi & 0x80000000) !== 0;
        if ((drc === 1) === eCopied) continue;
        this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(eHi, eLo)} refcount=${await this.refcountText(dataCluster, drc)}`);
        if (repair) {
          table.writeUInt32BE((drc === 1 ? eHi | 0x80000000 : eHi & 0x7fffffff) >>> 0, p);
          dirty = true;
          res.corruptionsFixed++;
        } else {
          res.corruptions++;
        }
      }
      if (dirty) {
        const overlap = this.overlapsMetadata(l2Offset, this.cs, 'active-l2');
        if (overlap) {
          this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${overlap})`);
          this.log(`ERROR: Could not write L2 table; metadata overlap check failed: ${EIO}`);
          res.checkErrors++;
          throw new CheckFailedError(EIO, this.path);
        }
        await this.file.write(table, l2Offset);
        await this.file.flush();
      }
    }
  }

  /**
   * Which metadata [offset, offset+len) touches, other than the kind being written (a
   * version of qemu's default "cached" overlap check, run before every repair write
   * into an L2 table); null when the write is safe.
   */
  overlapsMetadata(offset: number, len: number, writing: 'active-l2' | 'inactive-l2'): string | null {
    const cs = this.cs;
    const start = Math.floor(offset / cs) * cs;
    const end = Math.ceil((offset + len) / cs) * cs;
    const hit = (o: number, l: number) => l > 0 && o < end && start < o + l;
    if (offset < cs) return 'qcow2_header';
    if (hit(this.h.l1TableOffset, this.h.l1Size * 8)) return 'active L1 table';
    if (hit(this.reftableOffset, this.reftableEntries * 8)) return 'refcount table';
    if (hit(this.h.snapshotsOffset, this.snapshotsSize)) return 'snapshot table';
    for (const sn of this.snapshots) if (hit(sn.l1Offset, sn.l1Size * 8)) return 'inactive L1 table';
    if (writing !== 'active-l2') for (const o of this.activeL2) if (hit(o, cs)) return 'active L2 table';
    for (let i = 0; i < this.reftableEntries; i++) {
      const hi = this.reftable.readUInt32BE(i * 8);
      const lo = this.reftable.readUInt32BE(i * 8 + 4) & 0xfffffe00;
      if (hit(hi * TWO32 + (lo >>> 0), cs)) return 'refcount block';
    }
    if (this.h.bitmaps && hit(this.h.bitmaps.directoryOffset, this.h.bitmaps.directorySize)) return 'bitmap directory';
    return null;
  }

  /** qemu's corruption event, printed once (qimg does not set the corrupt bit). */
  signalCorruption(what: string): void {
    if (this.corruptionSignalled) return;
    this.corruptionSignalled = true;
    this.log(`qcow2: Image is corrupt: ${what}; further non-fatal corruption events will be suppressed`);
  }

  // ------------------------------------------------------------------ rebuild

  /**
   * Writes a new refcount structure describing the counted references, after the end
   * of the file: refcount blocks first, then the table, synced, then the header is
   * switched to the new table. The old table and blocks end up unreferenced (refcount
   * 0 in the new structure).
   */
  async rebuildRefcountStructure(): Promise<void> {
    // References without the old refcount structures, counted quietly.
    const savedRes = this.res;
    const savedLog = this.log;
    const savedRebuild = this.rebuild;
    this.res = emptyCheckResult();
    this.log = () => undefined;
    this.imrt = new RefArray(this.bits, this.fileClusters());
    await this.calculateRefcounts(0, false);
    this.res = savedRes;
    this.log = savedLog;
    this.rebuild = savedRebuild;

    const imrt = this.imrt;
    const cs = this.cs;
    const E = this.blockEntries;
    const start = Math.max(imrt.length, this.fileClusters());
    const used: number[] = [];
    for (let b = 0; b * E < imrt.length; b++) if (imrt.anyInRange(b * E, (b + 1) * E)) used.push(b);

    // Refblocks and table go at `start`; they need refcounts themselves, which may
    // need more refblocks and a bigger table: iterate until the layout is stable.
    let indices: number[];
    let nBlocks = 0;
    let tableClusters = 0;
    for (;;) {
      const end = start + nBlocks + tableClusters;
      const set = new Set(used);
      for (let b = Math.floor(start / E); b * E < end; b++) set.add(b);
      indices = [...set].sort((a, b) => a - b);
      const needBlocks = indices.length;
      const needTable = Math.max(1, Math.ceil(((indices[indices.length - 1] ?? 0) + 1) * 8 / cs));
      if (needBlocks === nBlocks && needTable === tableClusters) break;
      nBlocks = needBlocks;
      tableClusters = needTable;
    }
    if (tableClusters * cs > C.MAX_REFTABLE_BYTES) {
      this.res.checkErrors++;
      throw new CheckFailedError('the rebuilt refcount table would exceed the maximum size', this.path);
    }
    const tableCluster = start + nBlocks;
    imrt.ensure(tableCluster + tableClusters);
    for (let c = start; c < tableCluster + tableClusters; c++) imrt.set(c, 1);

    const table = Buffer.alloc(tableClusters * cs);
    const block = Buffer.alloc(cs);
    for (let k = 0; k < indices.length; k++) {
      const b = indices[k];
      const blockOffset = (start + k) * cs;
      block.fill(0);
      const first = b * E;
      const last = Math.min(imrt.length, first + E);
      for (let c = first; c < last; c++) {
        const v = imrt.get(c);
        if (v !== 0) writeRefcountEntry(block, c - first, this.bits, v);
      }
      await this.file.write(block, blockOffset);
      table.writeUInt32BE(Math.floor(blockOffset / TWO32), b * 8);
      table.writeUInt32BE(blockOffset % TWO32, b * 8 + 4);
    }
    const tableOffset = tableCluster * cs;
    await this.file.write(table, tableOffset);
    await this.file.flush();

    const head = Buffer.alloc(12);
    head.writeUInt32BE(Math.floor(tableOffset / TWO32), 0);
    head.writeUInt32BE(tableOffset % TWO32, 4);
    head.writeUInt32BE(tableClusters, 8);
    await this.file.write(head, 48);
    await this.file.flush();

    this.reftable = table;
    this.reftableOffset = tableOffset;
    this.reftableEntries = table.length / 8;
    this.h.refcountTableOffset = tableOffset;
    this.h.refcountTableClusters = tableClusters;
    this.blocks.clear();
    this.corruptionSignalled = false;
  }

  // ------------------------------------------------------------------ the whole check

  async checkRefcounts(fix: number): Promise<void> {
    const nb = this.fileClusters();
    const max = maxCheckClusters(this.bits);
    if (nb > max) {
      this.res.checkErrors++;
      throw new CheckFailedError(`the image file has ${nb} clusters; qimg checks at most ${max} with ${this.bits}-bit refcounts`, this.path);
    }
    this.res.totalClusters = Math.ceil(this.h.size / this.cs);
    this.imrt = new RefArray(this.bits, nb);
    await this.calculateRefcounts(fix);

    // When nothing needs a rebuild but something is to be fixed, compare again with
    // the repair switched on, from the state before this comparison.
    const preCompare = { ...this.res };
    await this.compareRefcounts(0);

    if (this.rebuild && fix & FIX_ERRORS) {
      const old = { ...this.res };
      this.log('Rebuilding refcount structure');
      await this.rebuildRefcountStructure();
      this.res.corruptions = 0;
      this.res.leaks = 0;
      this.res.allocatedClusters = 0;
      this.res.fragmentedClusters = 0;
      this.res.compressedClusters = 0;
      this.rebuild = false;
      this.imrt = new RefArray(this.bits, this.fileClusters());
      await this.calculateRefcounts(0);
      let freshLeaks = 0;
      if (fix & FIX_LEAKS) {
        const saved = this.res;
        this.res = emptyCheckResult();
        await this.compareRefcounts(FIX_LEAKS);
        if (this.rebuild) this.log('ERROR rebuilt refcount structure is still broken');
        freshLeaks = this.res.leaks;
        this.res = saved;
      }
      if (this.res.corruptions < old.corruptions) this.res.corruptionsFixed += old.corruptions - this.res.corruptions;
      if (this.res.leaks < old.leaks) this.res.leaksFixed += old.leaks - this.res.leaks;
      this.res.leaks += freshLeaks;
    } else if (fix) {
      if (this.rebuild) {
        this.log('ERROR need to rebuild refcount structures');
        this.res.checkErrors++;
        throw new CheckFailedError(EIO, this.path);
      }
      if (this.res.leaks || this.res.corruptions) {
        this.res = preCompare;
        await this.compareRefcounts(fix);
      }
    }

    await this.checkOflagCopied(fix);
    this.res.imageEndOffset = (this.highest + 1) * this.cs;
  }

  /** Clears the dirty and corrupt bits (after a repair that left nothing broken). */
  async markCleanAndConsistent(): Promise<void> {
    const h = this.h;
    if (h.version < 3) return;
    const bits = C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT;
    if ((h.incompatibleFeatures & bits) === 0n) return;
    await this.file.flush();
    h.incompatibleFeatures &= ~bits;
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64BE(h.incompatibleFeatures, 0);
    await this.file.write(buf, 72);
    await this.file.flush();
  }
}

/**
 * Checks (and with `fix`, repairs) the qcow2 image at `path`. One pass: the caller
 * runs a second, read-only pass after repairs (qemu-img's "Double checking").
 * Throws CheckFailedError when the check cannot complete.
 */
export async function checkQcow2(path: string, opts: Qcow2CheckOptions): Promise<Qcow2CheckResult> {
  const file = await openStorage(path, { writable: opts.fix !== 0 });
  try {
    const h = await readHeader(file);
    const cs = 2 ** h.clusterBits;
    const reftable = Buffer.alloc(h.refcountTableClusters * cs);
    if (Number.isSafeInteger(h.refcountTableOffset + reftable.length)) await file.read(reftable, h.refcountTableOffset);
    const checker = new Qcow2Checker(file, h, reftable, opts.log);
    await checker.loadSnapshots();
    checker.checkSnapshotTable();
    await checker.checkRefcounts(opts.fix);
    const res = checker.res;
    if (opts.fix && res.checkErrors === 0 && res.corruptions === 0) await checker.markCleanAndConsistent();
    return res;
  } catch (err) {
    if (err instanceof QimgError) throw err;
    const e = err as NodeJS.ErrnoException;
    throw new CheckFailedError(e && e.code === 'EIO' ? EIO : err instanceof Error ? err.message : String(err), path);
  } finally {
    await file.close().catch(() => undefined);
  }
}
