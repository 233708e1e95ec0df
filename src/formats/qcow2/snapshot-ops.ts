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
import type { Qcow2Snapshot } from './snapshot.js';
import type { Qcow2Image } from './driver.js';
import { switchGeneration } from './metadata-switch.js';

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

/** Refuses images a snapshot operation cannot work on. */
function assertSnapshotCapable(img: Qcow2Image): void {
  if (img.geometry.hasDataFile) throw new QimgError('Can\'t create/apply/delete snapshots of an image with an external data file', { file: img.filename });
}

/** `snapshot -c NAME`: a new snapshot of the active state. */
export async function createSnapshot(img: Qcow2Image, name: string, now = Date.now()): Promise<void> {
  assertSnapshotCapable(img);
  if (img.snapshots.length >= C.MAX_SNAPSHOTS) throw new QimgError('Too many snapshots', { file: img.filename });
  await img.flushAll();
  const maxId = img.snapshots.reduce((m, s) => Math.max(m, /^\d+$/.test(s.id) ? Number(s.id) : 0), 0);
  // The current active L1 table (and the L2 tables it points to) becomes the
  // snapshot's; the active tree continues on copies made by the switch.
  const snap: Qcow2Snapshot = {
    l1TableOffset: img.header.l1TableOffset,
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
  await switchGeneration(img, {
    activeL1: img.l1.subarray(0, img.header.l1Size * 8),
    snapshots: [...img.snapshots, snap],
    size: img.virtualSize,
    serializeSnapshots: serializeSnapshotTable,
  });
}

/** Finds a snapshot by id, then by name (apply), or by name only (delete, as qemu-img 7.2). */
export function findSnapshot(snaps: Qcow2Snapshot[], key: string, byIdToo: boolean): number {
  if (byIdToo) {
    const i = snaps.findIndex((s) => s.id === key);
    if (i >= 0) return i;
  }
  return snaps.findIndex((s) => s.name === key);
}

/** `snapshot -d NAME`: the snapshot leaves the table; what only it held is no longer counted. */
export async function deleteSnapshot(img: Qcow2Image, key: string): Promise<void> {
  assertSnapshotCapable(img);
  const index = findSnapshot(img.snapshots, key, false);
  if (index < 0) throw new QimgError(`Could not delete snapshot '${key}': snapshot not found`, { file: img.filename });
  await img.flushAll();
  await switchGeneration(img, {
    activeL1: img.l1.subarray(0, img.header.l1Size * 8),
    snapshots: img.snapshots.filter((_, i) => i !== index),
    size: img.virtualSize,
    serializeSnapshots: serializeSnapshotTable,
  });
}

/** `snapshot -a NAME`: the active state becomes a copy of the snapshot (and its size). */
export async function applySnapshot(img: Qcow2Image, key: string): Promise<void> {
  assertSnapshotCapable(img);
  const index = findSnapshot(img.snapshots, key, true);
  if (index < 0) throw new QimgError(`Could not apply snapshot '${key}': Failed to load snapshot: No such file or directory`, { file: img.filename });
  const sn = img.snapshots[index];
  await img.flushAll();
  const g = img.geometry;
  const l1Size = Math.max(sn.l1Size, Math.ceil(sn.diskSize / (g.clusterSize * g.l2Entries)));
  if (l1Size * 8 > C.MAX_L1_BYTES) throw new QimgError('Active L1 table too large', { file: img.filename });
  const activeL1 = Buffer.alloc(l1Size * 8);
  (await img.file.readBytes(sn.l1TableOffset, sn.l1Size * 8)).copy(activeL1);
  await switchGeneration(img, { activeL1, snapshots: img.snapshots, size: sn.diskSize, serializeSnapshots: serializeSnapshotTable });
}
