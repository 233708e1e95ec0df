/** Reserving disk blocks for a file (preallocation=falloc), via fallocate(2). */
import { QimgError } from '../core/errors.js';
import { native } from './native.js';

/** Allocates [0, length) without changing content; an error when the platform cannot. */
export async function allocateFile(fd: number, length: number, offset = 0): Promise<void> {
  if (length <= offset) return;
  const lib = native();
  if (!lib) throw new QimgError('preallocation=falloc is not supported on this platform (fallocate unavailable)');
  const r = lib.fallocate(fd, 0, offset, length - offset);
  if (r < 0) throw new QimgError(`Could not preallocate data for the new file: errno ${-r}`);
}
