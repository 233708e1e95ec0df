/**
 * `bitmap`: changes to the persistent dirty bitmaps of a qcow2 image, applied in the
 * order given, each with QEMU's checks and messages; what succeeded before a failure
 * is stored, as qemu-img does.
 */
import type { BlockImage } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import type { Qcow2Image } from '../formats/qcow2/driver.js';

export type BitmapAction = { kind: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { kind: 'merge'; source: string };

export interface BitmapRequest {
  filename: string;
  format?: string;
  /** the bitmap every action applies to */
  bitmap: string;
  actions: BitmapAction[];
  /** --add's granularity in bytes (default: the cluster size within 4 KiB..64 KiB) */
  granularity?: number;
  /** -b: the image holding the merge sources (default: the image itself) */
  sourceFile?: string;
  sourceFormat?: string;
  open?: Pick<OpenOptions, 'secrets' | 'imageOptions'>;
}

/**
 * The name QEMU's messages give an image opened by file name: its automatically
 * generated node name (the number differs between QEMU runs; scripts cannot rely on it).
 */
const NODE_NAME = '#block100';

export async function bitmapCommand(req: BitmapRequest): Promise<void> {
  const img = await openImage(req.filename, { format: req.format, writable: true, noBacking: true, ...req.open });
  let source: BlockImage | null = null;
  try {
    if (req.sourceFile !== undefined) {
      source = await openImage(req.sourceFile, { format: req.sourceFormat, noBacking: true, secrets: req.open?.secrets });
    }
    for (const action of req.actions) {
      try {
        await apply(img, source ?? img, req, action);
      } catch (err) {
        if (!(err instanceof QimgError)) throw err;
        throw new QimgError(`Operation ${action.kind} on bitmap ${req.bitmap} failed: ${err.message}`, { file: '', cause: err });
      }
    }
  } finally {
    try {
      await source?.close();
    } finally {
      await img.close();
    }
  }
}

async function apply(img: BlockImage, source: BlockImage, req: BitmapRequest, action: BitmapAction): Promise<void> {
  const name = req.bitmap;
  if (img.format !== 'qcow2') {
    // Formats without persistent bitmaps: nothing can be added, nothing is found.
    if (action.kind === 'add') {
      if (name === '') throw new QimgError('Bitmap name cannot be empty');
      throw new QimgError(`Can't store persistent bitmaps to ${NODE_NAME}: Operation not supported`);
    }
    throw new QimgError(`Dirty bitmap '${name}' not found`);
  }
  const set = await (img as Qcow2Image).bitmapsForUpdate();
  switch (action.kind) {
    case 'add':
      return set.add(name, req.granularity, false, NODE_NAME);
    case 'remove':
      return set.remove(name);
    case 'clear':
      return set.clear(name);
    case 'enable':
      return set.setEnabled(name, true);
    case 'disable':
      return set.setEnabled(name, false);
    case 'merge': {
      await set.checkMergeTarget(name);
      if (source.format !== 'qcow2') throw new QimgError(`Dirty bitmap '${action.source}' not found`);
      const from = source === img ? set : (source as Qcow2Image).bitmapsForReading();
      return set.merge(name, await from.sourceBits(action.source));
    }
  }
}
