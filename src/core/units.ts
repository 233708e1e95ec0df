/**
 * Checked integer arithmetic. Image offsets are JS numbers; every value that comes
 * from a 64-bit field goes through these helpers so that anything at or beyond 2^53
 * is refused instead of being silently rounded.
 */
import { CorruptImageError } from './errors.js';

export const MAX_SAFE = Number.MAX_SAFE_INTEGER;

/** A u64 from a bigint, refused when it cannot be represented exactly. */
export function u64ToNumber(v: bigint, what: string, file?: string): number {
  if (v > BigInt(MAX_SAFE)) {
    throw new CorruptImageError(file, `${what} is too large (${v}); values of 2^53 or more are not supported`);
  }
  return Number(v);
}

/** Reads a big-endian u64 as a number, refusing values >= 2^53. */
export function readU64(buf: Buffer, pos: number, what: string, file?: string): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  if (hi >= 0x200000) {
    throw new CorruptImageError(file, `${what} is too large (${buf.readBigUInt64BE(pos)}); values of 2^53 or more are not supported`);
  }
  return hi * 0x100000000 + lo;
}

/** Writes a number as a big-endian u64. */
export function writeU64(buf: Buffer, pos: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`not a u64: ${value}`);
  buf.writeUInt32BE(Math.floor(value / 0x100000000), pos);
  buf.writeUInt32BE(value % 0x100000000, pos + 4);
}

/** a + b, refusing results beyond 2^53. */
export function checkedAdd(a: number, b: number, what = 'offset'): number {
  const r = a + b;
  if (!Number.isSafeInteger(r)) throw new RangeError(`${what} overflows 2^53`);
  return r;
}

/** a * b, refusing results beyond 2^53. */
export function checkedMul(a: number, b: number, what = 'size'): number {
  const r = a * b;
  if (!Number.isSafeInteger(r)) throw new RangeError(`${what} overflows 2^53`);
  return r;
}

export function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

export function alignDown(value: number, alignment: number): number {
  return Math.floor(value / alignment) * alignment;
}

export function divRoundUp(a: number, b: number): number {
  return Math.ceil(a / b);
}

/**
 * An integer as decimal text, exact beyond 2^53: JavaScript prints large doubles with
 * the fewest digits that read back the same (2^61 as "2305843009213694000"), while
 * qemu prints every digit. Image sizes up to 2^62 that are whole sectors are exact
 * doubles, so their digits are known.
 */
export function intString(n: number | bigint): string {
  if (typeof n === 'bigint') return n.toString();
  return Number.isInteger(n) && Math.abs(n) >= 2 ** 53 ? BigInt(n).toString() : String(n);
}

/** The largest virtual size kept as a number: whole sectors below it are exact doubles. */
export const MAX_EXACT_SECTOR_SIZE = 2 ** 62;

/**
 * Writes a virtual disk size as a big-endian u64. Unlike writeU64 it takes sizes of
 * 2^53 and more (qcow2 images reach 2 EiB with 2 MiB clusters): whole sectors below
 * 2^62 are exact as numbers.
 */
export function writeSizeU64(buf: Buffer, pos: number, value: number): void {
  if (!Number.isInteger(value) || value < 0 || (value > MAX_SAFE && (value % 512 !== 0 || value >= MAX_EXACT_SECTOR_SIZE))) {
    throw new RangeError(`not an exact disk size: ${value}`);
  }
  buf.writeBigUInt64BE(BigInt(value), pos);
}
