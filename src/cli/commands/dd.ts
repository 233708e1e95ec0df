/**
 * `qimg dd [--object OBJDEF] [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size]
 * [count=blocks] [skip=blocks] if=input of=output` (10.1 long names: --format,
 * --output-format, --force-share).
 *
 * Operands are read left to right as qemu-img reads them: the first bad one is the
 * error (`unrecognized operand NAME`, qemu's size messages for bs, count and skip);
 * then both files must be named.
 */
import type { Command } from 'commander';
import { QimgError } from '../../core/errors.js';
import { parseSizeString } from '../../core/size.js';
import { dd } from '../../ops/dd.js';
import { UsageError, warn } from '../errors.js';
import { programName } from '../../core/program-name.js';
import { addImageOptsOption, addObjectOption, withObjects } from './common.js';
import { openResolved, resolveImage } from './image-opts.js';

const INT_MAX = 2147483647n;
const INT64_MAX = (1n << 63n) - 1n;

/**
 * qemu-img's cvtnum_full: a size string (k M G T P E suffixes) between `min` and `max`,
 * with its two messages (`name` as qemu-img names the value). A hex number with a
 * suffix is accepted with qemu's deprecation warning.
 */
export function cvtnumRange(name: string, value: string, min: bigint, max: bigint): bigint {
  const r = parseSizeString(value);
  if (!r.ok && !r.range) {
    throw new UsageError(`Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  }
  if (r.ok && r.warning) warn(r.warning);
  if (!r.ok || r.value < min || r.value > max) throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return r.value;
}

interface DdOperands {
  bs: number;
  count?: bigint;
  skip?: bigint;
  input?: string;
  output?: string;
}

/** The operands in order; the first bad one throws qemu-img's message. */
export function parseDdOperands(args: readonly string[]): DdOperands {
  const out: DdOperands = { bs: 512 };
  for (const arg of args) {
    const eq = arg.indexOf('=');
    const name = eq < 0 ? arg : arg.slice(0, eq);
    const value = eq < 0 ? undefined : arg.slice(eq + 1);
    if (value === undefined) throw new UsageError(`unrecognized operand ${name}`);
    switch (name) {
      case 'bs':
        out.bs = Number(cvtnumRange('bs', value, 1n, INT_MAX));
        break;
      case 'count':
        out.count = cvtnumRange('count', value, 0n, INT64_MAX);
        break;
      case 'skip':
        out.skip = cvtnumRange('skip', value, 0n, INT64_MAX);
        break;
      case 'if':
        out.input = value;
        break;
      case 'of':
        out.output = value;
        break;
      default:
        throw new UsageError(`unrecognized operand ${name}`);
    }
  }
  return out;
}

interface DdCliOptions {
  format?: string;
  outputFormat: string;
  forceShare?: boolean;
  imageOpts?: boolean;
  object: string[];
}

export function registerDd(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('dd')
    .description('copy a range of an image (bs=, count=, skip=) into a new image, as dd(1)')
    .option('-f, --format <fmt>', 'format of the input (probed when absent)')
    .option('-O, --output-format <fmt>', 'format of the new output image', 'raw')
    .option('-U, --force-share', 'open the input even if it is in use');
  addObjectOption(cmd);
  addImageOptsOption(cmd, 'if=')
    .argument('[operands...]', 'if=FILE of=FILE [bs=BYTES] [count=N] [skip=N]')
    .action((operands: string[], opts: DdCliOptions) =>
      run(undefined, () => withObjects(opts.object, async (secrets) => {
        const o = parseDdOperands(operands);
        if (o.input === undefined || o.output === undefined) throw new UsageError('Must specify both input and output files');
        // qemu's file driver refuses an empty name before looking for the file
        if (o.input === '' && !opts.imageOpts) throw new QimgError("Could not open '': The 'file' block driver requires a file name", { file: '' });
        const spec = await resolveImage(o.input, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, opensBacking: true, secrets });
        let input;
        try {
          input = await openResolved(spec, { secrets });
        } catch (err) {
          if (err instanceof QimgError && err.file === undefined && !spec.imageOpts) throw new QimgError(err.message, { file: o.input, cause: err });
          throw err;
        }
        try {
          await dd({
            input,
            inputName: o.input,
            output: o.output,
            outputFormat: opts.outputFormat,
            blockSize: o.bs,
            count: o.count,
            skip: o.skip,
            secrets,
            onSkipBeyondEnd: (message) => process.stderr.write(`${programName()}: ${message}\n`),
          });
        } finally {
          await input.close();
        }
      })),
    );
}
