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
import { QimgError } from '../core/errors.js';
import { openImage } from '../core/open.js';
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
  onProgress?: (done: number, total: number) => void;
}

export async function commitImage(filename: string, opts: CommitOptions = {}): Promise<void> {
  // BASE is reopened below to be written: the chain's own handle on it takes no lock.
  const top = await openImage(filename, { format: opts.format, writable: true, shareBacking: true });
  let base: BlockImage | null = null;
  try {
    if (!top.backing) throw new QimgError('Image does not have a backing file', { file: filename });
    // Find BASE in the chain and how deep it lies.
    let depth = 1;
    let layer: BlockImage | null = top.backing;
    if (opts.base !== undefined) {
      while (layer && !samePath(layer.filename, opts.base)) {
        layer = layer.backing;
        depth++;
      }
      if (!layer) throw new QimgError(`Did not find '${opts.base}' in the backing chain of '${filename}'`);
    }
    const baseLayer = layer!;
    base = await openImage(baseLayer.filename, { format: baseLayer.format, writable: true, noBacking: true });
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
    });
    await base.flush();
    await base.close();
    base = null;
    const drop = opts.drop || opts.base !== undefined;
    if (!drop) {
      if (!top.makeEmpty) throw new QimgError(`Could not empty '${filename}': operation not supported for this format`);
      await top.makeEmpty();
    }
  } finally {
    if (base) await base.close().catch(() => undefined);
    await top.close();
  }
}
