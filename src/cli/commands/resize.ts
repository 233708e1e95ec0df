/** `qimg resize [--object OBJDEF] [--image-opts] [-f fmt] [--shrink] [--preallocation=mode] [-q] FILE [+|-]SIZE` */
import type { Command } from 'commander';
import { resizeImage, ShrinkRefusedError, SHRINK_WARNING, type Preallocation } from '../../ops/resize.js';
import { reportError, UsageError, warn } from '../errors.js';
import { addImageOptsOption, addObjectOption, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerResize(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('resize')
    .description('change the virtual size of an image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--shrink', 'allow shrinking (data past the new end is lost)')
    .option('--preallocation <mode>', 'preallocation of the new space: off, metadata, falloc, full')
    .option('-q, --quiet', 'quiet mode');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('[filename]')
    .argument('[size]')
    .action((filename: string | undefined, size: string | undefined, opts: ResizeCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          if (filename === undefined || size === undefined) throw new UsageError('Expecting image file name and size');
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: true, secrets });
          try {
            await resizeImage(spec.path, spec.format, size, {
              shrink: opts.shrink,
              preallocation: opts.preallocation as Preallocation | undefined,
              secrets,
              imageOptions: spec.imageOptions,
            });
          } catch (err) {
            if (!(err instanceof ShrinkRefusedError)) throw err;
            // qemu-img prints the error line, then the data-loss warning, exit 1.
            const code = reportError(err, spec.imageOpts ? undefined : filename);
            warn(SHRINK_WARNING);
            return code;
          }
          if (!opts.quiet) await writeOut('Image resized.\n');
        }),
      ),
    );
}

interface ResizeCliOptions {
  format?: string;
  shrink?: boolean;
  preallocation?: string;
  quiet?: boolean;
  object: string[];
  imageOpts?: boolean;
}
