/**
 * Copying a source whose size is known only at its end (a raw disk piped into
 * standard input) into an image file: the target starts empty and is grown to each
 * chunk's end as the chunk arrives (or, with -n, must already be large enough).
 * Zero runs are found as the copy engine finds them.
 */
import type { BlockImage } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { alignUp } from '../core/units.js';
import { CHUNK, writeWithZeroDetection } from './copy-engine.js';

export interface GrowCopyOptions {
  sparseSize: number;
  targetIsZero: boolean;
  /** the target's allocation unit (zero detection never splits one) */
  targetGranularity: number;
  /** -n: write into the existing target as it is (never resized) */
  fixedSize: boolean;
  writeData?: (offset: number, data: Buffer) => Promise<void>;
  onProgress?: (done: number, total: number) => void;
}

/** Why `target` cannot take a source of unknown size, or undefined. */
export function growRefusal(target: BlockImage, fixedSize: boolean): string | undefined {
  if (fixedSize || target.resize) return undefined;
  return `the size of a raw pipe is known only at its end, and a ${target.format} image cannot grow as it arrives; redirect a file (< FILE) instead, or write raw or qcow2`;
}

export async function copyGrowing(src: BlockImage, target: BlockImage, opts: GrowCopyOptions): Promise<void> {
  const readNext = src.stream?.readNext;
  if (!readNext) throw new QimgError('internal error: not a stream of unknown size');
  const write = opts.writeData ?? ((o: number, d: Buffer) => target.write(o, d));
  const unit = opts.sparseSize > 0 ? Math.max(opts.sparseSize, opts.targetGranularity) : 0;
  const zeroUnit = unit > 0 ? Buffer.alloc(unit) : null;
  // two buffers: the next chunk is read while the last one is written
  const bufs = [Buffer.alloc(CHUNK), Buffer.alloc(CHUNK)];
  let pos = 0;
  let which = 0;
  let pending = readNext(bufs[0]);
  for (;;) {
    const n = await pending;
    if (n === 0) break;
    const buf = bufs[which];
    which ^= 1;
    const end = alignUp(pos + n, 512);
    buf.fill(0, n, end - pos);
    pending = n < CHUNK ? Promise.resolve(0) : readNext(bufs[which]);
    pending.catch(() => undefined);
    if (end > target.virtualSize) {
      if (opts.fixedSize) throw new QimgError('output file is smaller than input file', { file: '' });
      await target.resize!(end);
    }
    const data = buf.subarray(0, end - pos);
    if (opts.sparseSize === 0) await write(pos, data);
    else await writeWithZeroDetection(pos, data, zeroUnit, opts.targetIsZero, write, target);
    pos = end;
    opts.onProgress?.(pos, pos);
  }
}
