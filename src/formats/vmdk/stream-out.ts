/**
 * A stream-optimized VMDK written in one forward pass (convert -O vmdk -o
 * subformat=streamOptimized SRC -), as the format is meant to be written: the header
 * says its grain directory is at the end (GD_AT_END), the descriptor follows, then
 * each grain as a marker (LBA, size, zlib data) in guest order, and after the last
 * grain the grain tables, the directory, the footer (a header with the directory's
 * real offset) and the end-of-stream marker.
 */
import { promisify } from 'node:util';
import type { StreamImageWriter } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { zlib } from '../../core/lazy-builtins.js';
import { crypto } from '../../core/lazy-builtins.js';
import type { SequentialOutput } from '../../io/stdio.js';
import { DEFAULT_GRAIN_SECTORS, DEFAULT_GT_ENTRIES, GD_AT_END, SECTOR } from './constants.js';
import { vmdkSpecFromOptions } from './create.js';
import { buildDescriptor } from './descriptor.js';
import { serializeVmdk4Header } from './header.js';
import { buildStreamTail, streamHeader } from './stream.js';

const GRAIN = DEFAULT_GRAIN_SECTORS * SECTOR;
/** Grains being compressed at once (zlib runs on the threadpool). */
const IN_FLIGHT = 8;
/** Grain records gathered into one write. */
const BATCH = 1024 * 1024;

/** The name the descriptor gives the extent: the stream's own file, whose name is not known here. */
const EXTENT_NAME = 'disk.vmdk';

export class VmdkStreamWriter implements StreamImageWriter {
  readonly mode = 'live';
  readonly unit = GRAIN;
  readonly zeroUnits = 'data';
  private readonly descriptor: string;
  private readonly capacity: number;
  private readonly tables: Array<Buffer | null>;
  private readonly deflate = promisify(zlib().deflate) as (b: Buffer) => Promise<Buffer>;
  /** the grain being gathered and how far it is filled */
  private grain = -1;
  private grainBuf: Buffer | null = null;
  private queue: Array<{ grain: number; zlib: Promise<Buffer> }> = [];
  private batch: Buffer[] = [];
  private batchBytes = 0;
  /** stream offset of the next record (the output position once the batch is written) */
  private pos = 0;

  constructor(
    private readonly out: SequentialOutput,
    private readonly size: number,
    options: Map<string, OptionValue>,
  ) {
    const spec = vmdkSpecFromOptions(size, options);
    if (spec.subformat !== 'streamOptimized') {
      throw new QimgError(`subformat ${spec.subformat} cannot be written to standard output (use -o subformat=streamOptimized)`);
    }
    if (spec.backingFile !== undefined) throw new QimgError('a backing file cannot be given to a stream-optimized VMDK on standard output');
    if (spec.zeroedGrain) throw new QimgError('zeroed_grain cannot be used with a stream-optimized VMDK on standard output');
    if (size % SECTOR !== 0) throw new QimgError('the size must be a multiple of 512 bytes');
    this.capacity = size / SECTOR;
    const heads = spec.adapterType === 'ide' ? 16 : 255;
    this.descriptor = buildDescriptor({
      cid: crypto().randomInt(0, 2 ** 32),
      parentCid: 0xffffffff,
      createType: 'streamOptimized',
      parentFileNameHint: undefined,
      extentLines: [`RW ${this.capacity} SPARSE "${EXTENT_NAME}"\n`],
      hwVersion: spec.hwVersion,
      cylinders: Math.floor(size / (63 * heads * SECTOR)),
      heads,
      adapterType: spec.adapterType,
      toolsVersion: spec.toolsVersion,
    });
    const grains = Math.ceil(this.capacity / DEFAULT_GRAIN_SECTORS);
    this.tables = new Array<Buffer | null>(Math.ceil(grains / DEFAULT_GT_ENTRIES)).fill(null);
  }

  async begin(): Promise<void> {
    const head = Buffer.alloc(DEFAULT_GRAIN_SECTORS * SECTOR);
    serializeVmdk4Header(streamHeader(this.capacity, GD_AT_END)).copy(head);
    const desc = Buffer.from(this.descriptor, 'latin1');
    if (desc.length > 20 * SECTOR) throw new QimgError('descriptor too long');
    desc.copy(head, SECTOR);
    await this.out.write(head);
    this.pos = head.length;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    for (let p = 0; p < data.length; ) {
      const at = offset + p;
      const g = Math.floor(at / GRAIN);
      if (g < this.grain) throw new QimgError(`internal error: stream data at ${at} out of order`);
      if (g !== this.grain) await this.closeGrain(g);
      const inGrain = at - g * GRAIN;
      const n = Math.min(GRAIN - inGrain, data.length - p);
      this.grainBuf ??= Buffer.alloc(GRAIN);
      data.copy(this.grainBuf, inGrain, p, p + n);
      p += n;
      if (inGrain + n === GRAIN) await this.closeGrain(g + 1);
    }
  }

  /** Hands the gathered grain to compression and starts gathering grain `next`. */
  private async closeGrain(next: number): Promise<void> {
    if (this.grainBuf) {
      const plain = this.grainBuf;
      const zlibbed = this.deflate(plain);
      zlibbed.catch(() => undefined);
      this.queue.push({ grain: this.grain, zlib: zlibbed });
      this.grainBuf = null;
      if (this.queue.length >= IN_FLIGHT) await this.drainOne();
    }
    this.grain = next;
  }

  /** Appends the oldest compressed grain as a marker record. */
  private async drainOne(): Promise<void> {
    const head = this.queue.shift()!;
    const z = await head.zlib;
    const record = Buffer.alloc(Math.ceil((12 + z.length) / SECTOR) * SECTOR);
    record.writeBigUInt64LE(BigInt(head.grain * DEFAULT_GRAIN_SECTORS), 0);
    record.writeUInt32LE(z.length, 8);
    z.copy(record, 12);
    if ((this.pos + record.length) / SECTOR > 2 ** 32) throw new QimgError('stream-optimized extent is full (grain offsets are limited to 2 TiB)');
    const t = Math.floor(head.grain / DEFAULT_GT_ENTRIES);
    const table = (this.tables[t] ??= Buffer.alloc(DEFAULT_GT_ENTRIES * 4));
    table.writeUInt32LE(this.pos / SECTOR, (head.grain % DEFAULT_GT_ENTRIES) * 4);
    this.batch.push(record);
    this.batchBytes += record.length;
    this.pos += record.length;
    if (this.batchBytes >= BATCH) await this.flushBatch();
  }

  private async flushBatch(): Promise<void> {
    if (this.batch.length === 0) return;
    const b = this.batch.length === 1 ? this.batch[0] : Buffer.concat(this.batch, this.batchBytes);
    this.batch = [];
    this.batchBytes = 0;
    await this.out.write(b);
  }

  async finish(): Promise<void> {
    await this.closeGrain(Math.ceil(this.size / GRAIN));
    while (this.queue.length > 0) await this.drainOne();
    await this.flushBatch();
    const header = streamHeader(this.capacity, GD_AT_END);
    const { tail } = buildStreamTail(this.tables, DEFAULT_GT_ENTRIES * 4, this.pos, header);
    await this.out.write(tail);
  }
}

export function createVmdkStream(out: SequentialOutput, size: number, options: Map<string, OptionValue>): StreamImageWriter {
  return new VmdkStreamWriter(out, size, options);
}
