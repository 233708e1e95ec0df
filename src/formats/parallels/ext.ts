/**
 * The Parallels Format Extension cluster (docs/interop/parallels.txt). qemu reads it
 * on read-only opens and loads its dirty bitmaps; qimg exposes no parallels bitmaps,
 * so it validates the cluster as qemu does (same refusals, same messages) and keeps
 * nothing. Memory stays bounded: only the part of the cluster inside the file is
 * read, the rest is zeros (as qemu reads past the end of the file).
 */
import type { HostFile } from '../../io/host.js';
import { CorruptImageError } from '../../core/errors.js';
import { crypto } from '../../core/lazy-builtins.js';

const EXT_MAGIC = 0xab234cef23dcea87n;
const END_OF_FEATURES = 0n;
const DIRTY_BITMAP_FEATURE = 0x20385fae252cb34an;
const EXT_HEADER = 24;
const FEATURE_HEADER = 24;
const BITMAP_FEATURE = 32;

/** Byte `i` of the cluster (zero past what was read). */
function at(buf: Buffer, i: number): Buffer {
  return i < buf.length ? buf.subarray(i) : Buffer.alloc(0);
}

function u64(buf: Buffer, i: number): bigint {
  const b = Buffer.alloc(8);
  at(buf, i).copy(b, 0, 0, 8);
  return b.readBigUInt64LE(0);
}

function u32(buf: Buffer, i: number): number {
  const b = Buffer.alloc(4);
  at(buf, i).copy(b, 0, 0, 4);
  return b.readUInt32LE(0);
}

/** Validates the extension at byte `offset` (cluster of `clusterSize` bytes). */
export async function validateFormatExtension(
  file: HostFile,
  offset: number,
  clusterSize: number,
  totalSectors: number,
  name: string,
): Promise<void> {
  const inFile = Math.max(0, Math.min(clusterSize, file.size - offset));
  const buf = await file.readBytes(offset, inFile);
  const fail = (msg: string): never => {
    throw new CorruptImageError(name, msg);
  };
  const magic = u64(buf, 0);
  if (magic !== EXT_MAGIC) {
    fail(`Wrong parallels Format Extension magic: 0x${magic.toString(16)}, expected: 0x${EXT_MAGIC.toString(16)}`);
  }
  // MD5 of the cluster after the 24-byte header; zeros past the end of the file
  const md5 = crypto().createHash('md5');
  md5.update(buf.subarray(Math.min(EXT_HEADER, buf.length)));
  const zeros = Buffer.alloc(1024 * 1024);
  for (let left = clusterSize - Math.max(buf.length, EXT_HEADER); left > 0; left -= zeros.length) {
    md5.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
  }
  const sum = Buffer.alloc(16);
  at(buf, 8).copy(sum, 0, 0, 16);
  if (!md5.digest().equals(sum)) fail('Wrong checksum in Format Extension header. Format extension is corrupted.');

  let pos = EXT_HEADER;
  let remaining = clusterSize - EXT_HEADER;
  // each feature consumes at least its header: at most clusterSize / 24 rounds
  for (;;) {
    if (remaining < FEATURE_HEADER) {
      fail(
        `Can not read feature header, as remaining bytes (${remaining}) in Format Extension is less than Feature header size (${FEATURE_HEADER})`,
      );
    }
    const fmagic = u64(buf, pos);
    const flags = u64(buf, pos + 8);
    const dataSize = u32(buf, pos + 16);
    pos += FEATURE_HEADER;
    remaining -= FEATURE_HEADER;
    if (flags !== 0n) fail('Flags for extension feature are unsupported');
    const padded = Math.ceil(dataSize / 8) * 8;
    if (padded > remaining) fail('Feature data_size exceedes Format Extension cluster');
    if (fmagic === END_OF_FEATURES) return;
    if (fmagic !== DIRTY_BITMAP_FEATURE) fail(`Unknown feature: 0x${fmagic.toString(16)}`);
    checkBitmapFeature(buf, pos, dataSize, clusterSize, totalSectors, fail);
    pos += padded;
    remaining -= padded;
  }
}

function checkBitmapFeature(
  buf: Buffer,
  pos: number,
  dataSize: number,
  clusterSize: number,
  totalSectors: number,
  fail: (msg: string) => never,
): void {
  if (dataSize < BITMAP_FEATURE) {
    fail(
      `Too small Bitmap Feature area in Parallels Format Extension: ${dataSize} bytes, expected at least ${BITMAP_FEATURE} bytes`,
    );
  }
  const size = u64(buf, pos);
  const granularitySectors = u32(buf, pos + 24);
  const l1Size = u32(buf, pos + 28);
  if (size !== BigInt(totalSectors)) {
    fail(`Bitmap size (in sectors) ${BigInt.asIntN(64, size)} differs from disk size in sectors ${totalSectors}`);
  }
  const granularity = granularitySectors * 512;
  if (granularity < 512 || granularity > 0xffffffff || (granularitySectors & (granularitySectors - 1)) !== 0) {
    fail(`Invalid bitmap granularity ${granularity}, expected a power of two of at least 512 bytes`);
  }
  if (l1Size * 8 > dataSize - BITMAP_FEATURE) fail('Bitmaps feature corrupted: l1 table exceeds extension data_size');
  // serialised bitmap: one bit per granule, in 64-bit words
  const bits = Math.ceil((totalSectors * 512) / granularity);
  const serialized = Math.ceil(bits / 64) * 8;
  const expected = Math.ceil(serialized / clusterSize);
  if (expected !== l1Size) {
    fail(`Bitmap table size ${l1Size} does not correspond to bitmap size and cluster size. Expected ${expected}`);
  }
}
