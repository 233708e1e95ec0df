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
export { convertToRaw, type ConvertOptions } from './ops/convert.js';
