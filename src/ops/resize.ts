/** `resize`: grow or (with --shrink) shrink an image's virtual size. */
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import { parseImageSize } from '../core/size.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export const SHRINK_WARNING =
  "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

/** A shrink without --shrink: the CLI prints this error, then SHRINK_WARNING (qemu-img's order). */
export class ShrinkRefusedError extends QimgError {
  constructor() {
    super('Use the --shrink option to perform a shrink operation.');
  }
}

/** Parses "[+|-]SIZE" against the current size. */
export function resolveNewSize(text: string, current: number): number {
  const sign = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const value = Number(parseImageSize(sign === 0 ? text : text.slice(1)));
  const size = sign === 0 ? value : current + sign * value;
  if (size <= 0) throw new QimgError('New image size must be positive');
  return size;
}

export async function resizeImage(
  filename: string,
  format: string | undefined,
  sizeText: string,
  opts: { shrink?: boolean; preallocation?: Preallocation } & Pick<OpenOptions, 'secrets' | 'imageOptions'>,
): Promise<void> {
  const mode = opts.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) throw new QimgError(`Invalid preallocation mode '${mode}'`);
  const img = await openImage(filename, { format, writable: true, secrets: opts.secrets, imageOptions: opts.imageOptions });
  try {
    const size = resolveNewSize(sizeText, img.virtualSize);
    // After the shrink check, without a file name, as qemu-img's blk_truncate() reports it
    const unsupported = () => new QimgError('Image format driver does not support resize', { file: '' });
    if (!img.resize && size >= img.virtualSize) throw unsupported();
    if (size < img.virtualSize) {
      // qemu-img (7.2 and later) prints the data-loss warning together with this error,
      // after it; a shrink that was asked for with --shrink goes ahead silently.
      if (!opts.shrink) throw new ShrinkRefusedError();
      if (mode !== 'off') throw new QimgError('Preallocation can only be used for growing images', { file: filename });
    }
    if (!img.resize) throw unsupported();
    await img.resize(size, { preallocation: mode });
  } finally {
    await img.close();
  }
}
