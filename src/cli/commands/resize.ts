/** `qimg resize [--object OBJDEF] [--image-opts] [-f fmt] [--shrink] [--preallocation=mode] [-q] FILE [+|-]SIZE` */
import type { Command } from 'commander';
import { programName } from '../../core/program-name.js';
import { parseResizeArgument, resizeImage, ShrinkRefusedError, SHRINK_WARNING, type Preallocation } from '../../ops/resize.js';
import { reportError, warn, writeErrorLines } from '../errors.js';
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
  // As qemu-img, the last argument is the size whatever it looks like ("-1k", "--x");
  // main() moves it behind "--" before the options are parsed (see resizeArgv).
  addImageOptsOption(cmd)
    .argument('[args...]', 'FILENAME [+|-]SIZE')
    .action((args: string[], opts: ResizeCliOptions) => {
      const [filename, size] = args;
      return run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          if (args.length !== 2) {
            writeErrorLines(`${programName()}: Expecting image file name and size`, `Try '${programName()} --help' for more information`);
            return 1;
          }
          // the size is read before the image is opened, with QemuOpts' messages
          const arg = parseResizeArgument(size);
          if (arg.warning) warn(arg.warning);
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: true, secrets });
          try {
            await resizeImage(spec.path, spec.format, arg, {
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
      );
    });
}

/**
 * qemu-img resize takes its last argument as the size before reading the options, so
 * that negative sizes are not options. `args` are the arguments after "resize";
 * returns them with the size moved behind a "--", or a usage message.
 */
export function resizeArgv(args: readonly string[]): { args: string[]; size?: string } | { error: string } {
  // qimg's help stays reachable: --help alone, or among the options
  const options = args.length === 1 ? args : args.slice(0, args.indexOf('--') < 0 ? -1 : Math.min(args.indexOf('--'), args.length - 1));
  if (options.includes('--help') || options.includes('-h')) return { args: [...args] };
  if (args.length < 2) return { error: 'Not enough arguments' };
  const rest = args.slice(0, -1);
  const size = args[args.length - 1];
  return { args: [...rest, ...(rest.includes('--') ? [] : ['--']), size], size };
}

interface ResizeCliOptions {
  format?: string;
  shrink?: boolean;
  preallocation?: string;
  quiet?: boolean;
  object: string[];
  imageOpts?: boolean;
}
