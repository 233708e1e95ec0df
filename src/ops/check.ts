/**
 * `check`: format dispatch and the result qemu-img reports (its ImageCheck). Formats
 * without a check hook answer "does not support checks" (exit 63), as qemu-img does.
 */
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import { ImageFile } from '../io/file.js';
import { isRemoteName } from '../io/remote.js';
import { findDriver, type ImageCheckCounts } from '../core/driver.js';

/** qemu's BDRV_FIX_LEAKS / BDRV_FIX_ERRORS */
export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

/** qemu's ImageCheck: one check pass of one image. */
export interface ImageCheck extends ImageCheckCounts {
  filename: string;
  format: string;
}

export interface CheckOptions {
  /** -f */
  format?: string;
  /** FIX_LEAKS | FIX_ERRORS (0: read-only check) */
  fix: number;
  /** per-problem lines (stderr in the CLI) */
  log: (line: string) => void;
  /** -U: take no image locks */
  forceShare?: boolean;
  /** --object secrets and --image-opts options for the open */
  secrets?: OpenOptions['secrets'];
  imageOptions?: OpenOptions['imageOptions'];
}

/** Exit code qemu-img uses when a format has no consistency check. */
export const EXIT_NO_CHECK = 63;

/**
 * Opens the image as a read-only BlockImage first (format probing, header and
 * backing-chain validation, as qemu-img opens it), then runs the format's check on
 * the file itself.
 */
export async function checkImage(filename: string, opts: CheckOptions): Promise<ImageCheck> {
  const img = await openImage(filename, { format: opts.format, forceShare: opts.forceShare, check: true, secrets: opts.secrets, imageOptions: opts.imageOptions });
  const format = img.format;
  await img.close();
  const driver = findDriver(format);
  if (!driver?.check) {
    throw new QimgError('This image format does not support checks', { file: filename, exitCode: EXIT_NO_CHECK });
  }
  // Hold QEMU's locks while checking: a repair must not race a running VM.
  // (remote storage has no local locks)
  const holder = opts.forceShare || isRemoteName(filename) ? null : await ImageFile.open(filename, { lock: opts.fix ? 'write' : 'read' });
  try {
    const res = await driver.check(filename, { fix: opts.fix, log: opts.log });
    return { ...res, filename, format };
  } finally {
    await holder?.close();
  }
}

/** Exit code for a finished check: 1 internal errors, 2 corruptions, 3 leaks, 0 clean. */
export function checkExitCode(c: ImageCheck): number {
  if (c.checkErrors) return 1;
  if (c.corruptions) return 2;
  if (c.leaks) return 3;
  return 0;
}
