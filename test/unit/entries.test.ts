/**
 * L2 entry decoding and run lookup (src/formats/qcow2/entries.ts) on L2 tables built
 * by hand in Buffers: standard and extended entries, compressed descriptors, and the
 * corrupt combinations that must be refused.
 */
import { describe, expect, it } from 'vitest';
import { CorruptImageError } from '../../src/core/errors.js';
import {
  Sub,
  compressedDescriptor,
  decodeCluster,
  l2OffsetFromL1,
  lookupRun,
  type Geometry,
} from '../../src/formats/qcow2/entries.js';

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const ZERO = 1n;
const FILE = 'test.qcow2';
const L2OFF = 0x30000;

function geometry(clusterBits: number, opts: Partial<Geometry> = {}): Geometry {
  const extendedL2 = opts.extendedL2 ?? false;
  const clusterSize = 1 << clusterBits;
  const l2EntrySize = extendedL2 ? 16 : 8;
  return {
    clusterBits,
    clusterSize,
    l2EntrySize,
    l2Entries: clusterSize / l2EntrySize,
    extendedL2,
    subclusterSize: extendedL2 ? clusterSize / 32 : clusterSize,
    version: 3,
    hasDataFile: false,
    ...opts,
  };
}

/** An L2 table for `g` with the given standard entries (index -> 64-bit value). */
function table(g: Geometry, entries: Record<number, bigint>): Buffer {
  const buf = Buffer.alloc(g.clusterSize);
  for (const [i, v] of Object.entries(entries)) buf.writeBigUInt64BE(v, Number(i) * g.l2EntrySize);
  return buf;
}

/** An extended L2 table: index -> [entry, zero bits, alloc bits]. */
function extTable(g: Geometry, entries: Record<number, [bigint, number, number]>): Buffer {
  const buf = Buffer.alloc(g.clusterSize);
  for (const [i, [v, zero, alloc]] of Object.entries(entries)) {
    const pos = Number(i) * 16;
    buf.writeBigUInt64BE(v, pos);
    buf.writeUInt32BE(zero >>> 0, pos + 8);
    buf.writeUInt32BE(alloc >>> 0, pos + 12);
  }
  return buf;
}

function expectCorrupt(fn: () => unknown, message?: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(CorruptImageError);
  if (message) expect((caught as Error).message).toMatch(message);
}

describe('standard L2 entries (64 KiB clusters)', () => {
  const g = geometry(16);
  const cs = g.clusterSize;
  const span = cs * g.l2Entries; // 512 MiB per table

  it('no L2 table: unallocated up to the end of the table span', () => {
    expect(lookupRun(null, 0, 0, 2 ** 40, g, FILE)).toEqual({ type: Sub.UnallocatedPlain, length: span });
    expect(lookupRun(null, 0, span + 100, 2 ** 40, g, FILE)).toEqual({ type: Sub.UnallocatedPlain, length: span - 100 });
    expect(lookupRun(null, 0, 5, 1000, g, FILE)).toEqual({ type: Sub.UnallocatedPlain, length: 1000 });
  });

  it('unallocated entries merge into one run', () => {
    const l2 = table(g, { 3: 0x50000n | COPIED });
    const r = lookupRun(l2, L2OFF, 0, span, g, FILE);
    expect(r).toMatchObject({ type: Sub.UnallocatedPlain, length: 3 * cs });
    expect(r.hostOffset).toBeUndefined();
    expect(lookupRun(l2, L2OFF, 4 * cs, span, g, FILE)).toMatchObject({ type: Sub.UnallocatedPlain, length: span - 4 * cs });
  });

  it('normal clusters with contiguous host offsets merge; COPIED is ignored', () => {
    const l2 = table(g, { 0: 0x50000n | COPIED, 1: 0x60000n, 2: 0x70000n | COPIED, 3: 0x90000n, 4: 0xa0000n });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.Normal, length: 3 * cs, hostOffset: 0x50000 });
    // from inside the first cluster: host offset follows, length shrinks
    expect(lookupRun(l2, L2OFF, 0x1234, span, g, FILE)).toEqual({ type: Sub.Normal, length: 3 * cs - 0x1234, hostOffset: 0x51234 });
    // the jump 0x70000 -> 0x90000 breaks the run, then 0x90000, 0xa0000 merge
    expect(lookupRun(l2, L2OFF, 3 * cs, span, g, FILE)).toEqual({ type: Sub.Normal, length: 2 * cs, hostOffset: 0x90000 });
    // maxLen clips
    expect(lookupRun(l2, L2OFF, 0, cs + 7, g, FILE)).toEqual({ type: Sub.Normal, length: cs + 7, hostOffset: 0x50000 });
  });

  it('a backwards host offset breaks the run too', () => {
    const l2 = table(g, { 0: 0x60000n, 1: 0x50000n });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toMatchObject({ type: Sub.Normal, length: cs, hostOffset: 0x60000 });
    expect(lookupRun(l2, L2OFF, cs, span, g, FILE)).toMatchObject({ type: Sub.Normal, length: cs, hostOffset: 0x50000 });
  });

  it('a run stops at the end of the table', () => {
    const last = g.l2Entries - 1;
    const l2 = table(g, { [last - 1]: 0x50000n, [last]: 0x60000n });
    expect(lookupRun(l2, L2OFF, (last - 1) * cs, 2 ** 40, g, FILE)).toEqual({ type: Sub.Normal, length: 2 * cs, hostOffset: 0x50000 });
    // same offsets in the second table span
    expect(lookupRun(l2, L2OFF, span + last * cs + 10, 2 ** 40, g, FILE)).toEqual({ type: Sub.Normal, length: cs - 10, hostOffset: 0x60000 + 10 });
  });

  it('zero clusters: plain (no host offset) and preallocated', () => {
    const l2 = table(g, { 0: ZERO, 1: ZERO, 2: 0x80000n | ZERO, 3: 0x90000n | ZERO | COPIED, 4: 0xb0000n | ZERO, 5: 0xc0000n });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.ZeroPlain, length: 2 * cs, hostOffset: undefined });
    expect(lookupRun(l2, L2OFF, 2 * cs, span, g, FILE)).toEqual({ type: Sub.ZeroAlloc, length: 2 * cs, hostOffset: 0x80000 });
    expect(lookupRun(l2, L2OFF, 4 * cs, span, g, FILE)).toEqual({ type: Sub.ZeroAlloc, length: cs, hostOffset: 0xb0000 });
    expect(lookupRun(l2, L2OFF, 5 * cs, span, g, FILE)).toMatchObject({ type: Sub.Normal, length: cs, hostOffset: 0xc0000 });
    expect(decodeCluster(l2, L2OFF, 2, g, FILE)).toEqual({ type: Sub.ZeroAlloc, hostOffset: 0x80000 });
    expect(decodeCluster(l2, L2OFF, 0, g, FILE)).toEqual({ type: Sub.ZeroPlain });
  });

  it('a compressed cluster is a run of its own, clipped to the cluster', () => {
    const desc = (5n << 54n) | 0x123456n; // 5 additional sectors at 0x123456 (cluster_bits 16: x = 54)
    const l2 = table(g, { 0: COMPRESSED | desc, 1: COMPRESSED | desc });
    const r = lookupRun(l2, L2OFF, 100, span, g, FILE);
    expect(r.type).toBe(Sub.Compressed);
    expect(r.length).toBe(cs - 100);
    expect(r.compressed).toEqual({ hostOffset: 0x123456, size: 6 * 512 - 0x56 });
  });

  it('refuses the zero flag in a v2 image', () => {
    const v2 = { ...g, version: 2 };
    const l2 = table(v2, { 1: ZERO });
    expectCorrupt(() => lookupRun(l2, L2OFF, 0, span, v2, FILE), /Zero cluster entry found in pre-v3 image/);
    expectCorrupt(() => decodeCluster(l2, L2OFF, 1, v2, FILE), /L2 offset: 0x30000, L2 index: 0x1/);
  });

  it('refuses unaligned host offsets (data and preallocated zero)', () => {
    expectCorrupt(() => decodeCluster(table(g, { 0: 0x50200n }), L2OFF, 0, g, FILE), /Cluster allocation offset 0x50200 unaligned/);
    expectCorrupt(() => decodeCluster(table(g, { 0: 0x50200n | ZERO }), L2OFF, 0, g, FILE), /unaligned/);
  });

  it('with an external data file: offset 0 + COPIED is data, compressed is invalid', () => {
    const gd = { ...g, hasDataFile: true };
    const l2 = table(gd, { 0: COPIED, 1: COPIED | 0x10000n, 2: 0n });
    expect(lookupRun(l2, L2OFF, 0, span, gd, FILE)).toEqual({ type: Sub.Normal, length: 2 * cs, hostOffset: 0 });
    expect(decodeCluster(l2, L2OFF, 2, gd, FILE)).toEqual({ type: Sub.UnallocatedPlain });
    // without a data file, offset 0 is unallocated whatever COPIED says
    expect(decodeCluster(l2, L2OFF, 0, g, FILE)).toEqual({ type: Sub.UnallocatedPlain });
    const c = table(gd, { 0: COMPRESSED | 0x10000n });
    expectCorrupt(() => decodeCluster(c, L2OFF, 0, gd, FILE), /Invalid cluster entry found/);
  });

  it('refuses host offsets at or beyond 2^53 and accepts the largest below', () => {
    const below = 2n ** 53n - BigInt(cs);
    const l2 = table(g, { 0: below, 1: 2n ** 53n, 2: ((1n << 56n) - BigInt(cs)) | COPIED });
    expect(decodeCluster(l2, L2OFF, 0, g, FILE)).toEqual({ type: Sub.Normal, hostOffset: Number(below) });
    expectCorrupt(() => decodeCluster(l2, L2OFF, 1, g, FILE), /beyond 2\^53/);
    expectCorrupt(() => decodeCluster(l2, L2OFF, 2, g, FILE), /beyond 2\^53/);
    // bits 56..61 are not part of the offset
    const l2b = table(g, { 0: (1n << 60n) | 0x50000n });
    expect(decodeCluster(l2b, L2OFF, 0, g, FILE)).toEqual({ type: Sub.Normal, hostOffset: 0x50000 });
  });

  it('l2OffsetFromL1 checks alignment and the 2^53 limit', () => {
    const l1 = Buffer.alloc(32);
    l1.writeBigUInt64BE(COPIED | 0x70000n, 0);
    l1.writeBigUInt64BE(0x70200n, 8);
    l1.writeBigUInt64BE(2n ** 53n, 16);
    expect(l2OffsetFromL1(l1, 0, g, FILE)).toBe(0x70000);
    expect(l2OffsetFromL1(l1, 3, g, FILE)).toBe(0);
    expectCorrupt(() => l2OffsetFromL1(l1, 1, g, FILE), /L2 table offset 0x70200 unaligned \(L1 index: 0x1\)/);
    expectCorrupt(() => l2OffsetFromL1(l1, 2, g, FILE), /beyond 2\^53/);
  });
});

describe('compressed cluster descriptors', () => {
  /** Builds a descriptor: x = 62 - (cluster_bits - 8) offset bits, then the sector count. */
  function descriptor(clusterBits: number, offset: bigint, additionalSectors: bigint): [number, number] {
    const x = BigInt(62 - (clusterBits - 8));
    const v = COMPRESSED | (additionalSectors << x) | offset;
    return [Number(v >> 32n), Number(v & 0xffffffffn)];
  }
  const bytes = (nsec: number, offset: number) => (nsec + 1) * 512 - (offset & 511);

  for (const cb of [9, 16, 21]) {
    const maxSectors = 2 ** (cb - 8) - 1;
    const offsetBits = 62 - (cb - 8);
    it(`cluster_bits ${cb}: ${offsetBits} offset bits, ${cb - 8} sector-count bits`, () => {
      const cases: Array<[number, number]> = [
        [0x200000, 0],
        [0x200123, 0],
        [0x2001ff, maxSectors],
        [0x12345, 1],
        [0x5_0000_0000 + 17, Math.min(3, maxSectors)],
        [2 ** 40 + 511, maxSectors],
      ];
      for (const [offset, nsec] of cases) {
        const [hi, lo] = descriptor(cb, BigInt(offset), BigInt(nsec));
        expect(compressedDescriptor(hi, lo, cb, FILE), `${offset}/${nsec}`).toEqual({ hostOffset: offset, size: bytes(nsec, offset) });
      }
    });
  }

  it('the sector count does not leak into the offset (all count bits set)', () => {
    for (const cb of [9, 16, 21]) {
      const [hi, lo] = descriptor(cb, 0x10000n, BigInt(2 ** (cb - 8) - 1));
      const d = compressedDescriptor(hi, lo, cb, FILE);
      expect(d.hostOffset).toBe(0x10000);
      expect(d.size).toBe(2 ** (cb - 8) * 512);
    }
  });

  it('refuses offsets near 2^53', () => {
    const [hi, lo] = descriptor(16, 2n ** 53n, 0n);
    expectCorrupt(() => compressedDescriptor(hi, lo, 16, FILE), /beyond 2\^53/);
    const [hi2, lo2] = descriptor(9, 2n ** 60n, 0n);
    expectCorrupt(() => compressedDescriptor(hi2, lo2, 9, FILE), /beyond 2\^53/);
  });

  it('ignores the COPIED bit (bit 63) of the entry', () => {
    const [hi, lo] = descriptor(16, 0x4000n, 2n);
    expect(compressedDescriptor((hi | 0x80000000) >>> 0, lo, 16, FILE)).toEqual({ hostOffset: 0x4000, size: 3 * 512 });
  });
});

describe('extended L2 entries (64 KiB clusters, 2 KiB subclusters)', () => {
  const g = geometry(16, { extendedL2: true });
  const cs = g.clusterSize;
  const sc = g.subclusterSize;
  const span = cs * g.l2Entries;
  const ALL = 0xffffffff;

  it('has 4096 entries of 16 bytes and 32 subclusters', () => {
    expect(g.l2Entries).toBe(4096);
    expect(sc).toBe(2048);
  });

  it('splits an allocated cluster into alloc / zero / unallocated-alloc runs', () => {
    // subclusters 0-3 data, 4-5 zero, 6-7 unallocated (read backing), 8-31 data
    const alloc = (0b1111 | (ALL << 8)) >>> 0;
    const zero = 0b110000;
    const l2 = extTable(g, { 0: [0x50000n, zero, alloc] });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.Normal, length: 4 * sc, hostOffset: 0x50000 });
    expect(lookupRun(l2, L2OFF, 100, span, g, FILE)).toEqual({ type: Sub.Normal, length: 4 * sc - 100, hostOffset: 0x50000 + 100 });
    expect(lookupRun(l2, L2OFF, 4 * sc, span, g, FILE)).toEqual({ type: Sub.ZeroAlloc, length: 2 * sc, hostOffset: 0x50000 + 4 * sc });
    expect(lookupRun(l2, L2OFF, 6 * sc, span, g, FILE)).toEqual({
      type: Sub.UnallocatedAlloc,
      length: 2 * sc,
      hostOffset: 0x50000 + 6 * sc,
    });
    expect(lookupRun(l2, L2OFF, 8 * sc, span, g, FILE)).toEqual({ type: Sub.Normal, length: 24 * sc, hostOffset: 0x50000 + 8 * sc });
  });

  it('merges fully allocated clusters with contiguous hosts, breaks otherwise', () => {
    const l2 = extTable(g, {
      0: [0x50000n, 0, ALL],
      1: [0x60000n | COPIED, 0, ALL],
      2: [0x80000n, 0, ALL],
      3: [0x90000n, 0, 0x1], // only the first subcluster
    });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.Normal, length: 2 * cs, hostOffset: 0x50000 });
    expect(lookupRun(l2, L2OFF, 2 * cs, span, g, FILE)).toEqual({ type: Sub.Normal, length: cs + sc, hostOffset: 0x80000 });
    expect(lookupRun(l2, L2OFF, 3 * cs + sc, span, g, FILE)).toMatchObject({ type: Sub.UnallocatedAlloc, length: 31 * sc });
  });

  it('unallocated clusters: zero bits give zero-plain subclusters', () => {
    const l2 = extTable(g, { 0: [0n, 0xffff0000, 0], 1: [0n, ALL, 0] });
    expect(lookupRun(l2, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.UnallocatedPlain, length: 16 * sc, hostOffset: undefined });
    expect(lookupRun(l2, L2OFF, 16 * sc, span, g, FILE)).toEqual({ type: Sub.ZeroPlain, length: 16 * sc + cs, hostOffset: undefined });
    expect(lookupRun(l2, L2OFF, 2 * cs, span, g, FILE)).toMatchObject({ type: Sub.UnallocatedPlain, length: span - 2 * cs });
  });

  it('bit 0 of the standard half is not the zero flag with extended L2', () => {
    const l2 = extTable(g, { 0: [0x50000n | ZERO, 0, ALL] });
    expect(lookupRun(l2, L2OFF, 0, cs, g, FILE)).toEqual({ type: Sub.Normal, length: cs, hostOffset: 0x50000 });
  });

  it('compressed clusters: one run for the rest of the cluster', () => {
    const desc = COMPRESSED | (3n << 54n) | 0x40000n;
    const l2 = extTable(g, { 1: [desc, 0, 0] });
    expect(lookupRun(l2, L2OFF, cs + 5 * sc, span, g, FILE)).toEqual({
      type: Sub.Compressed,
      length: cs - 5 * sc,
      compressed: { hostOffset: 0x40000, size: 4 * 512 },
    });
    // a run of data stops before a compressed cluster
    const l2b = extTable(g, { 0: [0x50000n, 0, ALL], 1: [desc, 0, 0] });
    expect(lookupRun(l2b, L2OFF, 0, span, g, FILE)).toEqual({ type: Sub.Normal, length: cs, hostOffset: 0x50000 });
  });

  it('refuses invalid combinations', () => {
    // allocation bits on an unallocated cluster
    // (qemu formats with %#x, which prints 0 as "0")
    expectCorrupt(() => lookupRun(extTable(g, { 0: [0n, 0, 1] }), L2OFF, 0, span, g, FILE), /Invalid cluster entry found \(L2 offset: 0x30000, L2 index: 0\)/);
    // a subcluster both allocated and zero
    expectCorrupt(() => lookupRun(extTable(g, { 2: [0x50000n, 0x4, 0x4] }), L2OFF, 2 * cs, span, g, FILE), /Invalid cluster entry found/);
    // found while extending a run into the next cluster
    expectCorrupt(() => lookupRun(extTable(g, { 0: [0x50000n, 0, ALL], 1: [0x60000n, 1, 1] }), L2OFF, 0, span, g, FILE), /L2 index: 0x1/);
    // unaligned host cluster
    expectCorrupt(() => lookupRun(extTable(g, { 0: [0x50200n, 0, ALL] }), L2OFF, 0, span, g, FILE), /unaligned/);
    // compressed with a data file
    const gd = { ...g, hasDataFile: true };
    expectCorrupt(() => lookupRun(extTable(gd, { 0: [COMPRESSED | 0x10000n, 0, 0] }), L2OFF, 0, span, gd, FILE), /Invalid cluster entry/);
    // 2^53
    expectCorrupt(() => lookupRun(extTable(g, { 0: [2n ** 53n, 0, ALL] }), L2OFF, 0, span, g, FILE), /beyond 2\^53/);
  });

  it('works with the smallest extended-L2 cluster (16 KiB: 512-byte subclusters)', () => {
    const g16 = geometry(14, { extendedL2: true });
    expect(g16.subclusterSize).toBe(512);
    const l2 = extTable(g16, { 0: [0x8000n, 0, 0x0000ffff] });
    expect(lookupRun(l2, L2OFF, 0, 1 << 30, g16, FILE)).toEqual({ type: Sub.Normal, length: 16 * 512, hostOffset: 0x8000 });
    expect(lookupRun(l2, L2OFF, 16 * 512 + 3, 1 << 30, g16, FILE)).toEqual({
      type: Sub.UnallocatedAlloc,
      length: 16 * 512 - 3,
      hostOffset: 0x8000 + 16 * 512 + 3,
    });
  });
});

describe('small clusters (cluster_bits 9)', () => {
  const g = geometry(9);
  it('64 entries per table, runs stop at the 32 KiB table span', () => {
    expect(g.l2Entries).toBe(64);
    const entries: Record<number, bigint> = {};
    for (let i = 0; i < 64; i++) entries[i] = BigInt(0x10000 + i * 512);
    const l2 = table(g, entries);
    expect(lookupRun(l2, L2OFF, 0, 1 << 30, g, FILE)).toEqual({ type: Sub.Normal, length: 32768, hostOffset: 0x10000 });
    expect(lookupRun(l2, L2OFF, 32768 + 1000, 1 << 30, g, FILE)).toEqual({ type: Sub.Normal, length: 32768 - 1000, hostOffset: 0x10000 + 1000 });
  });
});
