/** qcow2 on-disk constants, named as in QEMU's docs/interop/qcow2.txt. */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export const HEADER_V2_LENGTH = 72;
export const HEADER_V3_MIN_LENGTH = 104;
/** What QEMU writes for v3: 104 + compression_type + 7 bytes padding. */
export const HEADER_V3_LENGTH = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_REFCOUNT_ORDER = 6;

// Header extension types
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

// Incompatible feature bits
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

// Compatible feature bits
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

// Autoclear feature bits
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;
/** Encrypted data is ciphered in units of this many bytes (QEMU's crypto sector size). */
export const ENCRYPTION_SECTOR = 512;

// QEMU's limits (block/qcow2.h)
export const MAX_BACKING_NAME = 1023;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_EXTRA = 1024;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY = 1024 * 65535;
export const MAX_BACKING_FORMAT_LEN = 15;

// L1/L2 entry bits (as two 32-bit halves: hi = bits 32..63, lo = bits 0..31)
export const OFLAG_COPIED_HI = 0x80000000;
export const OFLAG_COMPRESSED_HI = 0x40000000;
export const OFLAG_ZERO_LO = 0x1;
/** bits 9..55 of an entry: hi part (bits 32..55) and lo part (bits 9..31) */
export const OFFSET_MASK_HI = 0x00ffffff;
export const OFFSET_MASK_LO = 0xfffffe00;

/** Names of the feature bits QEMU knows, used when no feature table names a bit. */
export const KNOWN_FEATURE_NAMES: Array<{ type: number; bit: number; name: string }> = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];
