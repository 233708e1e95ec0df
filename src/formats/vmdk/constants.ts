/** VMDK on-disk constants (VMware's Virtual Disk Format 5.0 and QEMU's vmdk driver). */

export const SECTOR = 512;

/** "KDMV": hosted sparse extent (VMDK4); "COWD": ESX 3 sparse extent (vmfsSparse). */
export const VMDK4_MAGIC = 0x4b444d56;
export const VMDK3_MAGIC = 0x434f5744;
/** seSparse const / volatile header magics (64-bit little endian). */
export const SESPARSE_CONST_MAGIC = 0xcafebaben;
export const SESPARSE_VOLATILE_MAGIC = 0xcafecafen;
export const SESPARSE_VERSION = 0x0000000200000001n;

/** Sparse header flags. */
export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
export const FLAG_MARKER = 1 << 17;

export const COMPRESSION_DEFLATE = 1;
/** gdOffset of a stream-optimized header: the grain directory is found via the footer. */
export const GD_AT_END = 0xffffffffffffffffn;
/** Grain table entry of a zeroed grain (when FLAG_ZERO_GRAIN is set). */
export const GTE_ZEROED = 1;

/** Stream markers (the `type` of a metadata marker). */
export const MARKER_EOS = 0;
export const MARKER_GRAIN_TABLE = 1;
export const MARKER_GRAIN_DIRECTORY = 2;
export const MARKER_FOOTER = 3;

/** Size of the embedded descriptor area qemu reads for CIDs (20 sectors). */
export const DESC_AREA = 20 * SECTOR;
/** Longest descriptor read (qemu reads at most 1 MiB - 1). */
export const MAX_DESC_BYTES = (1 << 20) - 1;
/** Grain sizes above 1 GiB are refused (qemu: "Invalid granularity"). */
export const MAX_GRAIN_SECTORS = 0x200000;
/** Grain directory entries (qemu: "L1 size too big"). */
export const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** A 32-bit grain table entry cannot address beyond 2^32 sectors. */
export const MAX_EXTENT_SECTORS = 2 ** 32;
/** The size of one split extent (twoGbMaxExtent*). */
export const SPLIT_SIZE = 0x80000000;
/** What qemu writes: 64 KiB grains, 512 entries per grain table. */
export const DEFAULT_GRAIN_SECTORS = 128;
export const DEFAULT_GT_ENTRIES = 512;
