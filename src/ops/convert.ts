/**
 * `convert` to a raw file: sources are concatenated; only data extents are read, and
 * zero runs of at least `sparseSize` bytes become holes. A failed conversion removes
 * the output file it created.
 */
import { open, stat, unlink } from 'node:fs/promises';
import { constants } from 'node:fs';
import type { BlockImage } from '../core/block-image.js';
import { extents } from '../core/block-status.js';
import { QimgError, describeSystemError } from '../core/errors.js';
import { allocateFile } from '../io/allocate.js';

export interface ConvertOptions {
  /** minimum zero run (bytes) left as a hole; 0 = allocate everything */
  sparseSize: number;
  /** raw target preallocation: falloc reserves blocks, full writes zeros */
  preallocation?: 'off' | 'falloc' | 'full';
}

const CHUNK = 2 * 1024 * 1024;

export async function convertToRaw(sources: BlockImage[], output: string, opts: ConvertOptions): Promise<void> {
  const total = sources.reduce((n, s) => n + s.virtualSize, 0);
  let isDevice = false;
  try {
    isDevice = (await stat(output)).isBlockDevice();
  } catch {
    // does not exist yet
  }
  let handle;
  try {
    handle = await open(output, isDevice ? constants.O_WRONLY : constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, 0o644);
  } catch (err) {
    throw new QimgError(`Could not create '${output}': ${describeSystemError(err)}`, { cause: err });
  }
  try {
    if (!isDevice) await handle.truncate(total);
    if (!isDevice && opts.preallocation === 'falloc') await allocateFile(handle.fd, total);
    const zeroBlock = opts.sparseSize > 0 ? Buffer.alloc(opts.sparseSize) : null;
    const buf = Buffer.allocUnsafe(CHUNK);
    const zeros = Buffer.alloc(CHUNK);
    let base = 0;
    for (const src of sources) {
      for await (const e of extents(src)) {
        for (let pos = e.offset; pos < e.offset + e.length; ) {
          const n = Math.min(CHUNK - (pos % CHUNK), e.offset + e.length - pos);
          if (e.kind === 'data') {
            const chunk = buf.subarray(0, n);
            await src.read(pos, chunk);
            await writeNonZero(handle, chunk, base + pos, opts.preallocation === 'full' ? null : zeroBlock);
          } else if (!zeroBlock || isDevice || opts.preallocation === 'full') {
            // -S 0 allocates everything; a device must really be zeroed.
            await writeAll(handle, zeros.subarray(0, n), base + pos);
          }
          pos += n;
        }
      }
      base += src.virtualSize;
    }
    await handle.sync();
    await handle.close();
  } catch (err) {
    await handle.close().catch(() => undefined);
    if (!isDevice) await unlink(output).catch(() => undefined);
    if (err instanceof QimgError) throw err;
    throw new QimgError(`error while writing '${output}': ${describeSystemError(err)}`, { cause: err });
  }
}

type Handle = Awaited<ReturnType<typeof open>>;

async function writeAll(h: Handle, data: Buffer, pos: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await h.write(data, done, data.length - done, pos + done);
    done += bytesWritten;
  }
}

/** Writes `chunk` at `pos`, skipping aligned blocks that are all zeros (native compare). */
async function writeNonZero(h: Handle, chunk: Buffer, pos: number, zeroBlock: Buffer | null): Promise<void> {
  if (!zeroBlock) return writeAll(h, chunk, pos);
  const bs = zeroBlock.length;
  let runStart = -1;
  let i = 0;
  while (i < chunk.length) {
    // Blocks are aligned to the guest offset so that results do not depend on chunking.
    const len = Math.min(bs - ((pos + i) % bs), chunk.length - i);
    const isZero = len === bs ? chunk.subarray(i, i + len).equals(zeroBlock) : chunk.subarray(i, i + len).equals(zeroBlock.subarray(0, len));
    if (!isZero && runStart < 0) runStart = i;
    if (isZero && runStart >= 0) {
      await writeAll(h, chunk.subarray(runStart, i), pos + runStart);
      runStart = -1;
    }
    i += len;
  }
  if (runStart >= 0) await writeAll(h, chunk.subarray(runStart), pos + runStart);
}
