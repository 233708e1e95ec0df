/**
 * qimg as a library: open raw and qcow2 images (with their backing chains), read
 * guest data, ask block status, get `info` data, convert to raw.
 */
import { registerFormats } from './formats/index.js';

registerFormats();

export type { BlockImage, Extent, ExtentKind, ImageInfo, LayerStatus, SnapshotInfo } from './core/block-image.js';
export { QimgError, CorruptImageError, UnsupportedError } from './core/errors.js';
export { openImage, type OpenOptions } from './core/open.js';
export { extents, extentAt } from './core/block-status.js';
export { parseImageSize, parseSizeString, sizeToStr } from './core/size.js';
export { imageInfo, chainInfo } from './ops/info.js';
export { mapImage } from './ops/map.js';
export { convert, convertToRaw, type ConvertOptions, type ConvertRequest } from './ops/convert.js';
export { amendImage } from './ops/amend.js';
export { NbdExport, type ExportOptions, type ExportedBitmap } from './serve/export.js';
export { NbdServer, type ServerOptions, type ListenAddress } from './serve/server.js';
export { TlsServerCreds, type TlsCredsSpec } from './serve/tls.js';

import { prepareCreate } from './ops/create.js';

export interface CreateImageOptions {
  /** 'raw' (default) or 'qcow2' */
  format?: string;
  /** bytes, or a size string such as '10G' */
  size?: number | string;
  backingFile?: string;
  backingFormat?: string;
  /** format options as `-o` takes them: { cluster_size: '64k', lazy_refcounts: true, ... } */
  options?: Record<string, string | number | boolean>;
}

/** Creates an image, as `qimg create` does (without printing anything). */
export async function createImage(filename: string, opts: CreateImageOptions = {}): Promise<void> {
  const optionStrings = Object.entries(opts.options ?? {}).map(([k, v]) => {
    const text = typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v);
    return `${k}=${text.replace(/,/g, ',,')}`;
  });
  const prepared = await prepareCreate({
    filename,
    format: opts.format ?? 'raw',
    optionStrings,
    size: opts.size === undefined ? undefined : String(opts.size),
    backingFile: opts.backingFile,
    backingFormat: opts.backingFormat,
  });
  if (prepared === 'help') throw new Error('help is not an option');
  await prepared.run();
}
