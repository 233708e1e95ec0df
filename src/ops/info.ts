/**
 * `info`: image metadata, one image or the whole backing chain. Each layer is opened
 * for metadata only (as qemu-img does), so a missing backing file does not stop a
 * plain `info`, and an encrypted image or absent data file still shows.
 */
import { realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import type { ImageInfo } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { MAX_CHAIN_DEPTH, openImage, type OpenOptions } from '../core/open.js';
import { assertReferenceAllowed } from '../core/open-policy.js';

/** --object secrets and --image-opts options for the image named on the command line */
export type ImageOpenExtras = Pick<OpenOptions, 'secrets' | 'imageOptions'>;

export async function imageInfo(filename: string, format?: string, forceShare = false, extras: ImageOpenExtras = {}): Promise<ImageInfo> {
  const img = await openImage(filename, { format, metadataOnly: true, forceShare, secrets: extras.secrets, imageOptions: extras.imageOptions });
  try {
    return await img.info();
  } finally {
    await img.close();
  }
}

/**
 * Info for every layer, top first; loops and excessive depth are errors. `extras`
 * options apply to the top image (qemu-img opens the lower layers by name).
 */
export async function chainInfo(filename: string, format?: string, forceShare = false, extras: ImageOpenExtras = {}): Promise<ImageInfo[]> {
  const out: ImageInfo[] = [];
  const seen = new Set<string>();
  let name: string | undefined = filename;
  let fmt = format;
  while (name !== undefined) {
    let real: string;
    try {
      real = realpathSync(name);
    } catch {
      real = resolve(name);
    }
    if (seen.has(real)) throw new QimgError(`Backing file '${name}' creates an infinite loop.`);
    if (out.length >= MAX_CHAIN_DEPTH) throw new QimgError(`Backing chain is deeper than ${MAX_CHAIN_DEPTH} images`);
    seen.add(real);
    let info: ImageInfo;
    try {
      info = await imageInfo(name, fmt, forceShare, out.length === 0 ? extras : { secrets: extras.secrets });
    } catch (err) {
      if (out.length === 0 || !(err instanceof QimgError)) throw err;
      throw new QimgError(err.message, { file: name, cause: err });
    }
    out.push(info);
    const next = info.fullBackingFilename ?? info.backingFilename;
    if (next !== undefined) assertReferenceAllowed(next, name, 'backing file');
    name = next;
    fmt = info.backingFilenameFormat;
  }
  return out;
}
