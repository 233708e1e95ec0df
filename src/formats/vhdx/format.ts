/**
 * VHDX on-disk structures (MS-VHDX v1.0): the file identifier, the two headers, the
 * region table, the metadata table and its items, BAT entries. Parsing only checks
 * each structure's own shape; cross-structure validation lives in open.ts.
 * All integers are little-endian; GUIDs are kept as their 16 on-disk bytes.
 */
import { checksumValid, sealChecksum } from './crc32c.js';
import { crypto } from '../../core/lazy-builtins.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export const FILE_SIGNATURE = 'vhdxfile';
export const HEADER1_OFFSET = 64 * KiB;
export const HEADER2_OFFSET = 128 * KiB;
export const REGION_TABLE1_OFFSET = 192 * KiB;
export const REGION_TABLE2_OFFSET = 256 * KiB;
/** end of the header section: the first byte any region may use */
export const HEADER_SECTION_END = 1 * MiB;
/** bytes of a header covered by its checksum */
export const HEADER_SIZE = 4 * KiB;
/** bytes of a region table (and of the metadata table) covered by checksum / reserved */
export const REGION_TABLE_SIZE = 64 * KiB;
export const METADATA_TABLE_SIZE = 64 * KiB;
export const MAX_REGION_ENTRIES = 2047;
export const MAX_METADATA_ENTRIES = 2047;
/** a metadata item may be at most 1 MiB long */
export const MAX_METADATA_ITEM = 1 * MiB;

export const HEADER_SIGNATURE = 0x64616568; // "head"
export const REGION_SIGNATURE = 0x69676572; // "regi"
export const METADATA_SIGNATURE = 'metadata';

export const BLOCK_SIZE_MIN = 1 * MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
export const MAX_IMAGE_SIZE = 64 * 1024 * 1024 * MiB; // 64 TiB
/** sectors described by one sector bitmap block (2^23) */
export const SECTORS_PER_BITMAP = 1 << 23;
export const BITMAP_BLOCK_SIZE = 1 * MiB;
export const DEFAULT_LOG_SIZE = 1 * MiB;

/** payload block states (low 3 bits of a BAT entry) */
export const PAYLOAD_BLOCK_NOT_PRESENT = 0;
export const PAYLOAD_BLOCK_UNDEFINED = 1;
export const PAYLOAD_BLOCK_ZERO = 2;
export const PAYLOAD_BLOCK_UNMAPPED = 3;
/** the value v0.95 of the spec used for UNMAPPED (qemu still reads it as such) */
export const PAYLOAD_BLOCK_UNMAPPED_V095 = 5;
export const PAYLOAD_BLOCK_FULLY_PRESENT = 6;
export const PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7;
/** sector bitmap block states */
export const SB_BLOCK_NOT_PRESENT = 0;
export const SB_BLOCK_PRESENT = 6;

export const FILE_PARAMS_LEAVE_BLOCKS_ALLOCATED = 1;
export const FILE_PARAMS_HAS_PARENT = 2;
export const REGION_ENTRY_REQUIRED = 1;
export const METADATA_IS_USER = 1;
export const METADATA_IS_VIRTUAL_DISK = 2;
export const METADATA_IS_REQUIRED = 4;

/** GUID text ("2DC27766-F623-4200-9D64-115E9BFD4A08") to its 16 on-disk bytes. */
export function guidFromString(text: string): Buffer | undefined {
  const m = /^\{?([0-9a-fA-F]{8})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{12})\}?$/.exec(text.trim());
  if (!m) return undefined;
  const b = Buffer.alloc(16);
  b.writeUInt32LE(parseInt(m[1], 16), 0);
  b.writeUInt16LE(parseInt(m[2], 16), 4);
  b.writeUInt16LE(parseInt(m[3], 16), 6);
  Buffer.from(m[4] + m[5], 'hex').copy(b, 8);
  return b;
}

/** The 16 on-disk bytes of a GUID as "{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}". */
export function guidToString(g: Buffer): string {
  const h = (n: number, w: number) => n.toString(16).toUpperCase().padStart(w, '0');
  const d4 = g.subarray(8, 16).toString('hex').toUpperCase();
  return `{${h(g.readUInt32LE(0), 8)}-${h(g.readUInt16LE(4), 4)}-${h(g.readUInt16LE(6), 4)}-${d4.slice(0, 4)}-${d4.slice(4)}}`;
}

function guid(text: string): Buffer {
  const g = guidFromString(text);
  if (!g) throw new Error(`bad GUID constant ${text}`);
  return g;
}

export const BAT_GUID = guid('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const METADATA_GUID = guid('8B7CA206-4790-4B9A-B8FE-575F050F886E');
export const FILE_PARAMETERS_GUID = guid('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const VIRTUAL_DISK_SIZE_GUID = guid('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const PAGE83_DATA_GUID = guid('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const LOGICAL_SECTOR_SIZE_GUID = guid('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const PHYSICAL_SECTOR_SIZE_GUID = guid('CDA348C7-445D-4471-9CC9-E9885251C556');
export const PARENT_LOCATOR_GUID = guid('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
/** the parent locator type of a VHDX parent */
export const PARENT_TYPE_VHDX_GUID = guid('B04AEFB7-D19E-4A81-B789-25B8E9445913');

export const ZERO_GUID = Buffer.alloc(16);

export function newGuid(): Buffer {
  const b = crypto().randomBytes(16);
  // an RFC 4122 version 4 GUID, as the GUIDs the spec shows (byte order as MS GUIDs)
  b[7] = (b[7] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return b;
}

export function isZeroGuid(g: Buffer): boolean {
  return g.equals(ZERO_GUID);
}

/** One of the two 4 KiB headers. */
export interface VhdxHeader {
  sequenceNumber: bigint;
  fileWriteGuid: Buffer;
  dataWriteGuid: Buffer;
  logGuid: Buffer;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/**
 * Parses a header block (its first 4 KiB); undefined when the checksum, signature or
 * version do not hold (the header then does not count, as the spec says).
 */
export function parseHeader(buf: Buffer): VhdxHeader | undefined {
  const b = buf.subarray(0, HEADER_SIZE);
  if (b.readUInt32LE(0) !== HEADER_SIGNATURE || !checksumValid(b)) return undefined;
  const version = b.readUInt16LE(66);
  if (version !== 1) return undefined;
  return {
    sequenceNumber: b.readBigUInt64LE(8),
    fileWriteGuid: Buffer.from(b.subarray(16, 32)),
    dataWriteGuid: Buffer.from(b.subarray(32, 48)),
    logGuid: Buffer.from(b.subarray(48, 64)),
    logVersion: b.readUInt16LE(64),
    version,
    logLength: b.readUInt32LE(68),
    logOffset: Number(b.readBigUInt64LE(72)),
  };
}

/** The 4 KiB of a header with its checksum. */
export function serializeHeader(h: VhdxHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.writeUInt32LE(HEADER_SIGNATURE, 0);
  b.writeBigUInt64LE(h.sequenceNumber, 8);
  h.fileWriteGuid.copy(b, 16);
  h.dataWriteGuid.copy(b, 32);
  h.logGuid.copy(b, 48);
  b.writeUInt16LE(h.logVersion, 64);
  b.writeUInt16LE(h.version, 66);
  b.writeUInt32LE(h.logLength, 68);
  b.writeBigUInt64LE(BigInt(h.logOffset), 72);
  sealChecksum(b);
  return b;
}

export interface RegionEntry {
  guid: Buffer;
  fileOffset: number;
  length: number;
  required: boolean;
}

/** Parses a 64 KiB region table; undefined when its checksum/signature/count is bad. */
export function parseRegionTable(buf: Buffer): RegionEntry[] | undefined {
  if (buf.length < REGION_TABLE_SIZE || buf.readUInt32LE(0) !== REGION_SIGNATURE || !checksumValid(buf.subarray(0, REGION_TABLE_SIZE))) {
    return undefined;
  }
  const count = buf.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) return undefined;
  const out: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const p = 16 + i * 32;
    out.push({
      guid: Buffer.from(buf.subarray(p, p + 16)),
      // a u64 beyond 2^53 is beyond any file: keep it as a number that fails bounds checks
      fileOffset: Number(buf.readBigUInt64LE(p + 16)),
      length: buf.readUInt32LE(p + 24),
      required: (buf.readUInt32LE(p + 28) & REGION_ENTRY_REQUIRED) !== 0,
    });
  }
  return out;
}

export function serializeRegionTable(entries: RegionEntry[]): Buffer {
  const b = Buffer.alloc(REGION_TABLE_SIZE);
  b.writeUInt32LE(REGION_SIGNATURE, 0);
  b.writeUInt32LE(entries.length, 8);
  entries.forEach((e, i) => {
    const p = 16 + i * 32;
    e.guid.copy(b, p);
    b.writeBigUInt64LE(BigInt(e.fileOffset), p + 16);
    b.writeUInt32LE(e.length, p + 24);
    b.writeUInt32LE(e.required ? REGION_ENTRY_REQUIRED : 0, p + 28);
  });
  sealChecksum(b);
  return b;
}

export interface MetadataEntry {
  itemId: Buffer;
  offset: number;
  length: number;
  flags: number;
}

/** Parses the metadata table (first 64 KiB of the metadata region). */
export function parseMetadataTable(buf: Buffer): MetadataEntry[] | undefined {
  if (buf.subarray(0, 8).toString('latin1') !== METADATA_SIGNATURE) return undefined;
  const count = buf.readUInt16LE(10);
  if (count > MAX_METADATA_ENTRIES) return undefined;
  const out: MetadataEntry[] = [];
  for (let i = 0; i < count; i++) {
    const p = 32 + i * 32;
    out.push({
      itemId: Buffer.from(buf.subarray(p, p + 16)),
      offset: buf.readUInt32LE(p + 16),
      length: buf.readUInt32LE(p + 20),
      flags: buf.readUInt32LE(p + 24),
    });
  }
  return out;
}

export function serializeMetadataTable(entries: MetadataEntry[]): Buffer {
  const b = Buffer.alloc(METADATA_TABLE_SIZE);
  b.write(METADATA_SIGNATURE, 0, 'latin1');
  b.writeUInt16LE(entries.length, 10);
  entries.forEach((e, i) => {
    const p = 32 + i * 32;
    e.itemId.copy(b, p);
    b.writeUInt32LE(e.offset, p + 16);
    b.writeUInt32LE(e.length, p + 20);
    b.writeUInt32LE(e.flags, p + 24);
  });
  return b;
}

/** BAT entry fields: state in bits 0-2, FileOffsetMB in bits 20-63. */
export function batState(bat: Buffer, index: number): number {
  return bat.readUInt32LE(index * 8) & 7;
}

/** Byte offset of a BAT entry's block (FileOffsetMB * 1 MiB); may exceed 2^53 for junk. */
export function batOffset(bat: Buffer, index: number): number {
  const lo = bat.readUInt32LE(index * 8);
  const hi = bat.readUInt32LE(index * 8 + 4);
  return (hi * 4096 + (lo >>> 20)) * MiB;
}

export function setBatEntry(bat: Buffer, index: number, state: number, fileOffset: number): void {
  const mb = Math.floor(fileOffset / MiB);
  bat.writeUInt32LE((((mb % 4096) << 20) | state) >>> 0, index * 8);
  bat.writeUInt32LE(Math.floor(mb / 4096), index * 8 + 4);
}

/** qemu's geometry: chunk ratio and BAT entry count (with its uint32 arithmetic). */
export interface Geometry {
  blockSize: number;
  logicalSectorSize: number;
  virtualSize: number;
  chunkRatio: number;
  payloadBlocks: number;
  batEntries: number;
}

export function geometry(virtualSize: number, blockSize: number, logicalSectorSize: number, hasParent: boolean): Geometry {
  const chunkRatio = (SECTORS_PER_BITMAP * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  let batEntries: number;
  if (hasParent) {
    batEntries = bitmapBlocks * (chunkRatio + 1);
  } else {
    // qemu computes (payloadBlocks - 1) in uint32: an empty disk still gets entries
    const shift = Math.log2(chunkRatio);
    batEntries = payloadBlocks + (((payloadBlocks - 1) >>> 0) >>> shift);
  }
  return { blockSize, logicalSectorSize, virtualSize, chunkRatio, payloadBlocks, batEntries };
}

/** BAT index of payload block `block` (sector bitmap entries interleaved). */
export function payloadBatIndex(g: Geometry, block: number): number {
  return block + Math.floor(block / g.chunkRatio);
}

/** BAT index of the sector bitmap block of chunk `chunk`. */
export function bitmapBatIndex(g: Geometry, chunk: number): number {
  return chunk * (g.chunkRatio + 1) + g.chunkRatio;
}
