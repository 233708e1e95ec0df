/**
 * A read-only window [start, start + length) of another host file: a member of a tar
 * archive (an OVA's disk) opened as an image without unpacking it.
 */
import { QimgError } from '../core/errors.js';
import type { HostFile } from './host.js';
import { ReadOnlyHost } from './read-only-host.js';
import type { FileRun } from './sparse.js';

export class SliceFile extends ReadOnlyHost implements HostFile {
  constructor(
    private readonly parent: HostFile,
    private readonly start: number,
    readonly size: number,
    readonly path: string,
    /** close the parent with this slice */
    private readonly ownsParent = false,
  ) {
    super();
    if (start < 0 || size < 0 || start + size > parent.size) {
      throw new QimgError(`member lies outside the archive (offset ${start}, length ${size})`, { file: parent.path });
    }
  }

  async read(buf: Buffer, pos: number): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.size - pos));
    if (inside > 0) await this.parent.read(inside === buf.length ? buf : buf.subarray(0, inside), this.start + pos);
    if (inside < buf.length) buf.fill(0, inside);
  }

  async allocatedSize(): Promise<number> {
    return this.size;
  }

  runAt(pos: number, length: number): FileRun {
    const max = Math.max(0, Math.min(length, this.size - pos));
    if (max === 0) return { data: false, length: 0, eof: true };
    const run = this.parent.runAt(this.start + pos, max);
    const len = run.length > 0 ? Math.min(run.length, max) : max;
    return { data: run.length > 0 ? run.data : true, length: len, eof: pos + len >= this.size };
  }

  async close(): Promise<void> {
    if (this.ownsParent) await this.parent.close();
  }
}
