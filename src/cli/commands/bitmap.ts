/**
 * `qimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
 *   [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF] [--image-opts | -f FMT] FILE BITMAP`
 */
import type { Command } from 'commander';
import { cvtnum } from '../../core/size.js';
import { bitmapCommand, type BitmapAction } from '../../ops/bitmap.js';
import { UsageError } from '../errors.js';
import { addImageOptsOption, addObjectOption, withObjects } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerBitmap(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  // The actions apply in the order given: collected from commander's option events.
  const actions: BitmapAction[] = [];
  const cmd = program
    .command('bitmap')
    .description('add, remove, clear, enable, disable or merge persistent dirty bitmaps (qcow2)')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--add', 'create BITMAP (enabled unless --disable follows)')
    .option('-g, --granularity <size>', 'granularity of a new bitmap (default: the cluster size, within 4k..64k)')
    .option('--remove', 'delete BITMAP')
    .option('--clear', 'clear every bit of BITMAP')
    .option('--enable', 'make BITMAP track writes')
    .option('--disable', 'stop BITMAP tracking writes')
    .option('--merge <source>', 'merge bitmap SOURCE into BITMAP')
    .option('-b, --source-file <file>', 'the image holding the merge source')
    .option('-F, --source-format <fmt>', 'format of the merge source image');
  for (const kind of ['add', 'remove', 'clear', 'enable', 'disable'] as const) cmd.on(`option:${kind}`, () => actions.push({ kind }));
  cmd.on('option:merge', (source: string) => actions.push({ kind: 'merge', source }));
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('[args...]')
    .action((args: string[], opts: BitmapCliOptions) =>
      run(opts.imageOpts ? undefined : args[0], () =>
        withObjects(opts.object, async (secrets) => {
          // qemu-img's checks, in its order
          if (actions.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
          let granularity: number | undefined;
          if (opts.granularity !== undefined) {
            let g: bigint;
            try {
              g = cvtnum('granularity', opts.granularity);
            } catch (err) {
              throw err instanceof Error ? new UsageError(err.message) : err;
            }
            // QEMU passes it on as a 32-bit value: 0 means the default, 4G wraps to 0
            if (g !== 0n) granularity = Number(g & 0xffffffffn);
          }
          if (granularity !== undefined && !actions.some((a) => a.kind === 'add')) throw new UsageError('granularity only supported with --add');
          if (opts.sourceFormat !== undefined && opts.sourceFile === undefined) throw new UsageError('-F only supported with -b');
          if (opts.sourceFile !== undefined && !actions.some((a) => a.kind === 'merge')) throw new UsageError('Merge bitmap source file only supported with --merge');
          if (args.length !== 2) throw new UsageError('Expecting filename and bitmap name');
          const [filename, bitmap] = args;
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: false, secrets });
          await bitmapCommand({
            filename: spec.path,
            format: spec.format,
            bitmap,
            actions,
            granularity,
            sourceFile: opts.sourceFile,
            sourceFormat: opts.sourceFormat,
            open: { secrets, imageOptions: spec.imageOptions },
          });
        }),
      ),
    );
}

interface BitmapCliOptions {
  format?: string;
  granularity?: string;
  sourceFile?: string;
  sourceFormat?: string;
  object: string[];
  imageOpts?: boolean;
}
