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
}

export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const ENXIO = 6;

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
