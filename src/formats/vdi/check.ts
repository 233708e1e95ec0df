/**
 * `check` for VDI, as QEMU's: every block map entry that is allocated must name a
 * block inside the image and no block may be used twice; the header's allocated
 * count must match the entries counted. QEMU repairs nothing: `-r` is refused as
 * "does not support checks" (exit 63).
 */
import { emptyCheckCounts, type FormatCheckOptions, type ImageCheckCounts } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import { openStorage } from '../../io/storage.js';
import { readVdiMetadata } from './driver.js';
import { isAllocated } from './header.js';

export async function checkVdi(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts> {
  if (opts.fix) throw new QimgError('This image format does not support checks', { file: '', exitCode: 63 });
  const file = await openStorage(filename, { lock: 'none' });
  let meta;
  try {
    meta = await readVdiMetadata(file);
  } finally {
    await file.close();
  }
  const { header: h, bmap } = meta;
  const counts: ImageCheckCounts = emptyCheckCounts();
  const used = new Uint8Array(Math.ceil(h.blocksInImage / 8));
  let allocated = 0;
  for (let block = 0; block < h.blocksInImage; block++) {
    const entry = bmap.readUInt32LE(block * 4);
    if (!isAllocated(entry)) continue;
    if (entry >= h.blocksInImage) {
      opts.log(`ERROR: block index ${block} too large, is ${entry}`);
      counts.corruptions++;
      continue;
    }
    allocated++;
    const bit = 1 << (entry & 7);
    if (used[entry >>> 3] & bit) {
      // QEMU names the data block twice (the index it recorded is the entry itself).
      opts.log(`ERROR: block index ${entry} also used by ${entry}`);
      counts.corruptions++;
    } else {
      used[entry >>> 3] |= bit;
    }
  }
  if (allocated !== h.blocksAllocated) {
    opts.log(`ERROR: allocated blocks mismatch, is ${allocated}, should be ${h.blocksAllocated}`);
    counts.corruptions++;
  }
  return counts;
}
