/**
 * Reusable I/O buffers for short-lived copies on a hot path (a server's write
 * payloads): a fresh multi-MiB allocation per request costs page faults on first touch
 * and external memory that only a collection returns (measured: a second of garbage
 * collection in a 2.4 GiB copy through `qimg serve`). Leases are views of blocks in
 * power-of-two size classes (from 64 KiB); returned blocks wait for reuse while the
 * pool keeps fewer than `maxKeptBytes`.
 */
import { allocIoBuffer } from './buffers.js';

export interface Lease {
  readonly buf: Buffer;
  /** Gives the block back (once; the buffer must not be used after). */
  release(): void;
}

const SMALLEST_CLASS = 64 * 1024;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private kept = 0;

  constructor(private readonly maxKeptBytes: number) {}

  lease(size: number): Lease {
    let cls = SMALLEST_CLASS;
    while (cls < size) cls *= 2;
    if (cls > this.maxKeptBytes) return { buf: allocIoBuffer(size), release: () => undefined };
    let block = this.free.get(cls)?.pop();
    if (block) this.kept -= cls;
    else block = allocIoBuffer(cls);
    let released = false;
    return {
      buf: block.subarray(0, size),
      release: () => {
        if (released) return;
        released = true;
        if (this.kept + cls > this.maxKeptBytes) return;
        this.kept += cls;
        const list = this.free.get(cls);
        if (list) list.push(block);
        else this.free.set(cls, [block]);
      },
    };
  }
}
