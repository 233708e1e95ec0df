/**
 * `dd`: a byte range of an image copied into a new image, with qemu-img's arithmetic.
 *
 * The range is [skip*bs, min(count*bs, input size)): count is counted from the start of
 * the input, not from the skip point (qemu-img 7.2 does so: `bs=1M skip=1 count=2`
 * copies the second MiB only). A skip past that end creates an empty output and is
 * reported through `onSkipBeyondEnd`, and the command still succeeds, as qemu-img's does.
 *
 * The output is created anew by its format's create path with only a size. The copy
 * runs through the copy engine over a window of the input, so holes and zero clusters
 * of the input are never read and the new output is left sparse where the input reads
 * as zeros; what the output reads is byte for byte what qemu-img dd writes. A failure
 * removes the output this operation created.
 */
import { stat, unlink } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import type { BlockImage, ImageInfo, LayerStatus } from '../core/block-image.js';
import { creationRefusal, findDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { openImage } from '../core/open.js';
import type { ImageOptions, SecretStore } from '../core/secrets.js';
import { copyImages } from './copy-engine.js';
import { prepareCreate } from './create.js';
import { isRemoteName } from '../io/remote.js';
import { remoteZeroInit } from './create-remote.js';
import { NeverWritable } from '../core/read-only-image.js';

export interface DdRequest {
  /** the input: an image file, or an image the caller opened (and closes) */
  input: string | BlockImage;
  /** how messages name the input (the --image-opts string, or the file name) */
  inputName?: string;
  /** -f (probed when absent) */
  inputFormat?: string;
  /** --image-opts: the input's driver options */
  inputImageOptions?: ImageOptions;
  /** -U: take no lock on the input */
  forceShare?: boolean;
  output: string;
  /** -O (default raw) */
  outputFormat?: string;
  /** bs= in bytes (default 512) */
  blockSize?: number;
  /** count= in blocks (whole input when absent) */
  count?: bigint;
  /** skip= in blocks */
  skip?: bigint;
  secrets?: SecretStore;
  /** the skip lies past the end of what count leaves: qemu-img reports it and creates an empty output */
  onSkipBeyondEnd?: (message: string) => void;
}

/** The range of the input dd copies, and the output size (qemu-img's arithmetic). */
export function ddRange(inputSize: number, blockSize: number, count?: bigint, skip?: bigint): { start: number; end: number; skipBeyondEnd: boolean } {
  const bs = BigInt(blockSize);
  let end = BigInt(inputSize);
  if (count !== undefined && count * bs < end) end = count * bs;
  const start = skip !== undefined ? skip * bs : 0n;
  if (start > end) return { start: Number(end), end: Number(end), skipBeyondEnd: true };
  return { start: Number(start), end: Number(end), skipBeyondEnd: false };
}

/** An error qemu-img reports without a file name. */
const unnamed = (message: string) => new QimgError(message, { file: '' });

export async function dd(req: DdRequest): Promise<void> {
  const bs = req.blockSize ?? 512;
  if (!Number.isInteger(bs) || bs < 1) throw unnamed(`Invalid bs specified. Must be between 1 and 2147483647.`);
  const outputFormat = req.outputFormat ?? 'raw';
  const ours = typeof req.input === 'string';
  let input: BlockImage;
  if (typeof req.input !== 'string') input = req.input;
  else {
    try {
      input = await openImage(req.input, { format: req.inputFormat, forceShare: req.forceShare, secrets: req.secrets, imageOptions: req.inputImageOptions });
    } catch (err) {
      if (err instanceof QimgError && err.file === undefined) throw new QimgError(err.message, { file: req.input as string, cause: err });
      throw err;
    }
  }
  const inputName = req.inputName ?? input.filename;
  let target: BlockImage | null = null;
  let created = false;
  try {
    // qemu-img looks at -O once the input is open
    const driver = findDriver(outputFormat);
    if (!driver) throw unnamed('Unknown file format');
    const refusal = creationRefusal(driver);
    if (refusal) throw unnamed(refusal);

    const range = ddRange(input.virtualSize, bs, req.count, req.skip);
    const length = range.end - range.start;
    const prepared = await prepareCreate({ filename: req.output, format: driver.name, optionStrings: [], size: String(length), secrets: req.secrets });
    if (prepared === 'help') throw new QimgError('no options to list');
    const before = await stat(req.output).catch(() => undefined);
    const device = !!before?.isBlockDevice();
    if (before) await assertReplaceable(req.output, before, input);
    try {
      await prepared.run();
    } catch (err) {
      // only a file this run brought into being goes again; one that was there (the input
      // itself, refused by its lock) stays
      if (!before && !isRemoteName(req.output)) await unlink(req.output).catch(() => undefined);
      if (err instanceof QimgError) throw new QimgError(`error while creating output image: ${err.message}`, { file: req.output, cause: err });
      throw err;
    }
    // from here on the output holds nothing but what this run writes; a device (block
    // or character) is never removed
    created = (!before || before.isFile()) && !isRemoteName(req.output);
    target = await openImage(req.output, { format: driver.name, writable: true, secrets: req.secrets });
    if (range.skipBeyondEnd) req.onSkipBeyondEnd?.(`${inputName}: cannot skip to specified offset`);

    const t = target as BlockImage & { unsafeCache?: boolean };
    // metadata is made durable once, at the end (qemu-img's writeback cache flushes on close)
    if ('unsafeCache' in t) t.unsafeCache = true;
    if (length > 0) {
      await copyImages([windowOf(input, range.start, length)], target, {
        sparseSize: 4096,
        // a new image reads as zeros, except where a format gives no such promise (luks) or on a device
        targetIsZero: !device && !driver.noZeroInit && (!isRemoteName(req.output) || remoteZeroInit(driver.name)),
        parallel: 8,
        targetGranularity: target.allocationUnit,
      });
    }
    const done = target;
    target = null;
    if ('unsafeCache' in t) t.unsafeCache = false;
    await done.flush();
    await done.close();
  } catch (err) {
    if (target) await target.close().catch(() => undefined);
    if (created) await unlink(req.output).catch(() => undefined);
    throw err;
  } finally {
    if (ours) await input.close().catch(() => undefined);
  }
}

/**
 * An existing output must not be the input itself or one of its backing files, also
 * when the input was opened with -U (without locks). An image someone else has open is
 * refused by the create path itself, which takes QEMU's write lock before emptying a file.
 */
async function assertReplaceable(output: string, st: Stats, input: BlockImage): Promise<void> {
  for (let layer: BlockImage | null = input; layer; layer = layer.backing) {
    const other = await stat(layer.filename).catch(() => undefined);
    if (other && other.dev === st.dev && other.ino === st.ino) {
      throw new QimgError(`error while creating output image: Failed to get "write" lock: '${output}' is ${layer === input ? 'the input image' : 'a backing file of the input'}`, { file: output });
    }
  }
}

/**
 * A read-only view of [start, start+length) of an image as an image of its own, with
 * the backing chain windowed alike, so that chain-resolved block status works on it.
 */
export function windowOf(inner: BlockImage, start: number, length: number): BlockImage {
  return new WindowImage(inner, start, Math.max(0, Math.min(length, inner.virtualSize - start)));
}

class WindowImage extends NeverWritable implements BlockImage {
  readonly backing: BlockImage | null;

  constructor(
    private readonly inner: BlockImage,
    private readonly start: number,
    readonly virtualSize: number,
  ) {
    super();
    const below = inner.backing;
    this.backing = below && start < below.virtualSize ? windowOf(below, start, virtualSize) : null;
  }

  get format(): string {
    return this.inner.format;
  }

  get filename(): string {
    return this.inner.filename;
  }

  get allocationUnit(): number {
    return this.inner.allocationUnit;
  }

  read(offset: number, buf: Buffer): Promise<void> {
    return this.inner.read(this.start + offset, buf);
  }

  layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return this.inner.layerStatus(this.start + offset, Math.min(length, this.virtualSize - offset));
  }

  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize };
  }

  /** The window owns nothing: the caller closes the image it looks into. */
  async close(): Promise<void> {}
}
