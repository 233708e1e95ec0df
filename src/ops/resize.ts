/** `resize`: grow or (with --shrink) shrink an image's virtual size. */
import { QimgError } from '../core/errors.js';
import { openImage } from '../core/open.js';
import { parseImageSize } from '../core/size.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

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
  opts: { shrink?: boolean; preallocation?: Preallocation; warn?: (msg: string) => void },
): Promise<void> {
  const mode = opts.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) throw new QimgError(`Invalid preallocation mode '${mode}'`);
  const img = await openImage(filename, { format, writable: true });
  try {
    if (!img.resize) throw new QimgError(`Image format '${img.format}' does not support resizing`, { file: filename });
    const size = resolveNewSize(sizeText, img.virtualSize);
    if (size < img.virtualSize) {
      if (!opts.shrink) throw new QimgError('Use the --shrink option to perform a shrink operation.');
      opts.warn?.(
        "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
      if (mode !== 'off') throw new QimgError('Preallocation can only be used for growing images', { file: filename });
    }
    await img.resize(size, { preallocation: mode });
  } finally {
    await img.close();
  }
}
