/**
 * The part every read-only format shares (dmg, bochs, cloop): no backing file, no
 * writes, and qemu's answer for block status of formats that have none (all data, no
 * host offset). A driver extends it with its reads and info.
 */
import type { BlockImage, ImageInfo, LayerStatus } from './block-image.js';
import { QimgError } from './errors.js';
import type { HostFile } from '../io/host.js';

/** Every image that can never be written (read-only formats, views, OVA): writes refused, nothing to flush. */
export abstract class NeverWritable {
  abstract readonly filename: string;
  readonly readOnly = true;

  /** Why writes are refused (a subclass may say more). */
  protected readOnlyReason(): string {
    return 'image is opened read-only';
  }

  private refuse(): Promise<never> {
    return Promise.reject(new QimgError(this.readOnlyReason(), { file: this.filename }));
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

  async flush(): Promise<void> {}
}

export abstract class ReadOnlyImage extends NeverWritable implements BlockImage {
  abstract readonly format: string;
  abstract readonly virtualSize: number;
  abstract readonly allocationUnit: number;
  readonly backing = null;

  constructor(
    protected readonly file: HostFile,
    readonly filename: string,
  ) {
    super();
  }

  abstract read(offset: number, buf: Buffer): Promise<void>;

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return { length: Math.min(length, this.virtualSize - offset), data: true, zero: false };
  }

  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize, actualSize: await this.file.allocatedSize() };
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
