/**
 * raw: the file is the disk. Block status comes from the file's holes
 * (SEEK_DATA/SEEK_HOLE); the virtual size is the file size rounded up to 512 bytes.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import type { OpenContext } from '../../core/open.js';
import type { OptionSpec } from '../../core/options.js';
import type { HostFile } from '../../io/host.js';
import { alignUp } from '../../core/units.js';
import { QimgError, describeSystemError } from '../../core/errors.js';
import { allocateFile, zeroFileRange } from '../../io/allocate.js';
import type { OptionValue } from '../../core/options.js';
import { checkNewFileLength, writeNewFile } from '../../io/new-file.js';
import { truncateFile } from '../../io/file.js';
import { createRawStream, openRawStream } from './stream.js';

export const rawCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  {
    name: 'preallocation',
    type: 'string',
    help: 'Preallocation mode (allowed values: off, falloc, full)',
  },
];

export class RawImage implements BlockImage {
  readonly format = 'raw';
  readonly backing = null;
  readonly allocationUnit = 512;
  readonly concurrentWrites = true;
  constructor(
    readonly file: HostFile,
    readonly filename: string,
  ) {}

  get virtualSize(): number {
    return alignUp(this.file.size, 512);
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    await this.file.read(buf, offset);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const max = Math.min(length, this.virtualSize - offset);
    if (this.file.statusAt) {
      // storage with its own block status (an NBD export): its answer is the layer's
      const st = await this.file.statusAt(offset, max);
      return { length: Math.max(1, Math.min(st.length, max)), data: st.data, zero: st.zero, hostOffset: offset, file: this.filename };
    }
    const run = this.file.runAt(offset, max);
    // Past the end of the file (the tail of the last sector) reads as a hole.
    const len = run.length > 0 ? run.length : max;
    return { length: len, data: run.data && run.length > 0, zero: !(run.data && run.length > 0), hostOffset: offset, file: this.filename };
  }

  plainRange(offset: number, length: number): { fd: number; hostOffset: number; length: number } | undefined {
    const fd = this.file.fd;
    if (fd === undefined || this.file.isBlockDevice) return undefined;
    return { fd, hostOffset: offset, length: Math.max(0, Math.min(length, this.file.size - offset)) };
  }

  private checkWrite(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkWrite(offset, data.length);
    await this.file.write(data, offset);
  }

  async writeZeroes(offset: number, length: number, opts: { mayUnmap?: boolean } = {}): Promise<void> {
    this.checkWrite(offset, length);
    if (this.file.writeZeroes) return this.file.writeZeroes(offset, length, { mayUnmap: !!opts.mayUnmap });
    if (await zeroFileRange(this.file, offset, length, !!opts.mayUnmap)) return;
    const chunk = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
    for (let pos = offset; pos < offset + length; pos += chunk.length) {
      await this.file.write(chunk.subarray(0, Math.min(chunk.length, offset + length - pos)), pos);
    }
  }

  async resize(size: number, opts: { preallocation?: 'off' | 'metadata' | 'falloc' | 'full' } = {}): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    const mode = opts.preallocation ?? 'off';
    if (mode === 'metadata') throw new QimgError("Unsupported preallocation mode 'metadata'", { file: this.filename });
    const old = this.file.size;
    try {
      await this.file.truncate(size);
    } catch (err) {
      // qemu's file protocol: "Could not resize file: <strerror>"
      throw new QimgError(`Could not resize file: ${describeSystemError(err)}`, { file: this.filename, cause: err });
    }
    if (size > old && mode === 'falloc') await allocateFile(this.file.fd, size, old);
    if (size > old && mode === 'full') {
      const zeros = Buffer.alloc(Math.min(size - old, 4 * 1024 * 1024));
      for (let p = old; p < size; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, size - p)), p);
    }
    await this.file.flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
    if (this.file.discard) return this.file.discard(offset, length);
    // Discard is advisory; a hole reads as zeros, which is what raw users expect.
    await zeroFileRange(this.file, offset, length, true);
  }

  async info(): Promise<ImageInfo> {
    return {
      filename: this.filename,
      format: 'raw',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      // qemu's raw asks its storage for the dirty flag; remote protocols have no answer
      dirtyFlag: this.file.remote ? undefined : false,
    };
  }

  async flush(): Promise<void> {
    if (this.file.writable) await this.file.flush();
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** Creates a raw image: a file of `size` bytes, sparse unless preallocated. */
async function createRaw(path: string, size: number, options: Map<string, OptionValue>): Promise<void> {
  const prealloc = (options.get('preallocation') as string | undefined) ?? 'off';
  if (prealloc === 'metadata') throw new QimgError('Unsupported preallocation mode: metadata');
  if (!['off', 'falloc', 'full'].includes(prealloc)) throw new QimgError(`invalid parameter value: ${prealloc}`);
  // The exact size from the options (not every size past 2^62 is a double). 2^63, what
  // 2^63 - 1 rounds up to, is a negative length to ftruncate, as in qemu.
  const given = options.get('size');
  const exact = typeof given === 'bigint' && Number(given) === size ? given : BigInt(size);
  if (exact > (1n << 63n) - 1n) throw new QimgError('Could not resize file: Invalid argument');
  // a file system's EFBIG, as qemu's file protocol words it here
  const reword = (err: unknown) => ((err as NodeJS.ErrnoException).code === 'EFBIG' ? new QimgError("The image size is too large for file format 'raw'") : err);
  // (an existing file stays as it is when the new length is refused)
  await checkNewFileLength(path, exact).catch((err: unknown) => Promise.reject(reword(err)));
  await writeNewFile(
    path,
    async (handle) => {
      await truncateFile(handle, exact > BigInt(Number.MAX_SAFE_INTEGER) ? exact : size);
      if (prealloc === 'falloc') await allocateFile(handle.fd, size);
      if (prealloc === 'full') {
        const zeros = Buffer.alloc(Math.min(size, 4 * 1024 * 1024));
        for (let p = 0; p < size; p += zeros.length) await handle.write(zeros, 0, Math.min(zeros.length, size - p), p);
      }
      // qemu-img writes the first 4 KiB of a new raw image (its alignment probe); so do we,
      // so that `map` of a fresh image looks the same.
      if (prealloc !== 'full' && size > 0) await handle.write(Buffer.alloc(Math.min(4096, size)), 0, Math.min(4096, size), 0);
      await handle.datasync();
    },
    reword,
  );
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  probe: () => 1,
  createOptions: rawCreateOptions,
  describeCreate: (size, o) => [`size=${size}`, ...(o.raw.has('preallocation') ? [`preallocation=${o.raw.get('preallocation')}`] : [])].join(' '),
  create: createRaw,
  supportsMeasure: true,
  createStream: createRawStream,
  openSequential: openRawStream,
  async open(file: HostFile, _ctx: OpenContext): Promise<BlockImage> {
    return new RawImage(file, file.path);
  },
};
