/** Reserving disk blocks for a file (preallocation=falloc), via fallocate(2). */
import { QimgError } from '../core/errors.js';
import { native, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from './native.js';
import type { HostFile } from './host.js';

/** Allocates [0, length) without changing content; an error when the platform cannot. */
export async function allocateFile(fd: number | undefined, length: number, offset = 0): Promise<void> {
  if (length <= offset) return;
  const lib = native();
  if (!lib || fd === undefined) throw new QimgError('preallocation=falloc is not supported on this platform (fallocate unavailable)');
  const r = lib.fallocate(fd, 0, offset, length - offset);
  if (r < 0) throw new QimgError(`Could not preallocate data for the new file: errno ${-r}`);
}

/**
 * Zeroes a file range without writing data: punches a hole (`unmap`) or uses
 * ZERO_RANGE. Returns false when the platform cannot, so the caller writes zeros.
 */
export async function zeroFileRange(file: HostFile, offset: number, length: number, unmap: boolean): Promise<boolean> {
  const lib = native();
  if (!lib || file.isBlockDevice || file.fd === undefined || length === 0) return length === 0;
  const end = Math.min(offset + length, file.size);
  if (end > offset) {
    const mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if (lib.fallocate(file.fd, mode, offset, end - offset) < 0) return false;
  }
  return true;
}
