/** `qimg check [--object OBJDEF] [--image-opts] [-f fmt] [--output=human|json] [-r leaks|all] [-q] [-U] FILE` */
import type { Command } from 'commander';
import { QimgError } from '../../core/errors.js';
import { checkExitCode, checkImage, FIX_ERRORS, FIX_LEAKS, type ImageCheck } from '../../ops/check.js';
import { escapeLines, writeErrorLines } from '../errors.js';
import { programName } from '../../core/program-name.js';
import { prettyJson } from '../output/json.js';
import { checkFinding, checkSummary } from '../output/style.js';
import type { ImageOptions, SecretStore } from '../../core/secrets.js';
import { addImageOptsOption, checkCacheMode, addObjectOption, parseOutputFormat, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

interface CheckCliOptions {
  format?: string;
  output?: string;
  repair?: string;
  quiet?: boolean;
  forceShare?: boolean;
  cache?: string;
  object: string[];
  imageOpts?: boolean;
}

/** What one check run needs besides the file. */
interface CheckRun {
  format?: string;
  fix: number;
  json: boolean;
  quiet: boolean;
  forceShare: boolean;
  /** the image as the JSON report names it (the argument as given) */
  name: string;
  secrets: SecretStore;
  imageOptions?: ImageOptions;
}

export function registerCheck(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('check')
    .description('check an image for consistency (and repair it with -r)')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-r, --repair <mode>', "repair: 'leaks' (leaked clusters only) or 'all'")
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open even if the image is in use (read-only)')
    .option('-T, --cache <mode>', 'cache mode for the image: none, writeback, writethrough, directsync, unsafe (accepted, checked)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: CheckCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () => withObjects(opts.object, async (secrets) => {
        const output = parseOutputFormat(opts.output);
        let fix = 0;
        if (opts.repair !== undefined) {
          if (opts.repair === 'leaks') fix = FIX_LEAKS;
          else if (opts.repair === 'all') fix = FIX_LEAKS | FIX_ERRORS;
          else {
            // qemu-img's error_exit: the message and its "Try" line
            writeErrorLines(`${programName()}: Unknown option value for -r (expecting 'leaks' or 'all'): ${opts.repair}`, `Try '${programName()} --help' for more information`);
            return 1;
          }
        }
        checkCacheMode(opts.cache, 'source cache');
        if (fix && opts.forceShare) {
          throw new QimgError(`Could not open '${filename}': force-share=on can only be used with read-only images`);
        }
        const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, writable: fix !== 0, opensBacking: true, secrets });
        return checkCommand(spec.path, {
          format: spec.format,
          fix,
          json: output === 'json',
          quiet: !!opts.quiet,
          forceShare: spec.forceShare,
          name: filename,
          secrets,
          imageOptions: spec.imageOptions,
        });
      })),
    );
}

/** Runs the check (and, after repairs, the second read-only pass); returns the exit code. */
async function checkCommand(filename: string, o: CheckRun): Promise<number> {
  // Per-problem lines go to stderr, batched (a damaged image can have millions).
  let pending = '';
  const flushLog = () => {
    if (pending) process.stderr.write(pending);
    pending = '';
  };
  const log = (line: string) => {
    pending += checkFinding(escapeLines(line)) + '\n';
    if (pending.length >= 65536) flushLog();
  };
  const out = (text: string) => {
    flushLog();
    return o.quiet ? Promise.resolve() : writeOut(text);
  };
  try {
    return await runChecks(filename, o, log, out);
  } finally {
    flushLog();
  }
}

async function runChecks(
  filename: string,
  o: CheckRun,
  log: (line: string) => void,
  out: (text: string) => Promise<void>,
): Promise<number> {
  const checkOptions = { format: o.format, log, forceShare: o.forceShare, secrets: o.secrets, imageOptions: o.imageOptions };
  let result = { ...(await checkImage(filename, { ...checkOptions, fix: o.fix })), filename: o.name };
  if (result.corruptionsFixed || result.leaksFixed) {
    if (!o.json) {
      await out(
        checkSummary(
          'The following inconsistencies were found and repaired:\n\n' +
            `    ${result.leaksFixed} leaked clusters\n` +
            `    ${result.corruptionsFixed} corruptions\n\n` +
            'Double checking the fixed image now...\n',
        ),
      );
    }
    const { leaksFixed, corruptionsFixed } = result;
    result = { ...(await checkImage(filename, { ...checkOptions, fix: 0 })), filename: o.name };
    result.leaksFixed = leaksFixed;
    result.corruptionsFixed = corruptionsFixed;
  }

  await out(o.json ? prettyJson(checkJson(result)) + '\n' : checkSummary(checkHuman(result)));

  const code = checkExitCode(result);
  if (code === 1) throw new QimgError('Check failed', { file: o.name, exitCode: 1 });
  return code;
}

/**
 * qemu-img's ImageCheck as JSON: members in qemu 7.2's QDict order, optional members
 * (everything but filename, format and check-errors) only when non-zero.
 */
export function checkJson(c: ImageCheck): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const opt = (key: string, v: number) => {
    if (v) o[key] = v;
  };
  opt('image-end-offset', c.imageEndOffset);
  opt('compressed-clusters', c.compressedClusters);
  opt('total-clusters', c.totalClusters);
  opt('corruptions', c.corruptions);
  opt('corruptions-fixed', c.corruptionsFixed);
  o['check-errors'] = c.checkErrors;
  opt('leaks', c.leaks);
  opt('leaks-fixed', c.leaksFixed);
  opt('allocated-clusters', c.allocatedClusters);
  o.filename = c.filename;
  o.format = c.format;
  opt('fragmented-clusters', c.fragmentedClusters);
  return o;
}

/** qemu-img's human summary of a check. */
export function checkHuman(c: ImageCheck): string {
  let s = '';
  if (!(c.corruptions || c.leaks || c.checkErrors)) {
    s += 'No errors were found on the image.\n';
  } else {
    if (c.corruptions) {
      s += `\n${c.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (c.leaks) {
      s += `\n${c.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (c.checkErrors) s += `\n${c.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (c.totalClusters !== 0 && c.allocatedClusters !== 0) {
    s +=
      `${c.allocatedClusters}/${c.totalClusters} = ${printf2f((c.allocatedClusters * 100) / c.totalClusters)}% allocated, ` +
      `${printf2f((c.fragmentedClusters * 100) / c.allocatedClusters)}% fragmented, ` +
      `${printf2f((c.compressedClusters * 100) / c.allocatedClusters)}% compressed clusters\n`;
  }
  if (c.imageEndOffset) s += `Image end offset: ${c.imageEndOffset}\n`;
  return s;
}

/**
 * printf("%0.2f"): like toFixed(2), except that exact ties round to even (glibc rounds
 * the exact binary value; toFixed rounds ties up).
 */
export function printf2f(x: number): string {
  const fixed = x.toFixed(2);
  if (!Number.isFinite(x) || x < 0) return fixed;
  // x = m * 2^e exactly; a tie means x*100 has a fractional part of exactly 1/2.
  const buf = new DataView(new ArrayBuffer(8));
  buf.setFloat64(0, x);
  const hi = buf.getUint32(0);
  const lo = buf.getUint32(4);
  const expBits = (hi >>> 20) & 0x7ff;
  let mant = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  if (expBits !== 0) mant |= 1n << 52n;
  const e = (expBits === 0 ? 1 : expBits) - 1075;
  if (e >= 0) return fixed;
  const den = 1n << BigInt(-e);
  const num = mant * 100n;
  if ((num % den) * 2n !== den) return fixed;
  let q = num / den;
  if (q % 2n === 1n) q += 1n;
  const str = q.toString().padStart(3, '0');
  return `${str.slice(0, -2)}.${str.slice(-2)}`;
}
