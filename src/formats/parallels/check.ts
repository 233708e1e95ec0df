/**
 * `check` for parallels, as qemu 7.2's parallels_co_check: the in_use flag, BAT
 * entries pointing past the end of the file, fragmentation, and space leaked after
 * the last cluster. Repairs: out-of-file entries cleared (FIX_ERRORS), the file
 * truncated after the last cluster (FIX_LEAKS); any repair run leaves the image
 * closed cleanly (in_use cleared), as qemu's close does.
 */
import { emptyCheckCounts, type FormatCheckOptions, type ImageCheckCounts } from '../../core/driver.js';
import { openStorage } from '../../io/storage.js';
import { HEADER_INUSE_MAGIC, SECTOR_SIZE, batEntryOffset, serializeHeader } from './header.js';
import { loadState } from './image.js';

const FIX_LEAKS = 1;
const FIX_ERRORS = 2;

export async function checkParallels(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts> {
  const file = await openStorage(filename, { writable: opts.fix !== 0 });
  const res: ImageCheckCounts = emptyCheckCounts();
  try {
    const s = await loadState(file, filename);
    const { header, bat, clusterSize } = s;
    // qemu's bdrv_getlength: the file size in whole sectors
    const size = Math.ceil(file.size / SECTOR_SIZE) * SECTOR_SIZE;
    const fixErrors = (opts.fix & FIX_ERRORS) !== 0;
    const fixLeaks = (opts.fix & FIX_LEAKS) !== 0;
    if (header.inUse === HEADER_INUSE_MAGIC) {
      opts.log(`${fixErrors ? 'Repairing' : 'ERROR'} image was not closed correctly`);
      res.corruptions++;
      if (fixErrors) res.corruptionsFixed++;
    }
    res.totalClusters = header.batEntries;
    let highOff = 0;
    let prevOff = 0;
    let batChanged = false;
    for (let i = 0; i < header.batEntries; i++) {
      const off = bat.get(i) * s.offMultiplier * SECTOR_SIZE;
      if (off === 0) {
        prevOff = 0;
        continue;
      }
      if (off > size) {
        opts.log(`${fixErrors ? 'Repairing' : 'ERROR'} cluster ${i} is outside image`);
        res.corruptions++;
        if (fixErrors) {
          prevOff = 0;
          bat.set(i, 0);
          res.corruptionsFixed++;
          batChanged = true;
          continue;
        }
      }
      res.allocatedClusters++;
      if (off > highOff) highOff = off;
      if (prevOff !== 0 && prevOff + clusterSize !== off) res.fragmentedClusters++;
      prevOff = off;
    }
    if (batChanged) {
      await file.write(bat.encode(0, header.batEntries), batEntryOffset(0));
      await file.flush();
    }
    res.imageEndOffset = highOff + clusterSize;
    if (size > res.imageEndOffset) {
      const count = Math.ceil((size - res.imageEndOffset) / clusterSize);
      opts.log(`${fixLeaks ? 'Repairing' : 'ERROR'} space leaked at the end of the image ${size - res.imageEndOffset}`);
      res.leaks += count;
      if (fixLeaks) {
        await file.truncate(res.imageEndOffset);
        res.leaksFixed += count;
      }
    }
    if (fixErrors && header.inUse !== 0) {
      header.inUse = 0;
      await file.write(serializeHeader(header), 0);
    }
    if (opts.fix !== 0) await file.flush();
    return res;
  } finally {
    await file.close();
  }
}
