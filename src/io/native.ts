/**
 * libc calls Node does not expose (lseek with SEEK_DATA/SEEK_HOLE, fallocate, a buffer's
 * address), through
 * koffi. Loaded on first use only, so commands that never need them start fast. When
 * koffi cannot load (another platform, or QIMG_NO_NATIVE=1 to exercise the fallback),
 * `native()` returns null and callers use their portable paths.
 */
import { loadKoffi } from './koffi.js';

export interface NativeLibc {
  /** lseek(2); returns -errno on failure. */
  lseek(fd: number, offset: number, whence: number): number;
  /** fallocate(2); returns 0 or -errno. */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /** The memory address of a buffer's first byte. */
  address(buf: Buffer): number;
  /**
   * copy_file_range(2) on a libuv worker thread: copies up to `length` bytes from
   * `inFd` at `inOffset` to `outFd` at `outOffset` inside the kernel (a reflink where
   * the filesystem can). Resolves to the bytes copied (0 at the end of the input) or
   * -1 when the kernel refuses (no errno: it belongs to the worker thread).
   */
  copyFileRange(inFd: number, inOffset: number, outFd: number, outOffset: number, length: number): Promise<number>;
  /** ftruncate(2) with a 64-bit length (Node's own stops at 2^53); returns 0 or -errno. */
  ftruncate(fd: number, length: bigint): number;
}

export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const ENXIO = 6;
export const EINVAL = 22;
export const EFBIG = 27;

/** A koffi function with its asynchronous form (run on a worker thread). */
type AsyncFunc = ((...args: unknown[]) => unknown) & { async: (...args: unknown[]) => void };

let loaded: NativeLibc | null | undefined;

export function native(): NativeLibc | null {
  if (loaded !== undefined) return loaded;
  loaded = null;
  if (process.env.QIMG_NO_NATIVE === '1' || process.platform !== 'linux') return loaded;
  try {
    const koffi = loadKoffi();
    const libc = koffi.load('libc.so.6');
    const lseek = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const fallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    const errno = (): number => koffi.errno();
    let copyRange: AsyncFunc | null | undefined;
    let truncate: ((...args: unknown[]) => unknown) | undefined;
    loaded = {
      lseek(fd, offset, whence) {
        const r = Number(lseek(fd, offset, whence));
        return r < 0 ? -errno() : r;
      },
      fallocate(fd, mode, offset, length) {
        const r = fallocate(fd, mode, offset, length) as number;
        return r < 0 ? -errno() : 0;
      },
      address(buf) {
        return Number(koffi.address(buf));
      },
      copyFileRange(inFd, inOffset, outFd, outOffset, length) {
        if (copyRange === undefined) {
          try {
            copyRange = libc.func('int64_t copy_file_range(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)') as AsyncFunc;
          } catch {
            copyRange = null; // a C library without it (glibc < 2.27)
          }
        }
        const fn = copyRange;
        if (!fn || typeof fn.async !== 'function') return Promise.resolve(-1);
        // the kernel reads and advances the offsets through these pointers
        const offIn = Buffer.alloc(8);
        const offOut = Buffer.alloc(8);
        offIn.writeBigInt64LE(BigInt(inOffset));
        offOut.writeBigInt64LE(BigInt(outOffset));
        return new Promise((resolve) => {
          fn.async(inFd, offIn, outFd, offOut, length, 0, (err: unknown, r: unknown) => {
            resolve(err ? -1 : Number(r));
          });
        });
      },
      ftruncate(fd, length) {
        truncate ??= libc.func('int ftruncate(int fd, int64_t length)');
        const r = truncate(fd, length) as number;
        return r < 0 ? -errno() : 0;
      },
    };
  } catch {
    loaded = null;
  }
  return loaded;
}

/** For tests: forget the cached library so QIMG_NO_NATIVE is read again. */
export function resetNativeForTests(): void {
  loaded = undefined;
}
