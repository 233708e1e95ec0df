/**
 * The VDI driver: probing, opening (header and block map validated), creation and
 * check, as qemu-img 7.2 does them for VirtualBox images.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { CorruptImageError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { F, parseHeader, probeVdi, SECTOR_SIZE, VDI_HEADER_SIZE, type VdiHeader } from './header.js';
import { VdiImage } from './image.js';
import { createVdi, describeVdiCreate, vdiCreateOptions } from './create.js';

/** Bytes of the block map QEMU reads: every entry, rounded up to a sector. */
export function bmapBytes(h: VdiHeader): number {
  return Math.ceil((h.blocksInImage * 4) / SECTOR_SIZE) * SECTOR_SIZE;
}

/**
 * Header and block map of the image in `file`. QEMU reads a block map past the end
 * of the file as zeros (every block then maps to block 0); qimg refuses it, which
 * also bounds the map's memory by the file's size.
 */
export async function readVdiMetadata(file: HostFile): Promise<{ header: VdiHeader; headerBytes: Buffer; bmap: Buffer }> {
  const headerBytes = await file.readBytes(0, VDI_HEADER_SIZE);
  const header = parseHeader(headerBytes, file.path);
  const size = bmapBytes(header);
  if (header.offsetBmap + size > file.size) {
    throw new CorruptImageError(
      file.path,
      `VDI block map (offset 0x${header.offsetBmap.toString(16)}, ${header.blocksInImage} entries) extends beyond the end of the file`,
    );
  }
  const bmap = await file.readBytes(header.offsetBmap, size);
  return { header, headerBytes, bmap };
}

async function openVdi(file: HostFile, _ctx: OpenContext): Promise<BlockImage> {
  const { header, headerBytes, bmap } = await readVdiMetadata(file);
  // QEMU rewrites the header from its parsed copy, with the size rounded to a sector.
  headerBytes.writeBigUInt64LE(BigInt(header.diskSize), F.diskSize);
  return new VdiImage(file, file.path, header, headerBytes, bmap);
}

export const vdiDriver: FormatDriver = {
  name: 'vdi',
  probe: (head) => probeVdi(head),
  open: openVdi,
  createOptions: vdiCreateOptions,
  describeCreate: describeVdiCreate,
  create: createVdi,
  check: async (filename, opts) => (await import('./check.js')).checkVdi(filename, opts),
};
