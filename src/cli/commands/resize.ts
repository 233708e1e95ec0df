/** `qimg resize [-f fmt] [--shrink] [--preallocation=mode] [-q] FILE [+|-]SIZE` */
import type { Command } from 'commander';
import { resizeImage, ShrinkRefusedError, SHRINK_WARNING, type Preallocation } from '../../ops/resize.js';
import { reportError, UsageError, warn } from '../errors.js';
import { writeOut } from './common.js';

export function registerResize(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('resize')
    .description('change the virtual size of an image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--shrink', 'allow shrinking (data past the new end is lost)')
    .option('--preallocation <mode>', 'preallocation of the new space: off, metadata, falloc, full')
    .option('-q, --quiet', 'quiet mode')
    .argument('[filename]')
    .argument('[size]')
    .action((filename: string | undefined, size: string | undefined, opts: { format?: string; shrink?: boolean; preallocation?: string; quiet?: boolean }) =>
      run(filename, async () => {
        if (filename === undefined || size === undefined) throw new UsageError('Expecting image file name and size');
        try {
          await resizeImage(filename, opts.format, size, { shrink: opts.shrink, preallocation: opts.preallocation as Preallocation | undefined });
        } catch (err) {
          if (!(err instanceof ShrinkRefusedError)) throw err;
          // qemu-img prints the error line, then the data-loss warning, exit 1.
          const code = reportError(err, filename);
          warn(SHRINK_WARNING);
          return code;
        }
        if (!opts.quiet) await writeOut('Image resized.\n');
      }),
    );
}
