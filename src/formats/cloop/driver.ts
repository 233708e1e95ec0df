/**
 * cloop (read-only): the compressed loopback format of Knoppix, V2.0 as qemu reads it:
 * a shell-script header, block size and block count (big-endian, at 128), n+1
 * big-endian 64-bit offsets, then one zlib stream per block. qemu's limits: block size
 * a multiple of 512 up to 64 MiB, offsets table up to 512 MiB, compressed blocks up to
 * 128 MiB, offsets monotonic.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { ReadOnlyImage } from '../../core/read-only-image.js';
import type { HostFile } from '../../io/host.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { zlib } from '../../core/lazy-builtins.js';

const MAGIC = Buffer.from('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n', 'latin1');
const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
const MAX_OFFSETS_SIZE = 512 * 1024 * 1024;
const TABLE_AT = 136;

function readOnlyRefusal(file: HostFile): QimgError {
  return new QimgError(`Could not open '${file.path}': Image is read-only`, { file: file.path });
}

class CloopImage extends ReadOnlyImage {
  readonly format = 'cloop';
  readonly virtualSize: number;
  readonly allocationUnit: number;
  /** the last block inflated (qemu keeps one too): sequential reads inflate once */
  private cached: { index: number; data: Promise<Buffer> } | null = null;

  constructor(
    file: HostFile,
    filename: string,
    private readonly blockSize: number,
    private readonly offsets: Float64Array,
  ) {
    super(file, filename);
    this.virtualSize = (offsets.length - 1) * blockSize;
    this.allocationUnit = blockSize;
  }

  private block(index: number, at: number): Promise<Buffer> {
    if (this.cached?.index === index) return this.cached.data;
    const data = (async () => {
      const start = this.offsets[index];
      const length = this.offsets[index + 1] - start;
      const compressed = await this.file.readBytes(start, length);
      let out: Buffer;
      try {
        out = zlib().inflateSync(compressed, { maxOutputLength: this.blockSize });
      } catch {
        throw new QimgError(`error while reading at byte ${at}: Input/output error`, { file: '' });
      }
      if (out.length !== this.blockSize) throw new QimgError(`error while reading at byte ${at}: Input/output error`, { file: '' });
      return out;
    })();
    this.cached = { index, data };
    data.catch(() => {
      if (this.cached?.data === data) this.cached = null;
    });
    return data;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const index = Math.floor(pos / this.blockSize);
      const inBlock = pos - index * this.blockSize;
      const n = Math.min(buf.length - done, this.blockSize - inBlock);
      const data = await this.block(index, pos);
      data.copy(buf, done, inBlock, inBlock + n);
      done += n;
    }
  }





}

async function openCloop(file: HostFile, writable: boolean): Promise<BlockImage> {
  const name = file.path;
  if (writable) throw readOnlyRefusal(file);
  const head = await file.readBytes(128, 8);
  const blockSize = head.readUInt32BE(0);
  if (blockSize % 512) throw new CorruptImageError(name, `block_size ${blockSize} must be a multiple of 512`);
  if (blockSize === 0) throw new CorruptImageError(name, 'block_size cannot be zero');
  if (blockSize > MAX_BLOCK_SIZE) throw new CorruptImageError(name, `block_size ${blockSize} must be 64 MB or less`);
  const nBlocks = head.readUInt32BE(4);
  const maxBlocks = Math.floor((0xffffffff - 1) / 8);
  if (nBlocks > maxBlocks) throw new CorruptImageError(name, `n_blocks ${nBlocks} must be ${maxBlocks} or less`);
  const count = nBlocks + 1;
  if (count * 8 > MAX_OFFSETS_SIZE) throw new CorruptImageError(name, 'image requires too many offsets, try increasing block size');
  // entries past the end of the file read as zeros (as qemu's reads): memory stays
  // bounded by the file
  const inFile = Math.max(0, Math.min(count, Math.floor((file.size - TABLE_AT) / 8)));
  const raw = await file.readBytes(TABLE_AT, inFile * 8);
  const offsets = new Float64Array(count);
  let prev = 0n;
  for (let i = 0; i < count; i++) {
    const v = i < inFile ? raw.readBigUInt64BE(8 * i) : 0n;
    if (i > 0) {
      if (v < prev) throw new CorruptImageError(name, `offsets not monotonically increasing at index ${i}, image file is corrupt`);
      if (v - prev > BigInt(2 * MAX_BLOCK_SIZE)) {
        throw new CorruptImageError(name, `invalid compressed block size at index ${i}, image file is corrupt`);
      }
    }
    // beyond 2^53 a block cannot be inside any file: reading it fails either way
    offsets[i] = Number(v);
    prev = v;
  }
  return new CloopImage(file, name, blockSize, offsets);
}

export const cloopDriver: FormatDriver = {
  name: 'cloop',
  probe: (head) => {
    const padded = head.length >= MAGIC.length ? head : Buffer.concat([head, Buffer.alloc(MAGIC.length - head.length)]);
    return padded.subarray(0, MAGIC.length).equals(MAGIC) ? 2 : 0;
  },
  createOptions: [],
  describeCreate: () => '',
  open: (file, ctx) => openCloop(file, !!ctx.options.writable && file.writable),
};
