/**
 * `qimg convert [--object OBJDEF] [--image-opts] [--target-image-opts] [-f fmt] [-O fmt]
 * [-o options] [-B|-b backing [-F fmt]] [-c] [-p] [-q] [-n] [-S size] [-m N] [-W]
 * [--target-is-zero] [-U] [-l snapshot] [-t cache] [-T src_cache] [-r rate] [-C]
 * [--salvage] SRC... DST`
 */
import type { Command } from 'commander';
import { QimgError } from '../../core/errors.js';
import { cvtnum } from '../../core/size.js';
import { convert } from '../../ops/convert.js';
import { parseSnapshotParam } from '../../ops/snapshot-param.js';
import { creationRefusal, findDriver } from '../../core/driver.js';
import { formatOptionHelp, hasHelpOption, isValidOptionList, parseOptions } from '../../core/options.js';
import { UsageError, warn } from '../errors.js';
import { createProgress, progressMode } from '../output/progress.js';
import { addImageOptsOption, addObjectOption, checkCacheMode, collect, withObjects, writeOut } from './common.js';
import { resolveImage, type ImageSpec } from './image-opts.js';

const MAX_SPARSE = 16 * 1024 * 1024;
const MAX_COROUTINES = 16;

/** Runs a parse step whose failures are command-line errors (no file name prefix). */
function usage<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof QimgError && !(err instanceof UsageError)) throw new UsageError(err.message);
    throw err;
  }
}

interface ConvertFlags {
  sourceFormat?: string;
  targetFormat: string;
  sparseSize: string;
  targetFormatOptions: string[];
  backing?: string;
  B?: string;
  backingFormat?: string;
  compress?: boolean;
  /** false with -n (commander's --no-create) */
  create?: boolean;
  targetIsZero?: boolean;
  bitmaps?: boolean;
  skipBrokenBitmaps?: boolean;
  parallel: string;
  oobWrites?: boolean;
  snapshot?: string;
  progress?: boolean;
  progressJson?: boolean;
  quiet?: boolean;
  targetCache?: string;
  sourceCache?: string;
  forceShare?: boolean;
  object: string[];
  imageOpts?: boolean;
  targetImageOpts?: boolean;
  rateLimit?: string;
  copyRangeOffloading?: boolean;
  salvage?: boolean;
}

export function registerConvert(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('convert')
    .description('convert one or more images (concatenated) into a new image')
    .option('-f, --source-format <fmt>', 'format of the source images (probed when absent)')
    .option('-O, --target-format <fmt>', 'output format', 'raw')
    .option('-o, --target-format-options <options>', 'options of the output format (-o help lists them)', collect, [] as string[])
    .option('-b, --backing <file>', 'make the output an overlay of this backing file')
    .option('-B <file>', 'the same as -b (qemu-img 7 spelling)')
    .option('-F, --backing-format <fmt>', 'format of the backing file')
    .option('-c, --compress', 'compress the output clusters (qcow2)')
    .option('-n, --no-create', 'write into an existing output image')
    .option('--target-is-zero', 'the existing output image (-n) reads as zeros')
    .option('-S, --sparse-size <size>', 'minimum zero run written as a hole (0 = allocate all)', '4k')
    .option('-m, --parallel <n>', 'requests in flight', '8')
    .option('-W, --oob-writes', 'write out of order')
    .option('-l, --snapshot <snapshot>', 'convert an internal snapshot of the source')
    .option('-t, --target-cache <mode>', 'output cache mode (unsafe: no flush; others: flushed at the end)')
    .option('-T, --source-cache <mode>', 'source cache mode: none, writeback, writethrough, directsync, unsafe (accepted; reads go through the page cache)')
    .option('-r, --rate-limit <rate>', 'copy at most RATE bytes of data per second (size suffixes allowed; 0 = no limit)')
    .option('-C, --copy-range-offloading', 'copy data ranges inside the kernel (copy_file_range) where both images are raw files')
    .option('--salvage', 'read errors become zeros in the output (with a warning per sector) instead of failing')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open the sources even if they are in use')
    .option('--bitmaps', 'copy the persistent bitmaps of the source (qcow2 to qcow2)')
    .option('--skip-broken-bitmaps', 'with --bitmaps: leave inconsistent bitmaps behind instead of failing')
    .option('--target-image-opts', 'the output file is an option string (driver=FMT,file.filename=PATH,...); needs -n');
  addObjectOption(cmd);
  addImageOptsOption(cmd, 'each source')
    .argument('[files...]', 'source image(s) followed by the output file; - reads standard input (-f raw or vmdk) or writes standard output (raw, qcow2, vmdk subformat=streamOptimized)')
    .action((files: string[], opts: ConvertFlags, command: Command) =>
      run(opts.targetImageOpts ? undefined : files[files.length - 1], () => withObjects(opts.object, async (secrets) => {
        // qemu-img checks these values while it reads the options, before anything else
        // cvtnum first (its own messages), then: a multiple of 512 up to 16 MiB
        const sparse = usage(() => cvtnum('buffer size for sparse output', opts.sparseSize, warn));
        if (sparse % 512n !== 0n || sparse > BigInt(MAX_SPARSE)) {
          throw new UsageError(
            'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).',
          );
        }
        const parallel = Number(opts.parallel);
        if (!Number.isInteger(parallel) || parallel < 1 || parallel > MAX_COROUTINES) {
          throw new UsageError(`Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`);
        }
        const rateLimit = opts.rateLimit !== undefined ? Number(usage(() => cvtnum('rate limit', opts.rateLimit!, warn))) : undefined;
        // then the combinations copy offloading cannot do
        if (opts.copyRangeOffloading) {
          if (opts.compress) throw new UsageError('Cannot enable copy offloading when -c is used');
          if (command.getOptionValueSource('sparseSize') === 'cli') throw new UsageError('Cannot enable copy offloading when -S is used');
          if (opts.salvage) throw new UsageError('Cannot use copy offloading in salvaging mode');
        }
        // qemu-img checks these combinations next, before looking at -O, -o or the files
        const create = opts.create !== false;
        if (opts.targetImageOpts && create) throw new UsageError('--target-image-opts requires use of -n flag');
        if (!create && opts.targetFormatOptions.length > 0) throw new UsageError('-o has no effect when skipping image creation');
        if (opts.targetIsZero && create) throw new UsageError('--target-is-zero requires use of -n flag');
        if (opts.skipBrokenBitmaps && !opts.bitmaps) throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps');
        // without -o help: the file names, then the source cache mode, before the format
        if (opts.targetFormatOptions.every((o) => isValidOptionList(o) && !hasHelpOption(o))) {
          if (files.length < 2) throw new UsageError('Must specify image file name');
          checkCacheMode(opts.sourceCache, 'source cache');
        }
        const driver = findDriver(opts.targetFormat);
        if (!driver) throw new UsageError(`Unknown file format '${opts.targetFormat}'`);
        // qemu-img reports option and -S errors without a file name prefix
        const parsed = usage(() => parseOptions(opts.targetFormatOptions, driver.createOptions));
        if (parsed.help) {
          await writeOut(formatOptionHelp(driver.name, driver.createOptions, files.length > 0 ? files[files.length - 1] : undefined));
          return;
        }
        for (const w of parsed.warnings) warn(w);
        if (files.length < 2) throw new UsageError('Must specify image file name');
        const refusal = creationRefusal(driver);
        if (create && refusal) throw new UsageError(refusal);
        const backing = opts.backing ?? opts.B;
        if (backing !== undefined && opts.backingFormat === undefined) throw new UsageError('Use of backing file requires explicit backing format');
        if (backing !== undefined && !driver.createOptions.some((o) => o.name === 'backing_file')) {
          throw new UsageError(`Backing file not supported for file format '${driver.name}'`);
        }
        if (opts.compress && !opts.targetImageOpts && !driver.supportsCompression) throw new UsageError('Compression not supported for this file format');
        checkCacheMode(opts.sourceCache, 'source cache');
        checkCacheMode(opts.targetCache, 'cache');
        const snapshot = opts.snapshot !== undefined ? usage(() => parseSnapshotParam(opts.snapshot!)) : undefined;
        const sources: ImageSpec[] = [];
        for (const f of files.slice(0, -1)) {
          sources.push(await resolveImage(f, { imageOpts: !!opts.imageOpts, format: opts.sourceFormat, forceShare: opts.forceShare, opensBacking: true, secrets }));
        }
        // with --target-image-opts the target names its format (driver=, or probed); -O conflicts as -f does
        const target = opts.targetImageOpts
          ? await resolveImage(files[files.length - 1], {
              imageOpts: true,
              format: command.getOptionValueSource('targetFormat') === 'cli' ? opts.targetFormat : undefined,
              writable: true,
              opensBacking: true,
              secrets,
            })
          : undefined;
        if (target && opts.compress && !findDriver(target.format!)?.supportsCompression) throw new UsageError('Compression not supported for this file format');
        const toStdout = !opts.targetImageOpts && files[files.length - 1] === '-';
        const progress = createProgress(progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet }), { stdoutTaken: toStdout });
        await convert({
          sources: sources.map((s) => s.path),
          sourceFormat: opts.sourceFormat,
          sourceSpecs: sources.some((s) => s.imageOpts) ? sources : undefined,
          output: target?.path ?? files[files.length - 1],
          outputFormat: target?.format ?? driver.name,
          targetImageOptions: target?.imageOptions,
          secrets,
          optionStrings: opts.targetFormatOptions,
          backingFile: backing,
          backingFormat: opts.backingFormat,
          noCreate: !create,
          targetIsZero: opts.targetIsZero,
          sparseSize: Number(sparse),
          parallel,
          outOfOrder: opts.oobWrites,
          snapshot,
          compress: opts.compress,
          forceShare: opts.forceShare,
          flushAtEnd: opts.targetCache !== undefined && opts.targetCache !== 'unsafe',
          onProgress: (d, t) => progress.update(d, t),
          bitmaps: opts.bitmaps,
          skipBrokenBitmaps: opts.skipBrokenBitmaps,
          salvage: opts.salvage,
          rateLimit,
          copyOffload: opts.copyRangeOffloading,
          onWarning: warn,
        });
        progress.finish();
      })),
    );
}
