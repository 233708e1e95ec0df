/**
 * The QED header (docs/interop/qed_spec.txt): little-endian, 64 bytes at offset 0,
 * followed within the first header_size clusters by the backing file name. Parsing
 * validates every field the way QEMU's open does, with its messages.
 */
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';

export const QED_MAGIC = 0x00444551; // "QED\0"
export const QED_HEADER_BYTES = 64;

export const QED_F_BACKING_FILE = 0x01n;
export const QED_F_NEED_CHECK = 0x02n;
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;
export const QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE;
/** no compat or autoclear features are defined */
export const QED_COMPAT_FEATURE_MASK = 0n;
export const QED_AUTOCLEAR_FEATURE_MASK = 0n;

export const QED_MIN_CLUSTER_SIZE = 4096;
export const QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const QED_DEFAULT_CLUSTER_SIZE = 65536;
export const QED_MIN_TABLE_SIZE = 1;
export const QED_MAX_TABLE_SIZE = 16;
export const QED_DEFAULT_TABLE_SIZE = 4;
/** QEMU reads the backing name into a PATH_MAX buffer, NUL included */
export const QED_MAX_BACKING_NAME = 4095;
/**
 * Largest L1/L2 table qimg holds in memory (table_size * cluster_size); QEMU allows
 * up to 1 GiB tables (16 x 64 MiB), which no tool creates by default.
 */
export const QIMG_MAX_TABLE_BYTES = 64 * 1024 * 1024;

/** L2 entry values with a meaning of their own */
export const QED_UNALLOCATED = 0;
export const QED_ZERO_CLUSTER = 1;

export interface QedHeader {
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  features: bigint;
  compatFeatures: bigint;
  autoclearFeatures: bigint;
  l1TableOffset: number;
  imageSize: number;
  backingFilenameOffset: number;
  backingFilenameSize: number;
}

const U64 = (1n << 64n) - 1n;

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(n) && (n & (n - 1)) === 0;
}

export function isClusterSizeValid(cs: number): boolean {
  return cs >= QED_MIN_CLUSTER_SIZE && cs <= QED_MAX_CLUSTER_SIZE && isPowerOfTwo(cs);
}

export function isTableSizeValid(ts: number): boolean {
  return ts >= QED_MIN_TABLE_SIZE && ts <= QED_MAX_TABLE_SIZE && isPowerOfTwo(ts);
}

/** QEMU's qed_max_image_size(), in its 64-bit (wrapping) arithmetic. */
export function maxImageSize(clusterSize: number, tableSize: number): bigint {
  const entries = BigInt((tableSize * clusterSize) >>> 0) / 8n;
  return (((entries * BigInt(clusterSize)) & U64) * entries) & U64;
}

export function isImageSizeValid(size: bigint, clusterSize: number, tableSize: number): boolean {
  return size % 512n === 0n && size <= maxImageSize(clusterSize, tableSize);
}

/** Offsets a format field may hold; `fileSize` is the file length rounded down to a cluster. */
export interface QedBounds {
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  fileSize: number;
}

/** qed_check_cluster_offset(): aligned, past the header, before the end of the file. */
export function isClusterOffsetValid(b: QedBounds, offset: bigint | number): boolean {
  const off = BigInt(offset);
  const cs = BigInt(b.clusterSize);
  if (off % cs !== 0n) return false;
  return off >= BigInt(b.headerSize) * cs && off < BigInt(b.fileSize);
}

/**
 * qed_check_table_offset(): every cluster of the table inside the file. QEMU refuses
 * a table whose last cluster offset does not lie after the first — so with
 * table_size=1 no table offset is valid, and QEMU cannot open such images.
 */
export function isTableOffsetValid(b: QedBounds, offset: bigint | number): boolean {
  const off = BigInt(offset);
  const end = (off + BigInt((b.tableSize - 1) * b.clusterSize)) & U64;
  if (end <= off) return false;
  return isClusterOffsetValid(b, off) && isClusterOffsetValid(b, end);
}

/** Reads and validates the header; `fileLength` is the image file's size. */
export function parseQedHeader(buf: Buffer, fileLength: number, file: string): QedHeader {
  if (buf.length < QED_HEADER_BYTES || buf.readUInt32LE(0) !== QED_MAGIC) throw new CorruptImageError(file, 'Image not in QED format');
  const clusterSize = buf.readUInt32LE(4);
  const tableSize = buf.readUInt32LE(8);
  const headerSize = buf.readUInt32LE(12);
  const features = buf.readBigUInt64LE(16);
  const imageSize = buf.readBigUInt64LE(48);
  const l1 = buf.readBigUInt64LE(40);
  if (features & ~QED_FEATURE_MASK) {
    throw new UnsupportedError(file, `Unsupported QED features: ${(features & ~QED_FEATURE_MASK).toString(16)}`);
  }
  if (!isClusterSizeValid(clusterSize)) throw new CorruptImageError(file, 'QED cluster size is invalid');
  if (!isTableSizeValid(tableSize)) throw new CorruptImageError(file, 'QED table size is invalid');
  if (!isImageSizeValid(imageSize, clusterSize, tableSize)) throw new CorruptImageError(file, 'QED image size is invalid');
  const fileSize = Math.floor(fileLength / clusterSize) * clusterSize;
  const bounds: QedBounds = { clusterSize, tableSize, headerSize, fileSize };
  if (!isTableOffsetValid(bounds, l1)) throw new CorruptImageError(file, 'QED table offset is invalid');
  if (headerSize > Math.floor(0xffffffff / clusterSize)) throw new CorruptImageError(file, 'QED header size is too large');
  if (imageSize > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new UnsupportedError(file, `QED image size ${imageSize} is too large (values of 2^53 or more are not supported)`);
  }
  if (tableSize * clusterSize > QIMG_MAX_TABLE_BYTES) {
    throw new UnsupportedError(file, `QED tables of ${tableSize * clusterSize} bytes are not supported (qimg holds at most ${QIMG_MAX_TABLE_BYTES})`);
  }
  const h: QedHeader = {
    clusterSize,
    tableSize,
    headerSize,
    features,
    compatFeatures: buf.readBigUInt64LE(24),
    autoclearFeatures: buf.readBigUInt64LE(32),
    l1TableOffset: Number(l1),
    imageSize: Number(imageSize),
    backingFilenameOffset: buf.readUInt32LE(56),
    backingFilenameSize: buf.readUInt32LE(60),
  };
  if (features & QED_F_BACKING_FILE) {
    if (h.backingFilenameOffset + h.backingFilenameSize > clusterSize * headerSize) {
      throw new CorruptImageError(file, 'QED backing filename offset is invalid');
    }
    if (h.backingFilenameSize > QED_MAX_BACKING_NAME) throw new CorruptImageError(file, 'Failed to read backing filename');
  }
  return h;
}

/** The 64 header bytes (the backing name, when any, follows separately). */
export function serializeQedHeader(h: QedHeader): Buffer {
  const b = Buffer.alloc(QED_HEADER_BYTES);
  b.writeUInt32LE(QED_MAGIC, 0);
  b.writeUInt32LE(h.clusterSize, 4);
  b.writeUInt32LE(h.tableSize, 8);
  b.writeUInt32LE(h.headerSize, 12);
  b.writeBigUInt64LE(h.features, 16);
  b.writeBigUInt64LE(h.compatFeatures, 24);
  b.writeBigUInt64LE(h.autoclearFeatures, 32);
  b.writeBigUInt64LE(BigInt(h.l1TableOffset), 40);
  b.writeBigUInt64LE(BigInt(h.imageSize), 48);
  b.writeUInt32LE(h.backingFilenameOffset, 56);
  b.writeUInt32LE(h.backingFilenameSize, 60);
  return b;
}

export function probeQed(head: Buffer): number {
  return head.length >= QED_HEADER_BYTES && head.readUInt32LE(0) === QED_MAGIC ? 100 : 0;
}
