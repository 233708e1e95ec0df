/**
 * bochs (read-only): the "growing" redolog of the Bochs emulator as qemu reads it: a
 * 512-byte header ("Bochs Virtual HD Image", "Redolog", "Growing", version 1 or 2), a
 * catalog of extent slots (0xffffffff: not allocated), and per allocated extent a
 * sector bitmap followed by the extent's sectors. qemu's limits: at most 1M catalog
 * entries, extents a power of two from 512 bytes to 8 MiB, a catalog that covers
 * the disk.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { ReadOnlyImage } from '../../core/read-only-image.js';
import type { HostFile } from '../../io/host.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';

const HEADER_SIZE = 512;
const MAGIC = 'Bochs Virtual HD Image';
const REDOLOG_TYPE = 'Redolog';
const GROWING_TYPE = 'Growing';
const HEADER_VERSION = 0x00020000;
const HEADER_V1 = 0x00010000;
const MAX_CATALOG = 0x100000;
const MAX_EXTENT = 0x800000;
const NOT_ALLOCATED = 0xffffffff;
const SECTOR = 512;

/** strcmp(field, s) === 0: the string then a NUL (within the header). */
function isCString(buf: Buffer, at: number, s: string): boolean {
  return buf.toString('latin1', at, at + s.length) === s && buf[at + s.length] === 0;
}

function isBochs(h: Buffer): boolean {
  if (h.length < HEADER_SIZE) return false;
  const version = h.readUInt32LE(64);
  return (
    isCString(h, 0, MAGIC) &&
    isCString(h, 32, REDOLOG_TYPE) &&
    isCString(h, 48, GROWING_TYPE) &&
    (version === HEADER_VERSION || version === HEADER_V1)
  );
}

class BochsImage extends ReadOnlyImage {
  readonly format = 'bochs';
  readonly allocationUnit = SECTOR;

  constructor(
    file: HostFile,
    filename: string,
    readonly virtualSize: number,
    private readonly catalog: Uint32Array,
    private readonly dataOffset: number,
    private readonly extentSize: number,
    private readonly bitmapBlocks: number,
    private readonly extentBlocks: number,
  ) {
    super(file, filename);
  }

  /**
   * Reads one extent's part [from, to) (bytes inside the extent) into `out`: sectors
   * whose bitmap bit is clear, and unallocated extents, read as zeros.
   */
  private async readExtent(index: number, from: number, to: number, out: Buffer): Promise<void> {
    const slot = index < this.catalog.length ? this.catalog[index] : NOT_ALLOCATED;
    if (slot === NOT_ALLOCATED) {
      out.fill(0);
      return;
    }
    const bitmapOffset = this.dataOffset + SECTOR * slot * (this.extentBlocks + this.bitmapBlocks);
    // past the end of the file the bitmap reads as zeros: nothing allocated
    if (bitmapOffset >= this.file.size) {
      out.fill(0);
      return;
    }
    const first = Math.floor(from / SECTOR);
    const last = Math.floor((to - 1) / SECTOR);
    const bitmap = await this.file.readBytes(bitmapOffset + Math.floor(first / 8), Math.floor(last / 8) - Math.floor(first / 8) + 1);
    const sectors = Buffer.alloc((last - first + 1) * SECTOR);
    const blockStart = bitmapOffset + SECTOR * (this.bitmapBlocks + first);
    await this.file.read(sectors, blockStart);
    for (let s = first; s <= last; s++) {
      const bit = (bitmap[Math.floor(s / 8) - Math.floor(first / 8)] >> (s % 8)) & 1;
      if (!bit) sectors.fill(0, (s - first) * SECTOR, (s - first + 1) * SECTOR);
    }
    sectors.copy(out, 0, from - first * SECTOR, to - first * SECTOR);
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const jobs: Promise<void>[] = [];
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const index = Math.floor(pos / this.extentSize);
      const inExtent = pos - index * this.extentSize;
      const n = Math.min(buf.length - done, this.extentSize - inExtent);
      jobs.push(this.readExtent(index, inExtent, inExtent + n, buf.subarray(done, done + n)));
      done += n;
    }
    await Promise.all(jobs);
  }





}

async function openBochs(file: HostFile, writable: boolean): Promise<BlockImage> {
  const name = file.path;
  if (writable) throw new QimgError(`Could not open '${name}': Image is read-only`, { file: name });
  const h = await file.readBytes(0, HEADER_SIZE);
  if (!isBochs(h)) throw new CorruptImageError(name, 'Image not in Bochs format');
  const v1 = h.readUInt32LE(64) === HEADER_V1;
  const disk = h.readBigUInt64LE(v1 ? 84 : 88);
  const totalSectors = disk / 512n;
  const headerSize = h.readUInt32LE(68);
  const catalogSize = h.readUInt32LE(72);
  if (catalogSize > MAX_CATALOG) throw new CorruptImageError(name, 'Catalog size is too large');
  const raw = await file.readBytes(headerSize, catalogSize * 4);
  const catalog = new Uint32Array(catalogSize);
  for (let i = 0; i < catalogSize; i++) catalog[i] = raw.readUInt32LE(4 * i);
  const bitmap = h.readUInt32LE(76);
  const extent = h.readUInt32LE(80);
  // qemu computes these in 32-bit unsigned arithmetic
  const bitmapBlocks = (1 + Math.floor(((bitmap - 1) >>> 0) / 512)) >>> 0;
  const extentBlocks = (1 + Math.floor(((extent - 1) >>> 0) / 512)) >>> 0;
  if (extent < SECTOR) throw new CorruptImageError(name, 'Extent size must be at least 512');
  if ((extent & (extent - 1)) !== 0) throw new CorruptImageError(name, `Extent size ${extent} is not a power of two`);
  if (extent > MAX_EXTENT) throw new CorruptImageError(name, `Extent size ${extent} is too large`);
  const sectorsPerExtent = BigInt(extent / SECTOR);
  if (BigInt(catalogSize) < (totalSectors + sectorsPerExtent - 1n) / sectorsPerExtent) {
    throw new CorruptImageError(name, 'Catalog size is too small for this disk size');
  }
  // with at most 1M extents of at most 8 MiB the disk stays below 2^43 bytes
  const virtualSize = Number(totalSectors) * SECTOR;
  // qemu keeps the data offset in 32 bits (it wraps)
  const dataOffset = (headerSize + catalogSize * 4) >>> 0;
  return new BochsImage(file, name, virtualSize, catalog, dataOffset, extent, bitmapBlocks, extentBlocks);
}

export const bochsDriver: FormatDriver = {
  name: 'bochs',
  probe: (head) => (isBochs(head) ? 100 : 0),
  createOptions: [],
  describeCreate: () => '',
  open: (file, ctx) => openBochs(file, !!ctx.options.writable && file.writable),
};
