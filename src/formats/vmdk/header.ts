/**
 * Binary headers of sparse extents: the hosted sparse header (VMDK4, "KDMV", also
 * the footer of stream-optimized extents), the ESX 3 COWD header and the ESXi
 * seSparse const/volatile headers, plus stream markers.
 */
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';
import {
  MARKER_EOS,
  MARKER_FOOTER,
  SECTOR,
  SESPARSE_CONST_MAGIC,
  SESPARSE_VERSION,
  SESPARSE_VOLATILE_MAGIC,
  VMDK4_MAGIC,
} from './constants.js';

/** The hosted sparse extent header (SparseExtentHeader), magic included. */
export interface Vmdk4Header {
  version: number;
  flags: number;
  /** in sectors */
  capacity: bigint;
  /** grain size in sectors */
  granularity: bigint;
  descOffset: bigint;
  descSize: bigint;
  numGTEsPerGT: number;
  rgdOffset: bigint;
  gdOffset: bigint;
  grainOffset: bigint;
  uncleanShutdown: number;
  compressAlgorithm: number;
}

export const VMDK4_HEADER_SIZE = 79;

export function parseVmdk4Header(b: Buffer): Vmdk4Header {
  return {
    version: b.readUInt32LE(4),
    flags: b.readUInt32LE(8),
    capacity: b.readBigUInt64LE(12),
    granularity: b.readBigUInt64LE(20),
    descOffset: b.readBigUInt64LE(28),
    descSize: b.readBigUInt64LE(36),
    numGTEsPerGT: b.readUInt32LE(44),
    rgdOffset: b.readBigUInt64LE(48),
    gdOffset: b.readBigUInt64LE(56),
    grainOffset: b.readBigUInt64LE(64),
    uncleanShutdown: b[72],
    compressAlgorithm: b.readUInt16LE(77),
  };
}

/** One 512-byte sector holding the header (magic, fields, the newline-detection bytes). */
export function serializeVmdk4Header(h: Vmdk4Header): Buffer {
  const b = Buffer.alloc(SECTOR);
  b.writeUInt32BE(VMDK4_MAGIC, 0);
  b.writeUInt32LE(h.version, 4);
  b.writeUInt32LE(h.flags >>> 0, 8);
  b.writeBigUInt64LE(h.capacity, 12);
  b.writeBigUInt64LE(h.granularity, 20);
  b.writeBigUInt64LE(h.descOffset, 28);
  b.writeBigUInt64LE(h.descSize, 36);
  b.writeUInt32LE(h.numGTEsPerGT, 44);
  b.writeBigUInt64LE(h.rgdOffset, 48);
  b.writeBigUInt64LE(h.gdOffset, 56);
  b.writeBigUInt64LE(h.grainOffset, 64);
  b[72] = h.uncleanShutdown;
  // "\n \r\n": lets readers detect a file mangled by newline conversion
  b[73] = 0x0a;
  b[74] = 0x20;
  b[75] = 0x0d;
  b[76] = 0x0a;
  b.writeUInt16LE(h.compressAlgorithm, 77);
  return b;
}

/** The ESX 3 sparse header (COWD), all fields 32-bit. */
export interface CowdHeader {
  version: number;
  flags: number;
  diskSectors: number;
  granularity: number;
  l1dirOffset: number;
  l1dirSize: number;
}

export function parseCowdHeader(b: Buffer): CowdHeader {
  return {
    version: b.readUInt32LE(4),
    flags: b.readUInt32LE(8),
    diskSectors: b.readUInt32LE(12),
    granularity: b.readUInt32LE(16),
    l1dirOffset: b.readUInt32LE(20),
    l1dirSize: b.readUInt32LE(24),
  };
}

/** The seSparse const header fields qemu uses (everything is 64-bit, offsets in sectors). */
export interface SeSparseHeader {
  capacity: bigint;
  grainSize: bigint;
  grainTableSize: bigint;
  volatileHeaderOffset: bigint;
  grainDirOffset: bigint;
  grainDirSize: bigint;
  grainTablesOffset: bigint;
  grainsOffset: bigint;
}

const hex16 = (v: bigint) => `0x${v.toString(16).padStart(16, '0')}`;

/** Checks the seSparse const header as strictly as qemu (the format is undocumented). */
export function parseSeSparseConstHeader(b: Buffer, file: string): SeSparseHeader {
  const u = (i: number) => b.readBigUInt64LE(i * 8);
  const magic = u(0);
  if (magic !== SESPARSE_CONST_MAGIC) throw new CorruptImageError(file, `Bad const header magic: ${hex16(magic)}`);
  const version = u(1);
  if (version !== SESPARSE_VERSION) throw new UnsupportedError(file, `Unsupported version: ${hex16(version)}`);
  const grainSize = u(3);
  if (grainSize !== 8n) throw new UnsupportedError(file, `Unsupported grain size: ${grainSize}`);
  const grainTableSize = u(4);
  if (grainTableSize !== 64n) throw new UnsupportedError(file, `Unsupported grain table size: ${grainTableSize}`);
  const flags = u(5);
  if (flags !== 0n) throw new UnsupportedError(file, `Unsupported flags: ${hex16(flags)}`);
  const r = [u(6), u(7), u(8), u(9)];
  if (r.some((x) => x !== 0n)) throw new UnsupportedError(file, `Unsupported reserved bits: ${r.map(hex16).join(' ')}`);
  if (!isZero(b.subarray(26 * 8, SECTOR))) throw new UnsupportedError(file, 'Unsupported non-zero const header padding');
  return {
    capacity: u(2),
    grainSize,
    grainTableSize,
    volatileHeaderOffset: u(10),
    grainDirOffset: u(16),
    grainDirSize: u(17),
    grainTablesOffset: u(18),
    grainsOffset: u(24),
  };
}

export function checkSeSparseVolatileHeader(b: Buffer, file: string): void {
  const magic = b.readBigUInt64LE(0);
  if (magic !== SESPARSE_VOLATILE_MAGIC) throw new CorruptImageError(file, `Bad volatile header magic: ${hex16(magic)}`);
  if (b.readBigUInt64LE(24) !== 0n) throw new UnsupportedError(file, 'Image is dirty, Replaying journal not supported');
  if (!isZero(b.subarray(32, SECTOR))) throw new UnsupportedError(file, 'Unsupported non-zero volatile header padding');
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** A metadata marker sector of a stream: value (sectors or LBA), size 0, type. */
export function metadataMarker(value: number, type: number): Buffer {
  const b = Buffer.alloc(SECTOR);
  b.writeBigUInt64LE(BigInt(value), 0);
  b.writeUInt32LE(0, 8);
  b.writeUInt32LE(type, 12);
  return b;
}

/**
 * The footer of a stream-optimized extent: the last three sectors are a footer
 * marker, a copy of the header with the real gdOffset, and the end-of-stream marker.
 */
export function parseFooter(tail: Buffer, file: string): Vmdk4Header {
  const marker = tail.subarray(0, SECTOR);
  const header = tail.subarray(SECTOR, 2 * SECTOR);
  const eos = tail.subarray(2 * SECTOR, 3 * SECTOR);
  if (
    header.readUInt32BE(0) !== VMDK4_MAGIC ||
    marker.readUInt32LE(8) !== 0 ||
    marker.readUInt32LE(12) !== MARKER_FOOTER ||
    eos.readBigUInt64LE(0) !== 0n ||
    eos.readUInt32LE(8) !== 0 ||
    eos.readUInt32LE(12) !== MARKER_EOS
  ) {
    throw new CorruptImageError(file, 'Invalid footer');
  }
  return parseVmdk4Header(header);
}
