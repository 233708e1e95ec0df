/**
 * `create`: option parsing against the format's schema, size from the argument, `-o
 * size` or the backing file, the backing file checked (unless unsafe), then the
 * driver creates the image. Two phases so that the CLI can print qemu-img's
 * "Formatting" line between option parsing and the driver's own validation.
 */
import { creationRefusal, findDriver, type FormatDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { openImage, resolveRelative } from '../core/open.js';
import { assertCreatable } from '../io/new-file.js';
import { parseOptions, type ParsedOptions } from '../core/options.js';
import { INT64_MAX, parseImageSize, roundToSectors } from '../core/size.js';
import type { SecretStore } from '../core/secrets.js';
import { isAbsolute } from 'node:path';
import { isRemoteName } from '../io/remote.js';
import { createOnRemote } from './create-remote.js';

export interface CreateRequest {
  filename: string;
  format: string;
  optionStrings: string[];
  size?: string;
  backingFile?: string;
  backingFormat?: string;
  /** -u: do not open the backing file */
  unsafe?: boolean;
  /** --object secrets (`-o encrypt.key-secret=ID`, luks `key-secret=ID`) */
  secrets?: SecretStore;
}

export interface PreparedCreate {
  driver: FormatDriver;
  options: ParsedOptions;
  /** size as given (before rounding to sectors), for the Formatting line */
  givenSize: bigint;
  /** the options part of the Formatting line */
  describe(): string;
  run(): Promise<void>;
}

/** BDRV_MAX_LENGTH: the largest image qemu's block layer takes. */
const MAX_IMAGE_LENGTH = 9223372035781033984n;

/**
 * Formats whose drivers take sizes of 2^53 and more and answer them as qemu does (raw
 * and qcow2 create such images; the others refuse them with their own limits). Any
 * other format still stops at 2^53 with the generic message: qemu "creates" vmdk and
 * qcow images of exabytes that it cannot open again.
 */
const HUGE_SIZE_FORMATS = new Set(['raw', 'qcow2', 'luks', 'vdi', 'vpc', 'vhdx', 'qed', 'parallels']);

/** The refusal of a size of 2^53 or more before the driver runs, or undefined. */
function hugeSizeRefusal(format: string, rounded: bigint): string | undefined {
  if (rounded <= BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
  // qcow2 creation grows the new image by a block-layer resize, with its limits
  if (format === 'qcow2' && rounded > INT64_MAX) return 'Could not resize image: Image size cannot be negative';
  if (format === 'qcow2' && rounded > MAX_IMAGE_LENGTH) return `Could not resize image: offset(${rounded}) exceeds maximum(${MAX_IMAGE_LENGTH})`;
  // raw gives the exact size (options' bigint) to ftruncate; the others refuse sizes past
  // their limits whatever the last bits (a double is exact for whole sectors below 2^62)
  if (HUGE_SIZE_FORMATS.has(format) && (format !== 'qcow2' || BigInt(Number(rounded)) === rounded)) return undefined;
  const hint = format === 'qcow2' ? ' (try using a larger cluster size)' : '';
  return `The image size is too large for file format '${format}'${hint}`;
}

export async function prepareCreate(req: CreateRequest): Promise<PreparedCreate | 'help'> {
  const driver = findDriver(req.format);
  if (!driver) throw new QimgError(`Unknown file format '${req.format}'`);
  const refusal = creationRefusal(driver);
  if (refusal) throw new QimgError(refusal, { file: req.filename || undefined });
  // (before anything is printed, as qemu-img finds the protocol first)
  assertCreatable(req.filename);
  const strings = [...req.optionStrings];
  const options = parseOptions(strings, driver.createOptions);
  if (options.help) return 'help';
  if (req.backingFile !== undefined) {
    options.values.set('backing_file', req.backingFile);
    options.raw.set('backing_file', req.backingFile);
  }
  if (req.backingFormat !== undefined) {
    options.values.set('backing_fmt', req.backingFormat);
    options.raw.set('backing_fmt', req.backingFormat);
  }
  const file = req.filename;
  let size: bigint | undefined;
  if (req.size !== undefined) {
    size = parseImageSize(req.size);
    // qemu-img refuses a size argument together with -o size
    if (options.values.has('size')) throw new QimgError('The image size must be specified only once', { file });
  } else if (options.values.has('size')) size = options.values.get('size') as bigint;

  const backing = options.values.get('backing_file') as string | undefined;
  if (backing !== undefined && !driver.createOptions.some((o) => o.name === 'backing_file')) {
    throw new QimgError(`Backing file not supported for file format '${driver.name}'`, { file });
  }
  if (backing !== undefined && !req.unsafe) {
    const backingFmt = options.values.get('backing_fmt') as string | undefined;
    if (isRemoteName(file) && !isAbsolute(backing) && !isRemoteName(backing)) {
      throw new QimgError('Cannot generate a base directory for NBD nodes; could not open backing image', { file });
    }
    const path = resolveRelative(backing, file);
    let img;
    try {
      img = await openImage(path, { format: backingFmt, metadataOnly: true });
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      throw new QimgError(`${msg}; could not open backing image`, { file, cause: err });
    }
    try {
      if (backingFmt === undefined) {
        throw new QimgError(`Backing file specified without backing format (detected format of ${img.format}; use -F ${img.format})`, { file });
      }
      size ??= BigInt(img.virtualSize);
    } finally {
      await img.close();
    }
  } else if (backing !== undefined && options.values.get('backing_fmt') === undefined) {
    throw new QimgError('Backing file specified without backing format', { file });
  }
  if (size === undefined) throw new QimgError('Image creation needs a size parameter', { file });
  const givenSize = size;
  const rounded = roundToSectors(size);
  options.values.set('size', rounded);
  return {
    driver,
    options,
    givenSize,
    describe: () => driver.describeCreate(givenSize, options),
    run: async () => {
      // A driver-level refusal in qemu-img: it comes after the Formatting line.
      const refusal = hugeSizeRefusal(driver.name, rounded);
      if (refusal) throw new QimgError(refusal, { file });
      try {
        if (isRemoteName(file)) await createOnRemote(driver, file, Number(rounded), options.values, { secrets: req.secrets });
        else await driver.create!(file, Number(rounded), options.values, { secrets: req.secrets });
      } catch (err) {
        throw err instanceof QimgError && err.file === undefined ? new QimgError(err.message, { file, cause: err }) : err;
      }
    },
  };
}
