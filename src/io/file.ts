/**
 * The file layer: an open image file with positional, complete reads and writes.
 * Reads past the end of the file return zeros (as qemu's file protocol does), so
 * format code never sees short reads.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { constants, readFileSync, statSync } from 'node:fs';
import { QimgError, describeSystemError } from '../core/errors.js';
import { native, SEEK_END } from './native.js';
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
      const st = await handle.stat();
      if (st.isDirectory()) throw Object.assign(new Error('Is a directory'), { code: 'EISDIR' });
      let size = st.size;
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
      const { bytesRead } = await this.handle.read(buf, done, buf.length - done, pos + done);
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
      const { bytesWritten } = await this.handle.write(buf, done, buf.length - done, pos + done);
      done += bytesWritten;
    }
    if (pos + buf.length > this.size_) this.size_ = pos + buf.length;
  }

  async truncate(length: number): Promise<void> {
    await this.handle.truncate(length);
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
