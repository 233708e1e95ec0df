/**
 * The Parallels expandable image header and BAT (qemu docs/interop/parallels.txt):
 * parsing with qemu's open-time validation, and serialisation.
 */
import type { HostFile } from '../../io/host.js';
import { CorruptImageError } from '../../core/errors.js';

export const HEADER_MAGIC = 'WithoutFreeSpace';
export const HEADER_MAGIC2 = 'WithouFreSpacExt';
export const HEADER_VERSION = 2;
export const HEADER_SIZE = 64;
/** in_use while a writer has the image open */
export const HEADER_INUSE_MAGIC = 0x746f6e59;
/** qemu's create geometry (not used on image level) */
export const HEADS_NUMBER = 16;
export const SEC_IN_CYL = 32;
export const DEFAULT_CLUSTER_SIZE = 1024 * 1024;
const SECTOR = 512;

/** Header field offsets. */
export const F = {
  magic: 0,
  version: 16,
  heads: 20,
  cylinders: 24,
  tracks: 28,
  batEntries: 32,
  nbSectors: 36,
  inUse: 44,
  dataOff: 48,
  flags: 52,
  extOff: 56,
} as const;

export interface ParallelsHeader {
  /** "WithouFreSpacExt": BAT entries count clusters; else sectors */
  ext: boolean;
  heads: number;
  cylinders: number;
  /** cluster size in sectors */
  tracks: number;
  batEntries: number;
  /** virtual size in sectors (low 32 bits only for the old magic) */
  nbSectors: number;
  inUse: number;
  dataOff: number;
  flags: number;
  /** format extension cluster, in sectors (0: none) */
  extOff: bigint;
}

export function isParallelsMagic(head: Buffer): boolean {
  if (head.length < HEADER_SIZE) return false;
  const magic = head.toString('latin1', 0, 16);
  return (magic === HEADER_MAGIC || magic === HEADER_MAGIC2) && head.readUInt32LE(F.version) === HEADER_VERSION;
}

/** The 64-byte header with qemu's open checks (and qimg's bound on the size). */
export function parseHeader(buf: Buffer, file: string): ParallelsHeader {
  const magic = buf.toString('latin1', 0, 16);
  if (buf.readUInt32LE(F.version) !== HEADER_VERSION || (magic !== HEADER_MAGIC && magic !== HEADER_MAGIC2)) {
    throw new CorruptImageError(file, 'Image not in Parallels format');
  }
  const ext = magic === HEADER_MAGIC2;
  let sectors = buf.readBigUInt64LE(F.nbSectors);
  if (!ext) sectors &= 0xffffffffn;
  const tracks = buf.readUInt32LE(F.tracks);
  if (tracks === 0) throw new CorruptImageError(file, 'Invalid image: Zero sectors per track');
  if (tracks > Math.floor(0x7fffffff / 513)) throw new CorruptImageError(file, 'Invalid image: Too big cluster');
  const batEntries = buf.readUInt32LE(F.batEntries);
  if (batEntries > Math.floor(0x7fffffff / 4)) throw new CorruptImageError(file, 'Catalog too large');
  // qemu keeps the sector count as is; qimg's offsets are exact below 2^53 bytes
  if (sectors * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(file, `Invalid image: virtual size of ${sectors} sectors is too large`);
  }
  return {
    ext,
    heads: buf.readUInt32LE(F.heads),
    cylinders: buf.readUInt32LE(F.cylinders),
    tracks,
    batEntries,
    nbSectors: Number(sectors),
    inUse: buf.readUInt32LE(F.inUse),
    dataOff: buf.readUInt32LE(F.dataOff),
    flags: buf.readUInt32LE(F.flags),
    extOff: buf.readBigUInt64LE(F.extOff),
  };
}

export function serializeHeader(h: ParallelsHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write(h.ext ? HEADER_MAGIC2 : HEADER_MAGIC, F.magic, 'latin1');
  b.writeUInt32LE(HEADER_VERSION, F.version);
  b.writeUInt32LE(h.heads >>> 0, F.heads);
  b.writeUInt32LE(h.cylinders >>> 0, F.cylinders);
  b.writeUInt32LE(h.tracks, F.tracks);
  b.writeUInt32LE(h.batEntries, F.batEntries);
  b.writeBigUInt64LE(BigInt(h.nbSectors), F.nbSectors);
  b.writeUInt32LE(h.inUse >>> 0, F.inUse);
  b.writeUInt32LE(h.dataOff >>> 0, F.dataOff);
  b.writeUInt32LE(h.flags >>> 0, F.flags);
  b.writeBigUInt64LE(h.extOff, F.extOff);
  return b;
}

/** Byte offset of BAT entry `i` in the file. */
export function batEntryOffset(i: number): number {
  return HEADER_SIZE + 4 * i;
}

/**
 * The BAT as qemu sees it: entries past the end of the file read as zero (qemu reads
 * them as zeros), so memory is bounded by the file, never by the header's count.
 */
export class Bat {
  private entries: Uint32Array;
  constructor(
    readonly size: number,
    stored: Uint32Array,
  ) {
    this.entries = stored;
  }

  static async read(file: HostFile, count: number): Promise<Bat> {
    const inFile = Math.max(0, Math.min(count, Math.floor((file.size - HEADER_SIZE) / 4)));
    const raw = await file.readBytes(HEADER_SIZE, inFile * 4);
    const entries = new Uint32Array(inFile);
    for (let i = 0; i < inFile; i++) entries[i] = raw.readUInt32LE(4 * i);
    return new Bat(count, entries);
  }

  get(i: number): number {
    return i < this.entries.length ? this.entries[i] : 0;
  }

  set(i: number, v: number): void {
    if (i >= this.entries.length) {
      const grown = new Uint32Array(Math.min(this.size, Math.max(i + 1, this.entries.length * 2)));
      grown.set(this.entries);
      this.entries = grown;
    }
    this.entries[i] = v;
  }

  /** Entries [from, to) as stored on disk (little-endian). */
  encode(from: number, to: number): Buffer {
    const b = Buffer.alloc((to - from) * 4);
    for (let i = from; i < to; i++) b.writeUInt32LE(this.get(i), 4 * (i - from));
    return b;
  }
}

export const SECTOR_SIZE = SECTOR;
