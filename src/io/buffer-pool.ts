/**
 * Reusable I/O buffers for short-lived copies on a hot path (NBD write-behind copies, a
 * server's write payloads): a fresh multi-MiB allocation per request costs page faults
 * on first touch and leaves garbage that only a collection returns, which showed as
 * system time and 200 MiB of memory on a 4 GiB copy. Blocks of one capacity are leased
 * (a lease of up to that size is a view of a block) and returned; at most `keep` blocks
 * wait for reuse. Larger leases get a buffer of their own.
 */
import { allocIoBuffer } from './buffers.js';

export interface Lease {
  readonly buf: Buffer;
  /** Gives the block back (once; the buffer must not be used after). */
  release(): void;
}

export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(
    private readonly capacity: number,
    private readonly keep: number,
  ) {}

  lease(size: number): Lease {
    if (size > this.capacity) return { buf: allocIoBuffer(size), release: () => undefined };
    const block = this.free.pop() ?? allocIoBuffer(this.capacity);
    let released = false;
    return {
      buf: block.subarray(0, size),
      release: () => {
        if (released) return;
        released = true;
        if (this.free.length < this.keep) this.free.push(block);
      },
    };
  }
}
