/**
 * The VDI (VirtualBox) header: the 512-byte "pre-header + header v1.1" QEMU reads
 * and writes, little endian. Field names follow QEMU's VdiHeader. Parsing validates
 * in QEMU's order and with its messages, so a hostile header gives the same one-line
 * refusal qemu-img gives.
 */
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';
import { crypto } from '../../core/lazy-builtins.js';

export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_TYPE_DYNAMIC = 1;
export const VDI_TYPE_STATIC = 2;
/** What QEMU writes into the text field of the images it creates. */
export const VDI_TEXT = '<<< QEMU VM Virtual Disk Image >>>\n';
export const VDI_HEADER_SIZE = 512;
/** header_size QEMU records (the v1.1 header without the pre-header) */
export const VDI_HEADER_SIZE_FIELD = 0x180;
export const SECTOR_SIZE = 512;
/** The only block size QEMU accepts (it calls blocks clusters). */
export const VDI_BLOCK_SIZE = 1024 * 1024;
/** Block map entry: never allocated (reads as zeros in QEMU). */
export const VDI_UNALLOCATED = 0xffffffff;
/** Block map entry: discarded, reads as zeros. */
export const VDI_DISCARDED = 0xfffffffe;
/**
 * QEMU bounds the block map so that it stays below 2 GiB once rounded to a sector:
 * (INT_MAX + 1 - 512) / 4 entries.
 */
export const VDI_BLOCKS_IN_IMAGE_MAX = (0x80000000 - SECTOR_SIZE) / 4;
export const VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * VDI_BLOCK_SIZE;

/** An allocated block map entry (anything below the two special values). */
export function isAllocated(entry: number): boolean {
  return entry < VDI_DISCARDED;
}

/** Byte offsets of the header fields. */
export const F = {
  text: 0x00,
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  imageFlags: 0x50,
  description: 0x54,
  offsetBmap: 0x154,
  offsetData: 0x158,
  cylinders: 0x15c,
  heads: 0x160,
  sectors: 0x164,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidImage: 0x188,
  uuidLastSnap: 0x198,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;

export interface VdiHeader {
  signature: number;
  version: number;
  headerSize: number;
  imageType: number;
  imageFlags: number;
  offsetBmap: number;
  offsetData: number;
  sectorSize: number;
  /** as recorded (QEMU rounds it up to a sector for the virtual size) */
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
}

const hex = (v: number | bigint) => v.toString(16);

/** 100 for the VDI signature (QEMU's score); the probe buffer is zero-padded like QEMU's. */
export function probeVdi(head: Buffer): number {
  if (head.length < F.signature + 4) return 0;
  return head.readUInt32LE(F.signature) === VDI_SIGNATURE ? 100 : 0;
}

/**
 * Reads and validates a header (the first 512 bytes; bytes past the end of a short
 * file read as zeros, as in QEMU). Checks come in QEMU's order with its texts.
 */
export function parseHeader(buf: Buffer, file: string): VdiHeader {
  const diskSize = buf.readBigUInt64LE(F.diskSize);
  if (diskSize > BigInt(VDI_DISK_SIZE_MAX)) {
    throw new UnsupportedError(file, `Unsupported VDI image size (size is 0x${hex(diskSize)}, max supported is 0x${hex(VDI_DISK_SIZE_MAX)})`);
  }
  const h: VdiHeader = {
    signature: buf.readUInt32LE(F.signature),
    version: buf.readUInt32LE(F.version),
    headerSize: buf.readUInt32LE(F.headerSize),
    imageType: buf.readUInt32LE(F.imageType),
    imageFlags: buf.readUInt32LE(F.imageFlags),
    offsetBmap: buf.readUInt32LE(F.offsetBmap),
    offsetData: buf.readUInt32LE(F.offsetData),
    sectorSize: buf.readUInt32LE(F.sectorSize),
    diskSize: Number(diskSize),
    blockSize: buf.readUInt32LE(F.blockSize),
    blocksInImage: buf.readUInt32LE(F.blocksInImage),
    blocksAllocated: buf.readUInt32LE(F.blocksAllocated),
  };
  // 'VBoxManage convertfromraw' writes sizes that are not sector multiples; QEMU rounds up.
  const size = Math.ceil(h.diskSize / SECTOR_SIZE) * SECTOR_SIZE;
  const unsupported = (what: string) => new UnsupportedError(file, `unsupported VDI image (${what})`);
  if (h.signature !== VDI_SIGNATURE) {
    throw new CorruptImageError(file, `Image not in VDI format (bad signature ${hex(h.signature).padStart(8, '0')})`);
  }
  if (h.version !== VDI_VERSION_1_1) throw unsupported(`version ${h.version >>> 16}.${h.version & 0xffff}`);
  if (h.offsetBmap % SECTOR_SIZE !== 0) throw unsupported(`unaligned block map offset 0x${hex(h.offsetBmap)}`);
  if (h.offsetData % SECTOR_SIZE !== 0) throw unsupported(`unaligned data offset 0x${hex(h.offsetData)}`);
  if (h.sectorSize !== SECTOR_SIZE) throw unsupported(`sector size ${h.sectorSize} is not ${SECTOR_SIZE}`);
  if (h.blockSize !== VDI_BLOCK_SIZE) throw unsupported(`block size ${h.blockSize} is not ${VDI_BLOCK_SIZE}`);
  const room = h.blocksInImage * h.blockSize;
  if (size > room) throw unsupported(`disk size ${size}, image bitmap has room for ${room}`);
  if (!isNullUuid(buf, F.uuidLink)) throw unsupported('non-NULL link UUID');
  if (!isNullUuid(buf, F.uuidParent)) throw unsupported('non-NULL parent UUID');
  if (h.blocksInImage > VDI_BLOCKS_IN_IMAGE_MAX) throw unsupported(`too many blocks ${h.blocksInImage}, max is ${VDI_BLOCKS_IN_IMAGE_MAX}`);
  h.diskSize = size;
  return h;
}

function isNullUuid(buf: Buffer, at: number): boolean {
  for (let i = at; i < at + 16; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * A random (version 4) UUID in VirtualBox's byte order: the first three fields
 * little endian (QEMU byte-swaps RFC 4122 UUIDs the same way).
 */
export function vdiUuid(): Buffer {
  const rfc = Buffer.from(crypto().randomUUID().replace(/-/g, ''), 'hex');
  const out = Buffer.from(rfc);
  out.writeUInt32LE(rfc.readUInt32BE(0), 0);
  out.writeUInt16LE(rfc.readUInt16BE(4), 4);
  out.writeUInt16LE(rfc.readUInt16BE(6), 6);
  return out;
}

/** The header QEMU writes for a new image (geometry, flags and the other UUIDs zero). */
export function newHeader(diskSize: number, isStatic: boolean): { header: Buffer; blocks: number; bmapBytes: number } {
  const blocks = Math.ceil(diskSize / VDI_BLOCK_SIZE);
  const bmapBytes = Math.ceil((blocks * 4) / SECTOR_SIZE) * SECTOR_SIZE;
  const b = Buffer.alloc(VDI_HEADER_SIZE);
  b.write(VDI_TEXT, F.text, 'latin1');
  b.writeUInt32LE(VDI_SIGNATURE, F.signature);
  b.writeUInt32LE(VDI_VERSION_1_1, F.version);
  b.writeUInt32LE(VDI_HEADER_SIZE_FIELD, F.headerSize);
  b.writeUInt32LE(isStatic ? VDI_TYPE_STATIC : VDI_TYPE_DYNAMIC, F.imageType);
  b.writeUInt32LE(VDI_HEADER_SIZE, F.offsetBmap);
  b.writeUInt32LE(VDI_HEADER_SIZE + bmapBytes, F.offsetData);
  b.writeUInt32LE(SECTOR_SIZE, F.sectorSize);
  b.writeBigUInt64LE(BigInt(diskSize), F.diskSize);
  b.writeUInt32LE(VDI_BLOCK_SIZE, F.blockSize);
  b.writeUInt32LE(blocks, F.blocksInImage);
  b.writeUInt32LE(isStatic ? blocks : 0, F.blocksAllocated);
  vdiUuid().copy(b, F.uuidImage);
  vdiUuid().copy(b, F.uuidLastSnap);
  return { header: b, blocks, bmapBytes };
}
