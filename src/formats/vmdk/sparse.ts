/**
 * A sparse extent: grain directory (GD) → grain tables (GT) → grains. One class for
 * the three variants qemu reads (hosted VMDK4 incl. stream-optimized, ESX 3 COWD,
 * ESXi seSparse); they differ in entry width and entry encoding only. Grain tables
 * are cached; runs of grains with the same status (and contiguous host data) are
 * answered as one, so reads of contiguous grains become one large file read.
 */
import { CorruptImageError, QimgError } from '../../core/errors.js';
import type { HostFile } from '../../io/host.js';
import { GTE_ZEROED, MAX_EXTENT_SECTORS, SECTOR } from './constants.js';
import { zlib } from '../../core/lazy-builtins.js';

export type GrainKind = 'unalloc' | 'zero' | 'data' | 'compressed' | 'error';

export interface SparseLayout {
  variant: 'vmdk4' | 'cowd' | 'sesparse';
  /** extent size in sectors */
  sectors: number;
  grainSectors: number;
  gtEntries: number;
  gdEntries: number;
  /** bytes */
  gdOffset: number;
  /** bytes; 0 = no redundant directory */
  rgdOffset: number;
  compressed: boolean;
  hasMarker: boolean;
  zeroGrain: boolean;
  version: number;
  /** seSparse: where grain tables and grains start (sectors) */
  seGtOffset: number;
  seGrainsOffset: number;
}

export interface GrainRun {
  kind: GrainKind;
  /** bytes from the asked offset */
  length: number;
  /** host byte offset of the asked offset (data), or of the grain (compressed) */
  host?: number;
}

/** Grain table cache budget. */
const GT_CACHE_BYTES = 64 * 1024 * 1024;
/** Compressed grains read in one request (their spans are usually contiguous). */
const MAX_COMPRESSED_SPAN = 8 * 1024 * 1024;
/** GD entry of a grain table that exists only in memory (a stream being written). */
export const GT_IN_MEMORY = -2;

export class SparseExtent {
  readonly grainSize: number;
  readonly entrySize: number;
  readonly gtBytes: number;
  private readonly cache = new Map<number, Buffer>();
  private readonly cacheLimit: number;
  /** tables that must stay in memory (modified stream tables, deferred tables) */
  readonly pinned = new Map<number, Buffer>();
  /** deferred tables: the entry range not yet written, per directory entry */
  private readonly dirty = new Map<number, { lo: number; hi: number }>();
  /** next free host sector for new grains or tables */
  nextSector: number;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly layout: SparseLayout,
    /** GT byte offset per directory entry: 0 none, -1 invalid */
    readonly gd: Float64Array,
    readonly rgd: Float64Array | null,
  ) {
    this.grainSize = layout.grainSectors * SECTOR;
    this.entrySize = layout.variant === 'sesparse' ? 8 : 4;
    this.gtBytes = layout.gtEntries * this.entrySize;
    this.cacheLimit = Math.max(64, Math.floor(GT_CACHE_BYTES / Math.max(1, this.gtBytes)));
    const fileSectors = Math.ceil(file.size / SECTOR);
    this.nextSector = Math.ceil(fileSectors / layout.grainSectors) * layout.grainSectors;
  }

  /** Reads and decodes the grain directory (and the redundant one). */
  static async open(file: HostFile, filename: string, layout: SparseLayout): Promise<SparseExtent> {
    if (layout.grainSectors > 0x200000) throw new CorruptImageError(filename, 'Invalid granularity, image may be corrupt');
    if (layout.gdEntries > 32 * 1024 * 1024) throw new CorruptImageError(filename, 'L1 size too big');
    const entry = layout.variant === 'sesparse' ? 8 : 4;
    const gdBytes = layout.gdEntries * entry;
    // qemu reads a directory past the end of the file as zeros; a directory that large
    // is only ever a hostile header, so refuse it before allocating.
    if (layout.gdOffset + gdBytes > Math.max(file.size, 0) + SECTOR * 64 && gdBytes > 1024 * 1024) {
      throw new CorruptImageError(filename, `grain directory (${gdBytes} bytes at ${layout.gdOffset}) lies outside the file`);
    }
    const gd = decodeDirectory(await file.readBytes(layout.gdOffset, gdBytes), layout);
    const rgd = layout.rgdOffset ? decodeDirectory(await file.readBytes(layout.rgdOffset, gdBytes), layout) : null;
    return new SparseExtent(file, filename, layout, gd, rgd);
  }

  /** The grain table of directory entry `i` (null: none allocated). */
  async table(i: number): Promise<Buffer | null> {
    const pinned = this.pinned.get(i);
    if (pinned) return pinned;
    const off = this.gd[i];
    if (off <= 0) return null;
    let t = this.cache.get(off);
    if (t) {
      this.cache.delete(off);
      this.cache.set(off, t);
      return t;
    }
    t = await this.file.readBytes(off, this.gtBytes);
    if (this.cache.size >= this.cacheLimit) this.cache.delete(this.cache.keys().next().value as number);
    this.cache.set(off, t);
    return t;
  }

  /** Status and host sector of one grain. */
  async lookup(grain: number): Promise<{ kind: GrainKind; sector: number }> {
    const i = Math.floor(grain / this.layout.gtEntries);
    if (i >= this.layout.gdEntries) return { kind: 'error', sector: 0 };
    if (this.gd[i] === -1) return { kind: 'error', sector: 0 };
    const t = await this.table(i);
    if (!t) return { kind: 'unalloc', sector: 0 };
    return this.decode(t, grain % this.layout.gtEntries);
  }

  decode(t: Buffer, j: number): { kind: GrainKind; sector: number } {
    if (this.entrySize === 4) {
      const e = t.readUInt32LE(j * 4);
      if (e === 0) return { kind: 'unalloc', sector: 0 };
      if (e === GTE_ZEROED && this.layout.zeroGrain) return { kind: 'zero', sector: 0 };
      return { kind: this.layout.compressed ? 'compressed' : 'data', sector: e };
    }
    // seSparse: the top nibble says what the entry is
    const lo = t.readUInt32LE(j * 8);
    const hi = t.readUInt32LE(j * 8 + 4);
    switch (hi >>> 28) {
      case 0:
        return lo === 0 && hi === 0 ? { kind: 'unalloc', sector: 0 } : { kind: 'error', sector: 0 };
      case 1: // unmapped
      case 2: // zero
        return { kind: 'zero', sector: 0 };
      case 3: {
        const cluster = (hi & 0xffff) * 2 ** 44 + lo * 4096 + ((hi >>> 16) & 0xfff);
        const sector = this.layout.seGrainsOffset + cluster * this.layout.grainSectors;
        if (!Number.isSafeInteger(sector * SECTOR)) return { kind: 'error', sector: 0 };
        return { kind: 'data', sector };
      }
      default:
        return { kind: 'error', sector: 0 };
    }
  }

  /**
   * The run of grains from `rel` sharing one status (data: contiguous on the host too;
   * compressed: any host offsets, `host` is the first grain's).
   */
  async run(rel: number, len: number): Promise<GrainRun> {
    const g = this.grainSize;
    let grain = Math.floor(rel / g);
    const first = await this.lookup(grain);
    const inGrain = rel - grain * g;
    let length = Math.min(len, g - inGrain);
    const host = first.kind === 'data' ? first.sector * SECTOR + inGrain : first.kind === 'compressed' ? first.sector * SECTOR : undefined;
    let expect = first.sector + this.layout.grainSectors;
    while (length < len) {
      grain++;
      const next = await this.lookup(grain);
      if (next.kind !== first.kind) break;
      if (first.kind === 'data') {
        if (next.sector !== expect) break;
        expect += this.layout.grainSectors;
      }
      length = Math.min(len, length + g);
    }
    return { kind: first.kind, length, host };
  }

  /**
   * Reads `buf.length` bytes at extent offset `rel`. `below` supplies unallocated
   * ranges (the backing file, or zeros); zeroed grains read as zeros.
   */
  async read(rel: number, buf: Buffer, below: (rel: number, dst: Buffer) => Promise<void>, pending?: (grain: number) => Buffer | undefined): Promise<void> {
    const jobs: Promise<void>[] = [];
    const compressed: Array<{ host: number; dst: Buffer; inGrain: number }> = [];
    for (let pos = 0; pos < buf.length; ) {
      const at = rel + pos;
      const grain = Math.floor(at / this.grainSize);
      const held = pending?.(grain);
      if (held) {
        const inGrain = at - grain * this.grainSize;
        const n = Math.min(buf.length - pos, this.grainSize - inGrain);
        held.copy(buf, pos, inGrain, inGrain + n);
        pos += n;
        continue;
      }
      const r = await this.run(at, buf.length - pos);
      const dst = buf.subarray(pos, pos + r.length);
      if (r.kind === 'data') jobs.push(this.file.read(dst, r.host!));
      else if (r.kind === 'compressed') {
        // one item per grain: each is a separate zlib stream somewhere in the file
        for (let p = 0; p < r.length; ) {
          const gi = Math.floor((at + p) / this.grainSize);
          const inGrain = at + p - gi * this.grainSize;
          const n = Math.min(r.length - p, this.grainSize - inGrain);
          const host = p === 0 ? r.host! : (await this.lookup(gi)).sector * SECTOR;
          compressed.push({ host, dst: dst.subarray(p, p + n), inGrain });
          p += n;
        }
      }
      else if (r.kind === 'zero') dst.fill(0);
      else jobs.push(below(at, dst)); // unallocated (qemu also reads a bad entry as unallocated)
      pos += r.length;
    }
    if (compressed.length > 0) jobs.push(this.readCompressed(compressed));
    await Promise.all(jobs);
  }

  /**
   * Compressed grains: neighbouring grains are fetched in one read (all spans at once)
   * and inflated as their span arrives.
   */
  private async readCompressed(items: Array<{ host: number; dst: Buffer; inGrain: number }>): Promise<void> {
    // enough for the last grain of a span even when it did not shrink (marker + zlib framing)
    const slack = this.grainSize + SECTOR;
    const work: Promise<void>[] = [];
    for (let i = 0; i < items.length; ) {
      let j = i + 1;
      while (j < items.length && items[j].host > items[j - 1].host && items[j].host - items[i].host < MAX_COMPRESSED_SPAN) j++;
      const start = items[i].host;
      const group = items.slice(i, j);
      work.push(
        this.file.readBytes(start, items[j - 1].host - start + slack).then(async (span) => {
          for (const item of group) await this.inflateGrain(item, span, start);
        }),
      );
      i = j;
    }
    await Promise.all(work);
  }

  /**
   * Inflated here, synchronously: a grain is ~70 µs of zlib work, less than the cost of
   * an async zlib stream per grain (object, thread-pool round trip, callbacks).
   */
  private async inflateGrain(item: { host: number; dst: Buffer; inGrain: number }, span: Buffer, spanStart: number): Promise<void> {
    let at = item.host - spanStart;
    let size = this.grainSize;
    if (this.layout.hasMarker) {
      size = span.readUInt32LE(at + 8);
      at += 12;
    }
    if (size === 0 || size > 2 * this.grainSize) {
      throw new CorruptImageError(this.filename, `Invalid compressed grain at offset ${item.host} (size ${size})`);
    }
    const input = at + size <= span.length ? span.subarray(at, at + size) : await this.file.readBytes(spanStart + at, size);
    let plain: Buffer;
    try {
      plain = zlib().inflateSync(input, { maxOutputLength: this.grainSize, chunkSize: Math.max(this.grainSize, 1024) });
    } catch {
      throw new CorruptImageError(this.filename, `Invalid compressed grain at offset ${item.host}`);
    }
    if (item.inGrain + item.dst.length > plain.length) {
      throw new CorruptImageError(this.filename, `Compressed grain at offset ${item.host} is too short`);
    }
    plain.copy(item.dst, 0, item.inGrain, item.inGrain + item.dst.length);
  }

  /** Reserves `sectors` host sectors at the end for new grains or tables. */
  allocate(sectors: number): number {
    const at = this.nextSector;
    if (at + sectors > MAX_EXTENT_SECTORS) throw new QimgError(`No space left in extent '${this.filename}' (grain offsets are limited to 2 TiB)`);
    this.nextSector = at + sectors;
    return at;
  }

  /**
   * Points grains at host sectors (or GTE_ZEROED): tables updated in memory, then the
   * changed part of each table written to its primary and redundant copy. Callers
   * write grain data first, so a table never points at data not yet written.
   * `defer` (a conversion's target, no crash safety asked): the tables stay in memory
   * and each is written once by writeDirty().
   */
  async setEntries(updates: Array<[grain: number, value: number]>, persist = true, defer = false): Promise<void> {
    const touched = new Map<number, { lo: number; hi: number }>();
    for (const [grain, value] of updates) {
      const i = Math.floor(grain / this.layout.gtEntries);
      const j = grain % this.layout.gtEntries;
      let t = await this.table(i);
      if (!t) {
        t = await this.newTable(i, persist, defer);
        if (defer) this.dirty.set(i, { lo: 0, hi: this.layout.gtEntries - 1 });
      }
      t.writeUInt32LE(value >>> 0, j * 4);
      const span = touched.get(i);
      if (span) {
        span.lo = Math.min(span.lo, j);
        span.hi = Math.max(span.hi, j);
      } else touched.set(i, { lo: j, hi: j });
    }
    if (!persist) return;
    if (defer) {
      for (const [i, { lo, hi }] of touched) {
        const d = this.dirty.get(i);
        if (d) {
          d.lo = Math.min(d.lo, lo);
          d.hi = Math.max(d.hi, hi);
        } else this.dirty.set(i, { lo, hi });
        // kept out of the LRU cache until written
        this.pinned.set(i, (await this.table(i))!);
      }
      return;
    }
    const writes: Promise<void>[] = [];
    for (const [i, { lo, hi }] of touched) {
      const t = (await this.table(i))!;
      const piece = t.subarray(lo * 4, (hi + 1) * 4);
      writes.push(this.file.write(piece, this.gd[i] + lo * 4));
      if (this.rgd && this.rgd[i] > 0) writes.push(this.file.write(piece, this.rgd[i] + lo * 4));
    }
    await Promise.all(writes);
  }

  /** Writes the tables setEntries(…, defer) left in memory (after the data they point at). */
  async writeDirty(): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const [i, { lo, hi }] of this.dirty) {
      const t = this.pinned.get(i)!;
      const piece = t.subarray(lo * 4, (hi + 1) * 4);
      writes.push(this.file.write(piece, this.gd[i] + lo * 4));
      if (this.rgd && this.rgd[i] > 0) writes.push(this.file.write(piece, this.rgd[i] + lo * 4));
    }
    await Promise.all(writes);
    for (const i of this.dirty.keys()) {
      this.cache.set(this.gd[i], this.pinned.get(i)!);
      this.pinned.delete(i);
    }
    this.dirty.clear();
  }

  /**
   * A grain table for a directory entry that has none (zeroed table first, then the GD
   * entry; deferred: the table is written whole later).
   */
  private async newTable(i: number, persist: boolean, defer = false): Promise<Buffer> {
    const t = Buffer.alloc(this.gtBytes);
    if (!persist) {
      this.gd[i] = GT_IN_MEMORY;
      this.pinned.set(i, t);
      return t;
    }
    const sectors = Math.ceil(this.gtBytes / SECTOR);
    const gtSector = this.allocate(sectors);
    const padded = Buffer.alloc(sectors * SECTOR);
    if (!defer) await this.file.write(padded, gtSector * SECTOR);
    let rgtSector = 0;
    if (this.rgd) {
      rgtSector = this.allocate(sectors);
      if (!defer) await this.file.write(padded, rgtSector * SECTOR);
    }
    const entry = Buffer.alloc(4);
    entry.writeUInt32LE(gtSector);
    await this.file.write(entry, this.layout.gdOffset + i * 4);
    this.gd[i] = gtSector * SECTOR;
    if (this.rgd) {
      entry.writeUInt32LE(rgtSector);
      await this.file.write(entry, this.layout.rgdOffset + i * 4);
      this.rgd[i] = rgtSector * SECTOR;
    }
    this.cache.set(this.gd[i], t);
    return t;
  }

  /** Every grain table pinned in memory (a stream about to be rewritten). */
  async pinAll(): Promise<void> {
    for (let i = 0; i < this.layout.gdEntries; i++) {
      if (this.pinned.has(i)) continue;
      const t = await this.table(i);
      if (t) this.pinned.set(i, t);
    }
  }
}

function decodeDirectory(raw: Buffer, layout: SparseLayout): Float64Array {
  const n = layout.gdEntries;
  const out = new Float64Array(n);
  if (layout.variant !== 'sesparse') {
    for (let i = 0; i < n; i++) out[i] = raw.readUInt32LE(i * 4) * SECTOR;
    return out;
  }
  const gtSectors = (layout.gtEntries * 8) / SECTOR;
  for (let i = 0; i < n; i++) {
    const lo = raw.readUInt32LE(i * 8);
    const hi = raw.readUInt32LE(i * 8 + 4);
    if (lo === 0 && hi === 0) continue;
    // the top 32 bits must say "allocated" (0x10000000); the rest indexes the tables
    if (hi !== 0x10000000) {
      out[i] = -1;
      continue;
    }
    const sector = layout.seGtOffset + lo * gtSectors;
    out[i] = sector > 0xffffffff ? -1 : sector * SECTOR;
  }
  return out;
}
