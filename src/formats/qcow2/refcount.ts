/**
 * Reading reference counts: the refcount table and refcount blocks of any entry width
 * (1 to 64 bits). The writer issue adds the allocator on top of this.
 */
import { CorruptImageError } from '../../core/errors.js';
import type { ImageFile } from '../../io/file.js';
import { TableCache } from './table-cache.js';

export class RefcountReader {
  readonly bits: number;
  /** refcount entries per refcount block */
  readonly blockEntries: number;
  private readonly blocks: TableCache;

  constructor(
    private readonly file: ImageFile,
    private readonly table: Buffer,
    private readonly clusterSize: number,
    refcountOrder: number,
  ) {
    this.bits = 1 << refcountOrder;
    this.blockEntries = (clusterSize * 8) / this.bits;
    this.blocks = new TableCache(32, (off) => file.readBytes(off, clusterSize));
  }

  /** Refcount of host cluster `cluster` (0 when no refcount block covers it). */
  async get(cluster: number): Promise<bigint | number> {
    const tableIndex = Math.floor(cluster / this.blockEntries);
    if (tableIndex * 8 >= this.table.length) return 0;
    const hi = this.table.readUInt32BE(tableIndex * 8);
    const lo = this.table.readUInt32BE(tableIndex * 8 + 4);
    if (hi >= 0x200000) throw new CorruptImageError(this.file.path, `Refcount block offset beyond 2^53 (reftable index: 0x${tableIndex.toString(16)})`);
    const blockOffset = hi * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
    if (blockOffset === 0) return 0;
    if (blockOffset % this.clusterSize !== 0) {
      throw new CorruptImageError(
        this.file.path,
        `Image is corrupt: Refblock offset 0x${blockOffset.toString(16)} unaligned (reftable index: 0x${tableIndex.toString(16)})`,
      );
    }
    const block = await this.blocks.get(blockOffset);
    return readRefcountEntry(block, cluster % this.blockEntries, this.bits);
  }
}

/** Entry `i` of a refcount block with `bits`-wide entries (sub-byte widths: bit 0 = LSB). */
export function readRefcountEntry(block: Buffer, i: number, bits: number): number | bigint {
  switch (bits) {
    case 64:
      return block.readBigUInt64BE(i * 8);
    case 32:
      return block.readUInt32BE(i * 4);
    case 16:
      return block.readUInt16BE(i * 2);
    case 8:
      return block[i];
    default: {
      const perByte = 8 / bits;
      const byte = block[Math.floor(i / perByte)];
      const shift = (i % perByte) * bits;
      return (byte >> shift) & ((1 << bits) - 1);
    }
  }
}
