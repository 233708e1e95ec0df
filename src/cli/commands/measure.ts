/** `qimg measure [--output=human|json] [-O fmt] [-o options] [--size N | [--object OBJDEF] [--image-opts] [-f fmt] [-l snapshot] FILE]` */
import type { Command } from 'commander';
import { findDriver } from '../../core/driver.js';
import { formatOptionHelp, parseOptions } from '../../core/options.js';
import { QimgError } from '../../core/errors.js';
import { parseImageSize } from '../../core/size.js';
import { measure } from '../../ops/measure.js';
import { openSnapshotView, parseSnapshotParam } from '../../ops/snapshot-param.js';
import { UsageError, formatError, printError } from '../errors.js';
import { prettyJson } from '../output/json.js';
import { addImageOptsOption, addObjectOption, collect, parseOutputFormat, withObjects, writeOut } from './common.js';
import { openResolved, resolveImage } from './image-opts.js';

export function registerMeasure(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('measure')
    .description('compute the size a new image of some format would need')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-O, --target-format <fmt>', 'format of the new image', 'raw')
    .option('-o, --options <options>', 'options of the new image', collect, [] as string[])
    .option('-s, --size <size>', 'measure a new empty image of this size')
    .option('-f, --format <fmt>', 'format of FILE')
    .option('-l, --snapshot <snapshot>', 'measure an internal snapshot of FILE')
    .option('-U, --force-share', 'open even if the image is in use');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('[filename]')
    .action((filename: string | undefined, opts: MeasureCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () => withObjects(opts.object, async (secrets) => {
        const output = parseOutputFormat(opts.output);
        if (!findDriver(opts.targetFormat)) throw new UsageError(`Unknown file format '${opts.targetFormat}'`);
        if (filename !== undefined && opts.size !== undefined) throw new UsageError('--size N cannot be used together with a filename.');
        if (filename === undefined && opts.size === undefined && !opts.options.some((o) => /(^|,)(help|\?)(,|$)/.test(o))) {
          throw new UsageError('Either --size N or one filename must be specified.');
        }
        if (filename === undefined && (opts.format !== undefined || opts.snapshot !== undefined || opts.imageOpts)) {
          throw new UsageError('--image-opts, -f, and -l require a filename argument.');
        }
        const spec =
          filename !== undefined
            ? await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, opensBacking: true, secrets })
            : undefined;
        let source = spec ? await openResolved(spec, { secrets }) : undefined;
        const parent = source;
        try {
          if (source && opts.snapshot !== undefined) {
            source = await openSnapshotView(source, parseSnapshotParam(opts.snapshot));
          }
          const size = opts.size !== undefined ? parseImageSize(opts.size) : undefined;
          // An -o that does not parse: qemu-img adds a second line naming the format.
          const driver = findDriver(opts.targetFormat)!;
          try {
            parseOptions(opts.options, driver.createOptions);
          } catch (err) {
            if (!(err instanceof QimgError)) throw err;
            printError(formatError(err).line);
            throw new UsageError(`Invalid options for file format '${driver.name}'`);
          }
          const r = await measure({ format: opts.targetFormat, optionStrings: opts.options, size, source, secrets });
          if (r === 'help') {
            const d = findDriver(opts.targetFormat)!;
            await writeOut(formatOptionHelp(d.name, d.createOptions));
            return;
          }
          // qemu's uint64 fields: JSON prints them as signed 64-bit, the human text as
          // unsigned (a raw 2^63 is -9223372036854775808 in JSON, as qemu-img 7.2)
          if (output === 'json') {
            const o: Record<string, bigint> = {};
            if (r.bitmaps !== undefined) o.bitmaps = BigInt.asIntN(64, r.bitmaps);
            o.required = BigInt.asIntN(64, r.required);
            o['fully-allocated'] = BigInt.asIntN(64, r.fullyAllocated);
            await writeOut(prettyJson(o) + '\n');
          } else {
            const u = (v: bigint) => BigInt.asUintN(64, v);
            let text = `required size: ${u(r.required)}\nfully allocated size: ${u(r.fullyAllocated)}\n`;
            if (r.bitmaps !== undefined) text += `bitmaps size: ${u(r.bitmaps)}\n`;
            await writeOut(text);
          }
        } finally {
          if (source && source !== parent) await source.close();
          if (parent) await parent.close();
        }
      })),
    );
}

interface MeasureCliOptions {
  output?: string;
  targetFormat: string;
  options: string[];
  size?: string;
  format?: string;
  snapshot?: string;
  forceShare?: boolean;
  object: string[];
  imageOpts?: boolean;
}
