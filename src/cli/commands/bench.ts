/**
 * `qimg bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-i aio] [-n]
 * [--no-drain] [-o offset] [--pattern=byte] [-q] [-s buffer_size] [-S step_size]
 * [-t cache] [-w] [-U] [--image-opts] [--object OBJDEF] FILENAME`, with 10.1's long
 * names (--count --depth --format --aio --native --offset --buffer-size --step-size
 * --cache --write --force-share --quiet).
 *
 * Option values are checked in command-line order as qemu-img's getopt loop does (the
 * first bad one is the error), then the file count and the flush-interval rules, then
 * the open (with qemu's refusal of native AIO without O_DIRECT). stdout carries exactly
 * qemu-img's lines (which 7.2 prints even with -q); on a terminal a summary table
 * follows them (not with -q).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Command } from 'commander';
import type CliTable3 from 'cli-table3';
import { findDriver } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import { programName } from '../../core/program-name.js';
import { bench, type BenchResult, type CacheMode } from '../../ops/bench.js';
import { UsageError } from '../errors.js';
import { addImageOptsOption, addObjectOption, withObjects, writeOut } from './common.js';
import { cvtnumRange } from './dd.js';
import { openResolved, parseQemuOpts, resolveImage } from './image-opts.js';

const INT_MAX = 2147483647n;
const INT64_MAX = (1n << 63n) - 1n;
const U64 = 1n << 64n;

const isCSpace = (c: string | undefined) => c !== undefined && ' \t\n\v\f\r'.includes(c);

/**
 * qemu_strtoul(s, NULL, 0): C strtoul in base 0 (0x hex, leading-0 octal, leading
 * blanks, a sign; "-N" wraps to 2^64 - N) over the whole string; undefined when
 * anything is left over, nothing is a number or the value overflows 64 bits.
 */
export function qemuStrtoul(s: string): bigint | undefined {
  let i = 0;
  while (isCSpace(s[i])) i++;
  let negative = false;
  if (s[i] === '+' || s[i] === '-') negative = s[i++] === '-';
  let radix = 10;
  let digits = /[0-9]/;
  if (s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && /[0-9a-fA-F]/.test(s[i + 2] ?? '')) {
    radix = 16;
    digits = /[0-9a-fA-F]/;
    i += 2;
  } else if (s[i] === '0') {
    radix = 8;
    digits = /[0-7]/;
  }
  const start = i;
  while (i < s.length && digits.test(s[i])) i++;
  if (i === start || i !== s.length) return undefined;
  let value = 0n;
  for (const c of s.slice(start, i)) value = value * BigInt(radix) + BigInt(parseInt(c, 16));
  if (value >= U64) return undefined;
  return negative && value !== 0n ? U64 - value : value;
}

/** An integer option read by qemu_strtoul, at most `max` (and at least `min`). */
function strtoulOption(message: string, min: bigint, max: bigint) {
  return (value: string): number => {
    const v = qemuStrtoul(value);
    if (v === undefined || v < min || v > max) throw new UsageError(message);
    return Number(v);
  };
}

const AIO_MODES = ['threads', 'native', 'io_uring'];
/** qemu's cache mode names; off is none */
const CACHE_MODES: Record<string, CacheMode> = {
  none: 'none',
  off: 'none',
  writeback: 'writeback',
  writethrough: 'writethrough',
  directsync: 'directsync',
  unsafe: 'unsafe',
};

interface BenchCliOptions {
  count: number;
  depth: number;
  format?: string;
  flushInterval: number;
  aio?: string;
  native?: boolean;
  drain: boolean;
  offset?: bigint;
  pattern: number;
  quiet?: boolean;
  bufferSize: number;
  stepSize: number;
  cache: CacheMode;
  write?: boolean;
  forceShare?: boolean;
  imageOpts?: boolean;
  object: string[];
}

export function registerBench(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  // qemu-img stops at the first bad option value, in command-line order; commander calls
  // the parsers in that order, so the first failure is kept and reported by the action.
  let firstError: UsageError | undefined;
  let nativeAio = false;
  const checked =
    <T>(parse: (value: string) => T) =>
    (value: string, previous: T): T => {
      if (firstError) return previous;
      try {
        return parse(value);
      } catch (err) {
        if (!(err instanceof UsageError)) throw err;
        firstError = err;
        return previous;
      }
    };

  const cmd = program
    .command('bench')
    .description('send read or write requests to an image and time them')
    .option('-c, --count <count>', 'number of requests', checked(strtoulOption('Invalid request count specified', 0n, INT_MAX)), 75000)
    // qemu-img 7.2 takes -d 0 and then waits forever; 10.x refuses it, as qimg does
    .option('-d, --depth <depth>', 'requests in flight', checked(strtoulOption('Invalid queue depth specified', 1n, INT_MAX)), 64)
    .option('-f, --format <fmt>', 'format of FILENAME (probed when absent)')
    .option(
      '--flush-interval <n>',
      'write tests: flush every N requests',
      checked(strtoulOption('Invalid flush interval specified', 0n, INT_MAX)),
      0,
    )
    .option(
      '-i, --aio <mode>',
      'AIO mode: threads, native or io_uring (accepted; Node has one)',
      checked((v: string) => {
        if (!AIO_MODES.includes(v)) throw new UsageError(`Invalid aio option: ${v}`);
        if (v === 'native') nativeAio = true;
        return v;
      }),
    )
    .option('-n, --native', 'native AIO (accepted as qemu-img does: needs -t none or directsync)')
    .option('--no-drain', 'do not drain the queue before each flush')
    .option('-o, --offset <offset>', 'offset of the first request', checked((v: string) => cvtnumRange('offset', v, 0n, INT64_MAX)))
    .option('--pattern <byte>', 'byte written by write tests', checked(strtoulOption('Invalid pattern byte specified', 0n, 0xffn)), 0)
    .option('-q, --quiet', 'quiet mode (no summary table; the qemu-img lines stay, as in qemu-img)')
    .option('-s, --buffer-size <size>', 'bytes per request', checked((v: string) => Number(cvtnumRange('buffer size', v, 0n, INT_MAX))), 4096)
    .option('-S, --step-size <size>', 'distance between requests (0: the buffer size)', checked((v: string) => Number(cvtnumRange('step_size', v, 0n, INT_MAX))), 0)
    .option(
      '-t, --cache <mode>',
      'cache mode: none, writeback, writethrough, directsync, unsafe',
      checked((v: string) => {
        const mode = CACHE_MODES[v];
        if (!mode) throw new UsageError('Invalid cache mode');
        return mode;
      }),
      'writeback' as CacheMode,
    )
    .option('-w, --write', 'write test (default: read)')
    .option('-U, --force-share', 'open even if the image is in use (read tests only)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('[filename...]')
    .action((files: string[], opts: BenchCliOptions) =>
      run(undefined, () => withObjects(opts.object, async (secrets) => {
        if (firstError) throw firstError;
        if (files.length !== 1) {
          process.stderr.write(`${programName()}: Expecting one image file name\nTry '${programName()} --help' for more information\n`);
          return 1;
        }
        const arg = files[0];
        const write = !!opts.write;
        if (opts.flushInterval > 0 && !write) throw new UsageError('--flush-interval is only available in write tests');
        if (opts.flushInterval > 0 && opts.flushInterval < opts.depth) throw new UsageError("Flush interval can't be smaller than depth");
        const native = !!opts.native || nativeAio;
        let direct = opts.cache === 'none' || opts.cache === 'directsync';
        if (opts.imageOpts) {
          const given = parseQemuOpts(arg, 'file', () => undefined).filter(([k]) => k === 'cache.direct');
          if (given.length > 0) direct = ['on', 'yes', 'true', 'y'].includes(given[given.length - 1][1]);
        }
        const nativeRefusal = `Could not open '${arg}': aio=native was specified, but it requires cache.direct=on, which was not specified.`;
        // qemu's order: the driver name, force-share against writing, the file, native AIO, the format
        if (!opts.imageOpts) {
          if (opts.format !== undefined && !findDriver(opts.format)) throw new QimgError(`Unknown driver '${opts.format}'`, { file: arg });
          if (opts.forceShare && write) throw new QimgError(`Could not open '${arg}': force-share=on can only be used with read-only images`, { file: arg });
          if (native && !direct && existsSync(arg)) throw new QimgError(nativeRefusal, { file: arg });
        }
        const spec = await resolveImage(arg, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, writable: write, opensBacking: true, secrets });
        // (an --image-opts image has been opened for its metadata by now: it exists)
        if (native && !direct && opts.imageOpts) throw new QimgError(nativeRefusal, { file: arg });
        const img = await openResolved(spec, { writable: write, secrets });
        try {
          const unsafe = img as { unsafeCache?: boolean };
          if (opts.cache === 'unsafe' && 'unsafeCache' in unsafe) unsafe.unsafeCache = true;
          const step = opts.stepSize || opts.bufferSize;
          const result = await bench(img, {
            count: opts.count,
            depth: opts.depth,
            offset: opts.offset ?? 0n,
            bufferSize: opts.bufferSize,
            stepSize: step,
            write,
            pattern: opts.pattern,
            flushInterval: opts.flushInterval,
            drainOnFlush: opts.drain,
            cache: opts.cache,
            onStart: () => {
              let text =
                `Sending ${opts.count} ${write ? 'write' : 'read'} requests, ${opts.bufferSize} bytes each, ` +
                `${opts.depth} in parallel (starting at offset ${opts.offset ?? 0n}, step size ${step})\n`;
              if (opts.flushInterval > 0) text += `Sending flush every ${opts.flushInterval} requests\n`;
              process.stdout.write(text);
            },
          });
          await writeOut(`Run completed in ${result.seconds.toFixed(3)} seconds.\n`);
          if (process.stdout.isTTY && !opts.quiet) await writeOut(summaryTable(result, write, opts));
        } finally {
          await img.close();
        }
      })),
    );
}

function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function ms(v: number): string {
  return v < 1 ? `${(v * 1000).toFixed(0)} µs` : `${v.toFixed(v < 10 ? 2 : 1)} ms`;
}

/** The terminal's summary (cli-table3, loaded only here). */
function summaryTable(r: BenchResult, write: boolean, opts: BenchCliOptions): string {
  const Table = createRequire(import.meta.url)('cli-table3') as typeof CliTable3;
  const colour = !process.env.NO_COLOR;
  const table = new Table({ style: { head: colour ? ['cyan'] : [], border: colour ? ['grey'] : [], compact: true } });
  const secs = r.seconds > 0 ? r.seconds : Number.MIN_VALUE;
  const rows: Array<[string, string]> = [
    [`${write ? 'write' : 'read'} requests`, `${r.requests.toLocaleString('en-US')} × ${humanBytes(opts.bufferSize)}`],
    ['in flight', `${r.maxInFlight} (depth ${opts.depth})`],
    ['moved', humanBytes(r.bytes)],
    ['time', `${r.seconds.toFixed(3)} s`],
    ['requests/s', Math.round(r.requests / secs).toLocaleString('en-US')],
    ['throughput', `${humanBytes(r.bytes / secs)}/s`],
  ];
  if (r.latency) {
    const l = r.latency;
    rows.push(['latency min / mean / max', `${ms(l.min)} / ${ms(l.mean)} / ${ms(l.max)}`]);
    rows.push(['latency p50 / p90 / p99', `${ms(l.p50)} / ${ms(l.p90)} / ${ms(l.p99)}`]);
  }
  if (write) rows.push(['flushes', String(r.flushes)]);
  for (const [k, v] of rows) table.push({ [k]: v });
  return table.toString() + '\n';
}
