/**
 * `commit`: everything allocated in the image (and in the layers above BASE) is
 * written into BASE — data as data, zero ranges as zeros; BASE grows when smaller.
 * The image is then emptied, unless told to keep it (-d; -b implies -d, as layers
 * between would otherwise change meaning). Data reaches BASE before anything is
 * dropped from the image, so an interrupted commit leaves every image readable.
 */
import { realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import type { BlockImage } from '../core/block-image.js';
import { QimgError, asQimgError } from '../core/errors.js';
import { openImage, resolveRelative, type OpenOptions } from '../core/open.js';
import { backingImageOptions } from '../core/secrets.js';
import { extentAt } from '../core/block-status.js';
import { copyImages } from './copy-engine.js';

function samePath(a: string, b: string): boolean {
  const real = (p: string) => {
    try {
      return realpathSync(p);
    } catch {
      return resolve(p);
    }
  };
  return real(a) === real(b);
}

export interface CommitOptions {
  format?: string;
  /** -b: commit down to this backing file (default: the image's direct backing file) */
  base?: string;
  /** -d: do not empty the image afterwards */
  drop?: boolean;
  parallel?: number;
  /** -r: at most this many bytes of data per second (charged after each chunk, as qemu's block job) */
  rateLimit?: number;
  onProgress?: (done: number, total: number) => void;
  /** --object secrets (for every layer) and --image-opts options (for the image; `backing.` ones go down the chain) */
  secrets?: OpenOptions['secrets'];
  imageOptions?: OpenOptions['imageOptions'];
}

export async function commitImage(filename: string, opts: CommitOptions = {}): Promise<void> {
  // BASE is reopened below to be written: the chain's own handle on it takes no lock.
  const top = await openImage(filename, { format: opts.format, writable: true, shareBacking: true, secrets: opts.secrets, imageOptions: opts.imageOptions });
  let base: BlockImage | null = null;
  try {
    if (!top.backing) throw new QimgError('Image does not have a backing file', { file: filename });
    // Find BASE in the chain and how deep it lies.
    let depth = 1;
    let layer: BlockImage | null = top.backing;
    if (opts.base !== undefined) {
      // As qemu's bdrv_find_backing_image: BASE is named relative to the directory of the
      // image whose backing file it would be, not to the current directory.
      let above: BlockImage = top;
      while (layer && !samePath(layer.filename, resolveRelative(opts.base, above.filename))) {
        above = layer;
        layer = layer.backing;
        depth++;
      }
      if (!layer) throw new QimgError(`Did not find '${opts.base}' in the backing chain of '${filename}'`);
    }
    const baseLayer = layer!;
    // BASE is opened with its own backing chain: growing it must zero the new area where
    // a longer file below BASE would otherwise show through (qemu writes zeros there).
    // BASE gets the options the chain gave it (`backing.` once per level above it)
    let baseOptions = opts.imageOptions;
    for (let d = 0; d < depth; d++) baseOptions = backingImageOptions(baseOptions);
    base = namingErrors(
      await openImage(baseLayer.filename, { format: baseLayer.format, writable: true, secrets: opts.secrets, imageOptions: baseOptions }),
      baseLayer.filename,
    );
    if (base.virtualSize < top.virtualSize) {
      if (!base.resize) throw new QimgError(`Could not resize '${baseLayer.filename}' to the image's size`, { file: filename });
      await base.resize(top.virtualSize);
    }
    await copyImages([top], base, {
      sparseSize: 4096,
      targetIsZero: false,
      aboveDepth: depth,
      parallel: opts.parallel ?? 8,
      targetGranularity: base.allocationUnit,
      onProgress: opts.onProgress,
      rateLimit: opts.rateLimit,
      rateCharge: 'after',
    });
    await zeroPastShorterLayers(top, base, depth);
    await base.flush();
    await base.close();
    base = null;
    const drop = opts.drop || opts.base !== undefined;
    // qemu-img leaves the top as it is when its format cannot be emptied (ENOTSUP: vmdk, qed)
    if (!drop && top.makeEmpty) await top.makeEmpty();
  } finally {
    if (base) await base.close().catch(() => undefined);
    await top.close();
  }
}

/**
 * Past the end of a layer between FILE and BASE, FILE reads zeros that no layer above
 * BASE allocates: qemu's block status counts them as allocated zeros of the layer above
 * the short one, so commit writes them into BASE. Without this BASE would show its old
 * data (or its backing file's) there. (BASE itself is grown first, as qemu does, and
 * its resize zeroes what a longer file below it would show.)
 */
async function zeroPastShorterLayers(top: BlockImage, base: BlockImage, depth: number): Promise<void> {
  let shortest = Infinity;
  let layer = top.backing;
  for (let d = 1; layer && d < depth; d++, layer = layer.backing) shortest = Math.min(shortest, layer.virtualSize);
  for (let pos = shortest; pos < top.virtualSize; ) {
    const e = await extentAt(top, pos, top.virtualSize - pos);
    if (!e.present && e.depth < depth) await base.writeZeroes(pos, e.length, { mayUnmap: true });
    pos += e.length;
  }
}

/**
 * BASE with its system errors (ENOSPC, EIO while writing or flushing it) reported as
 * errors about BASE: the CLI would otherwise name the image being committed.
 */
function namingErrors(img: BlockImage, file: string): BlockImage {
  const tag = (err: unknown) => asQimgError(err, file);
  return new Proxy(img, {
    get(target, prop) {
      const value: unknown = Reflect.get(target, prop, target);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        try {
          const r: unknown = value.apply(target, args);
          return r instanceof Promise ? r.catch((err: unknown) => Promise.reject(tag(err))) : r;
        } catch (err) {
          throw tag(err);
        }
      };
    },
  });
}
