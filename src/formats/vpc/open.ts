/**
 * Opening a VHD with qemu 7.2's checks and messages (block/vpc.c vpc_open), plus
 * qimg's own: every table inside the file before it is read (memory bounded by the
 * file), block layouts that would let a write clobber metadata refused for writing,
 * and a differencing disk's parent found through its locators and checked by id.
 */
import { CorruptImageError, QimgError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { chooseParent, readParentCandidates } from './parent.js';
import { VpcImage, type DynamicLayout, type VpcLayout } from './image.js';
import {
  BAT_UNUSED,
  DYN_COOKIE,
  DYN_HEADER_SIZE,
  F,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  SECTOR,
  VHD_DIFFERENCING,
  VHD_FIXED,
  VHD_MAX_SECTORS,
  bitmapBytes,
  footerSectors,
  parseDynHeader,
  parseFooter,
  uuidText,
  vhdChecksum,
} from './structs.js';

/** qemu's largest single read (BDRV_REQUEST_MAX_BYTES): a larger BAT cannot be read. */
const MAX_REQUEST = 0x7ffffe00;

function hasCookie(buf: Buffer, cookie: string): boolean {
  return buf.subarray(0, 8).toString('latin1') === cookie;
}

export async function openVpc(file: HostFile, ctx: OpenContext): Promise<VpcImage> {
  const name = file.path;
  const bad = (msg: string) => new CorruptImageError(name, msg);
  let buf = await file.readBytes(0, FOOTER_SIZE);
  let footerAtEnd = false;
  if (!hasCookie(buf, FOOTER_COOKIE)) {
    // a fixed disk has its footer only at the end
    if (file.size < FOOTER_SIZE) throw bad('invalid VPC image');
    buf = await file.readBytes(file.size - FOOTER_SIZE, FOOTER_SIZE);
    if (!hasCookie(buf, FOOTER_COOKIE) || buf.readUInt32BE(F.diskType) !== VHD_FIXED) throw bad('invalid VPC image');
    footerAtEnd = true;
  }
  const footer = parseFooter(buf);
  if (vhdChecksum(buf, F.checksum) !== footer.checksum) throw bad('Incorrect header checksum');

  const sectors = footerSectors(footer);
  // qemu: -EFBIG, "File too large"; the 2040 GiB limit also keeps sizes exact in a number
  if (sectors > BigInt(VHD_MAX_SECTORS)) throw bad('File too large');
  const virtualSize = Number(sectors) * SECTOR;

  const layout: VpcLayout = { footer, virtualSize, fixedIo: footer.diskType === VHD_FIXED, footerAtEnd };
  if (footerAtEnd) return new VpcImage(file, name, layout, null);

  layout.dynamic = await readDynamic(file, footer.dataOffset, sectors, footer.diskType === VHD_DIFFERENCING, bad);
  if (file.writable) assertWritableLayout(layout.dynamic, name);

  let backing: VpcImage | null = null;
  const dyn = layout.dynamic;
  if (dyn.differencing && !layout.fixedIo) {
    const candidates = await readParentCandidates(file, dyn.header);
    const chosen = chooseParent(candidates, name);
    dyn.parentName = chosen?.path ?? (dyn.header.parentName || undefined);
    if (!ctx.options.metadataOnly && !ctx.options.noBacking) {
      if (!chosen) {
        throw bad(`differencing disk without a usable parent locator (parent name '${dyn.header.parentName}')`);
      }
      backing = await openParent(ctx, chosen.path!, name, dyn);
    }
  }
  return new VpcImage(file, name, layout, backing);
}

async function openParent(ctx: OpenContext, path: string, name: string, dyn: DynamicLayout): Promise<VpcImage> {
  let parent;
  try {
    parent = await ctx.openBacking(path, 'vpc', name);
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new QimgError(`${msg} (parent of this differencing disk: '${dyn.header.parentName}')`, { file: name, cause: err });
  }
  if (!(parent instanceof VpcImage) || !parent.uniqueId.equals(dyn.header.parentUniqueId)) {
    const id = parent instanceof VpcImage ? uuidText(parent.uniqueId) : 'none';
    await parent.close().catch(() => undefined);
    throw new QimgError(
      `parent disk '${path}' has unique id ${id}, but this differencing disk was made from ${uuidText(dyn.header.parentUniqueId)}`,
      { file: name },
    );
  }
  return parent;
}

async function readDynamic(
  file: HostFile,
  dataOffset: bigint,
  sectors: bigint,
  differencing: boolean,
  bad: (msg: string) => Error,
): Promise<DynamicLayout> {
  // past the end of the file the header reads as zeros (as qemu's pread)
  const inFile = dataOffset < BigInt(file.size);
  const headerOffset = inFile ? Number(dataOffset) : 0;
  const buf = inFile ? await file.readBytes(headerOffset, DYN_HEADER_SIZE) : Buffer.alloc(DYN_HEADER_SIZE);
  if (!hasCookie(buf, DYN_COOKIE)) throw bad('Invalid header magic');
  const header = parseDynHeader(buf);

  const blockSize = header.blockSize;
  if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) throw bad(`Invalid block size ${blockSize}`);
  const bitmapSize = bitmapBytes(blockSize);
  const bytes = sectors * 512n;
  if (bytes / BigInt(blockSize) > 0xffffffffn) throw bad('Too many blocks');
  // qemu multiplies the entry count as a signed int widened to 64 bits
  const computed = BigInt.asUintN(64, BigInt(header.maxTableEntries) * BigInt(blockSize));
  if (computed < bytes) throw bad('Page table too small');
  const entries = header.maxTableEntries;
  if (entries < 0 || entries > 0x1fffffff) throw bad(`Max Table Entries too large (${entries})`);
  const tableBytes = entries * 4;
  if (tableBytes > MAX_REQUEST || header.tableOffset > BigInt(Number.MAX_SAFE_INTEGER)) throw bad('Error reading pagetable');
  const batOffset = Number(header.tableOffset);
  const truncated = 'block-vpc: free_data_block_offset points after the end of file. The image has been truncated.';
  // checked before reading, so a hostile entry count cannot make us allocate more than the file
  if (batOffset + tableBytes > file.size) throw bad(truncated);
  const raw = await file.readBytes(batOffset, tableBytes);
  const bat = new Uint32Array(entries);
  let free = Math.ceil((batOffset + tableBytes) / SECTOR) * SECTOR;
  for (let i = 0; i < entries; i++) {
    const e = raw.readUInt32BE(i * 4);
    bat[i] = e;
    if (e !== BAT_UNUSED) free = Math.max(free, e * SECTOR + bitmapSize + blockSize);
  }
  if (free > file.size) throw bad(truncated);
  // new blocks also stay clear of the header and of parent locator data (qemu does
  // not look: Windows puts locators after the BAT)
  free = Math.max(free, Math.ceil((headerOffset + DYN_HEADER_SIZE) / SECTOR) * SECTOR);
  for (const loc of header.locators) {
    if (loc.platformCode === '\0\0\0\0' || loc.dataLength === 0 || loc.dataOffset > BigInt(file.size)) continue;
    free = Math.max(free, Math.ceil((Number(loc.dataOffset) + loc.dataLength) / SECTOR) * SECTOR);
  }
  return { header, headerOffset, blockSize, bitmapSize, batOffset, bat, freeDataBlockOffset: free, differencing };
}

/**
 * Writes go into blocks where the BAT says; refuse to open for writing when a block
 * overlaps another block or the image's own metadata (a write would clobber it).
 */
function assertWritableLayout(d: DynamicLayout, name: string): void {
  const ranges: Array<[number, number, string]> = [
    [0, FOOTER_SIZE, 'the footer copy'],
    [d.headerOffset, d.headerOffset + DYN_HEADER_SIZE, 'the dynamic disk header'],
    [d.batOffset, d.batOffset + d.bat.length * 4, 'the BAT'],
  ];
  const blocks: number[] = [];
  for (const e of d.bat) if (e !== BAT_UNUSED) blocks.push(e * SECTOR);
  blocks.sort((a, b) => a - b);
  const span = d.bitmapSize + d.blockSize;
  for (let i = 0; i < blocks.length; i++) {
    const [s, e] = [blocks[i], blocks[i] + span];
    if (i > 0 && s < blocks[i - 1] + span) throw new CorruptImageError(name, `data blocks at ${blocks[i - 1]} and ${s} overlap; refusing to write`);
    for (const [rs, re, what] of ranges) {
      if (s < re && rs < e) throw new CorruptImageError(name, `data block at ${s} overlaps ${what}; refusing to write`);
    }
  }
}
