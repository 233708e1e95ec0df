/** `resize`: grow or (with --shrink) shrink an image's virtual size. */
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import { parseSizeString } from '../core/size.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export const SHRINK_WARNING =
  "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

/** A shrink without --shrink: the CLI prints this error, then SHRINK_WARNING (qemu-img's order). */
export class ShrinkRefusedError extends QimgError {
  constructor() {
    super('Use the --shrink option to perform a shrink operation.');
  }
}

/** The largest length qemu's block layer takes (BDRV_MAX_LENGTH: INT64_MAX rounded down to whole GiB less one). */
export const MAX_IMAGE_LENGTH = 9223372035781033984n;

/** A resize argument: "+SIZE", "-SIZE" or "SIZE". */
export interface ResizeArgument {
  relative: -1 | 0 | 1;
  /** as qemu-img reads it: an unsigned 64-bit size */
  value: bigint;
  /** the deprecation warning for a hex number with a suffix */
  warning?: string;
}

/**
 * Reads the size argument as qemu-img resize does (before opening the image): a sign,
 * then a QemuOpts size, which may be anything below 2^64, with QemuOpts' messages.
 */
export function parseResizeArgument(text: string): ResizeArgument {
  const relative = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const r = parseSizeString(relative === 0 ? text : text.slice(1));
  if (!r.ok && r.range) throw new QimgError(`Value '${text.slice(relative === 0 ? 0 : 1)}' is out of range for parameter 'size'`, { file: '' });
  if (!r.ok) {
    throw new QimgError(
      "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
      { file: '' },
    );
  }
  return { relative, value: r.value, warning: r.warning };
}

/**
 * The new size, computed as qemu-img does, in signed 64-bit arithmetic (a size of 2^63
 * or more is negative there); qemu's messages for sizes that are not positive or
 * beyond what its block layer takes.
 */
export function resolveNewSize(arg: ResizeArgument | string, current: number, format = 'raw'): number {
  const a = typeof arg === 'string' ? parseResizeArgument(arg) : arg;
  const n = BigInt.asIntN(64, a.value);
  const total = a.relative === 0 ? n : BigInt.asIntN(64, BigInt(current) + BigInt(a.relative) * n);
  if (total <= 0n) throw new QimgError('New image size must be positive');
  if (total > MAX_IMAGE_LENGTH) throw new QimgError(`offset(${total}) exceeds maximum(${MAX_IMAGE_LENGTH})`, { file: '' });
  const size = Number(total);
  if (BigInt(size) !== total) {
    // Whole sectors below 2^62 are exact doubles; other sizes past 2^53 are not. The
    // image formats want whole sectors first (qemu's message), and their limits lie
    // far below 2^62; a raw file that large is refused as most file systems refuse it.
    if (format !== 'raw' && total % 512n !== 0n) throw new QimgError('The new size must be a multiple of 512');
    if (format === 'raw') throw new QimgError('Could not resize file: File too large');
  }
  return size;
}

export async function resizeImage(
  filename: string,
  format: string | undefined,
  sizeText: string | ResizeArgument,
  opts: { shrink?: boolean; preallocation?: Preallocation } & Pick<OpenOptions, 'secrets' | 'imageOptions'>,
): Promise<void> {
  const mode = opts.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) throw new QimgError(`Invalid preallocation mode '${mode}'`);
  const img = await openImage(filename, { format, writable: true, secrets: opts.secrets, imageOptions: opts.imageOptions });
  try {
    const size = resolveNewSize(sizeText, img.virtualSize, img.format);
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
