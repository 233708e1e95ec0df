/**
 * The qcow (version 1) header: big-endian, 48 bytes — magic "QFI\xfb", version 1,
 * backing file offset/size, mtime, size, cluster_bits, l2_bits, crypt_method,
 * l1_table_offset. Validated as QEMU's qcow driver validates it, with its messages.
 */
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';

export const QCOW_MAGIC = 0x514649fb;
export const QCOW_VERSION = 1;
export const QCOW_HEADER_BYTES = 48;
export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
/** QEMU refuses longer backing names */
export const QCOW_MAX_BACKING_NAME = 1023;
const INT_MAX = 0x7fffffff;

export interface QcowHeader {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  /** entries of the L1 table (derived from size) */
  l1Size: number;
}

/** QEMU scores a version 1 header 100 (qcow2's probe wants version 2 or later). */
export function probeQcow(head: Buffer): number {
  return head.length >= QCOW_HEADER_BYTES && head.readUInt32BE(0) === QCOW_MAGIC && head.readUInt32BE(4) === QCOW_VERSION ? 100 : 0;
}

function safe(v: bigint, what: string, file: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new UnsupportedError(file, `${what} ${v} is too large (values of 2^53 or more are not supported)`);
  return Number(v);
}

export function parseQcowHeader(buf: Buffer, file: string, _opts: { metadataOnly: boolean }): QcowHeader {
  if (buf.length < QCOW_HEADER_BYTES || buf.readUInt32BE(0) !== QCOW_MAGIC) throw new CorruptImageError(file, 'Image not in qcow format');
  const version = buf.readUInt32BE(4);
  if (version !== QCOW_VERSION) {
    const hint = version === 2 || version === 3 ? " (try the 'qcow2' driver instead)" : '';
    throw new UnsupportedError(file, `qcow (v1) does not support qcow version ${version}${hint}`);
  }
  const size = buf.readBigUInt64BE(24);
  const clusterBits = buf.readUInt8(32);
  const l2Bits = buf.readUInt8(33);
  const cryptMethod = buf.readUInt32BE(36);
  if (size <= 1n) throw new CorruptImageError(file, 'Image size is too small (must be at least 2 bytes)');
  if (clusterBits < 9 || clusterBits > 16) throw new CorruptImageError(file, 'Cluster size must be between 512 and 64k');
  // l2_bits counts 8-byte entries: tables of 512 bytes to 64 KiB
  if (l2Bits < 6 || l2Bits > 13) throw new CorruptImageError(file, 'L2 table size must be between 512 and 64k');
  // (AES images need their key to be read: the driver asks for encrypt.key-secret)
  if (cryptMethod !== QCOW_CRYPT_AES && cryptMethod !== QCOW_CRYPT_NONE) {
    throw new CorruptImageError(file, 'invalid encryption method in qcow header');
  }
  const shift = BigInt(clusterBits + l2Bits);
  if (size > (1n << 64n) - 1n - (1n << shift)) throw new CorruptImageError(file, 'Image too large');
  const l1Size = (size + (1n << shift) - 1n) >> shift;
  if (l1Size > BigInt(Math.floor(INT_MAX / 8))) throw new CorruptImageError(file, 'Image too large');
  const h: QcowHeader = {
    backingFileOffset: safe(buf.readBigUInt64BE(8), 'backing file offset', file),
    backingFileSize: buf.readUInt32BE(16),
    mtime: buf.readUInt32BE(20),
    size: safe(size, 'image size', file),
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset: safe(buf.readBigUInt64BE(40), 'L1 table offset', file),
    l1Size: Number(l1Size),
  };
  if (h.backingFileOffset !== 0 && h.backingFileSize > QCOW_MAX_BACKING_NAME) throw new CorruptImageError(file, 'Backing file name too long');
  return h;
}

export function serializeQcowHeader(h: QcowHeader): Buffer {
  const b = Buffer.alloc(QCOW_HEADER_BYTES);
  b.writeUInt32BE(QCOW_MAGIC, 0);
  b.writeUInt32BE(QCOW_VERSION, 4);
  b.writeBigUInt64BE(BigInt(h.backingFileOffset), 8);
  b.writeUInt32BE(h.backingFileSize, 16);
  b.writeUInt32BE(h.mtime, 20);
  b.writeBigUInt64BE(BigInt(h.size), 24);
  b.writeUInt8(h.clusterBits, 32);
  b.writeUInt8(h.l2Bits, 33);
  b.writeUInt32BE(h.cryptMethod, 36);
  b.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  return b;
}
