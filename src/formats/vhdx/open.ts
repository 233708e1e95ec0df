/**
 * Opening a VHDX file: file identifier, the current header, the log (replayed when
 * writable), a region table, the metadata items, the BAT. Every field is validated
 * before use; a problem is one CorruptImageError naming the image.
 */
import type { HostFile } from '../../io/host.js';
import { CorruptImageError, QimgError, UnsupportedError } from '../../core/errors.js';
import {
  BAT_GUID,
  BITMAP_BLOCK_SIZE,
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  FILE_PARAMETERS_GUID,
  FILE_PARAMS_HAS_PARENT,
  FILE_PARAMS_LEAVE_BLOCKS_ALLOCATED,
  FILE_SIGNATURE,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_SECTION_END,
  HEADER_SIZE,
  LOGICAL_SECTOR_SIZE_GUID,
  MAX_IMAGE_SIZE,
  MAX_METADATA_ITEM,
  METADATA_GUID,
  METADATA_IS_REQUIRED,
  METADATA_TABLE_SIZE,
  MiB,
  PAGE83_DATA_GUID,
  PARENT_LOCATOR_GUID,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PHYSICAL_SECTOR_SIZE_GUID,
  REGION_TABLE1_OFFSET,
  REGION_TABLE2_OFFSET,
  REGION_TABLE_SIZE,
  SB_BLOCK_PRESENT,
  VIRTUAL_DISK_SIZE_GUID,
  batOffset,
  batState,
  geometry,
  isZeroGuid,
  parseHeader,
  parseMetadataTable,
  parseRegionTable,
  type Geometry,
  type RegionEntry,
  type VhdxHeader,
} from './format.js';
import { findActiveSequence, type LogEntry, type LogLocation } from './log.js';
import { parseParentLocator, type ParentLocator } from './parent.js';

/** Everything read from the file's metadata. */
export interface VhdxMeta {
  headers: [VhdxHeader | undefined, VhdxHeader | undefined];
  current: 0 | 1;
  bat: RegionEntry;
  metadata: RegionEntry;
  /** regions nothing else may overlap (log, BAT, metadata, other regions), sorted */
  regions: Array<{ start: number; end: number }>;
  g: Geometry;
  fileFlags: number;
  physicalSectorSize: number;
  page83: Buffer;
  locator?: ParentLocator;
}

export function currentHeader(m: { headers: [VhdxHeader | undefined, VhdxHeader | undefined]; current: 0 | 1 }): VhdxHeader {
  return m.headers[m.current]!;
}

export function isDifferencing(m: VhdxMeta): boolean {
  return (m.fileFlags & FILE_PARAMS_HAS_PARENT) !== 0;
}

export function isFixed(m: VhdxMeta): boolean {
  return (m.fileFlags & FILE_PARAMS_LEAVE_BLOCKS_ALLOCATED) !== 0;
}

export async function checkSignature(file: HostFile): Promise<void> {
  const sig = await file.readBytes(0, 8);
  if (sig.toString('latin1') !== FILE_SIGNATURE) throw new CorruptImageError(file.path, 'Image not in VHDX format (no "vhdxfile" signature)');
}

/**
 * The two headers and which is current: the valid one, or of two valid ones the one
 * with the higher sequence number (equal numbers only when both are identical).
 */
export async function readHeaders(file: HostFile): Promise<{ headers: [VhdxHeader | undefined, VhdxHeader | undefined]; current: 0 | 1 }> {
  const raw1 = await file.readBytes(HEADER1_OFFSET, HEADER_SIZE);
  const raw2 = await file.readBytes(HEADER2_OFFSET, HEADER_SIZE);
  const h1 = parseHeader(raw1);
  const h2 = parseHeader(raw2);
  let current: 0 | 1;
  if (h1 && !h2) current = 0;
  else if (!h1 && h2) current = 1;
  else if (h1 && h2) {
    if (h1.sequenceNumber > h2.sequenceNumber) current = 0;
    else if (h2.sequenceNumber > h1.sequenceNumber) current = 1;
    else if (raw1.equals(raw2)) current = 0;
    else throw new CorruptImageError(file.path, 'No valid VHDX header found');
  } else {
    throw new CorruptImageError(file.path, 'No valid VHDX header found');
  }
  const h = [h1, h2][current]!;
  // qemu's log checks (the log region is validated even when empty)
  if (h.logOffset < HEADER_SECTION_END || h.logOffset % MiB !== 0 || !Number.isSafeInteger(h.logOffset)) {
    throw new CorruptImageError(file.path, `Invalid VHDX log offset ${h.logOffset}`);
  }
  if (h.logVersion !== 0) throw new CorruptImageError(file.path, `Unsupported VHDX log version ${h.logVersion}`);
  if (h.logLength % MiB !== 0) throw new CorruptImageError(file.path, `Invalid VHDX log length ${h.logLength}`);
  return { headers: [h1, h2], current };
}

/** The log location when the current header says a log may hold entries. */
export function activeLogLocation(h: VhdxHeader): LogLocation | undefined {
  if (isZeroGuid(h.logGuid) || h.logLength === 0) return undefined;
  return { offset: h.logOffset, length: h.logLength, guid: h.logGuid };
}

/** The log sequence that must be replayed before the image can be used (empty: none). */
export async function pendingLog(file: HostFile, h: VhdxHeader): Promise<LogEntry[]> {
  const loc = activeLogLocation(h);
  return loc ? findActiveSequence(file, loc) : [];
}

export function readOnlyLogError(filename: string): QimgError {
  return new QimgError(
    `Could not open '${filename}': VHDX image file '${filename}' opened read-only, but contains a log that needs to be replayed\n` +
      `To replay the log, run:\nqemu-img check -r all '${filename}'`,
    { file: filename },
  );
}

function regionOverlap(regions: Array<{ start: number; end: number }>, start: number, end: number): { start: number; end: number } | undefined {
  return regions.find((r) => start < r.end && end > r.start);
}

/** Reads the region table (the second copy when the first is damaged) and checks its entries. */
async function readRegions(file: HostFile, h: VhdxHeader): Promise<{ bat: RegionEntry; metadata: RegionEntry; regions: Array<{ start: number; end: number }> }> {
  const name = file.path;
  const entries =
    parseRegionTable(await file.readBytes(REGION_TABLE1_OFFSET, REGION_TABLE_SIZE)) ??
    parseRegionTable(await file.readBytes(REGION_TABLE2_OFFSET, REGION_TABLE_SIZE));
  if (!entries) throw new CorruptImageError(name, 'No valid VHDX region table found');
  const regions: Array<{ start: number; end: number }> = [];
  if (h.logLength > 0) regions.push({ start: h.logOffset, end: h.logOffset + h.logLength });
  let bat: RegionEntry | undefined;
  let metadata: RegionEntry | undefined;
  for (const e of entries) {
    const end = e.fileOffset + e.length;
    if (e.fileOffset < HEADER_SECTION_END || e.fileOffset % MiB !== 0 || e.length === 0 || e.length % MiB !== 0 || end > file.size) {
      throw new CorruptImageError(name, `VHDX region ${e.fileOffset}-${end} is invalid or lies outside the file (${file.size} bytes)`);
    }
    const o = regionOverlap(regions, e.fileOffset, end);
    if (o) throw new CorruptImageError(name, `VHDX region ${e.fileOffset}-${end} overlaps with region ${o.start}-${o.end}`);
    regions.push({ start: e.fileOffset, end });
    if (e.guid.equals(BAT_GUID)) {
      if (bat) throw new CorruptImageError(name, 'VHDX region table has two BAT entries');
      bat = e;
    } else if (e.guid.equals(METADATA_GUID)) {
      if (metadata) throw new CorruptImageError(name, 'VHDX region table has two metadata entries');
      metadata = e;
    } else if (e.required) {
      throw new UnsupportedError(name, 'VHDX region table has a required region qimg does not know');
    }
  }
  if (!bat || !metadata) throw new CorruptImageError(name, `VHDX region table has no ${bat ? 'metadata' : 'BAT'} region`);
  regions.sort((a, b) => a.start - b.start);
  return { bat, metadata, regions };
}

/** The metadata items, bounded by the metadata region; returns the decoded values. */
async function readMetadata(file: HostFile, region: RegionEntry): Promise<{
  blockSize: number;
  fileFlags: number;
  virtualSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  page83: Buffer;
  locator?: ParentLocator;
}> {
  const name = file.path;
  const bad = (msg: string) => new CorruptImageError(name, msg);
  const table = parseMetadataTable(await file.readBytes(region.fileOffset, Math.min(METADATA_TABLE_SIZE, region.length)));
  if (!table) throw bad('Invalid VHDX metadata table');
  const known: Array<[Buffer, string, number]> = [
    [FILE_PARAMETERS_GUID, 'file parameters', 8],
    [VIRTUAL_DISK_SIZE_GUID, 'virtual disk size', 8],
    [PAGE83_DATA_GUID, 'page 83 data', 16],
    [LOGICAL_SECTOR_SIZE_GUID, 'logical sector size', 4],
    [PHYSICAL_SECTOR_SIZE_GUID, 'physical sector size', 4],
    [PARENT_LOCATOR_GUID, 'parent locator', 20],
  ];
  const items = new Map<string, Buffer>();
  for (const e of table) {
    const k = known.find(([g]) => g.equals(e.itemId));
    if (!k) {
      if (e.flags & METADATA_IS_REQUIRED) throw new UnsupportedError(name, 'VHDX metadata has a required item qimg does not know');
      continue;
    }
    const [, what, min] = k;
    if (items.has(what)) throw bad(`VHDX metadata has two ${what} items`);
    if (e.length < min || e.length > MAX_METADATA_ITEM || e.offset < METADATA_TABLE_SIZE || e.offset + e.length > region.length) {
      throw bad(`VHDX metadata item ${what} (offset ${e.offset}, length ${e.length}) lies outside the metadata region`);
    }
    items.set(what, await file.readBytes(region.fileOffset + e.offset, e.length));
  }
  for (const [, what] of known.slice(0, 5)) if (!items.has(what)) throw bad(`VHDX metadata has no ${what} item`);
  const params = items.get('file parameters')!;
  const blockSize = params.readUInt32LE(0);
  const fileFlags = params.readUInt32LE(4);
  const virtualSize = Number(items.get('virtual disk size')!.readBigUInt64LE(0));
  const logicalSectorSize = items.get('logical sector size')!.readUInt32LE(0);
  const physicalSectorSize = items.get('physical sector size')!.readUInt32LE(0);
  if (blockSize < BLOCK_SIZE_MIN || blockSize > BLOCK_SIZE_MAX || (blockSize & (blockSize - 1)) !== 0) {
    throw bad(`Invalid VHDX block size ${blockSize} (a power of two from 1 MiB to 256 MiB)`);
  }
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) throw bad(`Invalid VHDX logical sector size ${logicalSectorSize}`);
  if (physicalSectorSize !== 512 && physicalSectorSize !== 4096) throw bad(`Invalid VHDX physical sector size ${physicalSectorSize}`);
  if (virtualSize > MAX_IMAGE_SIZE || virtualSize % logicalSectorSize !== 0) throw bad(`Invalid VHDX virtual disk size ${virtualSize}`);
  let locator: ParentLocator | undefined;
  if (fileFlags & FILE_PARAMS_HAS_PARENT) {
    const item = items.get('parent locator');
    if (!item) throw bad('VHDX differencing image has no parent locator');
    locator = parseParentLocator(item, name);
  }
  return { blockSize, fileFlags, virtualSize, logicalSectorSize, physicalSectorSize, page83: items.get('page 83 data')!.subarray(0, 16), locator };
}

/**
 * Reads everything but the BAT; `headers` come from readHeaders (after any log
 * replay, which may change the regions and metadata).
 */
export async function readMeta(file: HostFile, hs: { headers: [VhdxHeader | undefined, VhdxHeader | undefined]; current: 0 | 1 }): Promise<VhdxMeta> {
  const h = currentHeader(hs);
  const { bat, metadata, regions } = await readRegions(file, h);
  const md = await readMetadata(file, metadata);
  const g = geometry(md.virtualSize, md.blockSize, md.logicalSectorSize, (md.fileFlags & FILE_PARAMS_HAS_PARENT) !== 0);
  if (g.batEntries * 8 > bat.length) {
    throw new CorruptImageError(file.path, `VHDX BAT region (${bat.length} bytes) is too small for ${g.batEntries} entries`);
  }
  return { ...hs, bat, metadata, regions, g, fileFlags: md.fileFlags, physicalSectorSize: md.physicalSectorSize, page83: md.page83, locator: md.locator };
}

/** Reads the BAT (whole 4 KiB sectors, so updates can go through the log as sectors). */
export async function readBat(file: HostFile, m: VhdxMeta): Promise<Buffer> {
  const len = Math.ceil((m.g.batEntries * 8) / 4096) * 4096;
  return file.readBytes(m.bat.fileOffset, Math.min(len, m.bat.length));
}

/**
 * qemu's BAT entry checks: present blocks must lie inside the file and outside the
 * log, BAT and metadata regions. Calls `report` for each problem (qemu's messages);
 * returns the number found.
 */
export function checkBatEntries(m: VhdxMeta, bat: Buffer, fileSize: number, report: (msg: string) => boolean): number {
  const g = m.g;
  let errors = 0;
  const sorted = m.regions;
  const overlaps = (start: number, end: number) => {
    // binary search for the last region starting before `end`
    let lo = 0;
    let hi = sorted.length - 1;
    let idx = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (sorted[mid].start < end) {
        idx = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    for (let i = idx; i >= 0 && i > idx - 2; i--) if (sorted[i].end > start) return sorted[i];
    return undefined;
  };
  for (let i = 0; i < g.batEntries; i++) {
    const isBitmap = (i + 1) % (g.chunkRatio + 1) === 0;
    const state = batState(bat, i);
    if (state !== PAYLOAD_BLOCK_FULLY_PRESENT) continue; // == SB_BLOCK_PRESENT for bitmap entries
    const offset = batOffset(bat, i);
    // qemu lets the last block exist only partially (it used to create such files)
    const rest = g.virtualSize - i * g.blockSize;
    const length = isBitmap ? BITMAP_BLOCK_SIZE : rest > 0 ? Math.min(g.blockSize, rest) : g.blockSize;
    if (offset > Number.MAX_SAFE_INTEGER - g.blockSize) {
      errors++;
      if (!report(`VHDX BAT entry ${i} offset overflow.`)) return errors;
      continue;
    }
    if (offset >= fileSize) {
      errors++;
      if (!report(`VHDX BAT entry ${i} start offset ${offset} points after end of file (${fileSize}). Image has probably been truncated.`)) return errors;
    } else if (offset + length > fileSize) {
      errors++;
      if (!report(`VHDX BAT entry ${i} end offset ${offset + length - 1} points after end of file (${fileSize}). Image has probably been truncated.`)) return errors;
    }
    const size = isBitmap ? BITMAP_BLOCK_SIZE : g.blockSize;
    const o = overlaps(offset, offset + size) ?? (offset < HEADER_SECTION_END ? { start: 0, end: HEADER_SECTION_END } : undefined);
    if (o) {
      errors++;
      if (!report(`VHDX region ${offset}-${offset + size} overlaps with region ${o.start}-${o.end}`)) return errors;
    }
  }
  return errors;
}

export { SB_BLOCK_PRESENT };
