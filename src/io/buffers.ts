/**
 * Buffers for bulk reads. The kernel copies page-cache pages into them with `rep movsb`,
 * which on some CPUs (AMD Zen measured here) runs about three times slower when the
 * destination sits a few bytes past a page boundary, where large allocations start
 * (malloc puts its 16-byte header first): reading 1 GiB from the page cache took 250 ms
 * into such a buffer and 80 ms into a page-aligned one. qemu aligns its buffers too.
 */
import { native } from './native.js';

const PAGE = 4096;

/** `size` bytes (uninitialized) starting on a page boundary where the address is known. */
export function allocIoBuffer(size: number): Buffer {
  const lib = native();
  if (!lib) return Buffer.allocUnsafeSlow(size);
  const raw = Buffer.allocUnsafeSlow(size + PAGE);
  const skip = (PAGE - (lib.address(raw) % PAGE)) % PAGE;
  return raw.subarray(skip, skip + size);
}
