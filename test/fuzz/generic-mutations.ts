/**
 * Format-blind mutations for the foreign formats' fixtures (VMDK, VDI, VHD, VHDX, QED,
 * qcow, parallels, ...): their headers, footers and tables sit at the start and the end
 * of the file or in the first block of each metadata area, so fields of 1-8 bytes in
 * either byte order get boundary values there; bytes flip anywhere; blocks are copied
 * over other blocks (a table pointing into itself); the file is cut. Each mutation is
 * one log line, and a case is reproduced from its seed alone.
 */
import type { Prng } from '../helpers/prng.js';

export interface GenericMutated {
  data: Buffer;
  log: string[];
}

const BOUNDARY: bigint[] = [0n, 1n, 2n, 0x7fn, 0x80n, 0xffn, 0x1ffn, 0x200n, 0xfffn, 0x1000n, 0xffffn, 0x10000n, 0x7fffffffn, 0x80000000n, 0xfffffffen, 0xffffffffn, 0x100000000n, 1n << 53n, (1n << 63n) - 1n, 1n << 63n, (1n << 64n) - 1n];

const MASK = (w: number): bigint => (1n << BigInt(8 * w)) - 1n;

function read(buf: Buffer, at: number, width: number, le: boolean): bigint {
  let v = 0n;
  for (let i = 0; i < width; i++) {
    const b = at + i < buf.length ? buf[at + i] : 0;
    v = le ? v | (BigInt(b) << BigInt(8 * i)) : (v << 8n) | BigInt(b);
  }
  return v;
}

function write(buf: Buffer, at: number, width: number, le: boolean, v: bigint): void {
  for (let i = 0; i < width; i++) {
    const byte = Number((v >> BigInt(8 * (le ? i : width - 1 - i))) & 0xffn);
    if (at + i < buf.length) buf[at + i] = byte;
  }
}

/** Where metadata most likely is: the first 64 KiB, the last 4 KiB, the first bytes of 512-byte blocks. */
function spot(r: Prng, size: number): number {
  switch (r.int(0, 5)) {
    case 0:
    case 1:
      return r.int(0, Math.min(size, 1024) - 1);
    case 2:
      return r.int(0, Math.min(size, 65536) - 1);
    case 3:
      return Math.max(0, size - r.int(1, Math.min(size, 4096)));
    case 4:
      return Math.min(size - 1, r.int(0, Math.floor((size - 1) / 512)) * 512 + r.int(0, 63));
    default:
      return r.int(0, size - 1);
  }
}

function newValue(r: Prng, cur: bigint, width: number): bigint {
  const m = MASK(width);
  switch (r.int(0, 5)) {
    case 0:
    case 1:
      return r.pick(BOUNDARY) & m;
    case 2:
      return (cur ^ (1n << BigInt(r.int(0, 8 * width - 1)))) & m;
    case 3:
      return (cur + BigInt(r.int(-3, 3))) & m;
    case 4:
      return (cur * BigInt(r.pick([2, 16, 512, 4096, 65536]))) & m;
    default:
      return BigInt(r.u32()) & m;
  }
}

export function mutateGeneric(original: Buffer, r: Prng): GenericMutated {
  const buf = Buffer.from(original);
  const log: string[] = [];
  let truncateTo: number | undefined;
  const size = buf.length;
  const n = Number(r.weighted({ 1: 4, 2: 3, 3: 2, 4: 1 } as Record<string, number>));
  for (let i = 0; i < n && size > 0; i++) {
    const kind = r.weighted({ field: 10, flip: 4, copy: 2, zero: 1, truncate: 1 } as Record<string, number>);
    if (kind === 'field') {
      const width = r.pick([1, 2, 4, 4, 8, 8]);
      const le = r.chance(0.6);
      const at = spot(r, size);
      const aligned = r.chance(0.7) ? at - (at % width) : at;
      const cur = read(buf, aligned, width, le);
      const v = newValue(r, cur, width);
      write(buf, aligned, width, le, v);
      log.push(`u${8 * width}${le ? 'le' : 'be'} @${aligned}: 0x${cur.toString(16)} -> 0x${v.toString(16)}`);
    } else if (kind === 'flip') {
      const spots: string[] = [];
      for (let k = r.int(1, 8); k > 0; k--) {
        const at = spot(r, size);
        const bit = r.int(0, 7);
        buf[at] ^= 1 << bit;
        spots.push(`${at}^${1 << bit}`);
      }
      log.push(`bit flips ${spots.join(',')}`);
    } else if (kind === 'copy') {
      const len = r.pick([8, 64, 512, 4096]);
      const from = spot(r, size);
      const to = spot(r, size);
      buf.copy(buf, to, from, Math.min(size, from + len));
      log.push(`copy ${len} bytes @${from} -> @${to}`);
    } else if (kind === 'zero') {
      const at = spot(r, size);
      const len = r.pick([4, 16, 512, 4096]);
      buf.fill(0, at, Math.min(size, at + len));
      log.push(`zero ${len} bytes @${at}`);
    } else {
      const to = r.pick([0, 1, 511, 512, 4096, Math.floor(size / 2), size - 512, size - 1, r.int(0, size)]);
      truncateTo = Math.max(0, Math.min(truncateTo ?? size, to));
      log.push(`truncate to ${truncateTo}`);
    }
  }
  return { data: truncateTo !== undefined ? buf.subarray(0, truncateTo) : buf, log };
}
