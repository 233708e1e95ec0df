/**
 * Creating a VHD as qemu-img 7.2 does: dynamic (footer copy, dynamic disk header,
 * empty BAT, footer; 2 MiB blocks) or fixed (the data, then the footer), sized by the
 * CHS search unless force_size keeps the exact size (creator "qem2").
 */
import { crypto } from '../../core/lazy-builtins.js';
import { QimgError } from '../../core/errors.js';
import type { OptionSpec, OptionValue, ParsedOptions } from '../../core/options.js';
import { newDiskSize } from './geometry.js';
import {
  D,
  DEFAULT_BLOCK_SIZE,
  DYN_COOKIE,
  DYN_HEADER_SIZE,
  F,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  SECTOR,
  VHD_DYNAMIC,
  VHD_FIXED,
  VHD_TIMESTAMP_BASE,
  vhdChecksum,
} from './structs.js';
import { writeNewFile } from '../../io/new-file.js';

export const vpcCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  {
    name: 'subformat',
    type: 'string',
    help: 'Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ',
    default: 'dynamic',
  },
  {
    name: 'force_size',
    type: 'bool',
    help: 'Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation',
  },
];

/** "size=N [subformat=X] [force_size=on|off]", as qemu-img prints it. */
export function describeVpcCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`];
  if (o.raw.has('subformat')) parts.push(`subformat=${o.raw.get('subformat')}`);
  if (o.raw.has('force_size')) parts.push(`force_size=${o.raw.get('force_size')}`);
  return parts.join(' ');
}

export interface VpcSpec {
  size: number;
  fixed: boolean;
  forceSize: boolean;
}

export function vpcSpecFromOptions(size: number, options: Map<string, OptionValue>): VpcSpec {
  const sub = (options.get('subformat') as string | undefined) ?? 'dynamic';
  if (sub !== 'dynamic' && sub !== 'fixed') throw new QimgError(`Parameter 'subformat' does not accept value '${sub}'`);
  return { size, fixed: sub === 'fixed', forceSize: options.get('force_size') === true };
}

export function makeFooter(totalSize: number, geometry: { cylinders: number; heads: number; sectorsPerTrack: number }, type: number, forceSize: boolean): Buffer {
  const f = Buffer.alloc(FOOTER_SIZE);
  f.write(FOOTER_COOKIE, F.cookie, 'latin1');
  f.writeUInt32BE(0x2, F.features);
  f.writeUInt32BE(0x00010000, F.version);
  f.writeBigUInt64BE(type === VHD_FIXED ? 0xffffffffffffffffn : BigInt(FOOTER_SIZE), F.dataOffset);
  f.writeUInt32BE((Math.floor(Date.now() / 1000) - VHD_TIMESTAMP_BASE) >>> 0, F.timestamp);
  // "qemu" images are sized by CHS when read back, "qem2" by current_size
  f.write(forceSize ? 'qem2' : 'qemu', F.creatorApp, 'latin1');
  f.writeUInt16BE(5, F.creatorVersion); // Virtual PC 2007's version, as qemu
  f.writeUInt16BE(3, F.creatorVersion + 2);
  f.write('Wi2k', F.creatorOs, 'latin1');
  f.writeBigUInt64BE(BigInt(totalSize), F.originalSize);
  f.writeBigUInt64BE(BigInt(totalSize), F.currentSize);
  f.writeUInt16BE(geometry.cylinders, F.cylinders);
  f[F.heads] = geometry.heads;
  f[F.sectorsPerTrack] = geometry.sectorsPerTrack;
  f.writeUInt32BE(type, F.diskType);
  Buffer.from(crypto().randomUUID().replace(/-/g, ''), 'hex').copy(f, F.uniqueId);
  f.writeUInt32BE(vhdChecksum(f, F.checksum), F.checksum);
  return f;
}

export async function createVpc(path: string, spec: VpcSpec): Promise<void> {
  const sized = newDiskSize(spec.size, spec.forceSize);
  // qemu-img turns the driver's EFBIG into this message
  if (!sized) throw new QimgError("The image size is too large for file format 'vpc'");
  const footer = makeFooter(sized.totalSize, sized.geometry, spec.fixed ? VHD_FIXED : VHD_DYNAMIC, spec.forceSize);
  await writeNewFile(path, async (handle) => {
    if (spec.fixed) {
      await handle.truncate(sized.totalSize + FOOTER_SIZE);
      await handle.write(footer, 0, FOOTER_SIZE, sized.totalSize);
    } else {
      const sectors = sized.totalSize / SECTOR;
      const entries = Math.ceil(sectors / (DEFAULT_BLOCK_SIZE / SECTOR));
      const tableOffset = FOOTER_SIZE + DYN_HEADER_SIZE;
      const tableBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR;
      const header = Buffer.alloc(DYN_HEADER_SIZE);
      header.write(DYN_COOKIE, D.cookie, 'latin1');
      header.writeBigUInt64BE(0xffffffffffffffffn, D.dataOffset);
      header.writeBigUInt64BE(BigInt(tableOffset), D.tableOffset);
      header.writeUInt32BE(0x00010000, D.headerVersion);
      header.writeUInt32BE(entries, D.maxTableEntries);
      header.writeUInt32BE(DEFAULT_BLOCK_SIZE, D.blockSize);
      header.writeUInt32BE(vhdChecksum(header, D.checksum), D.checksum);
      const image = Buffer.alloc(tableOffset + tableBytes + FOOTER_SIZE, 0xff);
      footer.copy(image, 0);
      header.copy(image, FOOTER_SIZE);
      footer.copy(image, tableOffset + tableBytes);
      await handle.write(image, 0, image.length, 0);
    }
    await handle.datasync();
  });
}
