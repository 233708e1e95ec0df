/**
 * The part every read-only format shares (dmg, bochs, cloop): no backing file, no
 * writes, and qemu's answer for block status of formats that have none (all data, no
 * host offset). A driver extends it with its reads and info.
 */
import type { BlockImage, ImageInfo, LayerStatus } from './block-image.js';
import { QimgError } from './errors.js';
import type { HostFile } from '../io/host.js';

export abstract class ReadOnlyImage implements BlockImage {
  abstract readonly format: string;
  abstract readonly virtualSize: number;
  abstract readonly allocationUnit: number;
  readonly backing = null;
  readonly readOnly = true;

  constructor(
    protected readonly file: HostFile,
    readonly filename: string,
  ) {}

  abstract read(offset: number, buf: Buffer): Promise<void>;

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return { length: Math.min(length, this.virtualSize - offset), data: true, zero: false };
  }

  private refuse(): Promise<never> {
    return Promise.reject(new QimgError('image is opened read-only', { file: this.filename }));
  }

  write(): Promise<void> {
    return this.refuse();
  }

  writeZeroes(): Promise<void> {
    return this.refuse();
  }

  discard(): Promise<void> {
    return this.refuse();
  }

  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize, actualSize: await this.file.allocatedSize() };
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    await this.file.close();
  }
}
