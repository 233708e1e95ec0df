/**
 * Internal snapshots: create, apply (revert to) and delete, in QEMU's crash-safe
 * orders, plus the snapshot table serializer.
 *
 * Refcount semantics (as QEMU's check counts them): every L1 table — the active one
 * and each snapshot's — counts one reference to each L2 table it points to and,
 * through it, one to each data cluster. A tree is therefore taken or dropped by
 * walking its L1 table and adding ±1 to every cluster it reaches.
 *
 * Orders: create raises refcounts, writes the L1 copy and the new table, then
 * switches the header (a crash leaks, never corrupts); delete switches the table
 * first and lowers refcounts afterwards; apply raises the snapshot's tree, overwrites
 * the active L1 in place, then lowers the old tree.
 */
import { QimgError } from '../../core/errors.js';
import { writeU64 } from '../../core/units.js';
import * as C from './constants.js';
import { compressedDescriptor } from './entries.js';
import type { Qcow2Snapshot } from './snapshot.js';
import type { Qcow2Image } from './driver.js';

/** Bytes of the serialized snapshot table. */
export function serializeSnapshotTable(snaps: Qcow2Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of snaps) {
    const id = Buffer.from(s.id);
    const name = Buffer.from(s.name);
    const extra = s.extraData;
    const len = Math.ceil((40 + extra.length + id.length + name.length) / 8) * 8;
    const b = Buffer.alloc(len);
    writeU64(b, 0, s.l1TableOffset);
    b.writeUInt32BE(s.l1Size, 8);
    b.writeUInt16BE(id.length, 12);
    b.writeUInt16BE(name.length, 14);
    b.writeUInt32BE(s.dateSec, 16);
    b.writeUInt32BE(s.dateNsec, 20);
    b.writeBigUInt64BE(s.vmClockNsec, 24);
    b.writeUInt32BE(Math.min(s.vmStateSize, 0xffffffff), 32);
    b.writeUInt32BE(extra.length, 36);
    extra.copy(b, 40);
    id.copy(b, 40 + extra.length);
    name.copy(b, 40 + extra.length + id.length);
    parts.push(b);
  }
  return Buffer.concat(parts);
}

/** Extra data QEMU writes for a new snapshot: VM state size, disk size, icount. */
function newExtraData(diskSize: number): Buffer {
  const extra = Buffer.alloc(24);
  writeU64(extra, 8, diskSize);
  return extra;
}

interface TreeRef {
  /** host cluster index -> references from this tree */
  counts: Map<number, number>;
  /** L2 table offsets of the tree */
  l2Tables: number[];
}

/** Every cluster one L1 table reaches (L2 tables and data), with multiplicity. */
async function collectTree(img: Qcow2Image, l1: Buffer): Promise<TreeRef> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const counts = new Map<number, number>();
  const l2Tables: number[] = [];
  const add = (cluster: number) => counts.set(cluster, (counts.get(cluster) ?? 0) + 1);
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = img.l2OffsetAt(l1, i);
    if (l2Offset === 0) continue;
    l2Tables.push(l2Offset);
    add(l2Offset / cs);
    const table = await img.loadL2(l2Offset);
    for (let k = 0; k < g.l2Entries; k++) {
      const pos = k * g.l2EntrySize;
      const hi = table.readUInt32BE(pos);
      const lo = table.readUInt32BE(pos + 4);
      if (hi & C.OFLAG_COMPRESSED_HI) {
        const c = compressedDescriptor(hi, lo, g.clusterBits, img.filename);
        const start = c.hostOffset - (c.hostOffset % 512);
        for (let h = Math.floor(start / cs); h <= Math.floor((c.hostOffset + c.size - 1) / cs); h++) add(h);
        continue;
      }
      const host = (hi & C.OFFSET_MASK_HI) * 0x100000000 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      if (host !== 0 && !g.hasDataFile) add(host / cs);
    }
  }
  return { counts, l2Tables };
}

/** Adds `sign` × the tree's references; refuses (before any change) to overflow. */
async function applyTree(img: Qcow2Image, tree: TreeRef, sign: 1 | -1): Promise<void> {
  const rc = img.refcounts;
  for (const [cluster, n] of tree.counts) {
    const cur = await rc.get(cluster);
    const next = cur + sign * n;
    if (next > rc.maxRefcount) {
      throw new QimgError(
        `refcount of cluster ${cluster} would exceed ${rc.maxRefcount} (${rc.bits}-bit refcounts); the image cannot hold another reference to it`,
        { file: img.filename },
      );
    }
    if (next < 0) throw new QimgError(`Image is corrupt: refcount of cluster ${cluster} would drop below zero`, { file: img.filename });
  }
  for (const [cluster, n] of tree.counts) {
    const next = (await rc.get(cluster)) + sign * n;
    await rc.set(cluster, next);
    if (next === 0) img.forgetL2(cluster * img.geometry.clusterSize);
  }
}

/** Sets OFLAG_COPIED on the active tree exactly where the refcount is 1. */
async function updateCopiedFlags(img: Qcow2Image): Promise<void> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const rc = img.refcounts;
  for (let i = 0; i < img.header.l1Size; i++) {
    const l2Offset = img.l2OffsetAt(img.l1, i);
    if (l2Offset === 0) continue;
    const table = await img.loadL2(l2Offset);
    let changed = false;
    for (let k = 0; k < g.l2Entries; k++) {
      const pos = k * g.l2EntrySize;
      const hi = table.readUInt32BE(pos);
      if (hi & C.OFLAG_COMPRESSED_HI) continue;
      const lo = table.readUInt32BE(pos + 4);
      const host = (hi & C.OFFSET_MASK_HI) * 0x100000000 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      if (host === 0 || g.hasDataFile) continue;
      const want = (await rc.get(host / cs)) === 1;
      const has = (hi & C.OFLAG_COPIED_HI) !== 0;
      if (want !== has) {
        table.writeUInt32BE((want ? hi | C.OFLAG_COPIED_HI : hi & ~C.OFLAG_COPIED_HI) >>> 0, pos);
        changed = true;
      }
    }
    if (changed) img.markL2Dirty({ offset: l2Offset, table });
    const hi = img.l1.readUInt32BE(i * 8);
    const want = (await rc.get(l2Offset / cs)) === 1;
    if (want !== ((hi & C.OFLAG_COPIED_HI) !== 0)) {
      img.l1.writeUInt32BE((want ? hi | C.OFLAG_COPIED_HI : hi & ~C.OFLAG_COPIED_HI) >>> 0, i * 8);
      img.markL1Dirty(i);
    }
  }
}

/** Writes `snaps` as the new snapshot table and switches the header to it. */
async function replaceSnapshotTable(img: Qcow2Image, snaps: Qcow2Snapshot[]): Promise<void> {
  const cs = img.geometry.clusterSize;
  const bytes = serializeSnapshotTable(snaps);
  const oldOffset = img.header.snapshotsOffset;
  const oldSize = serializeSnapshotTable(img.snapshots).length;
  let offset = 0;
  if (bytes.length > 0) {
    offset = await img.refcounts.allocate(Math.ceil(bytes.length / cs));
    await img.file.write(bytes, offset);
  }
  // Everything the new table points to must be durable before the header does.
  await img.flushAll();
  await img.setSnapshotTable(offset, snaps);
  if (oldOffset !== 0 && oldSize > 0) {
    const first = oldOffset / cs;
    for (let c = first; c < first + Math.ceil(oldSize / cs); c++) await img.refcounts.add(c, -1);
  }
}

/** Refuses images a snapshot operation cannot work on. */
function assertSnapshotCapable(img: Qcow2Image): void {
  if (img.geometry.hasDataFile) throw new QimgError('Can\'t create/apply/delete snapshots of an image with an external data file', { file: img.filename });
}

/** `snapshot -c NAME`: a new snapshot of the active state. */
export async function createSnapshot(img: Qcow2Image, name: string, now = Date.now()): Promise<void> {
  assertSnapshotCapable(img);
  if (img.snapshots.length >= C.MAX_SNAPSHOTS) throw new QimgError('Too many snapshots', { file: img.filename });
  await img.flushAll();
  const cs = img.geometry.clusterSize;
  const tree = await collectTree(img, img.l1);
  // Take the new references (fails cleanly, before any change, on refcount overflow).
  await applyTree(img, tree, 1);
  const l1Bytes = img.header.l1Size * 8;
  const l1Offset = l1Bytes > 0 ? await img.refcounts.allocate(Math.ceil(l1Bytes / cs)) : 0;
  // The active tree is now shared: its COPIED flags go before the copy is taken.
  await updateCopiedFlags(img);
  if (l1Bytes > 0) await img.file.write(Buffer.from(img.l1.subarray(0, l1Bytes)), l1Offset);
  const maxId = img.snapshots.reduce((m, s) => Math.max(m, /^\d+$/.test(s.id) ? Number(s.id) : 0), 0);
  const snap: Qcow2Snapshot = {
    l1TableOffset: l1Offset,
    l1Size: img.header.l1Size,
    id: String(maxId + 1),
    name,
    dateSec: Math.floor(now / 1000),
    dateNsec: (now % 1000) * 1_000_000,
    vmClockNsec: 0n,
    vmStateSize: 0,
    diskSize: img.virtualSize,
    icount: 0n,
    extraData: newExtraData(img.virtualSize),
  };
  await replaceSnapshotTable(img, [...img.snapshots, snap]);
  await img.flushAll();
}

/** Finds a snapshot by id, then by name (apply), or by name only (delete, as qemu-img 7.2). */
export function findSnapshot(snaps: Qcow2Snapshot[], key: string, byIdToo: boolean): number {
  if (byIdToo) {
    const i = snaps.findIndex((s) => s.id === key);
    if (i >= 0) return i;
  }
  return snaps.findIndex((s) => s.name === key);
}

/** `snapshot -d NAME`: the snapshot's table entry goes first, then its references. */
export async function deleteSnapshot(img: Qcow2Image, key: string): Promise<void> {
  assertSnapshotCapable(img);
  const index = findSnapshot(img.snapshots, key, false);
  if (index < 0) throw new QimgError(`Could not delete snapshot '${key}': snapshot not found`, { file: img.filename });
  await img.flushAll();
  const sn = img.snapshots[index];
  const cs = img.geometry.clusterSize;
  const l1 = await img.file.readBytes(sn.l1TableOffset, sn.l1Size * 8);
  const tree = await collectTree(img, l1);
  await replaceSnapshotTable(img, img.snapshots.filter((_, i) => i !== index));
  await applyTree(img, tree, -1);
  if (sn.l1Size > 0) {
    const first = sn.l1TableOffset / cs;
    for (let c = first; c < first + Math.ceil((sn.l1Size * 8) / cs); c++) await img.refcounts.add(c, -1);
  }
  await updateCopiedFlags(img);
  await img.flushAll();
}

/** `snapshot -a NAME`: the active state becomes a copy of the snapshot. */
export async function applySnapshot(img: Qcow2Image, key: string): Promise<void> {
  assertSnapshotCapable(img);
  const index = findSnapshot(img.snapshots, key, true);
  if (index < 0) throw new QimgError(`Could not apply snapshot '${key}': Failed to load snapshot: No such file or directory`, { file: img.filename });
  const sn = img.snapshots[index];
  if (sn.diskSize !== img.virtualSize || sn.l1Size > img.header.l1Size) {
    await img.resizeForSnapshot(sn.diskSize, sn.l1Size);
  }
  await img.flushAll();
  const snapL1 = await img.file.readBytes(sn.l1TableOffset, sn.l1Size * 8);
  const snapTree = await collectTree(img, snapL1);
  const oldTree = await collectTree(img, img.l1);
  await applyTree(img, snapTree, 1);
  await img.flushAll();
  // Overwrite the active L1 in place (padded with zeros past the snapshot's size).
  const next = Buffer.alloc(img.header.l1Size * 8);
  snapL1.copy(next);
  await img.replaceActiveL1(next);
  await applyTree(img, oldTree, -1);
  await updateCopiedFlags(img);
  await img.flushAll();
}
