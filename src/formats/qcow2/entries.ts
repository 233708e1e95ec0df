/**
 * L1/L2 entry decoding into cluster and subcluster types (the spec's names), and the
 * run lookup: from one L2 table, the longest run of guest bytes that share a type and
 * (where they have one) contiguous host offsets. Entries are read as two 32-bit
 * halves so that the hot path needs no bigint.
 */
import { CorruptImageError } from '../../core/errors.js';
import { OFLAG_COMPRESSED_HI, OFLAG_COPIED_HI, OFFSET_MASK_HI, OFFSET_MASK_LO, OFLAG_ZERO_LO } from './constants.js';

export const enum Sub {
  /** not allocated here: read the backing file (or zeros) */
  UnallocatedPlain,
  /** cluster allocated, this subcluster not (extended L2): read the backing file */
  UnallocatedAlloc,
  /** reads as zeros, no host cluster */
  ZeroPlain,
  /** reads as zeros, host cluster preallocated */
  ZeroAlloc,
  /** data at a host offset */
  Normal,
  Compressed,
}

/** What the layout of one image needs to decode entries. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  /** 8 or 16 bytes per L2 entry */
  l2EntrySize: number;
  l2Entries: number;
  extendedL2: boolean;
  subclusterSize: number;
  /** v2 images may not use the zero flag */
  version: number;
  /**
   * with an external data file, offset 0 + COPIED is a valid data cluster, and every
   * host cluster must be its guest cluster
   */
  hasDataFile: boolean;
}

export interface Run {
  type: Sub;
  /** guest bytes in the run, from the asked offset */
  length: number;
  /** host offset matching the asked offset (Normal, ZeroAlloc, UnallocatedAlloc) */
  hostOffset?: number;
  /** compressed cluster: where its data lies */
  compressed?: { hostOffset: number; size: number };
}

/** A big-endian 32-bit word (Buffer.readUInt32BE validates its arguments on every call: slow in the L2 walks). */
function u32(b: Buffer, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

/** Bits 9..55 of an entry as a bigint (for messages about offsets qimg cannot hold). */
function rawOffset(hi: number, lo: number): bigint {
  return (BigInt(hi & OFFSET_MASK_HI) << 32n) | BigInt((lo & OFFSET_MASK_LO) >>> 0);
}

/** C's "%#x", as qemu's messages print numbers: 0 stays "0". */
function hex(v: number | bigint): string {
  return v === 0 || v === 0n ? '0' : `0x${v.toString(16)}`;
}

/**
 * Host offset in bits 9..55 of an entry, or an error past 2^53 (no real file is that
 * large; qemu would read zeros there). Callers check alignment first, as qemu does,
 * so that an unaligned huge offset gets qemu's message.
 */
function hostOffsetOf(hi: number, lo: number, file: string): number {
  const h = hi & OFFSET_MASK_HI;
  if (h >= 0x200000) throw new CorruptImageError(file, `Image is corrupt: cluster offset ${hex(rawOffset(hi, lo))} is beyond 2^53`);
  return h * 0x100000000 + ((lo & OFFSET_MASK_LO) >>> 0);
}

/** Is the offset of an entry cluster aligned? (Clusters are at most 2 MiB: the low word decides.) */
function entryAligned(lo: number, g: Geometry): boolean {
  return ((lo & OFFSET_MASK_LO) >>> 0) % g.clusterSize === 0;
}

/** Decodes a compressed cluster descriptor (bits 0..61). */
export function compressedDescriptor(hi: number, lo: number, clusterBits: number, file: string): { hostOffset: number; size: number } {
  const d = decodeDescriptor(hi, lo, clusterBits);
  if (d.offset > BigInt(Number.MAX_SAFE_INTEGER - 2 ** 22)) {
    throw new CorruptImageError(file, `Image is corrupt: compressed cluster offset 0x${d.offset.toString(16)} is beyond 2^53`);
  }
  return { hostOffset: Number(d.offset), size: d.size };
}

function decodeDescriptor(hi: number, lo: number, clusterBits: number): { offset: bigint; size: number } {
  const desc = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = desc & ((1n << x) - 1n);
  const nbSectors = ((desc >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1n;
  return { offset, size: Number(nbSectors) * 512 - Number(offset & 511n) };
}

/**
 * The read path's view of a compressed descriptor: an offset past 2^53 is past the end
 * of any file, so it is kept (rounded) for the read to fail on, as qemu's read does;
 * `map`, which never reads compressed data, still works.
 */
function readDescriptor(hi: number, lo: number, clusterBits: number): { hostOffset: number; size: number } {
  const d = decodeDescriptor(hi, lo, clusterBits);
  return { hostOffset: Number(d.offset), size: d.size };
}

/** The L2 table offset an L1 entry points to (0 = none), validated for alignment. */
export function l2OffsetFromL1(l1: Buffer, index: number, g: Geometry, file: string, base = 0): number {
  const hi = l1.readUInt32BE(index * 8);
  const lo = l1.readUInt32BE(index * 8 + 4);
  if (!entryAligned(lo, g)) {
    // `base`: the index of the table's first entry when `l1` is one page of a paged table
    throw new CorruptImageError(file, `Image is corrupt: L2 table offset ${hex(rawOffset(hi, lo))} unaligned (L1 index: ${hex(base + index)})`);
  }
  return hostOffsetOf(hi, lo, file);
}

function invalidEntry(file: string, l2Offset: number, index: number): CorruptImageError {
  return new CorruptImageError(file, `Image is corrupt: Invalid cluster entry found (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`);
}

/**
 * The run starting at guest offset `offset` within the L2 table `l2` (null = no L2
 * table: everything unallocated), at most `maxLen` bytes and never past the table.
 */
export function lookupRun(
  l2: Buffer | null,
  l2Offset: number,
  offset: number,
  maxLen: number,
  g: Geometry,
  file: string,
): Run {
  const cs = g.clusterSize;
  const tableSpan = cs * g.l2Entries;
  const inTable = offset % tableSpan;
  const limit = Math.min(maxLen, tableSpan - inTable);
  if (!l2) return { type: Sub.UnallocatedPlain, length: limit };

  let index = Math.floor(inTable / cs);
  const inCluster = inTable % cs;
  if (!g.extendedL2) {
    const first = decodeCluster(l2, l2Offset, index, g, file);
    if (g.hasDataFile && first.hostOffset !== undefined) checkDataFileMapping(first.hostOffset, offset - inCluster, index, file);
    if (first.type === Sub.Compressed) {
      return { type: Sub.Compressed, length: Math.min(limit, cs - inCluster), compressed: first.compressed };
    }
    let length = cs - inCluster;
    let nextHost = first.hostOffset !== undefined ? first.hostOffset + cs : undefined;
    // Fast paths on the raw words (no decoding, no object per entry): an entry equal to
    // a first one without a host cluster decodes the same way, and so does one with the
    // first's flags whose offset is the next contiguous host cluster.
    const firstHi = u32(l2, index * 8);
    const firstLo = u32(l2, index * 8 + 4);
    const flagsHi = firstHi & ~OFFSET_MASK_HI;
    const flagsLo = firstLo & ~OFFSET_MASK_LO;
    while (length < limit) {
      index++;
      const hi = u32(l2, index * 8);
      const lo = u32(l2, index * 8 + 4);
      if (nextHost === undefined ? hi === firstHi && lo === firstLo : (hi & ~OFFSET_MASK_HI) === flagsHi && (lo & ~OFFSET_MASK_LO) === flagsLo && (hi & OFFSET_MASK_HI) < 0x200000 && (hi & OFFSET_MASK_HI) * 0x100000000 + ((lo & OFFSET_MASK_LO) >>> 0) === nextHost) {
        if (nextHost !== undefined) nextHost += cs;
        length += cs;
        continue;
      }
      const e = decodeCluster(l2, l2Offset, index, g, file);
      if (e.type !== first.type) break;
      if (nextHost !== undefined) {
        if (e.hostOffset !== nextHost) break;
        nextHost += cs;
      }
      length += cs;
    }
    return {
      type: first.type,
      length: Math.min(length, limit),
      hostOffset: first.hostOffset !== undefined ? first.hostOffset + inCluster : undefined,
    };
  }

  // Extended L2: walk subclusters.
  const sc = g.subclusterSize;
  let scIndex = Math.floor(inCluster / sc);
  const inSub = inCluster % sc;
  let ent = decodeExtended(l2, l2Offset, index, g, file);
  if (ent.compressed) {
    return { type: Sub.Compressed, length: Math.min(limit, cs - inCluster), compressed: ent.compressed };
  }
  const type = subType(ent, scIndex);
  if (g.hasDataFile && ent.host !== undefined) checkDataFileMapping(ent.host, offset - inCluster, index, file);
  const hostAt = (e: ExtEntry, i: number): number | undefined =>
    e.host !== undefined && type !== Sub.ZeroPlain && type !== Sub.UnallocatedPlain ? e.host + i * sc : undefined;
  const firstHost = hostAt(ent, scIndex);
  let nextHost = firstHost !== undefined ? firstHost + sc : undefined;
  let length = sc - inSub;
  for (;;) {
    if (length >= limit) break;
    scIndex++;
    if (scIndex === 32) {
      scIndex = 0;
      index++;
      ent = decodeExtended(l2, l2Offset, index, g, file);
      if (ent.compressed) break;
    }
    if (subType(ent, scIndex) !== type) break;
    if (nextHost !== undefined) {
      if (hostAt(ent, scIndex) !== nextHost) break;
      nextHost += sc;
    }
    length += sc;
  }
  return { type, length: Math.min(length, limit), hostOffset: firstHost !== undefined ? firstHost + inSub : undefined };
}

/**
 * An external data file holds each guest cluster at its guest offset (QEMU and qimg
 * allocate it there): QEMU refuses an L2 entry that says otherwise, where qimg read
 * elsewhere in the data file (found by the fuzzer's qemu-img oracle).
 */
function checkDataFileMapping(hostCluster: number, guestCluster: number, index: number, file: string): void {
  if (hostCluster !== guestCluster) {
    throw new CorruptImageError(
      file,
      `Image is corrupt: External data file host cluster offset ${hex(hostCluster)} does not match guest cluster offset: ${hex(guestCluster)}, L2 index: ${hex(index)})`,
    );
  }
}

interface ClusterEntry {
  type: Sub;
  hostOffset?: number;
  compressed?: { hostOffset: number; size: number };
}

/** A standard (64-bit) L2 entry. */
export function decodeCluster(l2: Buffer, l2Offset: number, index: number, g: Geometry, file: string): ClusterEntry {
  const hi = u32(l2, index * 8);
  const lo = u32(l2, index * 8 + 4);
  if (hi & OFLAG_COMPRESSED_HI) {
    if (g.hasDataFile) throw invalidEntry(file, l2Offset, index);
    return { type: Sub.Compressed, compressed: readDescriptor(hi, lo, g.clusterBits) };
  }
  if (lo & OFLAG_ZERO_LO) {
    if (g.version < 3) {
      throw new CorruptImageError(
        file,
        `Image is corrupt: Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`,
      );
    }
    checkAligned(hi, lo, l2Offset, index, g, file);
    const host = hostOffsetOf(hi, lo, file);
    if (host === 0) return { type: Sub.ZeroPlain };
    return { type: Sub.ZeroAlloc, hostOffset: host };
  }
  checkAligned(hi, lo, l2Offset, index, g, file);
  const host = hostOffsetOf(hi, lo, file);
  if (host === 0 && !(g.hasDataFile && hi & OFLAG_COPIED_HI)) return { type: Sub.UnallocatedPlain };
  return { type: Sub.Normal, hostOffset: host };
}

function checkAligned(hi: number, lo: number, l2Offset: number, index: number, g: Geometry, file: string): void {
  if (!entryAligned(lo, g)) {
    throw new CorruptImageError(
      file,
      `Image is corrupt: Cluster allocation offset ${hex(rawOffset(hi, lo))} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`,
    );
  }
}

interface ExtEntry {
  /** host cluster offset when allocated */
  host?: number;
  allocBits: number;
  zeroBits: number;
  compressed?: { hostOffset: number; size: number };
}

/** An extended (128-bit) L2 entry: standard half plus the subcluster bitmap. */
function decodeExtended(l2: Buffer, l2Offset: number, index: number, g: Geometry, file: string): ExtEntry {
  const pos = index * 16;
  const hi = l2.readUInt32BE(pos);
  const lo = l2.readUInt32BE(pos + 4);
  const zeroBits = l2.readUInt32BE(pos + 8);
  const allocBits = l2.readUInt32BE(pos + 12);
  if (hi & OFLAG_COMPRESSED_HI) {
    if (g.hasDataFile || zeroBits !== 0 || allocBits !== 0) throw invalidEntry(file, l2Offset, index);
    return { allocBits: 0, zeroBits: 0, compressed: readDescriptor(hi, lo, g.clusterBits) };
  }
  const hasOffset = (hi & OFFSET_MASK_HI) !== 0 || (lo & OFFSET_MASK_LO) !== 0;
  const allocated = hasOffset || (g.hasDataFile && (hi & OFLAG_COPIED_HI) !== 0);
  if (!allocated) {
    if (allocBits !== 0) throw invalidEntry(file, l2Offset, index);
    return { allocBits, zeroBits };
  }
  if ((allocBits & zeroBits) !== 0) throw invalidEntry(file, l2Offset, index);
  checkAligned(hi, lo, l2Offset, index, g, file);
  return { host: hostOffsetOf(hi, lo, file), allocBits, zeroBits };
}

function subType(e: ExtEntry, i: number): Sub {
  const bit = 1 << i;
  if (e.host === undefined) return e.zeroBits & bit ? Sub.ZeroPlain : Sub.UnallocatedPlain;
  if (e.zeroBits & bit) return Sub.ZeroAlloc;
  if (e.allocBits & bit) return Sub.Normal;
  return Sub.UnallocatedAlloc;
}
