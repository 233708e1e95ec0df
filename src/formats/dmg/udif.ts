/**
 * Apple UDIF (.dmg) metadata as qemu reads it: the 512-byte "koly" trailer found in
 * the last 515 bytes of the (sector-rounded) file, then the block tables ("mish"
 * blocks) from the resource fork or, when there is none, from the base64 <data>
 * elements of the XML property list. qemu's bounds: plist at most 16 MiB, chunks of
 * non-zero types at most 64 MiB in and out.
 */
import type { HostFile } from '../../io/host.js';
import { CorruptImageError } from '../../core/errors.js';

export const UDZE = 0; // zeros
export const UDRW = 1; // raw
export const UDIG = 2; // ignore (reads as zeros)
export const UDZO = 0x80000005; // zlib
export const UDBZ = 0x80000006; // bzip2
export const ULFO = 0x80000007; // lzfse
export const UDCM = 0x7ffffffe; // comment
export const UDLE = 0xffffffff; // last entry

const LENGTHS_MAX = 64 * 1024 * 1024;
const SECTORCOUNTS_MAX = LENGTHS_MAX / 512;
const PLIST_MAX = 16 * 1024 * 1024;
const MISH_MAGIC = 0x6d697368;
/** qimg's bound on the chunk table (qemu has none): 4M chunks, ~150 MiB of table */
const MAX_CHUNKS = 4 * 1024 * 1024;

/** The chunk table, in the order the image lists it (qemu searches it as sorted). */
export interface Chunks {
  count: number;
  types: Uint32Array;
  /** first guest sector */
  sectors: Float64Array;
  sectorCounts: Float64Array;
  /** byte offset in the file */
  offsets: Float64Array;
  lengths: Float64Array;
}

export interface Udif {
  totalSectors: number;
  chunks: Chunks;
  /** chunk types present that qimg cannot read (reads of them fail) */
  unsupported: Set<number>;
}

const n = (v: bigint) => (v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v));

class ChunkTable {
  private cap = 64;
  c: Chunks = {
    count: 0,
    types: new Uint32Array(64),
    sectors: new Float64Array(64),
    sectorCounts: new Float64Array(64),
    offsets: new Float64Array(64),
    lengths: new Float64Array(64),
  };

  push(type: number, sector: number, count: number, offset: number, length: number): void {
    const c = this.c;
    if (c.count === this.cap) {
      this.cap *= 2;
      const grow = <T extends Uint32Array | Float64Array>(a: T, make: (n: number) => T): T => {
        const b = make(this.cap);
        b.set(a);
        return b;
      };
      c.types = grow(c.types, (k) => new Uint32Array(k));
      c.sectors = grow(c.sectors, (k) => new Float64Array(k));
      c.sectorCounts = grow(c.sectorCounts, (k) => new Float64Array(k));
      c.offsets = grow(c.offsets, (k) => new Float64Array(k));
      c.lengths = grow(c.lengths, (k) => new Float64Array(k));
    }
    const i = c.count++;
    c.types[i] = type;
    c.sectors[i] = sector;
    c.sectorCounts[i] = count;
    c.offsets[i] = offset;
    c.lengths[i] = length;
  }
}

/** Adds one mish block's chunks (skipping what qemu skips). */
function readMish(t: ChunkTable, u: Set<number>, dataForkOffset: bigint, buf: Buffer, name: string): void {
  if (buf.length < 244 || buf.readUInt32BE(0) !== MISH_MAGIC) return; // not a block table: skipped
  const outOffset = buf.readBigUInt64BE(8);
  const inOffset = dataForkOffset + buf.readBigUInt64BE(0x18);
  const entries = Math.floor((buf.length - 204) / 40);
  for (let k = 0; k < entries; k++) {
    const at = 204 + 40 * k;
    const type = buf.readUInt32BE(at);
    if (type !== UDZE && type !== UDRW && type !== UDIG && type !== UDZO) {
      if (type !== UDCM && type !== UDLE) u.add(type);
      continue;
    }
    const i = t.c.count;
    if (i >= MAX_CHUNKS) throw new CorruptImageError(name, `more than ${MAX_CHUNKS} chunks in the block tables`);
    const sector = BigInt.asUintN(64, buf.readBigUInt64BE(at + 8) + outOffset);
    const count = buf.readBigUInt64BE(at + 0x10);
    if (type !== UDZE && type !== UDIG && count > BigInt(SECTORCOUNTS_MAX)) {
      throw new CorruptImageError(name, `sector count ${count} for chunk ${i} is larger than max (${SECTORCOUNTS_MAX})`);
    }
    const offset = BigInt.asUintN(64, buf.readBigUInt64BE(at + 0x18) + inOffset);
    const length = buf.readBigUInt64BE(at + 0x20);
    if (length > BigInt(LENGTHS_MAX)) {
      throw new CorruptImageError(name, `length ${length} for chunk ${i} is larger than max (${LENGTHS_MAX})`);
    }
    t.push(type, n(sector), n(count), n(offset), Number(length));
  }
}

/** glib's g_base64_decode: characters outside the alphabet are skipped. */
function base64Decode(text: string): Buffer {
  return Buffer.from(text.replace(/[^A-Za-z0-9+/]/g, ''), 'base64');
}

export async function readUdif(file: HostFile, name: string): Promise<Udif> {
  const invalid = (why: string): never => {
    throw new CorruptImageError(name, `Invalid argument (${why})`);
  };
  const length = Math.ceil(file.size / 512) * 512;
  if (length < 512) throw new CorruptImageError(name, 'dmg file must be at least 512 bytes long');
  const searchFrom = length > 511 + 512 ? length - 511 - 512 : 0;
  const tail = await file.readBytes(searchFrom, Math.min(length, 515));
  const at = tail.indexOf('koly', 0, 'latin1');
  if (at < 0) throw new CorruptImageError(name, 'Could not locate UDIF trailer in dmg file');
  const koly = BigInt(searchFrom + at);
  const trailer = await file.readBytes(Number(koly), 512);
  const dataForkOffset = trailer.readBigUInt64BE(0x18);
  if (dataForkOffset > koly) invalid('data fork offset beyond the UDIF trailer');
  const rsrcOffset = trailer.readBigUInt64BE(0x28);
  const rsrcLength = trailer.readBigUInt64BE(0x30);
  if (rsrcOffset >= koly || rsrcLength > koly - rsrcOffset) invalid('resource fork outside the file');
  const xmlOffset = trailer.readBigUInt64BE(0xd8);
  const xmlLength = trailer.readBigUInt64BE(0xe0);
  if (xmlOffset >= koly || xmlLength > koly - xmlOffset) invalid('property list outside the file');
  const sectors = trailer.readBigInt64BE(0x1ec);
  if (sectors < 0n) invalid('negative sector count');
  if (sectors * 512n > BigInt(Number.MAX_SAFE_INTEGER)) invalid(`sector count ${sectors} too large`);

  const table = new ChunkTable();
  const unsupported = new Set<number>();
  if (rsrcLength !== 0n) {
    // resource fork: the data offset and length, then resources of (length, bytes)
    const begin = Number(rsrcOffset);
    const info = Number(rsrcLength);
    const head = await file.readBytes(begin, 12);
    const dataOffset = head.readUInt32BE(0);
    if (dataOffset > info) invalid('resource data offset');
    const count = head.readUInt32BE(8);
    if (count === 0 || dataOffset + count > info) invalid('resource data length');
    let pos = begin + dataOffset;
    const end = pos + count;
    while (pos < end) {
      const size = (await file.readBytes(pos, 4)).readUInt32BE(0);
      if (size === 0 || size > end - pos) invalid('resource length');
      pos += 4;
      readMish(table, unsupported, dataForkOffset, await file.readBytes(pos, size), name);
      pos += size;
    }
  } else if (xmlLength !== 0n) {
    if (xmlLength > BigInt(PLIST_MAX)) invalid('property list larger than 16 MiB');
    let xml = (await file.readBytes(Number(xmlOffset), Number(xmlLength))).toString('latin1');
    // qemu reads the plist as a C string
    const nul = xml.indexOf('\0');
    if (nul >= 0) xml = xml.slice(0, nul);
    for (let pos = 0; ; ) {
      const begin = xml.indexOf('<data>', pos);
      if (begin < 0) break;
      const end = xml.indexOf('</data>', begin + 6);
      if (end < 0) invalid('malformed property list');
      readMish(table, unsupported, dataForkOffset, base64Decode(xml.slice(begin + 6, end)), name);
      pos = end + 7;
    }
  } else {
    invalid('no resource fork and no property list');
  }
  return { totalSectors: Number(sectors), chunks: table.c, unsupported };
}

/** qemu's binary search over the chunk table; -1 when no chunk holds the sector. */
export function searchChunk(c: Chunks, sector: number): number {
  let lo = 0;
  let hi = c.count;
  while (lo <= hi) {
    const mid = Math.floor((lo + hi) / 2);
    if (mid >= c.count) return -1;
    if (c.sectors[mid] > sector) {
      if (mid === 0) return -1;
      hi = mid - 1;
    } else if (c.sectors[mid] + c.sectorCounts[mid] > sector) {
      return mid;
    } else {
      lo = mid + 1;
    }
  }
  return -1;
}
