/** The bit arithmetic of persistent bitmaps: ranges to bits (LSB first), merges across granularities. */
import { describe, expect, it } from 'vitest';
import { bitmapBytes, mergeBits, setBitRange } from '../../src/formats/qcow2/bitmap-store.js';

/** Bit numbers set in `bits`. */
function setBits(bits: Buffer): number[] {
  const out: number[] = [];
  for (let n = 0; n < bits.length * 8; n++) if (bits[n >> 3] & (1 << (n & 7))) out.push(n);
  return out;
}

/** The obvious definition: every granule [n*g, (n+1)*g) that meets [off, off+len). */
function expected(gBits: number, off: number, len: number, total: number): number[] {
  const g = 2 ** gBits;
  const out: number[] = [];
  for (let n = 0; n < total; n++) if (n * g < off + len && (n + 1) * g > off) out.push(n);
  return out;
}

describe('bitmap bits', () => {
  it('sizes bitmap data as qcow2 does (one bit per granule, rounded up to bytes)', () => {
    expect(bitmapBytes(10 * 1024 * 1024, 16)).toBe(20);
    expect(bitmapBytes(65536 * 8 + 1, 16)).toBe(2);
    expect(bitmapBytes(1, 9)).toBe(1);
    expect(bitmapBytes(2 ** 40, 9)).toBe(2 ** 28);
  });

  it('sets exactly the granules a range touches, for every alignment', () => {
    const gBits = 9;
    const total = 200;
    for (const [off, len] of [
      [0, 1],
      [511, 2],
      [512, 512],
      [100, 512 * 30],
      [4096 * 3 - 1, 4096 * 8 + 2],
      [0, 512 * 200],
      [512 * 199, 512],
      [7 * 512, 512 * 9],
    ]) {
      const bits = Buffer.alloc(total / 8);
      setBitRange(bits, gBits, off, len);
      expect(setBits(bits), `${off}+${len}`).toEqual(expected(gBits, off, len, total));
    }
  });

  it('never writes past the bitmap and ignores empty ranges', () => {
    const bits = Buffer.alloc(2);
    setBitRange(bits, 9, 512 * 14, 512 * 10);
    expect(setBits(bits)).toEqual([14, 15]);
    const none = Buffer.alloc(2);
    setBitRange(none, 9, 100, 0);
    expect(setBits(none)).toEqual([]);
  });

  it('merges a finer bitmap into a coarser one and back', () => {
    const size = 64 * 4096;
    const fine = Buffer.alloc(bitmapBytes(size, 9));
    setBitRange(fine, 9, 4096 * 3 + 512, 512);
    setBitRange(fine, 9, 4096 * 10, 4096 * 2);
    const coarse = Buffer.alloc(bitmapBytes(size, 12));
    mergeBits(coarse, 12, fine, 9, size);
    expect(setBits(coarse)).toEqual([3, 10, 11]);
    const back = Buffer.alloc(bitmapBytes(size, 9));
    mergeBits(back, 9, coarse, 12, size);
    expect(setBits(back)).toEqual([...expected(9, 4096 * 3, 4096, 512), ...expected(9, 4096 * 10, 8192, 512)]);
  });

  it('ORs bitmaps of the same granularity', () => {
    const a = Buffer.from([0b0001, 0]);
    const b = Buffer.from([0b1000, 0x80]);
    mergeBits(a, 16, b, 16, 16 * 65536);
    expect(setBits(a)).toEqual([0, 3, 15]);
  });
});
