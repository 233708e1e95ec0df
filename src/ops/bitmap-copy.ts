/**
 * `convert --bitmaps`: the persistent bitmaps of the (single) source's top layer
 * copied into a qcow2 target, with QEMU's checks before anything is created and its
 * messages; `--skip-broken-bitmaps` leaves inconsistent ones behind with a warning.
 */
import type { BlockImage } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { programName } from '../core/program-name.js';
import type { Qcow2Image } from '../formats/qcow2/driver.js';

const unnamed = (message: string) => new QimgError(message, { file: '' });

/** Before the target exists: one source, with bitmap support, and no inconsistent bitmap unless skipped. */
export async function checkSourceBitmaps(sources: readonly BlockImage[], skipBroken: boolean): Promise<void> {
  if (sources.length > 1) throw unnamed('Copying bitmaps only possible with single source');
  const src = sources[0];
  if (src.format !== 'qcow2') throw unnamed('Source lacks bitmap support');
  if (skipBroken) return;
  for (const b of await (src as Qcow2Image).bitmapsForReading().bitmaps()) {
    if (b.inconsistent) {
      throw unnamed(`Cannot copy inconsistent bitmap '${b.name}'\nTry --skip-broken-bitmaps, or use '${programName()} bitmap --remove' to delete it`);
    }
  }
}

/** The target must be able to store bitmaps (a qcow2 v3 image). */
export function checkTargetBitmaps(target: BlockImage, outputFormat: string): void {
  if (target.format !== 'qcow2' || (target as Qcow2Image).header.version < 3) {
    throw unnamed(`Format driver '${outputFormat}' does not support bitmaps`);
  }
}

/**
 * After the data: each bitmap created in the target (same granularity and state), then
 * filled. QEMU walks the source's bitmaps last to first and stores new ones after the
 * target's own; doing the same gives the same result when one of them fails midway.
 */
export async function copyBitmaps(src: BlockImage, target: BlockImage, warn: (message: string) => void): Promise<void> {
  const from = (src as Qcow2Image).bitmapsForReading();
  const to = await (target as Qcow2Image).bitmapsForUpdate();
  const existing = await to.count();
  for (const b of [...(await from.bitmaps())].reverse()) {
    if (b.inconsistent) {
      warn(`Skipping inconsistent bitmap '${b.name}'`);
      continue;
    }
    try {
      await to.add(b.name, 2 ** b.granularityBits, !b.enabled, '#block100', existing);
    } catch (err) {
      if (err instanceof QimgError) throw unnamed(`Failed to create bitmap ${b.name}: ${err.message}`);
      throw err;
    }
    try {
      await to.merge(b.name, await from.sourceBits(b.name));
    } catch (err) {
      await to.remove(b.name).catch(() => undefined);
      if (err instanceof QimgError) throw unnamed(`Failed to populate bitmap ${b.name}: ${err.message}`);
      throw err;
    }
  }
}
