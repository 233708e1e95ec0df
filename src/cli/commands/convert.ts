/** `qimg convert [-f fmt] [-O raw] [-S size] [-q] [-U] SRC... DST` */
import type { Command } from 'commander';
import type { BlockImage } from '../../core/block-image.js';
import { QimgError } from '../../core/errors.js';
import { openImage } from '../../core/open.js';
import { parseSizeString } from '../../core/size.js';
import { convertToRaw } from '../../ops/convert.js';
import { findDriver } from '../../core/driver.js';
import { formatOptionHelp, parseOptions } from '../../core/options.js';
import { UsageError } from '../errors.js';
import { collect, writeOut } from './common.js';

const MAX_SPARSE = 16 * 1024 * 1024;

export function registerConvert(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('convert')
    .description('convert one or more images (concatenated) into a new image')
    .option('-f, --source-format <fmt>', 'format of the source images (probed when absent)')
    .option('-O, --target-format <fmt>', 'output format', 'raw')
    .option('-o, --target-format-options <options>', 'options of the output format (-o help lists them)', collect, [] as string[])
    .option('-S, --sparse-size <size>', 'minimum zero run written as a hole (0 = allocate all)', '4k')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open the sources even if they are in use')
    .argument('[files...]', 'source image(s) followed by the output file')
    .action((files: string[], opts: { sourceFormat?: string; targetFormat: string; sparseSize: string; targetFormatOptions: string[] }) =>
      run(files[files.length - 1], async () => {
        const driver = findDriver(opts.targetFormat);
        if (!driver) throw new UsageError(`Unknown file format '${opts.targetFormat}'`);
        const parsed = parseOptions(opts.targetFormatOptions, driver.createOptions);
        if (parsed.help) {
          await writeOut(formatOptionHelp(driver.name, driver.createOptions));
          return;
        }
        if (files.length < 2) throw new UsageError('Expecting image file name');
        if (opts.targetFormat !== 'raw') {
          throw new QimgError(`output format '${opts.targetFormat}' is not supported by convert yet (only raw)`);
        }
        const preallocation = (parsed.values.get('preallocation') as string | undefined) ?? 'off';
        const sparse = parseSizeString(opts.sparseSize);
        const sparseSize = sparse.ok ? Number(sparse.value - (sparse.value % 512n)) : -1;
        if (!sparse.ok || sparseSize < 0 || sparseSize > MAX_SPARSE) {
          throw new UsageError(
            'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).',
          );
        }
        const out = files[files.length - 1];
        const sources: BlockImage[] = [];
        try {
          for (const f of files.slice(0, -1)) {
            try {
              sources.push(await openImage(f, { format: opts.sourceFormat }));
            } catch (err) {
              if (err instanceof QimgError && err.file === undefined) throw new QimgError(err.message, { file: f, cause: err });
              throw err;
            }
          }
          await convertToRaw(sources, out, { sparseSize, preallocation: preallocation as 'off' | 'falloc' | 'full' });
        } finally {
          for (const s of sources) await s.close();
        }
      }),
    );
}
