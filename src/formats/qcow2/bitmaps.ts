/**
 * The qcow2 persistent dirty bitmap directory (docs/interop/qcow2.txt, "Bitmaps"):
 * read, validated the way QEMU 7.2 validates it when it opens an image, and turned
 * into the `bitmaps` list that `qemu-img info` prints.
 *
 * Directory entry layout (big endian, each entry padded to a multiple of 8):
 *    0 -  7  bitmap_table_offset   (cluster aligned, non-zero)
 *    8 - 11  bitmap_table_size     (entries of the bitmap table, non-zero)
 *   12 - 15  flags                 (bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible)
 *   16       type                  (1 = dirty tracking bitmap)
 *   17       granularity_bits      (QEMU: 9..31)
 *   18 - 19  name_size             (spec: non-zero; QEMU: at most 1023)
 *   20 - 23  extra_data_size
 *   24 -     extra data, then the name (not NUL terminated), then zero padding
 *
 * Where QEMU is stricter than the spec, qimg follows QEMU: any extra data is refused
 * ("Bitmap extra data is not supported", whatever the extra_data_compatible flag says),
 * and every flag other than in_use and auto is refused (QEMU's reserved-flags mask
 * includes bit 2). qimg additionally refuses name_size 0, which the spec forbids but
 * QEMU 7.2 lets through.
 */
import { CorruptImageError } from '../../core/errors.js';
import type { HostFile } from '../../io/host.js';
import * as C from './constants.js';
import type { BitmapsExtension } from './header.js';
import { printable } from '../../core/printable.js';

export interface BitmapEntry {
  /** The name as QEMU sees it: the name bytes up to the first NUL, decoded as UTF-8. */
  name: string;
  /** The name as stored (what a rewritten directory keeps byte for byte). */
  nameBytes: Buffer;
  granularityBits: number;
  /** 2^granularityBits: bytes of guest data per bitmap bit. */
  granularity: number;
  /** The raw flags word. */
  flags: number;
  /** Flag bit 0: the bitmap was not saved cleanly and is inconsistent. */
  inUse: boolean;
  /** Flag bit 1: the bitmap is enabled (tracks writes). */
  auto: boolean;
  /** 1 = dirty tracking bitmap (the only type there is). */
  type: number;
  /** Offset of the bitmap table in the image file. */
  tableOffset: number;
  /** Number of u64 entries in the bitmap table. */
  tableSize: number;
  /** Type-specific extra data (always empty for a directory QEMU accepts). */
  extraData: Buffer;
}

/** One element of `format-specific.data.bitmaps` as `qemu-img info --output=json` prints it. */
export interface QemuBitmapInfo {
  flags: string[];
  name: string;
  granularity: number;
}

export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
/** Flags QEMU refuses: everything but in_use and auto (QEMU's BME_RESERVED_FLAGS). */
const BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO) >>> 0;
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MAX_NAME_SIZE = 1023;
/** Most bitmap table entries QEMU accepts. */
export const BME_MAX_TABLE_SIZE = 0x8000000;
/** Most bitmap data (table entries x cluster size) QEMU accepts (512 MiB). */
export const BME_MAX_PHYS_SIZE = 0x20000000;
const DIR_ENTRY_HEADER = 24;

/**
 * Reads and validates the bitmap directory described by `ext`.
 *
 * `virtualSize` (the image's virtual disk size) enables QEMU's last check: a bitmap
 * that is not in use must have a bitmap table big enough to cover the whole disk.
 * Without it that check is skipped.
 */
export async function readBitmapDirectory(
  file: HostFile,
  ext: BitmapsExtension,
  clusterSize: number,
  virtualSize?: number,
): Promise<BitmapEntry[]> {
  return (await loadBitmapDirectory(file, ext, clusterSize, virtualSize)).entries;
}

/** readBitmapDirectory, also giving the directory's bytes as read. */
export async function loadBitmapDirectory(
  file: HostFile,
  ext: BitmapsExtension,
  clusterSize: number,
  virtualSize?: number,
): Promise<{ entries: BitmapEntry[]; bytes: Buffer }> {
  const fail = (what: string): never => {
    throw new CorruptImageError(file.path, `Bitmap directory is corrupted: ${what}`);
  };
  const { directoryOffset, directorySize } = ext;
  if (directorySize === 0) fail('Requested bitmap directory size is zero');
  if (directorySize > C.MAX_BITMAP_DIRECTORY) {
    fail(`Requested bitmap directory size is too big (${directorySize} > ${C.MAX_BITMAP_DIRECTORY})`);
  }
  if (directoryOffset === 0 || directoryOffset % clusterSize !== 0) {
    fail(`directory offset ${directoryOffset} is not a non-zero multiple of the cluster size ${clusterSize}`);
  }
  if (directoryOffset + directorySize > file.size) {
    fail(`directory (offset ${directoryOffset}, size ${directorySize}) lies beyond the end of the file (${file.size} bytes)`);
  }
  const bytes = await file.readBytes(directoryOffset, directorySize);
  return { entries: parseBitmapDirectory(bytes, ext.nbBitmaps, clusterSize, file.path, virtualSize), bytes };
}

/**
 * Parses and validates a bitmap directory already in memory (checks in QEMU's order:
 * entry bounds, entry count, extra data, per-entry constraints, duplicate names).
 */
export function parseBitmapDirectory(
  dir: Buffer,
  nbBitmaps: number,
  clusterSize: number,
  fileName?: string,
  virtualSize?: number,
): BitmapEntry[] {
  const fail = (what: string): never => {
    throw new CorruptImageError(fileName, `Bitmap directory is corrupted: ${what}`);
  };
  const entries: BitmapEntry[] = [];
  const seen = new Set<string>();
  let pos = 0;
  while (pos < dir.length) {
    const index = entries.length;
    if (pos + DIR_ENTRY_HEADER > dir.length) {
      fail(`Broken bitmap directory (entry ${index} at byte ${pos} runs past the end of the ${dir.length}-byte directory)`);
    }
    if (index + 1 > nbBitmaps) {
      fail(`More bitmaps found than specified in header extension (${nbBitmaps})`);
    }
    const tableOffsetRaw = dir.readBigUInt64BE(pos);
    const tableSize = dir.readUInt32BE(pos + 8);
    const flags = dir.readUInt32BE(pos + 12);
    const type = dir[pos + 16];
    const granularityBits = dir[pos + 17];
    const nameSize = dir.readUInt16BE(pos + 18);
    const extraSize = dir.readUInt32BE(pos + 20);
    const entrySize = align8(DIR_ENTRY_HEADER + nameSize + extraSize);
    if (pos + entrySize > dir.length) {
      fail(`Broken bitmap directory (entry ${index} at byte ${pos} is ${entrySize} bytes long and runs past the end of the ${dir.length}-byte directory)`);
    }
    const extraStart = pos + DIR_ENTRY_HEADER;
    const nameStart = extraStart + extraSize;
    const rawName = dir.subarray(nameStart, nameStart + nameSize);
    const nul = rawName.indexOf(0);
    const name = rawName.subarray(0, nul < 0 ? rawName.length : nul).toString('utf8');
    const quoted = `'${printable(name)}'`;

    if (extraSize !== 0) {
      fail(`Bitmap extra data is not supported (bitmap ${quoted} has ${extraSize} bytes of extra data)`);
    }

    const problem = entryProblem(
      { tableOffset: tableOffsetRaw, tableSize, flags, type, granularityBits, nameSize },
      clusterSize,
      virtualSize,
    );
    if (problem) fail(`Bitmap ${quoted} doesn't satisfy the constraints (${problem})`);
    const tableOffset = Number(tableOffsetRaw);

    if (seen.has(name)) fail(`Bitmap already exists: ${printable(name)}`);
    seen.add(name);

    entries.push({
      name,
      nameBytes: Buffer.from(rawName),
      granularityBits,
      granularity: 2 ** granularityBits,
      flags,
      inUse: (flags & BME_FLAG_IN_USE) !== 0,
      auto: (flags & BME_FLAG_AUTO) !== 0,
      type,
      tableOffset,
      tableSize,
      extraData: Buffer.from(dir.subarray(extraStart, extraStart + extraSize)),
    });
    pos += entrySize;
  }
  if (entries.length !== nbBitmaps) {
    fail(`Less bitmaps found than specified in header extension (found ${entries.length}, expected ${nbBitmaps})`);
  }
  return entries;
}

/** QEMU's check_dir_entry (plus the spec's non-empty name): what is wrong, or undefined. */
function entryProblem(
  e: { tableOffset: bigint; tableSize: number; flags: number; type: number; granularityBits: number; nameSize: number },
  clusterSize: number,
  virtualSize: number | undefined,
): string | undefined {
  if (e.tableSize === 0) return 'bitmap table size is zero';
  if (e.tableOffset === 0n) return 'bitmap table offset is zero';
  if (e.tableOffset % BigInt(clusterSize) !== 0n) return `bitmap table offset ${e.tableOffset} is not cluster aligned`;
  if (e.tableSize > BME_MAX_TABLE_SIZE) return `bitmap table size ${e.tableSize} exceeds ${BME_MAX_TABLE_SIZE}`;
  if (e.granularityBits < BME_MIN_GRANULARITY_BITS || e.granularityBits > BME_MAX_GRANULARITY_BITS) {
    return `granularity bits ${e.granularityBits} not in ${BME_MIN_GRANULARITY_BITS}..${BME_MAX_GRANULARITY_BITS}`;
  }
  if ((e.flags & BME_RESERVED_FLAGS) >>> 0 !== 0) {
    return `unsupported flags 0x${((e.flags & BME_RESERVED_FLAGS) >>> 0).toString(16)}`;
  }
  if (e.nameSize > BME_MAX_NAME_SIZE) return `name size ${e.nameSize} exceeds ${BME_MAX_NAME_SIZE}`;
  if (e.nameSize === 0) return 'name size is zero';
  if (e.type !== BITMAP_TYPE_DIRTY_TRACKING) return `type ${e.type} is not 1 (dirty tracking)`;
  // QEMU stops here; a table beyond 2^53 could never be read by qimg, so refuse it too.
  if (e.tableOffset > BigInt(Number.MAX_SAFE_INTEGER)) return `bitmap table offset ${e.tableOffset} is 2^53 or more`;
  const physBytes = e.tableSize * clusterSize;
  if (physBytes > BME_MAX_PHYS_SIZE) return `bitmap data size ${physBytes} exceeds ${BME_MAX_PHYS_SIZE}`;
  if (virtualSize !== undefined && (e.flags & BME_FLAG_IN_USE) === 0) {
    const covered = physBytes * 8 * 2 ** e.granularityBits;
    if (virtualSize > covered) {
      return `bitmap table of ${e.tableSize} entries covers ${covered} bytes, less than the virtual size ${virtualSize}`;
    }
  }
  return undefined;
}

/** The `bitmaps` array of `qemu-img info --output=json` (key order flags, name, granularity). */
export function bitmapInfoForQemu(entries: readonly BitmapEntry[]): QemuBitmapInfo[] {
  return entries.map((e) => {
    const flags: string[] = [];
    if (e.inUse) flags.push('in-use');
    if (e.auto) flags.push('auto');
    return { flags, name: e.name, granularity: e.granularity };
  });
}

function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

