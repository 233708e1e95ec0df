/**
 * `compare`: are two images' guest contents the same? Ranges both sides know to be
 * zero are not read; unallocated and zero count as equal unless strict. Results and
 * exit codes are qemu-img's (0 identical, 1 different, 3 allocation error, 4 read error).
 */
import type { BlockImage, Extent } from '../core/block-image.js';
import { extentAt } from '../core/block-status.js';
import { describeSystemError } from '../core/errors.js';
import { allocIoBuffer } from '../io/buffers.js';

const IO_BUF = 2 * 1024 * 1024;
const SECTOR = 512;

export interface CompareResult {
  code: 0 | 1 | 3 | 4;
  /** lines qemu-img prints on stdout (suppressed by -q) */
  lines: string[];
  /** an error line for stderr, when code is 3 or 4 */
  error?: string;
}

/** Offset of the first 512-byte sector in which the buffers differ, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  for (let s = 0; s < a.length; s += SECTOR) {
    if (!a.subarray(s, s + SECTOR).equals(b.subarray(s, s + SECTOR))) return s;
  }
  return -1;
}

/** Offset of the first sector that is not all zeros, or -1. */
function firstNonZero(a: Buffer): number {
  const zero = Buffer.alloc(Math.min(a.length, SECTOR));
  for (let s = 0; s < a.length; s += SECTOR) {
    const part = a.subarray(s, s + SECTOR);
    if (!part.equals(zero.subarray(0, part.length))) return s;
  }
  return -1;
}

function sameStatus(a: Extent, b: Extent): boolean {
  return a.present === b.present && a.zero === b.zero && a.data === b.data && (a.hostOffset === undefined) === (b.hostOffset === undefined);
}

export async function compareImages(
  a: { image: BlockImage; name: string },
  b: { image: BlockImage; name: string },
  opts: { strict?: boolean; onProgress?: (done: number, total: number) => void } = {},
): Promise<CompareResult> {
  const sizeA = a.image.virtualSize;
  const sizeB = b.image.virtualSize;
  const common = Math.min(sizeA, sizeB);
  const total = Math.max(sizeA, sizeB);
  const lines: string[] = [];
  const bufA = allocIoBuffer(IO_BUF);
  const bufB = allocIoBuffer(IO_BUF);
  opts.onProgress?.(0, total);
  if (opts.strict && sizeA !== sizeB) return { code: 1, lines: ['Strict mode: Image size mismatch!'] };

  const read = async (side: { image: BlockImage; name: string }, offset: number, buf: Buffer): Promise<string | null> => {
    try {
      await side.image.read(offset, buf);
      return null;
    } catch (err) {
      return `Error while reading offset ${offset} of ${side.name}: ${describeSystemError(err)}`;
    }
  };
  /** The allocated side of a range must read as zeros. */
  const checkEmpty = async (side: { image: BlockImage; name: string }, offset: number, length: number): Promise<CompareResult | null> => {
    const buf = bufA.subarray(0, length);
    const err = await read(side, offset, buf);
    if (err) return { code: 4, lines, error: err };
    const at = firstNonZero(buf);
    if (at >= 0) return { code: 1, lines: [...lines, `Content mismatch at offset ${offset + at}!`] };
    return null;
  };

  let offset = 0;
  while (offset < common) {
    let ea: Extent;
    let eb: Extent;
    // qemu-img's message names the image whose block status failed
    try {
      ea = await extentAt(a.image, offset, common - offset, { qemuSpans: opts.strict });
    } catch {
      return { code: 3, lines, error: `Sector allocation test failed for ${a.name}` };
    }
    try {
      eb = await extentAt(b.image, offset, common - offset, { qemuSpans: opts.strict });
    } catch {
      return { code: 3, lines, error: `Sector allocation test failed for ${b.name}` };
    }
    let chunk = Math.min(ea.length, eb.length);
    // qemu-img compares the raw block status flags, BDRV_BLOCK_EOF included: whether
    // this extent reaches the end of the image (sizes are equal in strict mode).
    if (opts.strict && (!sameStatus(ea, eb) || (offset + ea.length === sizeA) !== (offset + eb.length === sizeB))) {
      return { code: 1, lines: [`Strict mode: Offset ${offset} block status mismatch!`] };
    }
    if (ea.zero && eb.zero) {
      // both read as zeros
    } else if (ea.present === eb.present) {
      if (ea.present) {
        chunk = Math.min(chunk, IO_BUF);
        const ra = await read(a, offset, bufA.subarray(0, chunk));
        if (ra) return { code: 4, lines, error: ra };
        const rb = await read(b, offset, bufB.subarray(0, chunk));
        if (rb) return { code: 4, lines, error: rb };
        const at = firstDifference(bufA.subarray(0, chunk), bufB.subarray(0, chunk));
        if (at >= 0) return { code: 1, lines: [`Content mismatch at offset ${offset + at}!`] };
      }
    } else {
      chunk = Math.min(chunk, IO_BUF);
      const r = await checkEmpty(ea.present ? a : b, offset, chunk);
      if (r) return r;
    }
    offset += chunk;
    opts.onProgress?.(offset, total);
  }

  if (sizeA !== sizeB) {
    lines.push('Warning: Image size mismatch!');
    const over = sizeA > sizeB ? a : b;
    while (offset < total) {
      let e: Extent;
      try {
        e = await extentAt(over.image, offset, total - offset);
      } catch {
        return { code: 3, lines, error: `Sector allocation test failed for ${over.name}` };
      }
      let chunk = e.length;
      if (e.present && !e.zero) {
        chunk = Math.min(chunk, IO_BUF);
        const r = await checkEmpty(over, offset, chunk);
        if (r) return r;
      }
      offset += chunk;
      opts.onProgress?.(offset, total);
    }
  }
  lines.push('Images are identical.');
  return { code: 0, lines };
}
