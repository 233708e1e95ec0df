/**
 * The VHD on-disk structures (Microsoft's "Virtual Hard Disk Image Format
 * Specification"): the 512-byte hard disk footer ("conectix"), the 1024-byte dynamic
 * disk header ("cxsparse") and its parent locators. All fields are big-endian.
 */

export const SECTOR = 512;
export const FOOTER_SIZE = 512;
export const DYN_HEADER_SIZE = 1024;

export const FOOTER_COOKIE = 'conectix';
export const DYN_COOKIE = 'cxsparse';

/** disk types */
export const VHD_FIXED = 2;
export const VHD_DYNAMIC = 3;
export const VHD_DIFFERENCING = 4;

/** BAT entry of a block that is not allocated */
export const BAT_UNUSED = 0xffffffff;

/** CHS geometry limits (spec appendix) and qemu's size limit: 2040 GiB. */
export const CHS_MAX_C = 65535;
export const CHS_MAX_H = 16;
export const CHS_MAX_S = 255;
export const VHD_MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
export const VHD_MAX_SECTORS = 0xff000000;

/** Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_TIMESTAMP_BASE = 946684800;

export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;

/** Footer field offsets. */
export const F = {
  cookie: 0,
  features: 8,
  version: 12,
  dataOffset: 16,
  timestamp: 24,
  creatorApp: 28,
  creatorVersion: 32,
  creatorOs: 36,
  originalSize: 40,
  currentSize: 48,
  cylinders: 56,
  heads: 58,
  sectorsPerTrack: 59,
  diskType: 60,
  checksum: 64,
  uniqueId: 68,
  savedState: 84,
} as const;

/** Dynamic disk header field offsets. */
export const D = {
  cookie: 0,
  dataOffset: 8,
  tableOffset: 16,
  headerVersion: 24,
  maxTableEntries: 28,
  blockSize: 32,
  checksum: 36,
  parentUniqueId: 40,
  parentTimestamp: 56,
  parentUnicodeName: 64,
  parentLocators: 576,
} as const;

export const PARENT_NAME_BYTES = 512;
export const LOCATOR_COUNT = 8;
export const LOCATOR_SIZE = 24;

/** One's complement of the byte sum of `buf`, with the 4 checksum bytes at `skip` read as 0. */
export function vhdChecksum(buf: Buffer, skip: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= skip && i < skip + 4) continue;
    sum += buf[i];
  }
  return ~sum >>> 0;
}

export interface Footer {
  raw: Buffer;
  features: number;
  dataOffset: bigint;
  creatorApp: Buffer;
  currentSize: bigint;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  diskType: number;
  checksum: number;
  uniqueId: Buffer;
}

export function parseFooter(buf: Buffer): Footer {
  return {
    raw: Buffer.from(buf.subarray(0, FOOTER_SIZE)),
    features: buf.readUInt32BE(F.features),
    dataOffset: buf.readBigUInt64BE(F.dataOffset),
    creatorApp: Buffer.from(buf.subarray(F.creatorApp, F.creatorApp + 4)),
    currentSize: buf.readBigUInt64BE(F.currentSize),
    cylinders: buf.readUInt16BE(F.cylinders),
    heads: buf[F.heads],
    sectorsPerTrack: buf[F.sectorsPerTrack],
    diskType: buf.readUInt32BE(F.diskType),
    checksum: buf.readUInt32BE(F.checksum),
    uniqueId: Buffer.from(buf.subarray(F.uniqueId, F.uniqueId + 16)),
  };
}

/**
 * Creator applications whose current_size qemu 7.2 trusts (Hyper-V, qemu's force_size
 * images, Disk2vhd, XenConverter, XenServer's "tap\0"); all others (Virtual PC "vpc ",
 * old qemu "qemu", Azure "wa\0\0", ...) are sized by their CHS geometry.
 */
const CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

/** strncmp(app, name, 4) == 0: the comparison stops at a NUL in both. */
function creatorIs(app: Buffer, name: string): boolean {
  for (let i = 0; i < 4; i++) {
    const a = app[i];
    const b = name.charCodeAt(i);
    if (a !== b) return false;
    if (a === 0) return true;
  }
  return true;
}

/** The virtual size in sectors as qemu 7.2 derives it from a footer (bigint: it may be huge). */
export function footerSectors(f: Footer): bigint {
  const chs = BigInt(f.cylinders * f.heads * f.sectorsPerTrack);
  const trustCurrent = CURRENT_SIZE_CREATORS.some((c) => creatorIs(f.creatorApp, c));
  // an image at the maximum geometry cannot express its size in CHS
  if (trustCurrent || chs === BigInt(VHD_MAX_GEOMETRY)) return f.currentSize / 512n;
  return chs;
}

export interface DynHeader {
  tableOffset: bigint;
  /** as qemu reads it: a signed 32-bit int */
  maxTableEntries: number;
  blockSize: number;
  parentUniqueId: Buffer;
  parentTimestamp: number;
  parentName: string;
  locators: Locator[];
}

export interface Locator {
  platformCode: string;
  dataSpace: number;
  dataLength: number;
  dataOffset: bigint;
}

/** UTF-16 text up to the first NUL character. */
export function utf16(buf: Buffer, bigEndian: boolean): string {
  const b = Buffer.from(buf.subarray(0, buf.length & ~1));
  if (bigEndian) b.swap16();
  const s = b.toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

export function parseDynHeader(buf: Buffer): DynHeader {
  const locators: Locator[] = [];
  for (let i = 0; i < LOCATOR_COUNT; i++) {
    const at = D.parentLocators + i * LOCATOR_SIZE;
    locators.push({
      platformCode: buf.subarray(at, at + 4).toString('latin1'),
      dataSpace: buf.readUInt32BE(at + 4),
      dataLength: buf.readUInt32BE(at + 8),
      dataOffset: buf.readBigUInt64BE(at + 16),
    });
  }
  return {
    tableOffset: buf.readBigUInt64BE(D.tableOffset),
    maxTableEntries: buf.readInt32BE(D.maxTableEntries),
    blockSize: buf.readUInt32BE(D.blockSize),
    parentUniqueId: Buffer.from(buf.subarray(D.parentUniqueId, D.parentUniqueId + 16)),
    parentTimestamp: buf.readUInt32BE(D.parentTimestamp),
    parentName: utf16(buf.subarray(D.parentUnicodeName, D.parentUnicodeName + PARENT_NAME_BYTES), true),
    locators,
  };
}

/**
 * Bytes of a block's sector bitmap: one bit per sector, padded to whole sectors, as
 * qemu computes it (whole bytes first: blocks under 4 KiB get no bitmap at all).
 */
export function bitmapBytes(blockSize: number): number {
  const bytes = Math.floor(blockSize / (8 * SECTOR));
  return Math.ceil(bytes / SECTOR) * SECTOR;
}

/** A UUID in its usual text form (as the bytes are stored). */
export function uuidText(id: Buffer): string {
  const h = id.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
