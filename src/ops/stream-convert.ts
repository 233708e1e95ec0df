/**
 * `convert ... -`: the new image goes to standard output in one forward pass, for
 * formats whose driver can write so (createStream: raw, qcow2, stream-optimized VMDK).
 * A 'live' writer takes the data as the copy engine finds it (zero detection as
 * usual); a 'plan' writer (qcow2, whose tables come first) gets every unit's kind from
 * a first walk over the block status, then exactly its data units, read in order.
 */
import type { BlockImage } from '../core/block-image.js';
import type { StreamImageWriter, UnitRun } from '../core/driver.js';
import { QimgError, describeSystemError } from '../core/errors.js';
import { openImage, resolveRelative } from '../core/open.js';
import { alignUp } from '../core/units.js';
import { STDIO_NAME, standardOutput, stdoutIsTerminal, type SequentialOutput } from '../io/stdio.js';
import { CHUNK, copyImages, workItems, type CopyOptions, type Item } from './copy-engine.js';
import type { ConvertRequest } from './convert.js';
import { prepareCreate } from './create.js';

const fail = (message: string) => new QimgError(message, { file: STDIO_NAME });

/** What `convert` refuses for standard output before it opens anything. */
export function streamOutputRefusal(req: ConvertRequest): string | undefined {
  if (req.noCreate) return 'standard output cannot be written into as an existing image (-n)';
  if (req.targetImageOptions) return 'standard output cannot be an existing image (--target-image-opts)';
  if (req.bitmaps) return 'bitmaps (--bitmaps) cannot be written to standard output';
  if (req.copyOffload) return 'copy offloading (-C) needs a file, not standard output';
  if (req.compress && req.outputFormat !== 'vmdk') {
    return 'compressed clusters (-c) cannot be written to standard output: their sizes are unknown before the tables that come first';
  }
  if (stdoutIsTerminal()) return 'refusing to write an image to a terminal; redirect standard output';
  return undefined;
}

/** A stand-in target for the copy engine: writes go to the stream writer, nothing else is possible. */
function streamTarget(writer: StreamImageWriter, size: number): BlockImage {
  const refuse = () => Promise.reject(fail('a stream cannot be rewritten'));
  return {
    format: 'stream',
    filename: STDIO_NAME,
    virtualSize: size,
    backing: null,
    readOnly: false,
    allocationUnit: writer.unit,
    read: refuse,
    write: (offset, data) => writer.write(offset, data),
    writeZeroes: refuse,
    discard: refuse,
    layerStatus: refuse,
    info: refuse,
    flush: async () => undefined,
    close: async () => undefined,
  };
}

export async function convertToStream(req: ConvertRequest, inputs: BlockImage[]): Promise<void> {
  const out = standardOutput();
  const unknown = inputs.find((s) => s.stream && !s.stream.sizeKnown);
  if (unknown) {
    if (req.outputFormat !== 'raw' || inputs.length > 1) {
      throw fail(`the size of a raw pipe is known only at its end; only raw can be written from it to standard output (-O ${req.outputFormat} needs the size first)`);
    }
    return pipeThrough(unknown, out);
  }
  const total = inputs.reduce((n, s) => n + s.virtualSize, 0);
  const prepared = await prepareCreate({
    filename: STDIO_NAME,
    format: req.outputFormat,
    optionStrings: req.optionStrings ?? [],
    size: String(total),
    backingFile: req.backingFile,
    backingFormat: req.backingFormat,
    secrets: req.secrets,
  });
  if (prepared === 'help') throw new QimgError('-o help is handled by the caller');
  const driver = prepared.driver;
  if (!driver.createStream) {
    throw fail(`the output format '${driver.name}' cannot be written to standard output (raw, qcow2 and vmdk with subformat=streamOptimized can)`);
  }
  const size = Number(prepared.options.values.get('size') as bigint);
  let writer: StreamImageWriter;
  try {
    writer = driver.createStream(out, size, prepared.options.values);
  } catch (err) {
    if (err instanceof QimgError && err.file === undefined) throw fail(err.message);
    throw err;
  }
  if (writer.mode === 'plan' && inputs.some((s) => s.stream)) {
    throw fail(`-O ${driver.name} to standard output needs the source's allocation before its data, which a source read from standard input cannot give; write raw or vmdk (streamOptimized), or to a file`);
  }
  const backingSize = writer.backingFile !== undefined ? await virtualSizeOf(writer.backingFile, writer.backingFormat) : undefined;
  const topOnly = writer.backingFile !== undefined;
  const opts: CopyOptions = {
    sparseSize: req.sparseSize ?? 4096,
    targetIsZero: !topOnly,
    topOnly,
    targetBackingSize: backingSize,
    targetGranularity: writer.unit,
    parallel: req.parallel ?? 8,
    onProgress: req.onProgress,
    salvage: req.salvage,
    onWarning: req.onWarning,
    rateLimit: req.rateLimit,
    rateCharge: 'before',
  };
  if (writer.mode === 'live') {
    await writer.begin();
    await copyImages(inputs, streamTarget(writer, size), { ...opts, writeData: (o, d) => writer.write(o, d) });
  } else {
    const plan = await planUnits(inputs, opts, writer);
    await writer.begin(plan);
    await copyPlanned(inputs, plan, writer, size, opts);
  }
  await writer.finish();
}

async function virtualSizeOf(name: string, format: string | undefined): Promise<number> {
  const img = await openImage(resolveRelative(name, STDIO_NAME), { format, metadataOnly: true });
  try {
    return img.virtualSize;
  } finally {
    await img.close();
  }
}

/** A raw pipe of unknown size copied as it comes (padded to whole sectors, as a raw disk is). */
async function pipeThrough(src: BlockImage, out: SequentialOutput): Promise<void> {
  const buf = Buffer.alloc(CHUNK);
  for (;;) {
    const n = await src.stream!.readNext!(buf);
    if (n > 0) await out.write(Buffer.from(buf.subarray(0, alignUp(n, 512)).fill(0, n)));
    if (n < buf.length) return;
  }
}

const DATA = 1;
const ZERO = 2;
const SKIP = 4;

/**
 * Every unit's kind from the copy's ranges: a unit with data is data; one that reads
 * as zeros over a backing file is a zero unit (or data where the format has no zero
 * flag, or where the top layer leaves part of it to the backing file); the rest is
 * left out (reads as zeros, or as the backing file).
 */
async function planUnits(inputs: BlockImage[], opts: CopyOptions, writer: StreamImageWriter): Promise<UnitRun[]> {
  const u = writer.unit;
  const runs: UnitRun[] = [];
  const zeroKind = writer.zeroUnits === 'flag' ? 'zero' : 'data';
  const decide = (f: number): UnitRun['kind'] | null => (f & DATA ? 'data' : f & ZERO ? (f & SKIP ? 'data' : zeroKind) : null);
  const push = (start: number, count: number, kind: UnitRun['kind'] | null) => {
    if (!kind || count <= 0) return;
    const last = runs[runs.length - 1];
    if (last && last.kind === kind && last.start + last.count === start) last.count += count;
    else runs.push({ start, count, kind });
  };
  let pendingUnit = -1;
  let pendingFlags = 0;
  const settle = () => {
    if (pendingUnit >= 0) push(pendingUnit, 1, decide(pendingFlags));
    pendingUnit = -1;
    pendingFlags = 0;
  };
  const mark = (from: number, to: number, flag: number) => {
    if (to <= from) return;
    const first = Math.floor(from / u);
    const end = Math.ceil(to / u);
    if (pendingUnit !== first) {
      settle();
      pendingUnit = first;
    }
    pendingFlags |= flag;
    if (end - first >= 2) {
      settle();
      push(first + 1, end - first - 2, decide(flag));
      pendingUnit = end - 1;
      pendingFlags = flag;
    }
  };
  for await (const item of workItems(inputs, opts) as AsyncGenerator<Item>) {
    const from = item.dstOffset;
    const to = from + item.length;
    if (item.kind === 'data') mark(from, to, DATA);
    else if (item.kind === 'skip') mark(from, to, SKIP);
    else if (opts.topOnly || opts.sparseSize === 0) {
      // zeros past the end of the new backing file need nothing (they read as zeros there)
      const until = opts.targetBackingSize === undefined ? to : Math.max(from, Math.min(to, opts.targetBackingSize));
      mark(from, until, opts.sparseSize === 0 ? DATA : ZERO);
    }
  }
  settle();
  return runs;
}

/** Reads [offset, offset+buf.length) of the concatenated sources; past their end reads as zeros. */
async function readConcat(inputs: BlockImage[], offset: number, buf: Buffer, opts: CopyOptions): Promise<void> {
  let base = 0;
  let filled = 0;
  for (const src of inputs) {
    const end = base + src.virtualSize;
    if (offset + filled < end && filled < buf.length) {
      const n = Math.min(buf.length - filled, end - (offset + filled));
      await readSalvaging(src, offset + filled - base, buf.subarray(filled, filled + n), opts);
      filled += n;
    }
    base = end;
  }
  buf.fill(0, filled);
}

/** A read; with --salvage a failing read is retried per sector and what still fails reads as zeros. */
async function readSalvaging(src: BlockImage, offset: number, buf: Buffer, opts: CopyOptions): Promise<void> {
  try {
    await src.read(offset, buf);
    return;
  } catch (err) {
    if (!opts.salvage) throw err;
  }
  for (let p = 0; p < buf.length; p += 512) {
    const part = buf.subarray(p, Math.min(buf.length, p + 512));
    try {
      await src.read(offset + p, part);
    } catch (err) {
      part.fill(0);
      opts.onWarning?.(`error while reading offset ${offset + p}: ${err instanceof QimgError ? err.message : describeSystemError(err)}`);
    }
  }
}

/** The data units of the plan, read in order (a few reads ahead) and handed to the writer. */
async function copyPlanned(inputs: BlockImage[], plan: readonly UnitRun[], writer: StreamImageWriter, size: number, opts: CopyOptions): Promise<void> {
  const u = writer.unit;
  const per = Math.max(1, Math.floor(CHUNK / u));
  const ahead = Math.max(1, opts.parallel);
  const started = performance.now();
  let sent = 0;
  const queue: Array<{ offset: number; buf: Buffer; read: Promise<void> }> = [];
  const writeHead = async () => {
    const head = queue.shift()!;
    await head.read;
    if (opts.rateLimit && opts.rateLimit > 0) {
      const wait = started + (sent / opts.rateLimit) * 1000 - performance.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, Math.ceil(wait)));
      sent += head.buf.length;
    }
    await writer.write(head.offset, head.buf);
    opts.onProgress?.(Math.min(size, head.offset + head.buf.length), size);
  };
  opts.onProgress?.(0, size);
  try {
    for (const run of plan) {
      if (run.kind !== 'data') continue;
      for (let unit = run.start; unit < run.start + run.count; ) {
        const n = Math.min(per, run.start + run.count - unit);
        const buf = Buffer.alloc(n * u);
        const read = readConcat(inputs, unit * u, buf, opts);
        read.catch(() => undefined);
        queue.push({ offset: unit * u, buf, read });
        if (queue.length >= ahead) await writeHead();
        unit += n;
      }
    }
    while (queue.length > 0) await writeHead();
  } finally {
    await Promise.allSettled(queue.map((q) => q.read));
  }
  opts.onProgress?.(size, size);
}
