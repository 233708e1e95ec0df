/**
 * Structure-aware mutations of qcow2 images for the mutation fuzzer.
 *
 * `parseLayout` reads a (valid) fixture once and finds where its structures live:
 * header fields, header extensions, active and snapshot L1 tables, the L2 tables they
 * point to, compressed cluster descriptors and their payloads, the refcount table and
 * blocks, the snapshot table, the bitmap directory and bitmap tables, the LUKS header.
 * `mutate` then applies 1-4 seeded random mutations to a copy of the image: field
 * values from a mix of boundary values (0, 1, 2^31, 2^32-1, 2^53, 2^63, 2^64-1, ...),
 * pointers at other metadata, past the end of the file or unaligned, bit flips, random
 * values; entry flags (copied, compressed, zero, reserved bits, subcluster bitmaps),
 * copies of other entries; compressed descriptors (sector counts, offsets near the end
 * of the file) and payloads (their stream headers most of all); snapshot entry lengths
 * around the limits; backing file names (loops, devices, missing files) and formats; a
 * huge virtual size with a just large enough L1 table; random byte flips and
 * truncation anywhere. Each mutation is described in one short line so that a failure
 * report says what was done to the image.
 *
 * The layout is parsed from the original bytes only: later mutations never depend on
 * earlier ones, so a case is reproduced from its seed alone.
 */
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { join } from 'node:path';
import { Prng } from '../helpers/prng.js';
import { mutateGeneric } from './generic-mutations.js';

// ---------------------------------------------------------------- layout

export interface Field {
  name: string;
  at: number;
  /** bytes: 1, 2, 4 or 8 */
  width: 1 | 2 | 4 | 8;
}

export interface Ext {
  type: number;
  /** offset of the extension's type field */
  at: number;
  length: number;
}

export interface SnapshotEntry {
  at: number;
  l1Offset: number;
  l1Size: number;
  extraSize: number;
  /** offset just past the entry (padded) */
  end: number;
}

export interface CompressedEntry {
  /** file offset of the L2 entry */
  at: number;
  hostOffset: number;
  /** bytes of the compressed payload as the descriptor gives them */
  length: number;
}

export interface Table {
  offset: number;
  entries: number;
}

export interface Layout {
  fileSize: number;
  version: number;
  clusterBits: number;
  clusterSize: number;
  headerLength: number;
  extAreaStart: number;
  extAreaEnd: number;
  extensions: Ext[];
  backingOffset: number;
  backingSize: number;
  extL2: boolean;
  /** bytes per L2 entry: 8, or 16 with extended L2 entries */
  l2EntryBytes: number;
  l1: Table;
  snapshotL1s: Table[];
  /** offsets of the L2 tables referenced by any L1 table */
  l2Tables: number[];
  /** file offsets of L2 entries that are not 0 */
  l2Used: number[];
  compressed: CompressedEntry[];
  refcountOrder: number;
  reftable: Table;
  refblocks: number[];
  snapshotTableOffset: number;
  snapshots: SnapshotEntry[];
  bitmapExt?: Ext;
  bitmapDirectory?: { offset: number; size: number; entries: number[] };
  bitmapTables: Table[];
  crypto?: { offset: number; length: number };
  /** offsets of every cluster known to hold metadata */
  metadataClusters: number[];
}

export const HEADER_FIELDS: Field[] = [
  { name: 'magic', at: 0, width: 4 },
  { name: 'version', at: 4, width: 4 },
  { name: 'backing_file_offset', at: 8, width: 8 },
  { name: 'backing_file_size', at: 16, width: 4 },
  { name: 'cluster_bits', at: 20, width: 4 },
  { name: 'size', at: 24, width: 8 },
  { name: 'crypt_method', at: 32, width: 4 },
  { name: 'l1_size', at: 36, width: 4 },
  { name: 'l1_table_offset', at: 40, width: 8 },
  { name: 'refcount_table_offset', at: 48, width: 8 },
  { name: 'refcount_table_clusters', at: 56, width: 4 },
  { name: 'nb_snapshots', at: 60, width: 4 },
  { name: 'snapshots_offset', at: 64, width: 8 },
  { name: 'incompatible_features', at: 72, width: 8 },
  { name: 'compatible_features', at: 80, width: 8 },
  { name: 'autoclear_features', at: 88, width: 8 },
  { name: 'refcount_order', at: 96, width: 4 },
  { name: 'header_length', at: 100, width: 4 },
  { name: 'compression_type', at: 104, width: 1 },
];

/** Fields of a snapshot table entry, relative to its start (extra data fields at 40+). */
export const SNAPSHOT_FIELDS: Field[] = [
  { name: 'l1_table_offset', at: 0, width: 8 },
  { name: 'l1_size', at: 8, width: 4 },
  { name: 'id_str_size', at: 12, width: 2 },
  { name: 'name_size', at: 14, width: 2 },
  { name: 'date_sec', at: 16, width: 4 },
  { name: 'date_nsec', at: 20, width: 4 },
  { name: 'vm_clock_nsec', at: 24, width: 8 },
  { name: 'vm_state_size', at: 32, width: 4 },
  { name: 'extra_data_size', at: 36, width: 4 },
  { name: 'vm_state_size_large', at: 40, width: 8 },
  { name: 'disk_size', at: 48, width: 8 },
  { name: 'icount', at: 56, width: 8 },
];

/** Fields of a bitmap directory entry, relative to its start. */
export const BITMAP_FIELDS: Field[] = [
  { name: 'bitmap_table_offset', at: 0, width: 8 },
  { name: 'bitmap_table_size', at: 8, width: 4 },
  { name: 'flags', at: 12, width: 4 },
  { name: 'type', at: 16, width: 1 },
  { name: 'granularity_bits', at: 17, width: 1 },
  { name: 'name_size', at: 18, width: 2 },
  { name: 'extra_data_size', at: 20, width: 4 },
];

const EXT_BITMAPS = 0x23852875;
const EXT_CRYPTO = 0x0537be77;
const EXT_TYPES = [0x00000000, 0xe2792aca, 0x6803f857, EXT_BITMAPS, EXT_CRYPTO, 0x44415441, 0x12345678];
const OFFSET_MASK = 0x00fffffffffffe00n;

function u64(buf: Buffer, at: number): bigint {
  return at + 8 <= buf.length ? buf.readBigUInt64BE(at) : 0n;
}

function u32(buf: Buffer, at: number): number {
  return at + 4 <= buf.length ? buf.readUInt32BE(at) : 0;
}

/** Structures of a qcow2 image (best effort: anything out of range is skipped). */
export function parseLayout(buf: Buffer): Layout {
  const fileSize = buf.length;
  const version = u32(buf, 4);
  const clusterBits = Math.min(Math.max(u32(buf, 20), 9), 21);
  const clusterSize = 2 ** clusterBits;
  const headerLength = version >= 3 ? u32(buf, 100) : 72;
  const backingOffset = Number(u64(buf, 8));
  const backingSize = u32(buf, 16);
  const incompat = version >= 3 ? u64(buf, 72) : 0n;
  const extL2 = (incompat & (1n << 4n)) !== 0n;
  const l2EntryBytes = extL2 ? 16 : 8;
  const inFile = (off: number, len: number) => off > 0 && off + len <= fileSize;
  const metadata = new Set<number>([0]);

  // header extensions
  const extAreaStart = headerLength;
  const extAreaEnd = backingOffset > 0 && backingOffset < clusterSize ? backingOffset : clusterSize;
  const extensions: Ext[] = [];
  for (let pos = extAreaStart; pos + 8 <= Math.min(extAreaEnd, fileSize); ) {
    const type = buf.readUInt32BE(pos);
    const length = buf.readUInt32BE(pos + 4);
    extensions.push({ type, at: pos, length });
    if (type === 0) break;
    pos += 8 + Math.ceil(length / 8) * 8;
  }

  const l1: Table = { offset: Number(u64(buf, 40)), entries: u32(buf, 36) };
  const reftable: Table = { offset: Number(u64(buf, 48)), entries: (u32(buf, 56) * clusterSize) / 8 };
  const refcountOrder = version >= 3 ? u32(buf, 96) : 4;
  const snapshotTableOffset = Number(u64(buf, 64));
  const nbSnapshots = u32(buf, 60);

  // snapshot table
  const snapshots: SnapshotEntry[] = [];
  let pos = snapshotTableOffset;
  for (let i = 0; i < nbSnapshots && inFile(pos, 40); i++) {
    const extraSize = u32(buf, pos + 36);
    const idSize = buf.readUInt16BE(pos + 12);
    const nameSize = buf.readUInt16BE(pos + 14);
    const end = Math.ceil((pos + 40 + extraSize + idSize + nameSize) / 8) * 8;
    snapshots.push({ at: pos, l1Offset: Number(u64(buf, pos)), l1Size: u32(buf, pos + 8), extraSize, end });
    pos = end;
  }
  if (snapshots.length) {
    for (let c = snapshotTableOffset; c < pos; c += clusterSize) metadata.add(c);
  }
  const snapshotL1s = snapshots.map((s) => ({ offset: s.l1Offset, entries: s.l1Size }));

  // L1 and L2 tables (active and snapshots)
  const l2Set = new Set<number>();
  for (const t of [l1, ...snapshotL1s]) {
    if (!inFile(t.offset, t.entries * 8)) continue;
    for (let c = t.offset; c < t.offset + t.entries * 8; c += clusterSize) metadata.add(c);
    for (let i = 0; i < t.entries; i++) {
      const off = Number(u64(buf, t.offset + 8 * i) & OFFSET_MASK);
      if (off && inFile(off, clusterSize)) l2Set.add(off);
    }
  }
  const l2Tables = [...l2Set].sort((a, b) => a - b);
  const l2Used: number[] = [];
  const compressed: CompressedEntry[] = [];
  const x = 62 - (clusterBits - 8);
  for (const t of l2Tables) {
    metadata.add(t);
    for (let at = t; at < t + clusterSize; at += l2EntryBytes) {
      const e = u64(buf, at);
      if (e === 0n && (!extL2 || u64(buf, at + 8) === 0n)) continue;
      l2Used.push(at);
      if (e & (1n << 62n)) {
        const hostOffset = Number(e & ((1n << BigInt(x)) - 1n));
        const sectors = Number((e >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
        compressed.push({ at, hostOffset, length: sectors * 512 - (hostOffset % 512) });
      }
    }
  }

  // refcount table and blocks
  const refblocks: number[] = [];
  if (inFile(reftable.offset, reftable.entries * 8)) {
    for (let c = reftable.offset; c < reftable.offset + reftable.entries * 8; c += clusterSize) metadata.add(c);
    for (let i = 0; i < reftable.entries; i++) {
      const off = Number(u64(buf, reftable.offset + 8 * i) & ~0x1ffn);
      if (off && inFile(off, clusterSize)) {
        refblocks.push(off);
        metadata.add(off);
      }
    }
  }

  // bitmaps
  const bitmapExt = extensions.find((e) => e.type === EXT_BITMAPS && e.length === 24);
  let bitmapDirectory: Layout['bitmapDirectory'];
  const bitmapTables: Table[] = [];
  if (bitmapExt) {
    const nb = u32(buf, bitmapExt.at + 8);
    const size = Number(u64(buf, bitmapExt.at + 16));
    const offset = Number(u64(buf, bitmapExt.at + 24));
    const entries: number[] = [];
    let p = offset;
    for (let i = 0; i < nb && inFile(p, 24); i++) {
      entries.push(p);
      const t = { offset: Number(u64(buf, p)), entries: u32(buf, p + 8) };
      if (inFile(t.offset, t.entries * 8)) {
        bitmapTables.push(t);
        metadata.add(t.offset);
      }
      p += Math.ceil((24 + u32(buf, p + 20) + buf.readUInt16BE(p + 18)) / 8) * 8;
    }
    if (inFile(offset, 8)) metadata.add(offset - (offset % clusterSize));
    bitmapDirectory = { offset, size, entries };
  }

  // LUKS header
  let crypto: Layout['crypto'];
  const cext = extensions.find((e) => e.type === EXT_CRYPTO && e.length === 16);
  if (cext) {
    crypto = { offset: Number(u64(buf, cext.at + 8)), length: Number(u64(buf, cext.at + 16)) };
  }

  return {
    fileSize,
    version,
    clusterBits,
    clusterSize,
    headerLength,
    extAreaStart,
    extAreaEnd,
    extensions,
    backingOffset,
    backingSize,
    extL2,
    l2EntryBytes,
    l1,
    snapshotL1s,
    l2Tables,
    l2Used,
    compressed,
    refcountOrder,
    reftable,
    refblocks,
    snapshotTableOffset,
    snapshots,
    bitmapExt,
    bitmapDirectory,
    bitmapTables,
    crypto,
    metadataClusters: [...metadata].sort((a, b) => a - b),
  };
}

// ---------------------------------------------------------------- values

const BOUNDARY_64: bigint[] = [
  0n,
  1n,
  2n,
  0x7fffffffn,
  0x80000000n,
  0xffffffffn,
  0x100000000n,
  1n << 53n,
  (1n << 53n) + 512n,
  (1n << 55n) - 512n,
  1n << 56n,
  1n << 62n,
  1n << 63n,
  (1n << 64n) - 1n,
  (1n << 64n) - 512n,
];

const BOUNDARY_32: number[] = [0, 1, 2, 7, 8, 0x7fff, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

const MASK = (w: number): bigint => (1n << BigInt(8 * w)) - 1n;

function randomU64(r: Prng): bigint {
  return (BigInt(r.u32()) << 32n) | BigInt(r.u32());
}

/** Interesting host offsets for pointer fields. */
function pointer(r: Prng, L: Layout): bigint {
  const cs = L.clusterSize;
  const clusters = Math.max(1, Math.ceil(L.fileSize / cs));
  switch (r.int(0, 9)) {
    case 0:
      return 0n;
    case 1: // another metadata cluster (overlap)
      return BigInt(r.pick(L.metadataClusters));
    case 2: // an aligned cluster inside the file
      return BigInt(r.int(0, clusters - 1) * cs);
    case 3: // just past the end of the file
      return BigInt((clusters + r.int(0, 3)) * cs);
    case 4: // unaligned, inside the file
      return BigInt(r.int(1, Math.max(1, L.fileSize - 1)));
    case 5: // 512-aligned but not cluster aligned
      return BigInt(r.int(0, clusters - 1) * cs + (cs > 512 ? 512 * r.int(1, cs / 512 - 1) : 0));
    case 6: // far away, aligned
      return BigInt(cs) * BigInt(r.int(1, 0x7fffffff));
    case 7:
      return r.pick(BOUNDARY_64);
    case 8: // the end of the file, minus a little
      return BigInt(Math.max(0, L.fileSize - r.int(1, 600)));
    default:
      return randomU64(r) & OFFSET_MASK;
  }
}

/** A new value for a `width`-byte field that holds `cur`. */
function value(r: Prng, width: number, cur: bigint, L: Layout, isPointer = false): bigint {
  const m = MASK(width);
  if (isPointer && r.chance(0.6)) return pointer(r, L) & m;
  switch (r.int(0, 7)) {
    case 0:
      return r.pick(BOUNDARY_64) & m;
    case 1:
      return BigInt(r.pick(BOUNDARY_32)) & m;
    case 2: // flip one bit (mostly low ones)
      return (cur ^ (1n << BigInt(r.chance(0.5) ? r.int(0, 7) : r.int(0, 8 * width - 1)))) & m;
    case 3: // small change
      return (cur + BigInt(r.int(-3, 3))) & m;
    case 4: // small value
      return BigInt(r.int(0, 70)) & m;
    case 5: // scaled
      return (cur * BigInt(r.pick([2, 8, 512, 65536]))) & m;
    case 6: // all ones in the low half
      return MASK(Math.max(1, width >> 1)) & m;
    default:
      return randomU64(r) & m;
  }
}

// ---------------------------------------------------------------- mutation

export interface Mutated {
  data: Buffer;
  /** one line per mutation applied */
  log: string[];
}

class Editor {
  truncateTo?: number;
  readonly log: string[] = [];
  constructor(
    readonly buf: Buffer,
    readonly L: Layout,
    readonly r: Prng,
  ) {}

  get(at: number, width: number): bigint {
    let v = 0n;
    for (let i = 0; i < width; i++) v = (v << 8n) | BigInt(at + i < this.buf.length ? this.buf[at + i] : 0);
    return v;
  }

  set(at: number, width: number, v: bigint): void {
    for (let i = width - 1; i >= 0; i--) {
      if (at + i >= 0 && at + i < this.buf.length) this.buf[at + i] = Number(v & 0xffn);
      v >>= 8n;
    }
  }

  /** Mutates a field and logs it. */
  field(what: string, at: number, width: number, isPointer = false): void {
    const cur = this.get(at, width);
    const v = value(this.r, width, cur, this.L, isPointer);
    this.set(at, width, v);
    this.log.push(`${what} @${at}: 0x${cur.toString(16)} -> 0x${v.toString(16)}`);
  }

  flipBits(from: number, to: number, what: string): void {
    if (to <= from) {
      this.log.push(`${what}: nothing to flip`);
      return;
    }
    const n = this.r.int(1, 8);
    const spots: string[] = [];
    for (let i = 0; i < n; i++) {
      const at = this.r.int(from, to - 1);
      if (this.r.chance(0.3)) {
        this.buf[at] = this.r.int(0, 255);
        spots.push(`${at}=${this.buf[at]}`);
      } else {
        const bit = this.r.int(0, 7);
        this.buf[at] ^= 1 << bit;
        spots.push(`${at}^${1 << bit}`);
      }
    }
    this.log.push(`${what}: bytes ${spots.join(',')}`);
  }
}

/** A table entry (L1, refcount table, snapshot L1): pointer, flags or random. */
function tableEntry(e: Editor, at: number, what: string, flagBits: number[]): void {
  const r = e.r;
  const cur = e.get(at, 8);
  let v: bigint;
  switch (r.int(0, 5)) {
    case 0:
    case 1: // new offset, flags kept
      v = (cur & ~OFFSET_MASK) | (pointer(r, e.L) & OFFSET_MASK);
      if (r.chance(0.2)) v |= BigInt(r.int(1, 511)); // low (reserved) bits
      break;
    case 2: // a flag bit
      v = cur ^ (1n << BigInt(r.pick(flagBits)));
      break;
    case 3:
      v = 0n;
      break;
    case 4:
      v = r.pick(BOUNDARY_64);
      break;
    default:
      v = randomU64(r);
  }
  e.set(at, 8, v);
  e.log.push(`${what} @${at}: 0x${cur.toString(16)} -> 0x${v.toString(16)}`);
}

/** Any entry of table `t` that lies inside the file. */
function pickEntry(r: Prng, t: Table, L: Layout): number | undefined {
  if (t.entries <= 0 || t.offset <= 0 || t.offset + 8 > L.fileSize) return undefined;
  const n = Math.min(t.entries, Math.floor((L.fileSize - t.offset) / 8));
  return t.offset + 8 * r.int(0, n - 1);
}

/** Mostly an entry of `t` that is in use (not 0), else any. */
function usedEntry(e: Editor, t: Table): number | undefined {
  const r = e.r;
  if (t.entries <= 0 || t.offset <= 0) return undefined;
  const n = Math.min(t.entries, Math.floor((e.L.fileSize - t.offset) / 8));
  if (n <= 0) return undefined;
  const used: number[] = [];
  for (let i = 0; i < n && used.length < 4096; i++) if (e.get(t.offset + 8 * i, 8) !== 0n) used.push(t.offset + 8 * i);
  if (used.length && r.chance(0.8)) return r.pick(used);
  return pickEntry(r, t, e.L);
}

type Strategy = (e: Editor) => boolean;

const strategies: Record<string, Strategy> = {
  header(e) {
    const fields = HEADER_FIELDS.filter((f) => f.at + f.width <= (e.L.version >= 3 ? Math.max(105, e.L.headerLength) : 72));
    const f = e.r.pick(fields);
    const pointerish = /offset/.test(f.name);
    if (/features/.test(f.name) && e.r.chance(0.7)) {
      const cur = e.get(f.at, 8);
      const bit = e.r.chance(0.8) ? e.r.int(0, 5) : e.r.int(0, 63);
      e.set(f.at, 8, cur ^ (1n << BigInt(bit)));
      e.log.push(`header ${f.name}: flip bit ${bit}`);
      return true;
    }
    if (/cluster_bits|refcount_order|version|crypt_method|compression_type/.test(f.name) && e.r.chance(0.6)) {
      const cur = e.get(f.at, f.width);
      const v = BigInt(e.r.int(0, 66));
      e.set(f.at, f.width, v);
      e.log.push(`header ${f.name}: ${cur} -> ${v}`);
      return true;
    }
    e.field(`header ${f.name}`, f.at, f.width, pointerish);
    return true;
  },

  extension(e) {
    const L = e.L;
    const r = e.r;
    if (L.extensions.length === 0 || r.chance(0.15)) {
      // a new extension where the list ends
      const end = L.extensions.length ? L.extensions[L.extensions.length - 1].at : L.extAreaStart;
      const type = r.pick(EXT_TYPES);
      const len = r.chance(0.5) ? r.int(0, 64) : Number(value(r, 4, 16n, L));
      e.set(end, 4, BigInt(type));
      e.set(end + 4, 4, BigInt(len));
      const n = Math.min(len, 64);
      for (let i = 0; i < n; i++) e.buf[end + 8 + i] = r.int(0, 255);
      e.log.push(`extension: new type 0x${type.toString(16)} len ${len} @${end}`);
      return true;
    }
    const x = r.pick(L.extensions);
    switch (r.int(0, 3)) {
      case 0:
        e.set(x.at, 4, BigInt(r.pick(EXT_TYPES)));
        e.log.push(`extension 0x${x.type.toString(16)} @${x.at}: type -> 0x${e.get(x.at, 4).toString(16)}`);
        return true;
      case 1:
        e.field(`extension 0x${x.type.toString(16)} length`, x.at + 4, 4);
        return true;
      case 2: {
        // a field of the data (8-byte or 4-byte aligned)
        if (x.length === 0) return false;
        const width = r.chance(0.5) && x.length >= 8 ? 8 : 4;
        const at = x.at + 8 + width * r.int(0, Math.max(0, Math.floor(x.length / width) - 1));
        e.field(`extension 0x${x.type.toString(16)} data`, at, width, width === 8);
        return true;
      }
      default:
        e.flipBits(x.at, x.at + 8 + Math.max(x.length, 1), `extension 0x${x.type.toString(16)}`);
        return true;
    }
  },

  l1(e) {
    const t = e.r.chance(0.8) || e.L.snapshotL1s.length === 0 ? e.L.l1 : e.r.pick(e.L.snapshotL1s);
    const at = usedEntry(e, t);
    if (at === undefined) return false;
    if (e.r.chance(0.15)) {
      // two entries naming the same L2 table
      const other = usedEntry(e, t);
      if (other === undefined || other === at) return false;
      e.set(other, 8, e.get(at, 8));
      e.log.push(`L1 @${other}: copy of entry @${at}`);
      return true;
    }
    tableEntry(e, at, t === e.L.l1 ? 'L1' : 'snapshot L1', [63, 62, 0, 1, 8, 56, 61]);
    return true;
  },

  l2(e) {
    const L = e.L;
    const r = e.r;
    if (L.l2Tables.length === 0) return false;
    let at: number;
    if (L.l2Used.length && r.chance(0.85)) at = r.pick(L.l2Used);
    else {
      const t = r.pick(L.l2Tables);
      at = t + L.l2EntryBytes * r.int(0, L.clusterSize / L.l2EntryBytes - 1);
    }
    const cur = e.get(at, 8);
    let v: bigint;
    switch (r.int(0, 8)) {
      case 0:
      case 1:
        v = (cur & ~OFFSET_MASK) | (pointer(r, L) & OFFSET_MASK);
        break;
      case 2: // zero flag
        v = cur ^ 1n;
        break;
      case 3: // compressed flag: a normal entry read as a descriptor, or the reverse
        v = cur ^ (1n << 62n);
        break;
      case 4: // copied flag, or a reserved bit
        v = cur ^ (1n << BigInt(r.pick([63, 63, 1, 8, 56, 61])));
        break;
      case 5: // a copy of another entry (two guest clusters, one host cluster)
        v = L.l2Used.length ? e.get(r.pick(L.l2Used), 8) : 0n;
        break;
      case 6:
        if (L.extL2) {
          // the subcluster bitmap: random, or a subcluster both allocated and zero
          const bm = e.get(at + 8, 8);
          const nb = r.chance(0.5) ? randomU64(r) : bm | ((bm & 0xffffffffn) << 32n) | (1n << BigInt(r.int(0, 63)));
          e.set(at + 8, 8, nb);
          e.log.push(`L2 bitmap @${at + 8}: 0x${bm.toString(16)} -> 0x${nb.toString(16)}`);
          return true;
        }
        v = r.pick(BOUNDARY_64);
        break;
      case 7:
        v = r.pick(BOUNDARY_64);
        break;
      default:
        v = randomU64(r);
    }
    e.set(at, 8, v);
    e.log.push(`L2 @${at}: 0x${cur.toString(16)} -> 0x${v.toString(16)}`);
    return true;
  },

  compressed(e) {
    const L = e.L;
    const r = e.r;
    if (L.compressed.length === 0) return false;
    const c = r.pick(L.compressed);
    const x = BigInt(62 - (L.clusterBits - 8));
    const sectorsMask = (1n << BigInt(L.clusterBits - 8)) - 1n;
    const offMask = (1n << x) - 1n;
    const cur = e.get(c.at, 8);
    let v: bigint;
    switch (r.int(0, 4)) {
      case 0: {
        // the sector count
        const s = r.pick([0n, 1n, sectorsMask, sectorsMask - 1n, BigInt(r.int(0, Number(sectorsMask)))]);
        v = (cur & ~(sectorsMask << x)) | ((s & sectorsMask) << x);
        break;
      }
      case 1: {
        // the host offset
        const choice = r.int(0, 3);
        const off =
          choice === 0
            ? BigInt(Math.max(0, L.fileSize - r.int(1, 2048)))
            : choice === 1
              ? BigInt(r.int(0, L.fileSize + 4096))
              : choice === 2
                ? offMask
                : pointer(r, L);
        v = (cur & ~offMask) | (off & offMask);
        break;
      }
      case 2:
      case 3: {
        // the compressed payload
        const from = Math.min(c.hostOffset, L.fileSize);
        const to = Math.min(c.hostOffset + c.length, L.fileSize);
        if (to <= from) return false;
        if (r.chance(0.35)) {
          // the stream's header (zstd frame header, deflate block header): sizes, windows
          e.flipBits(from, Math.min(to, from + 12), `compressed stream header of L2 @${c.at}`);
        } else if (r.chance(0.3)) {
          const fill = r.pick([0, 0xff, r.int(0, 255)]);
          const a = r.int(from, to - 1);
          e.buf.fill(fill, a, Math.min(to, a + r.int(1, 256)));
          e.log.push(`compressed payload @${a}: fill 0x${fill.toString(16)}`);
        } else e.flipBits(from, to, `compressed payload of L2 @${c.at}`);
        return true;
      }
      default:
        v = randomU64(r) | (1n << 62n);
    }
    e.set(c.at, 8, v);
    e.log.push(`compressed L2 @${c.at}: 0x${cur.toString(16)} -> 0x${v.toString(16)}`);
    return true;
  },

  reftable(e) {
    const L = e.L;
    if (e.r.chance(0.2)) {
      e.field('header refcount_table_clusters', 56, 4);
      return true;
    }
    const at = usedEntry(e, L.reftable);
    if (at === undefined) return false;
    tableEntry(e, at, 'reftable', [63, 62, 0, 8]);
    return true;
  },

  refblock(e) {
    const L = e.L;
    const r = e.r;
    if (L.refblocks.length === 0) return false;
    const b = r.pick(L.refblocks);
    if (r.chance(0.25)) {
      e.flipBits(b, b + Math.min(L.clusterSize, 256), 'refblock');
      return true;
    }
    const bits = 2 ** Math.min(L.refcountOrder, 6);
    const entries = (L.clusterSize * 8) / bits;
    // mostly the first entries (the ones in use in small images)
    const i = r.chance(0.7) ? r.int(0, Math.min(entries - 1, Math.ceil(L.fileSize / L.clusterSize) + 2)) : r.int(0, entries - 1);
    const max = bits === 64 ? (1n << 64n) - 1n : (1n << BigInt(bits)) - 1n;
    const v = r.pick([0n, 1n, 2n, max, max - 1n, BigInt(r.int(0, 0xffff)) & max, randomU64(r) & max]);
    if (bits >= 8) {
      const width = bits / 8;
      e.set(b + i * width, width, v);
    } else {
      const bitPos = i * bits;
      const byte = b + (bitPos >> 3);
      const shift = bitPos & 7;
      const mask = ((1 << bits) - 1) << shift;
      if (byte < e.buf.length) e.buf[byte] = (e.buf[byte] & ~mask) | ((Number(v) << shift) & mask);
    }
    e.log.push(`refblock @${b}: entry ${i} (${bits} bits) -> ${v}`);
    return true;
  },

  snapshot(e) {
    const L = e.L;
    const r = e.r;
    const choice = r.int(0, 9);
    if (choice === 0 || L.snapshots.length === 0) {
      const f = r.pick([HEADER_FIELDS[11], HEADER_FIELDS[12]]);
      if (L.snapshots.length === 0 && r.chance(0.5)) return false;
      e.field(`header ${f.name}`, f.at, f.width, f.width === 8);
      return true;
    }
    const s = r.pick(L.snapshots);
    if (choice <= 2) {
      // its L1 table
      const at = usedEntry(e, { offset: s.l1Offset, entries: s.l1Size });
      if (at === undefined) return false;
      tableEntry(e, at, 'snapshot L1', [63, 62, 0, 8]);
      return true;
    }
    if (choice === 3) {
      e.flipBits(s.at, s.end, 'snapshot entry');
      return true;
    }
    const fields = SNAPSHOT_FIELDS.filter((f) => f.at < 40 + s.extraSize);
    const f = r.pick(fields);
    if (/size/.test(f.name) && f.width <= 4 && r.chance(0.5)) {
      // lengths: just past what the entry has, or around the limits
      const cur = e.get(s.at + f.at, f.width);
      const v = BigInt(r.pick([0, 1, 7, 8, 15, 16, 23, 24, 25, 1023, 1024, 1025, 65535, Number(cur) + r.int(1, 64)])) & MASK(f.width);
      e.set(s.at + f.at, f.width, v);
      e.log.push(`snapshot @${s.at} ${f.name}: ${cur} -> ${v}`);
      return true;
    }
    e.field(`snapshot @${s.at} ${f.name}`, s.at + f.at, f.width, f.name === 'l1_table_offset');
    return true;
  },

  bitmap(e) {
    const L = e.L;
    const r = e.r;
    if (!L.bitmapExt || !L.bitmapDirectory) return false;
    const choice = r.int(0, 5);
    if (choice === 0) {
      const at = L.bitmapExt.at + 8 + r.pick([0, 4, 8, 16]);
      e.field('bitmaps extension', at, at >= L.bitmapExt.at + 16 ? 8 : 4, at === L.bitmapExt.at + 24);
      return true;
    }
    if (choice === 1 && L.bitmapTables.length) {
      const t = r.pick(L.bitmapTables);
      const at = usedEntry(e, t);
      if (at === undefined) return false;
      tableEntry(e, at, 'bitmap table', [0, 1, 8, 63]);
      return true;
    }
    if (L.bitmapDirectory.entries.length === 0) return false;
    const d = r.pick(L.bitmapDirectory.entries);
    if (choice === 2) {
      e.flipBits(d, d + 32, 'bitmap directory entry');
      return true;
    }
    const f = r.pick(BITMAP_FIELDS);
    e.field(`bitmap entry @${d} ${f.name}`, d + f.at, f.width, f.name === 'bitmap_table_offset');
    return true;
  },

  crypto(e) {
    const L = e.L;
    const r = e.r;
    if (!L.crypto) return false;
    if (r.chance(0.3)) {
      const x = L.extensions.find((t) => t.type === EXT_CRYPTO)!;
      const which = r.int(0, 1);
      e.field(`crypto extension ${which ? 'length' : 'offset'}`, x.at + 8 + 8 * which, 8, which === 0);
      return true;
    }
    const base = L.crypto.offset;
    if (base <= 0 || base >= L.fileSize) return false;
    if (r.chance(0.5)) {
      // a 32-bit field of the LUKS header (offsets, iterations, key slots)
      const at = base + 4 * r.int(0, 150);
      e.field('LUKS header', at, 4);
    } else e.flipBits(base, Math.min(L.fileSize, base + 592), 'LUKS header');
    return true;
  },

  geometry(e) {
    // A big virtual size with an L1 table just large enough (often all zeros, past
    // the end of the file): map and read must stay fast on huge sparse images.
    const L = e.L;
    const r = e.r;
    const l2Entries = L.clusterSize / L.l2EntryBytes;
    const span = BigInt(L.clusterSize) * BigInt(l2Entries);
    const size = r.chance(0.5) ? 1n << BigInt(r.int(30, 56)) : (randomU64(r) >> BigInt(r.int(8, 40))) + BigInt(r.int(0, 511));
    const l1 = (size + span - 1n) / span + BigInt(r.pick([0, 0, 0, 1, 2]));
    e.set(24, 8, size);
    e.set(36, 4, l1 & 0xffffffffn);
    let where = 'kept';
    if (r.chance(0.5)) {
      const off = BigInt(Math.ceil(L.fileSize / L.clusterSize) * L.clusterSize + L.clusterSize * r.int(0, 4));
      e.set(40, 8, off);
      where = `@${off}`;
    }
    e.log.push(`geometry: size ${size}, l1_size ${l1}, L1 ${where}`);
    return true;
  },

  names(e) {
    // The backing file name (and its format): other files, loops, devices, odd names.
    const L = e.L;
    const r = e.r;
    if (r.chance(0.3)) {
      const x = L.extensions.find((t) => t.type === 0xe2792aca);
      if (!x) return false;
      const fmt = r.pick(['raw', 'qcow2', 'qcow', 'vmdk', 'bogus', '', 'raw\0qcow2', 'q'.repeat(15)]);
      const bytes = Buffer.from(fmt, 'latin1');
      e.buf.fill(0, x.at + 8, x.at + 8 + Math.ceil(x.length / 8) * 8);
      bytes.copy(e.buf, x.at + 8, 0, Math.min(bytes.length, Math.max(0, Math.ceil(x.length / 8) * 8)));
      if (r.chance(0.5)) e.set(x.at + 4, 4, BigInt(bytes.length));
      e.log.push(`backing format -> ${JSON.stringify(fmt)}`);
      return true;
    }
    const name = r.pick([
      '',
      '.',
      '..',
      '/',
      '/dev/null',
      '/dev/zero',
      '/proc/self/fd/0',
      'zz-fuzz-case.qcow2',
      './zz-fuzz-case.qcow2',
      'missing.qcow2',
      'base.qcow2',
      'mid/mid.qcow2',
      '../empty.qcow2',
      '../cluster-64k.qcow2',
      '/etc/passwd',
      'a'.repeat(r.int(200, 1100)),
      'base.qcow2\0junk',
      'json:{"driver":"raw"}',
      // an export behind a socket that does not exist: every truncation of the name
      // fails at once (a TCP name could reach a real host, or a proxy that stalls)
      'nbd+unix:///x?socket=/nonexistent/qimg-fuzz.sock',
    ]);
    const bytes = Buffer.from(name, 'latin1');
    const lastExt = L.extensions.length ? L.extensions[L.extensions.length - 1] : undefined;
    const extEnd = lastExt ? lastExt.at + 8 + Math.ceil(lastExt.length / 8) * 8 : L.extAreaStart;
    const at = L.backingOffset > 0 && r.chance(0.7) ? L.backingOffset : Math.max(extEnd, L.clusterSize - Math.max(bytes.length, 16) - 8);
    bytes.copy(e.buf, at, 0, Math.max(0, Math.min(bytes.length, L.clusterSize - at)));
    e.set(8, 8, BigInt(at));
    e.set(16, 4, BigInt(r.chance(0.8) ? bytes.length : r.int(0, 2048)));
    e.log.push(`backing file name @${at} -> ${JSON.stringify(name.length > 40 ? `${name.slice(0, 20)}...(${name.length})` : name)}`);
    return true;
  },

  flip(e) {
    const L = e.L;
    const r = e.r;
    const where = r.int(0, 3);
    if (where === 0) e.flipBits(0, Math.min(L.fileSize, 512), 'header bytes');
    else if (where <= 2) {
      const c = r.pick(L.metadataClusters);
      e.flipBits(c, Math.min(L.fileSize, c + L.clusterSize), `metadata cluster ${c}`);
    } else e.flipBits(0, L.fileSize, 'anywhere');
    return true;
  },

  truncate(e) {
    const L = e.L;
    const r = e.r;
    const ends = [
      0,
      1,
      48,
      72,
      104,
      L.headerLength,
      L.clusterSize,
      L.fileSize - 1,
      L.fileSize - 512,
      L.fileSize - L.clusterSize,
      r.int(0, L.fileSize),
      r.pick(L.metadataClusters) + r.int(0, L.clusterSize),
      L.l1.offset + r.int(0, Math.max(0, L.l1.entries * 8 - 1)),
      L.reftable.offset + r.int(0, 64),
    ];
    const to = Math.max(0, Math.min(L.fileSize, r.pick(ends)));
    e.truncateTo = Math.min(e.truncateTo ?? Infinity, to);
    e.log.push(`truncate to ${to}`);
    return true;
  },
};

const WEIGHTS: Record<keyof typeof strategies, number> = {
  // header mutations mostly end a case at open: the table structures get more weight
  header: 14,
  extension: 6,
  l1: 11,
  l2: 20,
  compressed: 10,
  reftable: 6,
  refblock: 10,
  snapshot: 10,
  bitmap: 6,
  crypto: 4,
  names: 4,
  geometry: 3,
  flip: 8,
  truncate: 4,
};

/** Applies 1-4 mutations (seeded by `r`) to a copy of `original`. */
export function mutate(original: Buffer, L: Layout, r: Prng): Mutated {
  const e = new Editor(Buffer.from(original), L, r);
  const n = r.weighted({ 1: 4, 2: 3, 3: 2, 4: 1 } as Record<string, number>);
  let applied = 0;
  for (let tries = 0; applied < Number(n) && tries < 50; tries++) {
    const kind = r.weighted(WEIGHTS);
    if (strategies[kind](e)) applied++;
  }
  const data = e.truncateTo !== undefined ? e.buf.subarray(0, e.truncateTo) : e.buf;
  return { data, log: e.log };
}

// ---------------------------------------------------------------- cases

export interface FixtureRef {
  name: string;
  /** path relative to the images directory */
  rel: string;
  /** how often it is picked, relative to the others */
  weight: number;
  /** the image format (qcow2 when absent: structure-aware mutations) */
  format?: string;
  /** an encrypted image's passphrase (its cases open it with the key) */
  passphrase?: string;
}

export interface CaseFixture extends FixtureRef {
  data: Buffer;
  /** qcow2 only: where its structures are */
  layout?: Layout;
}

/** The fixtures' bytes and (for qcow2) layouts. */
export function loadFixtures(root: string, refs: FixtureRef[]): CaseFixture[] {
  return refs.map((ref) => {
    const raw = readFileSync(join(root, ref.rel));
    const data = ref.rel.endsWith('.gz') ? gunzipSync(raw) : raw;
    return { ...ref, data, layout: (ref.format ?? 'qcow2') === 'qcow2' ? parseLayout(data) : undefined };
  });
}

export interface PlannedCase {
  fixture: CaseFixture;
  /** open without -f (format probing) */
  probe: boolean;
  mutated: Mutated;
}

/** Everything a case does, from its seed alone. */
export function planCase(seed: number, fixtures: CaseFixture[]): PlannedCase {
  const r = new Prng(seed);
  const weights: Record<string, number> = {};
  fixtures.forEach((f, i) => (weights[String(i)] = f.weight));
  const fixture = fixtures[Number(r.weighted(weights))];
  const probe = r.chance(0.15);
  const mutated = fixture.layout ? mutate(fixture.data, fixture.layout, r) : mutateGeneric(fixture.data, r);
  return { fixture, probe, mutated };
}
