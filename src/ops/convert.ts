/**
 * `convert`: sources (concatenated) copied into a new or existing target of any
 * writable format by the copy engine. A failed conversion removes the output it
 * created; an existing target (-n) is written in place.
 */
import { stat, unlink } from 'node:fs/promises';
import type { BlockImage } from '../core/block-image.js';
import { findDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { openImage, resolveRelative } from '../core/open.js';
import type { ImageOptions, SecretStore } from '../core/secrets.js';
import type { ParsedOptions } from '../core/options.js';
import { copyImages, type CopyOptions } from './copy-engine.js';
import { prepareCreate } from './create.js';
import { isRemoteName } from '../io/remote.js';
import { remoteZeroInit } from './create-remote.js';
import { checkSourceBitmaps, checkTargetBitmaps, copyBitmaps } from './bitmap-copy.js';
import { openSnapshotView, type SnapshotParam } from './snapshot-param.js';
import { isStdio, openStdinSource } from './stdin-source.js';
import { convertToStream, streamOutputRefusal } from './stream-convert.js';
import { copyGrowing, growRefusal } from './grow-copy.js';

export interface ConvertRequest {
  sources: string[];
  sourceFormat?: string;
  output: string;
  outputFormat: string;
  /** -o options for the new image */
  optionStrings?: string[];
  /** -B/-b: the new image is an overlay of this file; only the sources' top layers are copied */
  backingFile?: string;
  backingFormat?: string;
  /** -n: write into an existing target */
  noCreate?: boolean;
  targetIsZero?: boolean;
  /** -S in bytes (default 4096); 0 allocates everything */
  sparseSize?: number;
  parallel?: number;
  outOfOrder?: boolean;
  /** -l: read this internal snapshot of the (single) source */
  snapshot?: SnapshotParam;
  /** -c: compressed clusters (qcow2) */
  compress?: boolean;
  onProgress?: (done: number, total: number) => void;
  /** -U: take no locks on the sources */
  forceShare?: boolean;
  /** flush the target at the end (cache modes other than qemu-img's default "unsafe") */
  flushAtEnd?: boolean;
  /** per source (by index), what --image-opts gave: its format, driver options and force-share */
  sourceSpecs?: ReadonlyArray<{ format?: string; imageOptions?: ImageOptions; forceShare?: boolean } | undefined>;
  /** -n with --target-image-opts: the target's driver options */
  targetImageOptions?: ImageOptions;
  /** --object secrets: for the sources, the new target's creation (-o encrypt.key-secret=ID) and its open */
  secrets?: SecretStore;
  /** --bitmaps: copy the source's persistent bitmaps; --skip-broken-bitmaps: leave inconsistent ones */
  bitmaps?: boolean;
  skipBrokenBitmaps?: boolean;
  /** --salvage: read errors become zeros, each failed sector reported through onWarning */
  salvage?: boolean;
  /** -r: at most this many bytes of data per second */
  rateLimit?: number;
  /** -C: copy offloading (copy_file_range between raw files; no zero detection in data) */
  copyOffload?: boolean;
  /** warning lines qemu-img prints while converting (--salvage, --skip-broken-bitmaps) */
  onWarning?: (message: string) => void;
}

/** The key-secret options of a new image (`encrypt.key-secret`, luks `key-secret`), which its open needs too (as qemu-img). */
function keySecretOptions(options: ParsedOptions): ImageOptions | undefined {
  const out: Record<string, string> = {};
  for (const [k, v] of options.values) if (k.endsWith('key-secret') && typeof v === 'string') out[k] = v;
  return Object.keys(out).length ? out : undefined;
}

/** An error qemu-img reports without a file name (an empty `file` keeps the CLI from adding one). */
const unnamed = (message: string) => new QimgError(message, { file: '' });

export async function convert(req: ConvertRequest): Promise<void> {
  if (req.targetIsZero && !req.noCreate) throw unnamed('--target-is-zero requires use of -n flag');
  if (req.targetIsZero && req.backingFile !== undefined) throw unnamed('Cannot use --target-is-zero when the destination image has a backing file');
  if (req.snapshot && req.sources.length > 1) throw unnamed('No support for concatenating multiple snapshot');
  if (req.copyOffload && req.compress) throw unnamed('Cannot enable copy offloading when -c is used');
  if (req.copyOffload && req.salvage) throw unnamed('Cannot use copy offloading in salvaging mode');
  // `-` (standard input / output): refused combinations before anything is read
  const toStream = isStdio(req.output) && !req.targetImageOptions;
  if (toStream) {
    const refusal = streamOutputRefusal(req);
    if (refusal) throw new QimgError(refusal, { file: req.output });
  }
  const fromStdin = req.sources.filter(isStdio).length;
  if (fromStdin > 0) {
    const why = fromStdin > 1 ? 'standard input can be read only once' : req.snapshot ? 'an internal snapshot (-l) needs random access' : req.sourceSpecs ? 'standard input cannot be given with --image-opts' : req.copyOffload ? 'copy offloading (-C) needs files' : undefined;
    if (why) throw new QimgError(why, { file: '-' });
  }

  const sources: BlockImage[] = [];
  const views: BlockImage[] = [];
  let target: BlockImage | null = null;
  let created = false;
  /** an external data file this conversion created (removed with the output on failure) */
  let createdDataFile: string | undefined;
  try {
    for (const [i, f] of req.sources.entries()) {
      const spec = req.sourceSpecs?.[i];
      try {
        sources.push(
          isStdio(f) && !spec ? await openStdinSource(req.sourceFormat) : await openImage(f, {
            format: spec?.format ?? req.sourceFormat,
            forceShare: req.forceShare || spec?.forceShare,
            secrets: req.secrets,
            imageOptions: spec?.imageOptions,
          }),
        );
      } catch (err) {
        if (err instanceof QimgError && err.file === undefined) throw new QimgError(err.message, { file: f, cause: err });
        throw err;
      }
    }
    if (req.bitmaps) await checkSourceBitmaps(sources, !!req.skipBrokenBitmaps);
    let inputs = sources;
    if (req.snapshot) {
      const view = await openSnapshotView(sources[0], req.snapshot);
      views.push(view);
      inputs = [view];
    }
    if (toStream) {
      await convertToStream(req, inputs);
      return;
    }
    // a raw pipe's size is known at its end: the new image grows as it arrives
    const growing = inputs.find((s) => s.stream && !s.stream.sizeKnown);
    if (growing && (inputs.length > 1 || req.backingFile !== undefined)) {
      throw new QimgError(`the size of a raw pipe is known only at its end; it cannot be ${inputs.length > 1 ? 'concatenated with other sources' : 'converted onto a backing file (-B)'}`, { file: '-' });
    }
    const total = growing ? 0 : inputs.reduce((n, s) => n + s.virtualSize, 0);

    let targetOptions = req.noCreate ? req.targetImageOptions : undefined;
    if (!req.noCreate) {
      const prepared = await prepareCreate({
        filename: req.output,
        format: req.outputFormat,
        optionStrings: req.optionStrings ?? [],
        size: String(total),
        backingFile: req.backingFile,
        backingFormat: req.backingFormat,
        secrets: req.secrets,
      });
      if (prepared === 'help') throw new QimgError('-o help is handled by the caller');
      targetOptions = keySecretOptions(prepared.options);
      // an output that is a device (block or character) is written, never removed
      const device = await stat(req.output).then(
        (s) => !s.isFile(),
        () => false,
      );
      if (req.compress) {
        // qemu-img refuses these before creating anything
        const values = prepared.options.values;
        if (values.get('encryption') === true || values.has('encrypt.format')) throw unnamed('Compression and encryption not supported at the same time');
        const prealloc = values.get('preallocation');
        if (prealloc !== undefined && prealloc !== 'off') throw unnamed('Compression and preallocation not supported at the same time');
      }
      const dataFile = prepared.options.values.get('data_file');
      if (typeof dataFile === 'string' && dataFile !== '') {
        const path = resolveRelative(dataFile, req.output);
        // only a data file this conversion creates is removed again on failure
        if (!(await stat(path).then(() => true, () => false))) createdDataFile = path;
      }
      try {
        await prepared.run();
        // only now is the output this run's: a create refused (an image in use, such as
        // the source itself) leaves the file that was there alone
        created = !device && !isRemoteName(req.output);
      } catch (err) {
        // qemu-img: "OUT: error while converting FMT: <the driver's message>"
        if (err instanceof QimgError) throw new QimgError(`error while converting ${req.outputFormat}: ${err.message}`, { file: req.output, cause: err });
        throw err;
      }
    }
    target = await openImage(req.output, { format: req.outputFormat, writable: true, secrets: req.secrets, imageOptions: targetOptions });
    if (target.virtualSize < total) throw unnamed('output file is smaller than input file');
    const growRefused = growing ? growRefusal(target, !!req.noCreate) : undefined;
    if (growRefused) throw new QimgError(growRefused, { file: '-' });
    if (req.bitmaps) checkTargetBitmaps(target, req.outputFormat);
    const t = target as BlockImage & { unsafeCache?: boolean; clusterSize?: number };
    // qemu-img's default cache mode for the target is unsafe: no flush until the end.
    if ('unsafeCache' in t) t.unsafeCache = !req.flushAtEnd;

    const opts: CopyOptions = {
      sparseSize: req.sparseSize ?? 4096,
      // a new luks target reads as noise, not zeros: its zero ranges are written (as qemu-img)
      // a raw image "created" on an export keeps the export's old contents
      targetIsZero: !req.noCreate
        ? req.backingFile === undefined && !findDriver(req.outputFormat)?.noZeroInit && (!isRemoteName(req.output) || remoteZeroInit(req.outputFormat))
        : !!req.targetIsZero,
      topOnly: req.backingFile !== undefined,
      // Compression is the bottleneck of -c: reading further ahead than the workers
      // can take only holds more buffers (peak memory), so -c reads 4 ahead unless -m says.
      parallel: req.parallel ?? (req.compress || target.compressesAllWrites ? 4 : 8),
      // In order unless -W, for raw targets too: with the page cache cold, reads in
      // offset order beat completion order (measured on 1 GiB qcow2/vhdx → raw).
      outOfOrder: req.outOfOrder,
      // The persistent bitmaps of a target (only an existing one has any) record exactly the ranges
      // written: write what qemu-img writes (its sparse detection, nothing widened to clusters).
      targetGranularity: target.tracksWrites ? 512 : target.allocationUnit,
      onProgress: req.onProgress,
      // only a new target (qemu-img's target_backing_sectors is unknown with -n)
      targetBackingSize: req.backingFile !== undefined && !req.noCreate ? target.backing?.virtualSize : undefined,
      salvage: req.salvage,
      onWarning: req.onWarning,
      rateLimit: req.rateLimit,
      rateCharge: 'before',
      copyOffload: req.copyOffload,
    };
    if (req.compress && !target.writeCompressed) throw new QimgError(`Compression not supported for file format '${target.format}'`, { file: req.output });
    // Compressed units come from worker threads; a target that accepts -c without
    // compressing (no `compression`) stores the data as is.
    if ((req.compress || target.compressesAllWrites) && target.compression && target.writeCompressed) {
      const { compressingWriter } = await import('./compress-writer.js');
      const writer = compressingWriter(target, total, { skipZeroClusters: opts.sparseSize > 0, targetIsZero: opts.targetIsZero });
      try {
        if (growing) await copyGrowing(growing, target, { ...opts, fixedSize: !!req.noCreate, targetGranularity: target.allocationUnit, writeData: writer.write });
        else await copyImages(inputs, target, { ...opts, writeData: writer.write, targetGranularity: target.allocationUnit });
        await writer.finish();
      } finally {
        await writer.close();
      }
    } else if (growing) {
      await copyGrowing(growing, target, { ...opts, fixedSize: !!req.noCreate, targetGranularity: opts.targetGranularity ?? target.allocationUnit });
    } else {
      await copyImages(inputs, target, opts);
    }
    if (req.bitmaps) await copyBitmaps(sources[0], target, req.onWarning ?? (() => undefined));
    const done = target;
    target = null;
    if (req.flushAtEnd) {
      if ('unsafeCache' in t) t.unsafeCache = false;
      await done.flush();
    }
    await done.close();
  } catch (err) {
    if (target) await target.close().catch(() => undefined);
    if (created) await unlink(req.output).catch(() => undefined);
    if (createdDataFile !== undefined) await unlink(createdDataFile).catch(() => undefined);
    throw err;
  } finally {
    for (const v of views) await v.close().catch(() => undefined);
    for (const s of sources) await s.close().catch(() => undefined);
  }
}

/** Kept for library users of the first release: convert to a raw file. */
export interface ConvertOptions {
  sparseSize: number;
  preallocation?: 'off' | 'falloc' | 'full';
}

export async function convertToRaw(sources: BlockImage[], output: string, opts: ConvertOptions): Promise<void> {
  const total = sources.reduce((n, s) => n + s.virtualSize, 0);
  const prepared = await prepareCreate({
    filename: output,
    format: 'raw',
    optionStrings: opts.preallocation ? [`preallocation=${opts.preallocation}`] : [],
    size: String(total),
  });
  if (prepared === 'help') return;
  await prepared.run();
  const target = await openImage(output, { format: 'raw', writable: true });
  try {
    await copyImages(sources, target, { sparseSize: opts.sparseSize, targetIsZero: true, parallel: 8 });
    await target.close();
  } catch (err) {
    await target.close().catch(() => undefined);
    await unlink(output).catch(() => undefined);
    throw err;
  }
}
