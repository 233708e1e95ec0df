/**
 * What every read-only host storage shares (an archive member, an HTTP resource): the
 * write refusals, a flush with nothing to do, and readBytes over the subclass's read.
 */
import { QimgError } from '../core/errors.js';

export abstract class ReadOnlyHost {
  readonly writable = false;
  abstract readonly path: string;
  abstract read(buf: Buffer, pos: number): Promise<void>;

  async readBytes(pos: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.read(buf, pos);
    return buf;
  }

  write(): Promise<void> {
    return Promise.reject(new QimgError('image is opened read-only', { file: this.path }));
  }

  truncate(): Promise<void> {
    return Promise.reject(new QimgError('image is opened read-only', { file: this.path }));
  }

  async flush(): Promise<void> {}
}
