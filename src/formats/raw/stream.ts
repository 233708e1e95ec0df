/**
 * raw through pipes: written to a stream, the disk's bytes go out in order with holes
 * as zeros (a pipe cannot have holes); read from a stream, the disk is whatever comes
 * until its end, read forward only. A pipe does not tell its length in advance: such
 * a source has an unknown size (`sizeKnown` false) until its end is reached.
 */
import type { BlockImage, ImageInfo, LayerStatus } from '../../core/block-image.js';
import type { StreamImageWriter } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { NeverWritable } from '../../core/read-only-image.js';
import { alignUp } from '../../core/units.js';
import type { SequentialInput, SequentialOutput } from '../../io/stdio.js';

const ZERO_CHUNK = 1024 * 1024;
let zeros: Buffer | undefined;

export class RawStreamWriter implements StreamImageWriter {
  readonly mode = 'live';
  readonly unit = 512;
  readonly zeroUnits = 'data';

  constructor(
    private readonly out: SequentialOutput,
    private readonly size: number,
    options: Map<string, OptionValue>,
  ) {
    const prealloc = options.get('preallocation');
    if (prealloc !== undefined && prealloc !== 'off') throw new QimgError(`preallocation=${String(prealloc)} cannot be written to standard output`);
  }

  async begin(): Promise<void> {}

  private async zerosTo(offset: number): Promise<void> {
    zeros ??= Buffer.alloc(ZERO_CHUNK);
    while (this.out.position < offset) await this.out.write(zeros.subarray(0, Math.min(ZERO_CHUNK, offset - this.out.position)));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    if (offset < this.out.position) throw new QimgError(`internal error: stream data at ${offset} after ${this.out.position}`);
    await this.zerosTo(offset);
    await this.out.write(data);
  }

  async finish(): Promise<void> {
    await this.zerosTo(this.size);
  }
}

/**
 * A raw disk read from a stream. Reads must come in increasing offsets; the part of a
 * read past the end of the stream reads as zeros. With an unknown size the image
 * claims the largest size (stream.sizeKnown false): take it with stream.readNext.
 */
export class RawStreamImage extends NeverWritable implements BlockImage {
  readonly format = 'raw';
  readonly backing = null;
  readonly allocationUnit = 512;
  readonly filename: string;
  private chain: Promise<unknown> = Promise.resolve();
  private ended = false;

  constructor(private readonly input: SequentialInput) {
    super();
    this.filename = input.name;
    this.stream = { sizeKnown: input.knownSize !== undefined, readNext: (buf) => this.readSome(buf) };
  }

  readonly stream: { sizeKnown: boolean; readNext(buf: Buffer): Promise<number> };

  get virtualSize(): number {
    return this.input.knownSize !== undefined ? alignUp(this.input.knownSize, 512) : Number.MAX_SAFE_INTEGER;
  }

  read(offset: number, buf: Buffer): Promise<void> {
    const run = this.chain.then(() => this.readNow(offset, buf));
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Fills `buf` from the stream; returns how many bytes the stream still had. */
  readSome(buf: Buffer): Promise<number> {
    const run = this.chain.then(async () => {
      const n = this.ended ? 0 : await this.input.readFully(buf);
      if (n < buf.length) this.ended = true;
      return n;
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  private async readNow(offset: number, buf: Buffer): Promise<void> {
    const pos = this.input.position;
    if (offset < pos) throw new QimgError(`a stream cannot be read backwards (offset ${offset} after ${pos})`, { file: this.filename });
    if (offset > pos && !this.ended) {
      const skipped = await this.input.skip(offset - pos);
      if (skipped < offset - pos) this.ended = true;
    }
    const n = this.ended ? 0 : await this.input.readFully(buf);
    if (n < buf.length) {
      this.ended = true;
      buf.fill(0, n);
    }
  }

  /** Everything is data: a stream tells nothing about holes (zero detection finds them). */
  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return { length: Math.min(length, this.virtualSize - offset), data: true, zero: false };
  }

  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize };
  }

  async close(): Promise<void> {}
}

export function createRawStream(out: SequentialOutput, size: number, options: Map<string, OptionValue>): StreamImageWriter {
  return new RawStreamWriter(out, size, options);
}

export async function openRawStream(input: SequentialInput): Promise<BlockImage> {
  return new RawStreamImage(input);
}
