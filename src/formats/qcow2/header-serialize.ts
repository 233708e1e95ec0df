/**
 * Serializing the qcow2 header model back into cluster 0: fixed fields, header
 * extensions in QEMU's order (backing format, crypto, data file, feature table,
 * bitmaps, then unknown extensions kept verbatim), the end marker, then the backing
 * file name. Everything parsed and not changed round-trips.
 */
import { QimgError } from '../../core/errors.js';
import { writeSizeU64, writeU64 } from '../../core/units.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';

function extension(type: number, data: Buffer): Buffer {
  const padded = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  padded.writeUInt32BE(type, 0);
  padded.writeUInt32BE(data.length, 4);
  data.copy(padded, 8);
  return padded;
}

/** A feature name table: 48-byte entries (type, bit, NUL-padded name). */
export function featureTableBytes(entries: ReadonlyArray<{ type: number; bit: number; name: string }>): Buffer {
  const buf = Buffer.alloc(entries.length * 48);
  entries.forEach((f, i) => {
    buf[i * 48] = f.type;
    buf[i * 48 + 1] = f.bit;
    buf.write(f.name, i * 48 + 2, 46, 'utf8');
  });
  return buf;
}

/**
 * Cluster-0 bytes for `h` (header, extensions, backing name). Updates
 * h.headerLength, h.backingFileOffset and h.backingFileSize to what was written.
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const v3 = h.version >= 3;
  const fixedLength = v3 ? Math.max(C.HEADER_V3_LENGTH, h.headerLength, C.HEADER_V3_MIN_LENGTH + 1 + h.unknownHeaderFields.length) : C.HEADER_V2_LENGTH;
  const fixed = Buffer.alloc(fixedLength);
  fixed.writeUInt32BE(C.QCOW2_MAGIC, 0);
  fixed.writeUInt32BE(h.version, 4);
  // 8..19: backing file offset/size, filled in below
  fixed.writeUInt32BE(h.clusterBits, 20);
  writeSizeU64(fixed, 24, h.size);
  fixed.writeUInt32BE(h.cryptMethod, 32);
  fixed.writeUInt32BE(h.l1Size, 36);
  writeU64(fixed, 40, h.l1TableOffset);
  writeU64(fixed, 48, h.refcountTableOffset);
  fixed.writeUInt32BE(h.refcountTableClusters, 56);
  fixed.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(fixed, 64, h.snapshotsOffset);
  if (v3) {
    fixed.writeBigUInt64BE(h.incompatibleFeatures, 72);
    fixed.writeBigUInt64BE(h.compatibleFeatures, 80);
    fixed.writeBigUInt64BE(h.autoclearFeatures, 88);
    fixed.writeUInt32BE(h.refcountOrder, 96);
    fixed.writeUInt32BE(fixedLength, 100);
    fixed[104] = h.compressionType;
    h.unknownHeaderFields.copy(fixed, 105);
  }
  h.headerLength = fixedLength;

  const exts: Buffer[] = [];
  if (h.backingFormat !== undefined && h.backingFile !== undefined) exts.push(extension(C.EXT_BACKING_FORMAT, Buffer.from(h.backingFormat)));
  if (h.crypto) {
    const d = Buffer.alloc(16);
    writeU64(d, 0, h.crypto.offset);
    writeU64(d, 8, h.crypto.length);
    exts.push(extension(C.EXT_CRYPTO_HEADER, d));
  }
  if (h.dataFile !== undefined) exts.push(extension(C.EXT_DATA_FILE, Buffer.from(h.dataFile)));
  // The table the image had is kept; a v3 image without one gets QEMU's, but (as
  // qemu-img 7.2) only with clusters of 8 KiB or more: smaller header clusters are
  // left room for the extensions that matter (a data file name, a backing name).
  const featureTable =
    h.featureTable.length > 0 ? h.featureTable : clusterSize >= 8192 ? C.KNOWN_FEATURE_NAMES : [];
  const tableExt = v3 && featureTable.length > 0 ? extension(C.EXT_FEATURE_TABLE, featureTableBytes(featureTable)) : null;
  if (tableExt) exts.push(tableExt);
  if (h.bitmaps) {
    const d = Buffer.alloc(24);
    d.writeUInt32BE(h.bitmaps.nbBitmaps, 0);
    writeU64(d, 8, h.bitmaps.directorySize);
    writeU64(d, 16, h.bitmaps.directoryOffset);
    exts.push(extension(C.EXT_BITMAPS, d));
  }
  for (const u of h.unknownExtensions) exts.push(extension(u.type, u.data));
  exts.push(Buffer.alloc(8)); // end of extensions

  const backing = h.backingFile !== undefined ? Buffer.from(h.backingFile) : Buffer.alloc(0);
  let extLength = exts.reduce((n, e) => n + e.length, 0);
  let total = fixedLength + extLength + backing.length;
  if (total > clusterSize && tableExt) {
    // The feature name table is optional: it gives way to the extensions that are not.
    exts.splice(exts.indexOf(tableExt), 1);
    extLength -= tableExt.length;
    total -= tableExt.length;
  }
  if (total > clusterSize) {
    throw new QimgError(`the header, its extensions and the backing file name (${total} bytes) do not fit in one cluster (${clusterSize} bytes)`);
  }
  if (backing.length > C.MAX_BACKING_NAME) throw new QimgError('Backing file name too long');
  h.backingFileOffset = backing.length > 0 ? fixedLength + extLength : 0;
  h.backingFileSize = backing.length;
  writeU64(fixed, 8, h.backingFileOffset);
  fixed.writeUInt32BE(h.backingFileSize, 16);
  return Buffer.concat([fixed, ...exts, backing]);
}

/** A deep copy of a header model (Buffers stay Buffers). */
export function cloneHeader(h: Qcow2Header): Qcow2Header {
  return {
    ...h,
    unknownHeaderFields: Buffer.from(h.unknownHeaderFields),
    featureTable: h.featureTable.map((f) => ({ ...f })),
    bitmaps: h.bitmaps ? { ...h.bitmaps } : undefined,
    crypto: h.crypto ? { ...h.crypto } : undefined,
    unknownExtensions: h.unknownExtensions.map((u) => ({ type: u.type, data: Buffer.from(u.data) })),
  };
}
