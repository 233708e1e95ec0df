/**
 * `check` for VHDX as qemu does it: a log that needs replaying is replayed by a
 * repairing check (one corruption fixed) and refuses a read-only one; every present
 * BAT entry must lie inside the file and outside the metadata regions (qemu's
 * messages, one corruption each).
 */
import { emptyCheckCounts, type FormatCheckOptions, type ImageCheckCounts } from '../../core/driver.js';
import { openStorage } from '../../io/storage.js';
import { newGuid, ZERO_GUID } from './format.js';
import { updateHeaders } from './image.js';
import { replaySequence } from './log.js';
import { activeLogLocation, checkBatEntries, checkSignature, currentHeader, pendingLog, readBat, readHeaders, readMeta, readOnlyLogError } from './open.js';
import { programName } from '../../core/program-name.js';

export async function checkVhdx(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts> {
  const counts: ImageCheckCounts = emptyCheckCounts();
  // qemu opens the image read-write for any -r: the log is replayed then
  const file = await openStorage(filename, { writable: opts.fix !== 0 });
  try {
    await checkSignature(file);
    const hs = await readHeaders(file);
    const seq = await pendingLog(file, currentHeader(hs));
    if (seq.length > 0) {
      if (opts.fix === 0) throw readOnlyLogError(filename);
      await replaySequence(file, activeLogLocation(currentHeader(hs))!, seq, filename);
      await updateHeaders(file, hs, newGuid(), { newDataWriteGuid: true, logGuid: ZERO_GUID });
      counts.corruptionsFixed++;
    }
    const meta = await readMeta(file, hs);
    const bat = await readBat(file, meta);
    counts.corruptions = checkBatEntries(meta, bat, file.size, (msg) => {
      opts.log(`${programName()}: ${msg}`);
      return true;
    });
    return counts;
  } finally {
    await file.close();
  }
}
