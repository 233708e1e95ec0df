/**
 * QED consistency check (the spec's "Consistency checking" section, with QEMU's
 * counting): every table and data cluster referenced once, inside the file and
 * aligned; unreferenced clusters are leaks. Repairing clears invalid entries (QEMU
 * repairs errors whichever -r level is asked) and marks the image clean; leaks stay.
 */
import { emptyCheckCounts, type ImageCheckCounts } from '../../core/driver.js';
import type { HostFile } from '../../io/host.js';
import { isClusterOffsetValid, isTableOffsetValid, QED_F_NEED_CHECK, serializeQedHeader, type QedBounds, type QedHeader } from './header.js';
import { setTableEntry, tableEntry } from './tables.js';

/** Bitmap index of a cluster: QEMU's qed_bytes_to_clusters() divides by cluster_size - 1. */
function clusterIndex(bytes: number, cs: number): number {
  return Math.floor((Math.ceil(bytes / cs) * cs) / (cs - 1));
}

export async function checkQedFile(file: HostFile, h: QedHeader, l1: Buffer, fix: boolean): Promise<ImageCheckCounts> {
  const cs = h.clusterSize;
  const fileSize = Math.floor(file.size / cs) * cs;
  const bounds: QedBounds = { clusterSize: cs, tableSize: h.tableSize, headerSize: h.headerSize, fileSize };
  const tableBytes = cs * h.tableSize;
  const nelems = tableBytes / 8;
  const nclusters = clusterIndex(fileSize, cs);
  const used = new Uint8Array(Math.ceil(nclusters / 8) + 1);
  const r: ImageCheckCounts = { ...emptyCheckCounts(), totalClusters: Math.ceil(h.imageSize / cs) };
  /** Marks n clusters from `offset` referenced; false when one already was. */
  const setUsed = (offset: number, n: number): boolean => {
    let clean = true;
    for (let c = clusterIndex(offset, cs), k = 0; k < n; k++, c++) {
      if (c >= nclusters) continue;
      const bit = 1 << (c & 7);
      if (used[c >> 3] & bit) {
        r.corruptions++;
        clean = false;
      }
      used[c >> 3] |= bit;
    }
    return clean;
  };
  const invalid = (table: Buffer, i: number) => {
    if (fix) {
      setTableEntry(table, i, 0);
      r.corruptionsFixed++;
    } else {
      r.corruptions++;
    }
  };

  setUsed(h.l1TableOffset, h.tableSize);
  let invalidL1 = 0;
  let ioFailed = false;
  for (let i = 0; i < nelems; i++) {
    const off = tableEntry(l1, i);
    if (off === 0) continue;
    if (off < 0 || !isTableOffsetValid(bounds, off)) {
      invalid(l1, i);
      invalidL1++;
      continue;
    }
    if (!setUsed(off, h.tableSize)) continue;
    let l2: Buffer;
    try {
      l2 = await file.readBytes(off, tableBytes);
    } catch {
      r.checkErrors++;
      ioFailed = true;
      continue;
    }
    let invalidL2 = 0;
    let last = 0;
    for (let k = 0; k < nelems; k++) {
      const e = tableEntry(l2, k);
      if (e === 0 || e === 1) continue;
      r.allocatedClusters++;
      // QEMU compares raw entries; -1 stands for one too large to be valid
      if (last && last + cs !== e) r.fragmentedClusters++;
      last = e;
      if (e < 0 || !isClusterOffsetValid(bounds, e)) {
        invalid(l2, k);
        invalidL2++;
        continue;
      }
      setUsed(e, 1);
    }
    if (invalidL2 > 0 && fix) {
      try {
        await file.write(l2, off);
      } catch {
        r.checkErrors++;
        ioFailed = true;
      }
    }
  }
  if (invalidL1 > 0 && fix) {
    try {
      await file.write(l1, h.l1TableOffset);
    } catch {
      r.checkErrors++;
      ioFailed = true;
    }
  }
  if (!ioFailed) {
    // Leaks are counted only after a complete scan.
    for (let c = h.headerSize; c < nclusters; c++) if (!(used[c >> 3] & (1 << (c & 7)))) r.leaks++;
    if (fix && r.corruptions === 0 && r.checkErrors === 0 && h.features & QED_F_NEED_CHECK) {
      await file.flush();
      h.features &= ~QED_F_NEED_CHECK;
      await file.write(serializeQedHeader(h), 0);
      await file.flush();
    }
  }
  return r;
}
