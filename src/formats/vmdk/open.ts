/**
 * Opening a VMDK: a sparse file (hosted KDMV with its embedded descriptor, or COWD),
 * or a text descriptor whose extent lines name flat / sparse / seSparse extent files
 * relative to the descriptor. Every header field is checked before use, with qemu's
 * messages where qemu has one.
 */
import { CorruptImageError, QimgError, UnsupportedError } from '../../core/errors.js';
import { resolveRelative, type OpenContext } from '../../core/open.js';
import { assertReferenceAllowed } from '../../core/open-policy.js';
import { openStorage } from '../../io/storage.js';
import type { HostFile } from '../../io/host.js';
import {
  COMPRESSION_DEFLATE,
  DESC_AREA,
  FLAG_MARKER,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  GD_AT_END,
  MAX_DESC_BYTES,
  SECTOR,
  VMDK3_MAGIC,
  VMDK4_MAGIC,
} from './constants.js';
import { DESCRIPTOR_CREATE_TYPES, descriptorText, descriptorValue, parseExtentLines } from './descriptor.js';
import { checkSeSparseVolatileHeader, parseCowdHeader, parseFooter, parseSeSparseConstHeader, parseVmdk4Header, type Vmdk4Header } from './header.js';
import { SparseExtent } from './sparse.js';

export interface FlatExtent {
  kind: 'flat';
  file: HostFile;
  filename: string;
  /** guest byte offset where the extent starts */
  start: number;
  size: number;
  /** byte offset of the extent's data in its file */
  flatStart: number;
  type: string;
}

export interface SparseExtentRef {
  kind: 'sparse';
  file: HostFile;
  filename: string;
  start: number;
  size: number;
  sparse: SparseExtent;
  /** descriptor type (SPARSE, VMFSSPARSE, SESPARSE); undefined for a monolithic file */
  type: string | undefined;
  /** the hosted header, for stream-optimized rewrites */
  header?: Vmdk4Header;
  /** the header came from a footer (stream-optimized, GD at the end) */
  gdAtEnd: boolean;
}

export type VmdkExtent = FlatExtent | SparseExtentRef;

export interface OpenedLayout {
  extents: VmdkExtent[];
  createType: string | undefined;
  /** where the descriptor text lives in the main file (0x200 for sparse, 0 for a descriptor file) */
  descOffset: number;
  /** bytes available for the descriptor there */
  descRoom: number;
  /** extent files this image opened itself (closed with it) */
  ownFiles: HostFile[];
}

const MAX_SAFE_SECTORS = Math.floor(Number.MAX_SAFE_INTEGER / SECTOR);

function sectorsToNumber(v: bigint, what: string, file: string): number {
  if (v > BigInt(MAX_SAFE_SECTORS)) throw new CorruptImageError(file, `${what} is too large (${v} sectors)`);
  return Number(v);
}

export async function openLayout(file: HostFile, ctx: OpenContext): Promise<OpenedLayout> {
  const path = file.path;
  if (file.size < 4) throw new CorruptImageError(path, 'File is too small, not a valid image');
  const head = await file.readBytes(0, Math.min(file.size, SECTOR));
  const magic = head.readUInt32BE(0);
  const out: OpenedLayout = { extents: [], createType: undefined, descOffset: 0x200, descRoom: DESC_AREA, ownFiles: [] };
  try {
    if (magic === VMDK4_MAGIC || magic === VMDK3_MAGIC) {
      await openSparseFile(file, path, ctx, out, undefined, true);
      out.descOffset = 0x200;
      const h = (out.extents[0] as SparseExtentRef | undefined)?.header;
      if (h && h.descOffset === 1n && h.descSize > 0n) out.descRoom = Math.min(Number(h.descSize) * SECTOR, DESC_AREA);
    } else {
      const buf = await file.readBytes(0, Math.min(file.size, MAX_DESC_BYTES));
      await openDescriptor(descriptorText(buf), file, path, ctx, out);
      out.descOffset = 0;
      out.descRoom = Math.max(file.size, DESC_AREA);
    }
    if (out.extents.length === 0) throw new CorruptImageError(path, 'VMDK descriptor lists no usable extent');
    return out;
  } catch (err) {
    for (const f of out.ownFiles) await f.close().catch(() => undefined);
    throw err;
  }
}

async function openDescriptor(desc: string, file: HostFile, path: string, ctx: OpenContext, out: OpenedLayout): Promise<void> {
  const ct = descriptorValue(desc, 'createType');
  if (ct === undefined || ct.length >= 128) throw new CorruptImageError(path, 'invalid VMDK image descriptor');
  if (!DESCRIPTOR_CREATE_TYPES.includes(ct)) throw new UnsupportedError(path, `Unsupported image type '${ct}'`);
  out.createType = ct;
  const lines = parseExtentLines(desc, path);
  const writable = file.writable;
  const lock = ctx.options.forceShare || (ctx.chain.length > 1 && ctx.options.shareBacking) ? 'none' : writable ? 'write' : 'read';
  let start = out.extents.reduce((n, e) => n + e.size, 0);
  for (const line of lines) {
    const extPath = resolveRelative(line.fname, path);
    assertReferenceAllowed(extPath, path, 'data file');
    const ext = await openStorage(extPath, { writable, lock });
    out.ownFiles.push(ext);
    if (line.type === 'FLAT' || line.type === 'VMFS') {
      const size = line.sectors * SECTOR;
      out.extents.push({ kind: 'flat', file: ext, filename: extPath, start, size, flatStart: line.flatOffset * SECTOR, type: line.type });
    } else if (line.type === 'SPARSE' || line.type === 'VMFSSPARSE') {
      if (ext.size < 4) throw new CorruptImageError(extPath, 'File is too small, not a valid image');
      await openSparseFile(ext, extPath, ctx, out, line.type, false);
    } else {
      await openSeSparse(ext, extPath, out, line.type);
    }
    start = out.extents.reduce((n, e) => n + e.size, 0);
    if (start > Number.MAX_SAFE_INTEGER) throw new CorruptImageError(path, 'image too large');
  }
}

async function openSparseFile(file: HostFile, path: string, ctx: OpenContext, out: OpenedLayout, type: string | undefined, top: boolean): Promise<void> {
  const head = await file.readBytes(0, SECTOR);
  const magic = head.readUInt32BE(0);
  if (magic === VMDK3_MAGIC) return openCowd(file, path, head, out, type);
  if (magic !== VMDK4_MAGIC) throw new CorruptImageError(path, 'Image not in VMDK format');
  let h = parseVmdk4Header(head);
  if (h.capacity === 0n && h.descOffset !== 0n && top) {
    // a sparse file that only carries a descriptor naming other extents
    if (h.descOffset > BigInt(MAX_SAFE_SECTORS)) throw new CorruptImageError(path, 'descriptor offset too large');
    const at = Number(h.descOffset) * SECTOR;
    const buf = await file.readBytes(at, Math.max(0, Math.min(file.size - at, MAX_DESC_BYTES)));
    return openDescriptor(descriptorText(buf), file, path, ctx, out);
  }
  out.createType ??= 'monolithicSparse';
  let gdAtEnd = false;
  if (h.gdOffset === GD_AT_END) {
    // stream-optimized: the footer (three sectors before the end) holds the real header
    const fileSectors = Math.floor(file.size / SECTOR);
    const at = fileSectors * SECTOR - 3 * SECTOR;
    if (at < 0) throw new CorruptImageError(path, 'Invalid footer');
    h = parseFooter(await file.readBytes(at, 3 * SECTOR), path);
    gdAtEnd = true;
  }
  const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
  if (h.version > 3) throw new UnsupportedError(path, `Unsupported VMDK version ${h.version}`);
  if (h.version === 3 && file.writable && !compressed) throw new QimgError('VMDK version 3 must be read only', { file: path });
  if (h.numGTEsPerGT > 512) throw new CorruptImageError(path, 'L2 table size too big');
  // qemu computes the directory coverage in 32 bits
  const l1EntrySectors = Number((BigInt(h.numGTEsPerGT) * h.granularity) & 0xffffffffn);
  if (l1EntrySectors === 0) throw new CorruptImageError(path, 'L1 entry size is invalid');
  const capacity = sectorsToNumber(h.capacity, 'capacity', path);
  const gdEntries = Number(((h.capacity + BigInt(l1EntrySectors) - 1n) / BigInt(l1EntrySectors)) & 0xffffffffn);
  if (BigInt(Math.floor(file.size / SECTOR)) < h.grainOffset) {
    throw new CorruptImageError(path, `File truncated, expecting at least ${h.grainOffset * 512n} bytes`);
  }
  if (h.granularity > 0x200000n) throw new CorruptImageError(path, 'Invalid granularity, image may be corrupt');
  if (gdEntries > 32 * 1024 * 1024) throw new CorruptImageError(path, 'L1 size too big');
  if (gdAtEnd && h.gdOffset === GD_AT_END) throw new CorruptImageError(path, 'Invalid footer');
  const gdOffset = sectorsToNumber(h.gdOffset, 'grain directory offset', path) * SECTOR;
  const rgdOffset = h.flags & FLAG_RGD ? sectorsToNumber(h.rgdOffset, 'redundant grain directory offset', path) * SECTOR : 0;
  const sparse = await SparseExtent.open(file, path, {
    variant: 'vmdk4',
    sectors: capacity,
    grainSectors: Number(h.granularity),
    gtEntries: h.numGTEsPerGT,
    gdEntries,
    gdOffset,
    rgdOffset,
    compressed,
    hasMarker: (h.flags & FLAG_MARKER) !== 0,
    zeroGrain: (h.flags & FLAG_ZERO_GRAIN) !== 0,
    version: h.version,
    seGtOffset: 0,
    seGrainsOffset: 0,
  });
  if (compressed) out.createType = 'streamOptimized';
  const start = out.extents.reduce((n, e) => n + e.size, 0);
  out.extents.push({ kind: 'sparse', file, filename: path, start, size: capacity * SECTOR, sparse, type, header: h, gdAtEnd });
}

/** ESX 3 sparse extent: 4096 entries per grain table, 32-bit fields. */
async function openCowd(file: HostFile, path: string, head: Buffer, out: OpenedLayout, type: string | undefined): Promise<void> {
  const h = parseCowdHeader(head);
  if (h.granularity > 0x200000) throw new CorruptImageError(path, 'Invalid granularity, image may be corrupt');
  if (h.l1dirSize > 32 * 1024 * 1024) throw new CorruptImageError(path, 'L1 size too big');
  if (h.granularity === 0) throw new CorruptImageError(path, 'Invalid granularity, image may be corrupt');
  const sparse = await SparseExtent.open(file, path, {
    variant: 'cowd',
    sectors: h.diskSectors,
    grainSectors: h.granularity,
    gtEntries: 4096,
    gdEntries: h.l1dirSize,
    gdOffset: h.l1dirOffset * SECTOR,
    rgdOffset: 0,
    compressed: false,
    hasMarker: false,
    zeroGrain: false,
    version: h.version,
    seGtOffset: 0,
    seGrainsOffset: 0,
  });
  const start = out.extents.reduce((n, e) => n + e.size, 0);
  out.extents.push({ kind: 'sparse', file, filename: path, start, size: h.diskSectors * SECTOR, sparse, type, gdAtEnd: false });
}

/** ESXi seSparse extent (read-only, as in qemu). */
async function openSeSparse(file: HostFile, path: string, out: OpenedLayout, type: string): Promise<void> {
  if (file.writable) throw new QimgError('No write support for seSparse images available', { file: path });
  const h = parseSeSparseConstHeader(await file.readBytes(0, SECTOR), path);
  const volAt = sectorsToNumber(h.volatileHeaderOffset, 'volatile header offset', path) * SECTOR;
  checkSeSparseVolatileHeader(await file.readBytes(volAt, SECTOR), path);
  const capacity = sectorsToNumber(h.capacity, 'capacity', path);
  const gdEntries = Number((h.grainDirSize * 512n) / 8n);
  if (gdEntries > 32 * 1024 * 1024) throw new CorruptImageError(path, 'L1 size too big');
  const sparse = await SparseExtent.open(file, path, {
    variant: 'sesparse',
    sectors: capacity,
    grainSectors: 8,
    gtEntries: 4096,
    gdEntries,
    gdOffset: sectorsToNumber(h.grainDirOffset, 'grain directory offset', path) * SECTOR,
    rgdOffset: 0,
    compressed: false,
    hasMarker: false,
    zeroGrain: false,
    version: 0,
    seGtOffset: sectorsToNumber(h.grainTablesOffset, 'grain tables offset', path),
    seGrainsOffset: sectorsToNumber(h.grainsOffset, 'grains offset', path),
  });
  const start = out.extents.reduce((n, e) => n + e.size, 0);
  out.extents.push({ kind: 'sparse', file, filename: path, start, size: capacity * SECTOR, sparse, type, gdAtEnd: false });
}
