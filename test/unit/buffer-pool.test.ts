/** The pooled I/O buffers: leases of the asked size, blocks reused once released, memory kept bounded. */
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../../src/io/buffer-pool.js';

describe('BufferPool', () => {
  it('leases views of the asked size and reuses a released block for the same size class', () => {
    const pool = new BufferPool(4 << 20);
    const a = pool.lease(200_000);
    expect(a.buf.length).toBe(200_000);
    a.buf.fill(7);
    const block = a.buf.buffer;
    a.release();
    a.release(); // twice is once
    const b = pool.lease(262_144); // the same 256 KiB class
    expect(b.buf.buffer).toBe(block);
    const c = pool.lease(262_144); // the block is leased: a new one
    expect(c.buf.buffer).not.toBe(block);
    const d = pool.lease(70_000); // another class
    expect(d.buf.buffer).not.toBe(block);
  });

  it('keeps at most its byte limit, and does not pool leases larger than it', () => {
    const pool = new BufferPool(512 * 1024);
    const leases = [pool.lease(256 * 1024), pool.lease(256 * 1024), pool.lease(256 * 1024)];
    const blocks = leases.map((l) => l.buf.buffer);
    for (const l of leases) l.release();
    // two fit the limit; the third was dropped
    const again = [pool.lease(256 * 1024), pool.lease(256 * 1024), pool.lease(256 * 1024)].map((l) => l.buf.buffer);
    expect(again.filter((b) => blocks.includes(b))).toHaveLength(2);
    const big = pool.lease(1 << 20);
    expect(big.buf.length).toBe(1 << 20);
    big.release();
    expect(pool.lease(1 << 20).buf.buffer).not.toBe(big.buf.buffer);
  });
});
