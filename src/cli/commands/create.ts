/** `qimg create [--object OBJDEF] [-q] [-f fmt] [-b backing [-F fmt]] [-u] [-o options] FILE [size]` */
import type { Command } from 'commander';
import { findDriver } from '../../core/driver.js';
import { formatOptionHelp } from '../../core/options.js';
import { prepareCreate } from '../../ops/create.js';
import { UsageError } from '../errors.js';
import { addObjectOption, collect, withObjects, writeOut } from './common.js';

export function registerCreate(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('create')
    .description('create a new image')
    .option('-f, --format <fmt>', 'image format', 'raw')
    .option('-o, --options <options>', 'format options (-o help lists them)', collect, [] as string[])
    .option('-b, --backing <file>', 'backing file (the new image is an overlay)')
    .option('-F, --backing-format <fmt>', 'format of the backing file')
    .option('-B <fmt>', 'format of the backing file (qemu-img 10 spelling)')
    .option('-u, --backing-unsafe', 'do not open the backing file')
    .option('-q, --quiet', 'quiet mode');
  addObjectOption(cmd)
    .argument('[filename]')
    .argument('[size]')
    .action((filename: string | undefined, size: string | undefined, opts: CreateCliOptions) =>
      run(filename, () => withObjects(opts.object, async (secrets) => {
        const prepared = filename !== undefined || opts.options.length > 0
          ? await prepareCreate({
              filename: filename ?? '',
              format: opts.format,
              optionStrings: opts.options,
              size,
              backingFile: opts.backing,
              backingFormat: opts.backingFormat ?? opts.B,
              unsafe: opts.backingUnsafe,
              secrets,
            })
          : undefined;
        if (prepared === 'help') {
          await writeOut(formatOptionHelp(findDriver(opts.format)!.name, findDriver(opts.format)!.createOptions));
          return;
        }
        if (!prepared || filename === undefined) throw new UsageError('Expecting image file name');
        if (!opts.quiet) await writeOut(`Formatting '${filename}', fmt=${prepared.driver.name} ${prepared.describe()}\n`);
        await prepared.run();
      })),
    );
}

interface CreateCliOptions {
  format: string;
  options: string[];
  backing?: string;
  backingFormat?: string;
  B?: string;
  backingUnsafe?: boolean;
  quiet?: boolean;
  object: string[];
}
