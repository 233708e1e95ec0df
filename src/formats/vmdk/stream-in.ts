/**
 * A stream-optimized VMDK read in one forward pass (convert -f vmdk - OUT): the header,
 * then, from its grain offset on, grain markers in order. Each marker carries its LBA,
 * so the grain directory and tables (before the grains in qemu's layout, after them in
 * VMware's) are never needed. Every marker is checked before use: LBA inside the disk
 * and on a grain boundary, LBAs increasing, compressed size bounded, decompression
 * bounded to one grain; a stream that ends inside a record is truncated.
 */
import { promisify } from 'node:util';
import type { BlockImage, ImageInfo, LayerStatus } from '../../core/block-image.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { NeverWritable } from '../../core/read-only-image.js';
import { zlib } from '../../core/lazy-builtins.js';
import type { SequentialInput } from '../../io/stdio.js';
import {
  COMPRESSION_DEFLATE,
  FLAG_COMPRESS,
  FLAG_MARKER,
  GD_AT_END,
  MARKER_EOS,
  MARKER_FOOTER,
  MARKER_GRAIN_DIRECTORY,
  MARKER_GRAIN_TABLE,
  SECTOR,
  VMDK3_MAGIC,
  VMDK4_MAGIC,
} from './constants.js';
import { descriptorText, probeVmdk, readCid } from './descriptor.js';
import { parseVmdk4Header, type Vmdk4Header } from './header.js';

/** Largest grain held in memory (VMware and qemu write 64 KiB). */
const MAX_GRAIN_BYTES = 16 * 1024 * 1024;
/** Largest area skipped before the first grain (header, descriptor, qemu's tables). */
const MAX_GRAIN_OFFSET_BYTES = 1024 * 1024 * 1024;
/** Largest metadata record (grain table, directory, footer) skipped between grains. */
const MAX_METADATA_BYTES = 256 * 1024 * 1024;

const RANDOM_ACCESS = 'needs random access; only a stream-optimized VMDK can be read from standard input';

interface Marker {
  grain: number;
  size: number;
}

export class VmdkStreamImage extends NeverWritable implements BlockImage {
  readonly format = 'vmdk';
  readonly backing = null;
  readonly filename: string;
  readonly virtualSize: number;
  readonly allocationUnit: number;
  readonly stream = { sizeKnown: true };
  private readonly grainBytes: number;
  private readonly inflate = promisify(zlib().inflate) as (b: Buffer, o: { maxOutputLength: number }) => Promise<Buffer>;
  private chain: Promise<unknown> = Promise.resolve();
  /** the next grain marker read but whose data is still in the stream; null at the end */
  private next: Marker | null | undefined;
  private lastGrain = -1;
  /** the grain most recently inflated (a read may take it in parts) */
  private current: { grain: number; data: Buffer } | null = null;

  private constructor(
    private readonly input: SequentialInput,
    header: Vmdk4Header,
    private readonly needsEos: boolean,
  ) {
    super();
    this.filename = input.name;
    this.grainBytes = Number(header.granularity) * SECTOR;
    this.virtualSize = Number(header.capacity) * SECTOR;
    this.allocationUnit = this.grainBytes;
  }

  /** Reads and checks the header and descriptor; the stream is then at the first grain. */
  static async open(input: SequentialInput): Promise<VmdkStreamImage> {
    const file = input.name;
    const head = Buffer.alloc(SECTOR);
    const got = await input.readFully(head);
    if (got < 4 || probeVmdk(head.subarray(0, got)) === 0) throw new CorruptImageError(file, 'Image not in VMDK format');
    const magic = head.readUInt32BE(0);
    if (magic === VMDK3_MAGIC || magic !== VMDK4_MAGIC) throw new QimgError(RANDOM_ACCESS, { file });
    if (got < SECTOR) throw new CorruptImageError(file, 'truncated VMDK header');
    const h = parseVmdk4Header(head);
    const stream = (h.flags & FLAG_COMPRESS) !== 0 && (h.flags & FLAG_MARKER) !== 0 && h.compressAlgorithm === COMPRESSION_DEFLATE;
    if (!stream) throw new QimgError(RANDOM_ACCESS, { file });
    if (h.version > 3) throw new CorruptImageError(file, `Unsupported VMDK version ${h.version}`);
    if (h.granularity === 0n || h.granularity > BigInt(MAX_GRAIN_BYTES / SECTOR)) {
      throw new CorruptImageError(file, `grain size of ${h.granularity} sectors is not supported on a stream (at most ${MAX_GRAIN_BYTES / SECTOR})`);
    }
    if (h.capacity === 0n || h.capacity > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) {
      throw new CorruptImageError(file, `invalid capacity of ${h.capacity} sectors`);
    }
    const grainStart = h.grainOffset * BigInt(SECTOR);
    if (h.grainOffset === 0n || grainStart > BigInt(MAX_GRAIN_OFFSET_BYTES)) throw new CorruptImageError(file, `invalid grain offset ${h.grainOffset}`);
    // the embedded descriptor: a stream has no parent to read unallocated grains from
    const descStart = Number(h.descOffset) * SECTOR;
    const descEnd = descStart + Number(h.descSize) * SECTOR;
    if (h.descOffset > 0n && h.descSize > 0n && descEnd <= Number(grainStart) && descStart >= SECTOR) {
      await input.skip(descStart - input.position);
      const desc = Buffer.alloc(Math.min(descEnd - descStart, 1024 * 1024));
      await input.readFully(desc);
      const text = descriptorText(desc);
      const parent = readCid(text, true);
      if (parent !== undefined && parent !== 0xffffffff) throw new QimgError('a stream-optimized VMDK with a parent image cannot be read from standard input', { file });
    }
    const rest = Number(grainStart) - input.position;
    if ((await input.skip(rest)) < rest) throw new CorruptImageError(file, 'truncated stream: it ends before its first grain');
    return new VmdkStreamImage(input, h, h.gdOffset === GD_AT_END);
  }

  /** Runs stream operations one at a time, in call order (the stream only goes forward). */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  private corrupt(message: string): CorruptImageError {
    return new CorruptImageError(this.filename, `${message} (stream offset ${this.input.position})`);
  }

  /** Reads marker headers until the next grain marker (skipping tables, directory and footer) or the end. */
  private async loadNext(): Promise<Marker | null> {
    if (this.next !== undefined) return this.next;
    const sector = Buffer.alloc(SECTOR);
    for (;;) {
      const got = await this.input.readFully(sector.subarray(0, 12));
      if (got === 0 && !this.needsEos) return (this.next = null);
      if (got < 12) throw this.corrupt(this.needsEos ? 'truncated stream: it ends before its end-of-stream marker' : 'truncated stream: it ends inside a marker');
      const value = sector.readBigUInt64LE(0);
      const size = sector.readUInt32LE(8);
      if (size !== 0) {
        if (value % BigInt(this.grainBytes / SECTOR) !== 0n) throw this.corrupt(`grain marker LBA ${value} is not on a grain boundary`);
        if (value * BigInt(SECTOR) >= BigInt(this.virtualSize)) throw this.corrupt(`grain marker LBA ${value} is past the end of the disk`);
        // deflate never grows data by more than a few bytes per 16 KiB block
        const bound = this.grainBytes + Math.ceil(this.grainBytes / 1024) + 1024;
        if (size > bound) throw this.corrupt(`grain marker size ${size} is too large for a grain of ${this.grainBytes} bytes`);
        const grain = Number(value) / (this.grainBytes / SECTOR);
        if (grain <= this.lastGrain) throw this.corrupt(`grain markers out of order (LBA ${value} after LBA ${this.lastGrain * (this.grainBytes / SECTOR)}); the stream needs random access`);
        this.lastGrain = grain;
        return (this.next = { grain, size });
      }
      // a metadata marker: the rest of its sector, then `value` sectors of metadata
      if ((await this.input.readFully(sector.subarray(12))) < SECTOR - 12) throw this.corrupt('truncated stream: it ends inside a marker');
      const type = sector.readUInt32LE(12);
      if (type === MARKER_EOS) return (this.next = null);
      if (type !== MARKER_GRAIN_TABLE && type !== MARKER_GRAIN_DIRECTORY && type !== MARKER_FOOTER) throw this.corrupt(`unknown stream marker type ${type}`);
      const bytes = value * BigInt(SECTOR);
      if (bytes > BigInt(MAX_METADATA_BYTES)) throw this.corrupt(`stream marker of ${value} sectors is too large`);
      if ((await this.input.skip(Number(bytes))) < Number(bytes)) throw this.corrupt('truncated stream: it ends inside a metadata record');
    }
  }

  /** Takes the next grain's data out of the stream and inflates it (at most one grain). */
  private async consume(m: Marker): Promise<Buffer> {
    const z = Buffer.alloc(m.size);
    if ((await this.input.readFully(z)) < m.size) throw this.corrupt('truncated stream: it ends inside a grain');
    const pad = (SECTOR - ((12 + m.size) % SECTOR)) % SECTOR;
    if ((await this.input.skip(pad)) < pad && this.needsEos) throw this.corrupt('truncated stream: it ends inside a grain');
    this.next = undefined;
    let plain: Buffer;
    try {
      plain = await this.inflate(z, { maxOutputLength: this.grainBytes });
    } catch (err) {
      const why = (err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE' ? 'inflates to more than one grain' : 'does not inflate';
      throw this.corrupt(`grain at LBA ${m.grain * (this.grainBytes / SECTOR)} ${why}`);
    }
    const data = Buffer.alloc(this.grainBytes);
    plain.copy(data);
    return data;
  }

  layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return this.serial(async () => {
      const g = Math.floor(offset / this.grainBytes);
      const grainEnd = Math.min(this.virtualSize, (g + 1) * this.grainBytes);
      const max = Math.min(length, this.virtualSize - offset);
      if (this.current?.grain === g) return { length: Math.min(max, grainEnd - offset), data: true, zero: false };
      let m = await this.loadNext();
      // grains the caller went past without reading are dropped
      while (m && m.grain < g) {
        await this.consume(m);
        m = await this.loadNext();
      }
      if (m && m.grain === g) return { length: Math.min(max, grainEnd - offset), data: true, zero: false };
      const until = m ? m.grain * this.grainBytes : this.virtualSize;
      return { length: Math.min(max, until - offset), data: false, zero: false };
    });
  }

  read(offset: number, buf: Buffer): Promise<void> {
    return this.serial(async () => {
      for (let p = 0; p < buf.length; ) {
        const at = offset + p;
        const g = Math.floor(at / this.grainBytes);
        const inGrain = at - g * this.grainBytes;
        const n = Math.min(buf.length - p, this.grainBytes - inGrain);
        if (this.current && g < this.current.grain) throw new QimgError(`a stream cannot be read backwards (offset ${at})`, { file: this.filename });
        if (this.current?.grain !== g) {
          let m = await this.loadNext();
          while (m && m.grain < g) {
            await this.consume(m);
            m = await this.loadNext();
          }
          if (m && m.grain === g) this.current = { grain: g, data: await this.consume(m) };
        }
        if (this.current?.grain === g) this.current.data.copy(buf, p, inGrain, inGrain + n);
        else buf.fill(0, p, p + n);
        p += n;
      }
    });
  }

  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize };
  }

  async close(): Promise<void> {}
}

export function openVmdkStream(input: SequentialInput): Promise<BlockImage> {
  return VmdkStreamImage.open(input);
}
