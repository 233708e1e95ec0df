/**
 * The writer behind convert -c: whole clusters are compressed on worker threads (one
 * per core) while the copy engine reads ahead; results are stored in guest order.
 * A cluster that does not shrink is written uncompressed; the last, partial cluster
 * is zero-padded as QEMU does.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import type { BlockImage } from '../core/block-image.js';

export interface CompressingWriter {
  write(offset: number, data: Buffer): Promise<void>;
  /** waits until every queued cluster is stored */
  finish(): Promise<void>;
  close(): Promise<void>;
}

/** Bytes of queued clusters before write() waits (bounds memory). */
const MAX_QUEUED = 32 * 1024 * 1024;

export function compressingWriter(target: BlockImage, virtualSize: number): CompressingWriter {
  const { algorithm, clusterSize } = target.compression!;
  const pool = new Piscina({
    filename: new URL('./compress-worker.js', import.meta.url).href,
    maxThreads: Math.max(1, availableParallelism()),
    minThreads: 1,
    idleTimeout: 1000,
  });
  let chain: Promise<void> = Promise.resolve();
  let queued = 0;
  let failure: unknown = null;
  const waiters: Array<() => void> = [];

  const store = async (offset: number, plain: Buffer, result: Uint8Array | null, partialLength: number) => {
    if (result) await target.writeCompressed!(offset, Buffer.from(result.buffer, result.byteOffset, result.byteLength));
    else await target.write(offset, plain.subarray(0, partialLength));
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
        const plain = Buffer.alloc(clusterSize);
        data.copy(plain, 0, pos, pos + len);
        const task = pool.run({ data: plain, algorithm, clusterSize });
        queued += clusterSize;
        const partial = len;
        chain = chain.then(async () => {
          try {
            const result = (await task) as Uint8Array | null;
            await store(clusterStart, plain, result, partial);
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
