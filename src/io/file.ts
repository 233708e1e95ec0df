/**
 * The file layer: an open image file with positional, complete reads and writes.
 * Reads past the end of the file return zeros (as qemu's file protocol does), so
 * format code never sees short reads.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { constants, readFileSync, statSync } from 'node:fs';
import { QimgError, describeSystemError } from '../core/errors.js';
import { native, SEEK_END, EFBIG, EINVAL } from './native.js';
import { fileRunAt, type FileRun } from './sparse.js';
import { lockImage, type LockMode } from './lock.js';
import type { HostFile } from './host.js';

export class ImageFile implements HostFile {
  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly writable: boolean,
    private size_: number,
    readonly isBlockDevice: boolean,
  ) {}

  /**
   * Opens `path`; `lock` takes QEMU-compatible image locks (none by default: internal
   * re-opens of a file qimg already holds must not conflict with themselves).
   */
  static async open(path: string, opts: { writable?: boolean; lock?: LockMode } = {}): Promise<ImageFile> {
    const writable = !!opts.writable;
    let handle: FileHandle;
    try {
      handle = await open(path, writable ? constants.O_RDWR : constants.O_RDONLY);
    } catch (err) {
      throw new QimgError(`Could not open '${path}': ${describeSystemError(err)}`, { file: path, cause: err });
    }
    try {
      const st = await handle.stat({ bigint: true });
      if (st.isDirectory()) throw Object.assign(new Error('Is a directory'), { code: 'EISDIR' });
      // qemu's block layer refuses a file longer than it can address (BDRV_MAX_LENGTH)
      if (st.size > MAX_FILE_LENGTH) throw new QimgError(`Could not open '${path}': Could not refresh total sector count: File too large`, { file: path });
      // (sizes past 2^53 are exact as whole sectors; a file that is not, only on file
      // systems that hold 8 PiB files, counts as its size rounded up to a sector)
      let size = st.size > BigInt(Number.MAX_SAFE_INTEGER) ? Number(((st.size + 511n) / 512n) * 512n) : Number(st.size);
      const isBlockDevice = st.isBlockDevice();
      if (isBlockDevice) size = blockDeviceSize(handle.fd, path);
      lockImage(handle.fd, path, opts.lock ?? 'none');
      return new ImageFile(path, handle, writable, size, isBlockDevice);
    } catch (err) {
      await handle.close().catch(() => undefined);
      if (err instanceof QimgError) throw err;
      throw new QimgError(`Could not open '${path}': ${describeSystemError(err)}`, { file: path, cause: err });
    }
  }

  get fd(): number {
    return this.handle.fd;
  }

  /** Length of the file in bytes (as of open, or as changed through this object). */
  get size(): number {
    return this.size_;
  }

  /** Fills `buf` from `pos`; bytes past the end of the file read as zeros. */
  async read(buf: Buffer, pos: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.handle.read(buf, done, buf.length - done, position(pos + done) as number);
      if (bytesRead === 0) {
        buf.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  /** Reads `length` bytes at `pos` into a new buffer. */
  async readBytes(pos: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.read(buf, pos);
    return buf;
  }

  async write(buf: Buffer, pos: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.handle.write(buf, done, Math.min(LARGEST_WRITE, buf.length - done), position(pos + done) as number);
      done += bytesWritten;
    }
    if (pos + buf.length > this.size_) this.size_ = pos + buf.length;
  }

  async truncate(length: number): Promise<void> {
    await truncateFile(this.handle, length);
    this.size_ = length;
  }

  async flush(): Promise<void> {
    await this.handle.datasync();
  }

  /** Bytes the file occupies on disk (st_blocks * 512), as `du` and qemu's actual-size. */
  async allocatedSize(): Promise<number> {
    const st = await this.handle.stat({ bigint: false });
    return st.blocks * 512;
  }

  /** Data/hole run at `pos` (SEEK_DATA/SEEK_HOLE; all data when unsupported). */
  runAt(pos: number, length: number): FileRun {
    if (this.isBlockDevice) {
      const max = Math.max(0, Math.min(length, this.size_ - pos));
      return { data: max > 0, length: max, eof: pos + max >= this.size_ };
    }
    return fileRunAt(this.fd, this.size_, pos, length);
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** The longest file qemu's block layer opens (BDRV_MAX_LENGTH). */
const MAX_FILE_LENGTH = 9223372035781033984n;

/**
 * The most one pwrite(2) writes. A 2 MiB write at a 2 MiB boundary makes Linux 6.x (ext4
 * with large folios) fill 2 MiB page-cache folios, which on the VM measured here cost
 * fifteen times the system time of smaller ones (warm qcow2 → raw of the bench's 4 GiB
 * image: 5.8 s, nearly all system time, in 2 MiB writes; 1.6 s in 256 KiB ones; qemu-img,
 * whose chunks start off 2 MiB boundaries, 0.8–1.2 s). Eight calls instead of one cost
 * little elsewhere.
 */
const LARGEST_WRITE = 256 * 1024;

/** A file position for Node's read/write: numbers stop at 2^53, bigints do not. */
function position(pos: number): number | bigint {
  return pos > Number.MAX_SAFE_INTEGER ? BigInt(pos) : pos;
}

/**
 * ftruncate that takes any length up to 2^63 - 1 (Node's own stops at 2^53): past 2^53
 * through the C library. Failures are Node-style system errors (code EFBIG, EINVAL...).
 */
export async function truncateFile(handle: FileHandle, length: number | bigint): Promise<void> {
  if (typeof length === 'number' && length <= Number.MAX_SAFE_INTEGER) return handle.truncate(length);
  const big = BigInt(length);
  const lib = native();
  const r = lib ? lib.ftruncate(handle.fd, big) : -EFBIG;
  if (r < 0) {
    const code = -r === EFBIG ? 'EFBIG' : -r === EINVAL ? 'EINVAL' : `E${-r}`;
    throw Object.assign(new Error(code === 'EFBIG' ? 'File too large' : code === 'EINVAL' ? 'Invalid argument' : `error ${-r}`), { code, errno: r });
  }
}

/** A block device's size: lseek to its end (stat reports 0 for devices). */
function blockDeviceSize(fd: number, path: string): number {
  const lib = native();
  if (lib) {
    const end = lib.lseek(fd, 0, SEEK_END);
    if (end >= 0) return end;
  }
  // Portable fallback: the kernel's sector count in sysfs.
  try {
    const st = statSync(path);
    const major = Math.floor(st.rdev / 256) & 0xfff;
    const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
    const text = readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    return Number(text.trim()) * 512;
  } catch {
    throw new QimgError(`Could not determine the size of block device '${path}'`, { file: path });
  }
}
