/**
 * qemu-img check for vmdk: every allocated grain (and every flat extent's start) must
 * lie inside its extent file. qemu stops at the first problem and reports the check as
 * failed; repairs are not supported.
 */
import { emptyCheckCounts, type FormatCheckOptions, type ImageCheckCounts } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import { openImage } from '../../core/open.js';
import { SECTOR } from './constants.js';
import type { VmdkImage } from './image.js';

const EXIT_NO_CHECK = 63;

export async function checkVmdk(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts> {
  if (opts.fix) throw new QimgError('This image format does not support checks', { file: '', exitCode: EXIT_NO_CHECK });
  const img = (await openImage(filename, { format: 'vmdk', metadataOnly: true, forceShare: true })) as unknown as VmdkImage;
  try {
    for (const ext of img.layout.extents) {
      const firstSector = ext.start / SECTOR;
      if (ext.kind === 'flat') {
        if (ext.flatStart >= ext.file.size) {
          opts.log(`ERROR: cluster offset for sector ${firstSector} points after EOF`);
          throw failed('Invalid argument');
        }
        continue;
      }
      const sp = ext.sparse;
      const grains = Math.ceil(ext.size / sp.grainSize);
      const fileSize = ext.file.size;
      for (let g = 0; g < grains; ) {
        const i = Math.floor(g / sp.layout.gtEntries);
        if (i >= sp.layout.gdEntries || sp.gd[i] === -1) {
          opts.log(`ERROR: could not get cluster_offset for sector ${firstSector + g * sp.layout.grainSectors}`);
          throw failed('Operation not permitted');
        }
        const t = await sp.table(i);
        const end = Math.min(grains, (i + 1) * sp.layout.gtEntries);
        if (!t) {
          g = end;
          continue;
        }
        for (; g < end; g++) {
          const e = sp.decode(t, g % sp.layout.gtEntries);
          if (e.kind === 'error') {
            opts.log(`ERROR: could not get cluster_offset for sector ${firstSector + g * sp.layout.grainSectors}`);
            throw failed('Operation not permitted');
          }
          if ((e.kind === 'data' || e.kind === 'compressed') && e.sector * SECTOR >= fileSize) {
            opts.log(`ERROR: cluster offset for sector ${firstSector + g * sp.layout.grainSectors} points after EOF`);
            throw failed('Invalid argument');
          }
        }
      }
    }
  } finally {
    await img.close();
  }
  return emptyCheckCounts();
}

function failed(reason: string): QimgError {
  return new QimgError(`Check failed: ${reason}`, { file: '', exitCode: 1 });
}
