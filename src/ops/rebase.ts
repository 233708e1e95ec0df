/**
 * `rebase`: change an image's backing file. Safe mode first copies into the image
 * every range it does not own where the old and the new backing file differ (so its
 * content stays the same), then rewrites the header; `-u` only rewrites the header.
 * `-b ""` makes the image standalone.
 */
import type { BlockImage } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { openImage, resolveRelative, type OpenOptions } from '../core/open.js';
import { allocIoBuffer } from '../io/buffers.js';

export interface RebaseOptions {
  format?: string;
  backing: string;
  backingFormat?: string;
  unsafe?: boolean;
  /** -c: differing clusters are stored compressed */
  compress?: boolean;
  onProgress?: (done: number, total: number) => void;
  /** --object secrets (for every image opened) and --image-opts options (for the image) */
  secrets?: OpenOptions['secrets'];
  imageOptions?: OpenOptions['imageOptions'];
}

const CHUNK = 2 * 1024 * 1024;

export async function rebaseImage(filename: string, opts: RebaseOptions): Promise<void> {
  const removing = opts.backing === '';
  if (!removing && opts.backingFormat === undefined) {
    throw new QimgError(`Could not change the backing file to '${opts.backing}': backing format must be specified`, { file: filename });
  }
  const img = await openImage(filename, { format: opts.format, writable: true, noBacking: !!opts.unsafe, secrets: opts.secrets, imageOptions: opts.imageOptions });
  let fresh: BlockImage | null = null;
  try {
    // qemu-img's bdrv_change_backing_file() answer for formats without backing files (unnamed)
    if (!img.setBacking) throw new QimgError(`Could not change the backing file to '${opts.backing}': Operation not supported`, { file: '' });
    if (!opts.unsafe) {
      if (!removing) {
        try {
          fresh = await openImage(resolveRelative(opts.backing, filename), { format: opts.backingFormat, secrets: opts.secrets });
        } catch (err) {
          throw new QimgError(`Could not open new backing file '${opts.backing}': ${err instanceof Error ? err.message : String(err)}`, { file: filename });
        }
      }
      await copyDifferences(img, fresh, opts);
    }
    await img.flush();
    await img.setBacking(removing ? undefined : opts.backing, removing ? undefined : opts.backingFormat);
  } finally {
    if (fresh) await fresh.close();
    await img.close();
  }
}

const SKIP_BLOCK = 64 * 1024;

/** Where the image falls through to its backing file, keep what the old one showed. */
async function copyDifferences(img: BlockImage, fresh: BlockImage | null, opts: RebaseOptions): Promise<void> {
  const size = img.virtualSize;
  // qemu-img 7.2 compares 512-byte sectors and writes runs of differing ones (the rest
  // of a cluster comes from the old backing file, which agrees there): the written
  // ranges, and so the bits of persistent bitmaps, are qemu's. -c needs whole clusters.
  const compress = !!(opts.compress && img.compression && img.writeCompressed);
  const unit = compress ? (img.compression?.clusterSize ?? img.allocationUnit) : 512;
  const oldBuf = allocIoBuffer(CHUNK);
  const newBuf = allocIoBuffer(CHUNK);
  // Past the end of the old backing file the image read zeros: as qemu-img, differences
  // there are written as zeros (zero clusters), not as zero-filled data.
  const oldSize = img.backing?.virtualSize ?? 0;
  let done = 0;
  for (let pos = 0; pos < size; ) {
    const st = await img.layerStatus(pos, Math.min(size - pos, CHUNK, pos < oldSize ? oldSize - pos : Infinity));
    const n = st.length;
    const oldIsZero = pos >= oldSize;
    if (!(st.data || st.zero)) {
      // Unallocated here: compare old (through the chain) and new backing content.
      const a = oldBuf.subarray(0, n);
      const b = newBuf.subarray(0, n);
      await img.read(pos, a);
      await readOrZero(fresh, pos, b);
      if (!a.equals(b)) {
        // Only differing units get written; runs of them go out as one request.
        let runStart = -1;
        const flushRun = async (end: number) => {
          if (runStart < 0) return;
          const start = pos + runStart;
          if (oldIsZero) await img.writeZeroes(start, end - runStart);
          else await img.write(start, Buffer.from(a.subarray(runStart, end)));
          runStart = -1;
        };
        for (let p = 0; p < n; ) {
          // equal 64 KiB blocks are skipped whole: sectors are compared only where they differ
          if (!compress && n - p >= SKIP_BLOCK && a.subarray(p, p + SKIP_BLOCK).equals(b.subarray(p, p + SKIP_BLOCK))) {
            await flushRun(p);
            p += SKIP_BLOCK;
            continue;
          }
          const start = pos + p;
          const len = Math.min(unit - (start % unit), n - p);
          const differs = !a.subarray(p, p + len).equals(b.subarray(p, p + len));
          if (differs && compress && !oldIsZero && start % unit === 0 && len === unit) {
            await flushRun(p);
            const { compressUnit } = await import('./compress-one.js');
            const c = compressUnit(img.compression!.algorithm, a.subarray(p, p + len), unit, img.compression!.alwaysCompressed);
            if (c) await img.writeCompressed!(start, c);
            else await img.write(start, Buffer.from(a.subarray(p, p + len)));
          } else if (differs) {
            if (runStart < 0) runStart = p;
          } else {
            await flushRun(p);
          }
          p += len;
        }
        await flushRun(n);
      }
    }
    pos += n;
    done += n;
    opts.onProgress?.(done, size);
  }
}

async function readOrZero(img: BlockImage | null, offset: number, buf: Buffer): Promise<void> {
  if (!img || offset >= img.virtualSize) {
    buf.fill(0);
    return;
  }
  const n = Math.min(buf.length, img.virtualSize - offset);
  await img.read(offset, buf.subarray(0, n));
  buf.fill(0, n);
}
