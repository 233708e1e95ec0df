/**
 * The writer behind convert -c: whole clusters are compressed on worker threads (one
 * per core) while the copy engine reads ahead; results are stored in guest order.
 * A cluster that does not shrink is written uncompressed; the last, partial cluster
 * is zero-padded as QEMU does.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import type { BlockImage } from '../core/block-image.js';
import { isAllZero } from '../io/zero-detect.js';
import { collectYoung } from './compress-worker.js';

export interface CompressingWriter {
  write(offset: number, data: Buffer): Promise<void>;
  /** waits until every queued cluster is stored */
  finish(): Promise<void>;
  close(): Promise<void>;
}

/** Bytes of queued clusters before write() waits (bounds memory). */
const MAX_QUEUED = 5 * 1024 * 1024;

export interface CompressingWriterOptions {
  /** whole clusters of zeros are skipped instead of compressed (-S other than 0), as qemu-img does */
  skipZeroClusters?: boolean;
  /** the target reads as zeros: a skipped cluster needs no zero write */
  targetIsZero?: boolean;
}

export function compressingWriter(target: BlockImage, virtualSize: number, opts: CompressingWriterOptions = {}): CompressingWriter {
  const { algorithm, clusterSize, alwaysCompressed = false } = target.compression!;
  const pool = new Piscina({
    filename: new URL('./compress-worker.js', import.meta.url).href,
    name: 'compressTask',
    maxThreads: Math.max(1, availableParallelism()),
    minThreads: 1,
    idleTimeout: 1000,
    // Small heaps: each cluster passes through as an ArrayBuffer, and frequent young
    // collections keep the garbage of thousands of them from piling up (peak memory).
    resourceLimits: { maxYoungGenerationSizeMb: 4, maxOldGenerationSizeMb: 64 },
  });
  let chain: Promise<void> = Promise.resolve();
  let queued = 0;
  let failure: unknown = null;
  const waiters: Array<() => void> = [];

  /** `result` is compressed data, or the cluster itself (exactly a cluster long) when it did not shrink. */
  let stored = 0;
  const store = async (offset: number, result: Uint8Array, partialLength: number) => {
    // results arrive as fresh ArrayBuffers: collect them every 4 MiB (see collectYoung)
    if ((stored += clusterSize) >= 4 * 1024 * 1024) {
      stored = 0;
      collectYoung();
    }
    const bytes = Buffer.from(result.buffer, result.byteOffset, result.byteLength);
    if (alwaysCompressed || bytes.length < clusterSize) await target.writeCompressed!(offset, bytes);
    else await target.write(offset, bytes.subarray(0, partialLength));
  };

  return {
    async write(offset, data) {
      if (failure) throw failure;
      for (let pos = 0; pos < data.length; ) {
        const clusterStart = offset + pos;
        const len = Math.min(clusterSize - (clusterStart % clusterSize), data.length - pos);
        if (clusterStart % clusterSize !== 0 || (len < clusterSize && clusterStart + len < virtualSize)) {
          // Not a whole cluster (the engine aligns data, so this is rare): store as is.
          const piece = Buffer.from(data.subarray(pos, pos + len));
          chain = chain.then(() => target.write(clusterStart, piece));
          pos += len;
          continue;
        }
        const plain = new Uint8Array(clusterSize);
        plain.set(data.subarray(pos, pos + len));
        // The copy engine detects zeros in units of -S (4 KiB): a smaller zero cluster
        // (or one under a larger -S) arrives here, and qemu-img skips every all-zero
        // cluster rather than compressing it.
        if (opts.skipZeroClusters && isAllZero(plain)) {
          if (!opts.targetIsZero) chain = chain.then(() => target.writeZeroes(clusterStart, len, { mayUnmap: true }));
          pos += len;
          continue;
        }
        // The cluster's memory moves to the worker (no copy) and its result moves back.
        const input = plain;
        const task = pool.run({ data: input, algorithm, clusterSize, always: alwaysCompressed }, { transferList: [input.buffer] });
        queued += clusterSize;
        const partial = len;
        chain = chain.then(async () => {
          try {
            const result = (await task) as Uint8Array;
            await store(clusterStart, result, partial);
          } catch (err) {
            failure ??= err;
          } finally {
            queued -= clusterSize;
            while (waiters.length > 0 && queued < MAX_QUEUED) waiters.shift()!();
          }
        });
        pos += len;
      }
      if (queued >= MAX_QUEUED) await new Promise<void>((resolve) => waiters.push(resolve));
      if (failure) throw failure;
    },
    async finish() {
      await chain;
      if (failure) throw failure;
    },
    async close() {
      await chain.catch(() => undefined);
      await pool.destroy();
    },
  };
}


