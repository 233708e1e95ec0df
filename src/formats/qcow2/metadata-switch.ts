/**
 * Atomic metadata switches for internal snapshot operations. Refcounts and the
 * OFLAG_COPIED flags of the active tree must change together (qemu-img check counts
 * any disagreement as corruption), which no order of in-place writes achieves. So the
 * new state is written as a new generation after the end of the image — copies of the
 * active L2 tables with exact COPIED flags, a new active L1, the snapshot table and a
 * complete refcount structure counted from every tree — and one write of header bytes
 * 24..71 (size, L1, refcount table, snapshot table) switches to it. A crash before
 * that write leaves the old state untouched; the old generation's clusters are simply
 * no longer counted afterwards.
 */
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { writeU64 } from '../../core/units.js';
import * as C from './constants.js';
import { compressedDescriptor } from './entries.js';
import { readBitmapDirectory } from './bitmaps.js';
import { writeRefcountEntry } from './refcount.js';
import type { Qcow2Snapshot } from './snapshot.js';
import type { Qcow2Image } from './driver.js';

export interface Generation {
  /** entries of the new active L1 table (its size is the table's size) */
  activeL1: Buffer;
  /** the snapshots after the operation (their L1 tables are already on disk) */
  snapshots: Qcow2Snapshot[];
  /** virtual size after the operation */
  size: number;
  serializeSnapshots: (snaps: Qcow2Snapshot[]) => Buffer;
}

/**
 * First cluster index that is free in the current structure and past the end of the
 * file (on storage of a fixed size, an NBD export: past the last cluster in use).
 */
async function firstFreeAtEnd(img: Qcow2Image): Promise<number> {
  const cs = img.geometry.clusterSize;
  const rc = img.refcounts;
  const end = img.file.remote ? 0 : Math.ceil(img.file.size / cs);
  for (let index = rc.tableEntries - 1; index >= 0; index--) {
    if (rc.blockOffset(index) === 0) continue;
    for (let c = (index + 1) * rc.blockEntries - 1; c >= index * rc.blockEntries; c--) {
      if ((await rc.get(c)) !== 0) return Math.max(end, c + 1);
    }
  }
  return end;
}

export async function switchGeneration(img: Qcow2Image, gen: Generation): Promise<void> {
  await img.flushAll();
  // bitmaps flagged in use since the open are stored clean first: the directory the new
  // generation keeps is the final one
  await img.storeBitmaps();
  const g = img.geometry;
  const cs = g.clusterSize;
  const es = g.l2EntrySize;
  const h = img.header;
  const rc = img.refcounts;
  const name = img.filename;
  let next = await firstFreeAtEnd(img);
  const alloc = (clusters: number): number => {
    const at = next;
    next += clusters;
    return at;
  };

  // New clusters: a copy of every L2 table of the new active tree, the L1, the table.
  const l2Copies = new Map<number, { at: number; table: Buffer }>();
  const activeL1 = Buffer.from(gen.activeL1);
  for (let i = 0; i < activeL1.length / 8; i++) {
    const off = img.l2OffsetAt(activeL1, i);
    if (off === 0 || l2Copies.has(off)) continue;
    l2Copies.set(off, { at: alloc(1), table: Buffer.from(await img.loadL2(off)) });
  }
  const l1Clusters = Math.ceil(activeL1.length / cs);
  const l1At = activeL1.length > 0 ? alloc(l1Clusters) : 0;
  const snapBytes = gen.serializeSnapshots(gen.snapshots);
  const snapAt = snapBytes.length > 0 ? alloc(Math.ceil(snapBytes.length / cs)) : 0;

  // The refcount structure covers everything up to its own end.
  const bits = rc.bits;
  const perBlock = rc.blockEntries;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = next + tableClusters + blocks;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const tableAt = alloc(tableClusters);
  const blocksAt = alloc(blocks);
  const end = next;

  // Count every reference of the new state.
  const counts = new Float64Array(end);
  const inc = (cluster: number, n = 1) => {
    if (cluster >= end) throw new CorruptImageError(name, `reference to cluster ${cluster} beyond the end of the image`);
    counts[cluster] += n;
  };
  const incRange = (offset: number, length: number) => {
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + length - 1) / cs); c++) inc(c);
  };
  inc(0);
  /** Counts the data an L2 table references (one more tree through it). */
  const countL2 = (table: Buffer) => {
    for (let k = 0; k < g.l2Entries; k++) {
      const hi = table.readUInt32BE(k * es);
      const lo = table.readUInt32BE(k * es + 4);
      if (hi & C.OFLAG_COMPRESSED_HI) {
        const c = compressedDescriptor(hi, lo, g.clusterBits, name);
        const start = c.hostOffset - (c.hostOffset % 512);
        incRange(start, c.hostOffset + c.size - start);
        continue;
      }
      const host = (hi & C.OFFSET_MASK_HI) * 0x100000000 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      if (host === 0) continue;
      if (host % cs !== 0) throw new CorruptImageError(name, `Image is corrupt: cluster offset 0x${host.toString(16)} unaligned`);
      inc(host / cs);
    }
  };
  for (const { at, table } of l2Copies.values()) {
    inc(at);
    countL2(table);
  }
  for (let c = 0; c < l1Clusters; c++) inc(l1At + c);
  for (const sn of gen.snapshots) {
    if (sn.l1Size === 0) continue;
    incRange(sn.l1TableOffset, sn.l1Size * 8);
    const l1 = await img.file.readBytes(sn.l1TableOffset, sn.l1Size * 8);
    for (let i = 0; i < sn.l1Size; i++) {
      const off = img.l2OffsetAt(l1, i);
      if (off === 0) continue;
      inc(off / cs);
      countL2(await img.loadL2(off));
    }
  }
  if (snapBytes.length > 0) incRange(snapAt * cs, snapBytes.length);
  if (h.bitmaps) {
    incRange(h.bitmaps.directoryOffset, h.bitmaps.directorySize);
    for (const bm of await readBitmapDirectory(img.file, h.bitmaps, cs)) {
      incRange(bm.tableOffset, bm.tableSize * 8);
      const bt = await img.file.readBytes(bm.tableOffset, bm.tableSize * 8);
      for (let i = 0; i < bm.tableSize; i++) {
        const off = Number(bt.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
        if (off !== 0) inc(off / cs);
      }
    }
  }
  if (h.crypto && h.crypto.length > 0) incRange(h.crypto.offset, h.crypto.length);
  for (let c = tableAt; c < blocksAt + blocks; c++) inc(c);

  // Refuse before writing anything when a count does not fit the refcount width.
  for (let c = 0; c < end; c++) {
    if (counts[c] > rc.maxRefcount) {
      throw new QimgError(`refcount of cluster ${c} would be ${counts[c]}, more than ${bits}-bit refcounts hold`, { file: name });
    }
  }

  // Exact COPIED flags in the new active tree.
  for (const { table } of l2Copies.values()) {
    for (let k = 0; k < g.l2Entries; k++) {
      const hi = table.readUInt32BE(k * es);
      if (hi & C.OFLAG_COMPRESSED_HI) continue;
      const lo = table.readUInt32BE(k * es + 4);
      const host = (hi & C.OFFSET_MASK_HI) * 0x100000000 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      if (host === 0) continue;
      const copied = counts[host / cs] === 1;
      table.writeUInt32BE((copied ? hi | C.OFLAG_COPIED_HI : hi & ~C.OFLAG_COPIED_HI) >>> 0, k * es);
    }
  }
  for (let i = 0; i < activeL1.length / 8; i++) {
    const off = img.l2OffsetAt(activeL1, i);
    if (off === 0) continue;
    const at = l2Copies.get(off)!.at * cs;
    activeL1.writeUInt32BE((Math.floor(at / 0x100000000) | C.OFLAG_COPIED_HI) >>> 0, i * 8);
    activeL1.writeUInt32BE(at % 0x100000000, i * 8 + 4);
  }

  // Write the new generation, make it durable, then switch with one header write.
  for (const { at, table } of l2Copies.values()) await img.file.write(table, at * cs);
  if (activeL1.length > 0) await img.file.write(activeL1, l1At * cs);
  if (snapBytes.length > 0) await img.file.write(snapBytes, snapAt * cs);
  const table = Buffer.alloc(tableClusters * cs);
  const blockBuf = Buffer.alloc(blocks * cs);
  for (let b = 0; b < blocks; b++) writeU64(table, b * 8, (blocksAt + b) * cs);
  for (let c = 0; c < end; c++) {
    if (counts[c] === 0) continue;
    const b = Math.floor(c / perBlock);
    writeRefcountEntry(blockBuf.subarray(b * cs, (b + 1) * cs), c % perBlock, bits, counts[c]);
  }
  await img.file.write(table, tableAt * cs);
  await img.file.write(blockBuf, blocksAt * cs);
  await img.file.flush();

  const head = Buffer.alloc(48);
  writeU64(head, 0, gen.size);
  head.writeUInt32BE(h.cryptMethod, 8);
  head.writeUInt32BE(activeL1.length / 8, 12);
  writeU64(head, 16, l1At * cs);
  writeU64(head, 24, tableAt * cs);
  head.writeUInt32BE(tableClusters, 32);
  head.writeUInt32BE(gen.snapshots.length, 36);
  writeU64(head, 40, snapAt * cs);
  await img.file.write(head, 24);
  await img.file.flush();
  img.adoptGeneration();
}
