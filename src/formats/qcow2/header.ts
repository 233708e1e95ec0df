/**
 * The qcow2 header and its extensions: parsed into a model, validated with QEMU's
 * limits and messages before anything else is read. Unknown header fields and
 * extensions are kept so that a later writer can round-trip them.
 */
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';
import { readU64 } from '../../core/units.js';
import type { HostFile } from '../../io/host.js';
import * as C from './constants.js';

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface CryptoExtension {
  offset: number;
  length: number;
}

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** header bytes past the fields qimg knows (kept verbatim) */
  unknownHeaderFields: Buffer;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  featureTable: FeatureName[];
  bitmaps?: BitmapsExtension;
  crypto?: CryptoExtension;
  unknownExtensions: Array<{ type: number; data: Buffer }>;
}

/**
 * Does this buffer start like a qcow2 image? qemu probes version >= 2 as qcow2 and
 * version 1 as the older qcow format; qimg has no qcow driver, so it claims version 1
 * too (and refuses it when opening) rather than letting it fall through to raw.
 */
export function probeQcow2(head: Buffer): number {
  if (head.length < 8) return 0;
  if (head.readUInt32BE(0) !== C.QCOW2_MAGIC) return 0;
  // version 1 is qcow (its own driver), as in qemu
  return head.readUInt32BE(4) >= 2 ? 100 : 0;
}

/** A name stored in the image: qemu uses it as a C string, so it ends at the first NUL. */
function storedName(bytes: Buffer): string {
  const nul = bytes.indexOf(0);
  return (nul < 0 ? bytes : bytes.subarray(0, nul)).toString('utf8');
}

/** Reads and validates the header of `file`. */
export async function readHeader(file: HostFile): Promise<Qcow2Header> {
  const name = file.path;
  const fail = (msg: string): never => {
    throw new CorruptImageError(name, msg);
  };
  const base = await file.readBytes(0, C.HEADER_V3_MIN_LENGTH);
  if (base.readUInt32BE(0) !== C.QCOW2_MAGIC) fail('Image is not in qcow2 format');
  const version = base.readUInt32BE(4);
  if (version < 2 || version > 3) fail(`Unsupported qcow2 version ${version}`);
  const clusterBits = base.readUInt32BE(20);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    fail(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;

  const h: Qcow2Header = {
    version,
    backingFileOffset: readU64(base, 8, 'Backing file offset', name),
    backingFileSize: base.readUInt32BE(16),
    clusterBits,
    size: 0, // set once the L1 checks accepted it (qemu's messages come first)
    cryptMethod: base.readUInt32BE(32),
    l1Size: base.readUInt32BE(36),
    l1TableOffset: readU64(base, 40, 'L1 table offset', name),
    refcountTableOffset: readU64(base, 48, 'Reference count table offset', name),
    refcountTableClusters: base.readUInt32BE(56),
    nbSnapshots: base.readUInt32BE(60),
    snapshotsOffset: readU64(base, 64, 'Snapshot table offset', name),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: C.HEADER_V2_LENGTH,
    compressionType: C.COMPRESSION_ZLIB,
    unknownHeaderFields: Buffer.alloc(0),
    featureTable: [],
    unknownExtensions: [],
  };

  if (version >= 3) {
    h.incompatibleFeatures = base.readBigUInt64BE(72);
    h.compatibleFeatures = base.readBigUInt64BE(80);
    h.autoclearFeatures = base.readBigUInt64BE(88);
    h.refcountOrder = base.readUInt32BE(96);
    h.headerLength = base.readUInt32BE(100);
    if (h.headerLength < C.HEADER_V3_MIN_LENGTH) fail('qcow2 header too short');
    if (h.headerLength > clusterSize) fail('qcow2 header exceeds cluster size');
    if (h.headerLength > C.HEADER_V3_MIN_LENGTH) {
      const rest = await file.readBytes(C.HEADER_V3_MIN_LENGTH, h.headerLength - C.HEADER_V3_MIN_LENGTH);
      h.compressionType = rest[0];
      h.unknownHeaderFields = Buffer.from(rest.subarray(1));
    }
  }

  if (h.backingFileOffset > clusterSize) fail('Invalid backing file offset');

  // Compression type and its feature bit must agree.
  if (h.compressionType !== C.COMPRESSION_ZLIB && h.compressionType !== C.COMPRESSION_ZSTD) {
    fail(`qcow2: unknown compression type: ${h.compressionType}`);
  }
  const hasCompressionBit = (h.incompatibleFeatures & C.INCOMPAT_COMPRESSION) !== 0n;
  if (h.compressionType === C.COMPRESSION_ZLIB && hasCompressionBit) {
    fail('qcow2: Compression type incompatible feature bit must not be set');
  }
  if (h.compressionType !== C.COMPRESSION_ZLIB && !hasCompressionBit) {
    fail('qcow2: Compression type incompatible feature bit must be set');
  }

  // Extensions live between the header and the backing file name (or cluster end).
  const extEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize;
  await readExtensions(file, h, h.headerLength, extEnd);

  const unknownIncompat = h.incompatibleFeatures & ~C.INCOMPAT_KNOWN;
  if (unknownIncompat !== 0n) {
    throw new UnsupportedError(name, `Unsupported qcow2 feature(s): ${describeFeatures(unknownIncompat, 0, h.featureTable)}`);
  }

  if (h.refcountOrder > C.MAX_REFCOUNT_ORDER) {
    fail('Reference count entry width too large; may not exceed 64 bits');
  }
  if (h.cryptMethod > C.CRYPT_LUKS) fail(`Unsupported encryption method ${h.cryptMethod}`);
  if (h.crypto && h.cryptMethod !== C.CRYPT_LUKS) {
    fail('CRYPTO header extension only expected with LUKS encryption method');
  }

  if (h.refcountTableClusters === 0) fail('Image does not contain a reference count table');
  validateTable(name, clusterSize, h.refcountTableOffset, h.refcountTableClusters, clusterSize, C.MAX_REFTABLE_BYTES, 'Reference count table');
  validateTable(name, clusterSize, h.snapshotsOffset, h.nbSnapshots, 40, 40 * C.MAX_SNAPSHOTS, 'Snapshot table');
  validateTable(name, clusterSize, h.l1TableOffset, h.l1Size, 8, C.MAX_L1_BYTES, 'Active L1 table');

  const l2Entries = clusterSize / (h.incompatibleFeatures & C.INCOMPAT_EXTL2 ? 16 : 8);
  if (h.incompatibleFeatures & C.INCOMPAT_EXTL2 && clusterBits < 14) {
    fail('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  // In bigint: any u64 size gets qemu's messages before qimg's own 2^53 limit.
  const sizeRaw = base.readBigUInt64BE(24);
  const span = BigInt(clusterSize * l2Entries);
  const needed = (sizeRaw + span - 1n) / span;
  if (needed > 0x7fffffffn) fail('Image is too big');
  if (BigInt(h.l1Size) < needed) fail('L1 table is too small');
  // QEMU counts the disk in 512-byte sectors (total_sectors = size / 512): a size that
  // is not a multiple of 512 (QEMU never writes one) is rounded down, or info, map and
  // convert disagree with qemu-img by up to 511 bytes (found by the fuzzer's oracle).
  // The L1 checks above bound it by 2^61 (4 Mi L1 entries of 2 MiB clusters): whole
  // sectors that large are exact doubles.
  h.size = Number((sizeRaw / 512n) * 512n);

  if (h.backingFileOffset !== 0) {
    const len = h.backingFileSize;
    if (len > Math.min(C.MAX_BACKING_NAME, clusterSize - h.backingFileOffset)) fail('Backing file name too long');
    const backing = storedName(await file.readBytes(h.backingFileOffset, len));
    // An empty name means no backing file to qemu (info shows none, reads open none).
    if (backing !== '') h.backingFile = backing;
  }

  if ((h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n && (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) === 0n) {
    fail('data-file-raw requires a data file');
  }
  return h;
}

/** qcow2_validate_table: entry count bounded, offset cluster aligned and not overflowing. */
function validateTable(
  file: string,
  clusterSize: number,
  offset: number,
  entries: number,
  entryLen: number,
  maxBytes: number,
  what: string,
): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw new CorruptImageError(file, `${what} too large`);
  const size = entries * entryLen;
  if (offset % clusterSize !== 0 || offset + size > Number.MAX_SAFE_INTEGER) {
    throw new CorruptImageError(file, `${what} offset invalid`);
  }
}

async function readExtensions(file: HostFile, h: Qcow2Header, start: number, end: number): Promise<void> {
  const name = file.path;
  const clusterSize = 2 ** h.clusterBits;
  if (start >= end) return;
  const area = await file.readBytes(start, end - start);
  let pos = 0;
  const fail = (msg: string): never => {
    throw new CorruptImageError(name, msg);
  };
  while (pos < area.length) {
    if (pos + 8 > area.length) fail('Header extension too large');
    const type = area.readUInt32BE(pos);
    const len = area.readUInt32BE(pos + 4);
    pos += 8;
    // The length is checked before the end marker, as QEMU does: an end marker with a
    // length past the area is an error there (found by the fuzzer's qemu-img oracle).
    if (len > area.length - pos) fail('Header extension too large');
    if (type === C.EXT_END) return;
    const data = area.subarray(pos, pos + len);
    switch (type) {
      case C.EXT_BACKING_FORMAT:
        if (len > C.MAX_BACKING_FORMAT_LEN) fail(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = storedName(data);
        break;
      case C.EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          h.featureTable.push({ type: data[i], bit: data[i + 1], name: raw.subarray(0, nul < 0 ? 46 : nul).toString('utf8') });
        }
        break;
      case C.EXT_CRYPTO_HEADER: {
        if (len !== 16) fail(`CRYPTO header extension size ${len}, but expected size 16`);
        const offset = readU64(data, 0, 'Encryption header offset', name);
        const length = readU64(data, 8, 'Encryption header length', name);
        if (offset % clusterSize !== 0) {
          fail(`Encryption header offset '${offset}' is not a multiple of cluster size '${clusterSize}'`);
        }
        h.crypto = { offset, length };
        break;
      }
      case C.EXT_BITMAPS: {
        if (len !== 24) fail('bitmaps_ext: Invalid extension length');
        if ((h.autoclearFeatures & C.AUTOCLEAR_BITMAPS) === 0n) {
          // Written by a program without bitmap support: all bitmaps are inconsistent.
          h.unknownExtensions.push({ type, data: Buffer.from(data) });
          break;
        }
        const nb = data.readUInt32BE(0);
        if (data.readUInt32BE(4) !== 0) fail('bitmaps_ext: Reserved field is not zero');
        if (nb > C.MAX_BITMAPS) {
          fail(`bitmaps_ext: Image has ${nb} bitmaps, exceeding the QEMU supported maximum of ${C.MAX_BITMAPS}`);
        }
        if (nb === 0) fail('found bitmaps extension with zero bitmaps');
        const directorySize = readU64(data, 8, 'Bitmap directory size', name);
        const directoryOffset = readU64(data, 16, 'Bitmap directory offset', name);
        if (directoryOffset % clusterSize !== 0) fail('bitmaps_ext: invalid bitmap directory offset');
        if (directorySize > C.MAX_BITMAP_DIRECTORY) {
          fail(`bitmaps_ext: bitmap directory size (${directorySize}) exceeds the maximum supported size (${C.MAX_BITMAP_DIRECTORY})`);
        }
        h.bitmaps = { nbBitmaps: nb, directorySize, directoryOffset };
        break;
      }
      case C.EXT_DATA_FILE:
        h.dataFile = storedName(data);
        break;
      default:
        h.unknownExtensions.push({ type, data: Buffer.from(data) });
    }
    pos += (len + 7) & ~7;
  }
}

/** Names of the set bits of `mask` (feature type `type`), from the image's table or QEMU's. */
export function describeFeatures(mask: bigint, type: number, table: FeatureName[]): string {
  const parts: string[] = [];
  let rest = mask;
  for (const f of table) {
    if (f.type !== type || f.bit > 63) continue;
    const bit = 1n << BigInt(f.bit);
    if (rest & bit) {
      parts.push(f.name);
      rest &= ~bit;
    }
  }
  if (rest !== 0n) {
    const kind = ['incompatible', 'compatible', 'autoclear'][type] ?? 'incompatible';
    parts.push(`Unknown ${kind} feature: ${rest.toString(16)}`);
  }
  return parts.join(', ');
}
