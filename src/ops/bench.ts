/**
 * `bench`: `count` read or write requests of `bufferSize` bytes through an image's own
 * read/write paths, `depth` of them in flight, as qemu-img bench sends them.
 *
 * Request i goes to offset o(i): o(0) is the start offset, o(i+1) = (o(i) + step) modulo
 * the virtual size (step 0 means the buffer size). A request that does not fit inside
 * the image fails the run as the block layer fails it in qemu ("Input/output error").
 * Writes store the pattern byte. With a flush interval (writes only), a flush follows
 * every `flushInterval` requests: by default the queue is drained first and no request
 * is sent until the flush is done; without drain the flush runs beside the requests.
 * Cache modes: writethrough and directsync flush after every write; unsafe ignores
 * flushes. The other differences between modes (O_DIRECT, native AIO) do not exist in
 * Node's file I/O and are accepted without effect.
 *
 * An empty image with requests of some length has nowhere to send them: it is refused
 * (qemu-img 7.2 divides by zero there).
 */
import { performance } from 'node:perf_hooks';
import type { BlockImage } from '../core/block-image.js';
import { QimgError, describeSystemError } from '../core/errors.js';

export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';

export interface BenchOptions {
  /** requests to send (qemu-img's default 75000) */
  count?: number;
  /** requests in flight (default 64) */
  depth?: number;
  /** offset of the first request (default 0); a bigint may exceed 2^53 */
  offset?: number | bigint;
  /** bytes per request (default 4096) */
  bufferSize?: number;
  /** distance between requests; 0 or absent: the buffer size */
  stepSize?: number;
  write?: boolean;
  /** the byte written (default 0) */
  pattern?: number;
  /** write tests: flush every N requests (0: never) */
  flushInterval?: number;
  /** drain the queue before each flush (default true) */
  drainOnFlush?: boolean;
  cache?: CacheMode;
  /** called once the run is accepted, right before the first request */
  onStart?: () => void;
}

export interface LatencyStats {
  /** milliseconds */
  min: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface BenchResult {
  requests: number;
  /** bytes moved by all requests */
  bytes: number;
  /** wall time of the run (first request sent to last one done), seconds */
  seconds: number;
  flushes: number;
  /** the most requests ever in flight at once */
  maxInFlight: number;
  /** per-request latency (sampled beyond 131072 requests); undefined for an empty run */
  latency?: LatencyStats;
}

/** qemu-img's defaults. */
export const BENCH_DEFAULTS = { count: 75000, depth: 64, bufferSize: 4096 } as const;

const RESERVOIR = 1 << 17;

/** The failure of a request, worded as qemu-img words it. */
function failedRequest(err: unknown): QimgError {
  const what = err instanceof QimgError ? err.message : describeSystemError(err);
  return new QimgError(`Failed request: ${what}`, { file: '', cause: err });
}

export async function bench(img: BlockImage, opts: BenchOptions = {}): Promise<BenchResult> {
  const count = opts.count ?? BENCH_DEFAULTS.count;
  const depth = opts.depth ?? BENCH_DEFAULTS.depth;
  const bufferSize = opts.bufferSize ?? BENCH_DEFAULTS.bufferSize;
  const step = BigInt(opts.stepSize || bufferSize);
  const write = !!opts.write;
  const pattern = opts.pattern ?? 0;
  const flushInterval = write ? (opts.flushInterval ?? 0) : 0;
  const drain = opts.drainOnFlush ?? true;
  const cache = opts.cache ?? 'writeback';
  for (const [name, v] of [['count', count], ['depth', depth], ['bufferSize', bufferSize], ['flushInterval', flushInterval]] as const) {
    if (!Number.isSafeInteger(v) || v < 0) throw new QimgError(`bench: invalid ${name} ${v}`, { file: '' });
  }
  if (count > 0 && depth < 1) throw new QimgError('Invalid queue depth specified', { file: '' });
  if (!Number.isInteger(pattern) || pattern < 0 || pattern > 0xff) throw new QimgError('Invalid pattern byte specified', { file: '' });
  if (write && img.readOnly) throw new QimgError('image is opened read-only', { file: img.filename });
  const size = BigInt(img.virtualSize);
  if (size === 0n && count > 0 && bufferSize > 0) {
    throw new QimgError('the image is empty (0 bytes): there is no room for a request', { file: img.filename });
  }

  const syncEveryWrite = write && (cache === 'writethrough' || cache === 'directsync');
  const flushImage = async () => {
    if (cache === 'unsafe') return;
    flushes++;
    await img.flush();
  };

  const free: Buffer[] = [];
  const samples = new Float64Array(Math.min(count, RESERVOIR));
  let sampled = 0;
  let latencySum = 0;
  let latencyMin = Infinity;
  let latencyMax = 0;

  let offset = BigInt(opts.offset ?? 0);
  let submitted = 0;
  let completed = 0;
  let inFlight = 0;
  let maxInFlight = 0;
  let flushes = 0;
  let failure: unknown;
  const background: Array<Promise<void>> = [];
  let wake: (() => void) | null = null;
  const changed = () => new Promise<void>((resolve) => (wake = resolve));
  const notify = () => {
    const w = wake;
    wake = null;
    w?.();
  };

  const record = (ms: number) => {
    latencySum += ms;
    if (ms < latencyMin) latencyMin = ms;
    if (ms > latencyMax) latencyMax = ms;
    const seen = completed; // requests recorded before this one
    if (seen < samples.length) samples[seen] = ms;
    else {
      const j = Math.floor(Math.random() * (seen + 1));
      if (j < samples.length) samples[j] = ms;
    }
    sampled = Math.min(seen + 1, samples.length);
  };

  const send = (): void => {
    const at = offset;
    offset = size === 0n ? 0n : (offset + step) % size;
    const fits = at + BigInt(bufferSize) <= size;
    let buf = free.pop();
    if (!buf && fits) {
      try {
        buf = write ? Buffer.alloc(bufferSize, pattern) : Buffer.allocUnsafeSlow(bufferSize);
      } catch {
        throw new QimgError(`Could not allocate ${bufferSize} bytes for a request: Cannot allocate memory`, { file: '' });
      }
    }
    const data = buf;
    inFlight++;
    if (inFlight > maxInFlight) maxInFlight = inFlight;
    const t0 = performance.now();
    let io: Promise<void>;
    if (!fits || !data) {
      // as qemu's block layer: a request past the end of the image fails with EIO
      io = Promise.reject(Object.assign(new Error('request beyond the end of the image'), { code: 'EIO' }));
    } else if (bufferSize === 0) {
      io = Promise.resolve();
    } else if (write) {
      io = img.write(Number(at), data).then(() => (syncEveryWrite ? img.flush() : undefined));
    } else {
      io = img.read(Number(at), data);
    }
    io.then(
      () => {
        record(performance.now() - t0);
        completed++;
        if (flushInterval > 0 && !drain && completed % flushInterval === 0) {
          background.push(flushImage().catch((err) => void (failure ??= err)));
        }
      },
      (err) => void (failure ??= err),
    ).finally(() => {
      inFlight--;
      if (data) free.push(data);
      notify();
    });
  };

  opts.onStart?.();
  const t0 = performance.now();
  let drainedAt = 0;
  try {
    while (submitted < count && failure === undefined) {
      if (inFlight >= depth) {
        await changed();
        continue;
      }
      if (flushInterval > 0 && drain && submitted > 0 && submitted % flushInterval === 0 && drainedAt !== submitted) {
        drainedAt = submitted;
        while (inFlight > 0) await changed();
        if (failure !== undefined) break;
        await flushImage();
      }
      send();
      submitted++;
    }
  } catch (err) {
    failure ??= err;
  }
  while (inFlight > 0) await changed();
  await Promise.all(background);
  const seconds = (performance.now() - t0) / 1000;
  if (failure !== undefined) throw failure instanceof QimgError && failure.message.startsWith('Could not allocate') ? failure : failedRequest(failure);

  let latency: LatencyStats | undefined;
  if (completed > 0) {
    const sorted = samples.subarray(0, sampled).sort();
    const q = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
    latency = { min: latencyMin, mean: latencySum / completed, p50: q(0.5), p90: q(0.9), p99: q(0.99), max: latencyMax };
  }
  return { requests: completed, bytes: completed * bufferSize, seconds, flushes, maxInFlight, latency };
}
