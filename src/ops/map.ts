/** `map`: the allocation of every guest range through the backing chain. */
import type { BlockImage, Extent } from '../core/block-image.js';
import { extents, mergeable } from '../core/block-status.js';

export async function* mapImage(img: BlockImage, start = 0, length?: number): AsyncGenerator<Extent> {
  const end = length === undefined ? img.virtualSize : Math.min(img.virtualSize, start + length);
  // qemu-img does not know which of a format's "data" reads as zeros: merge as it does
  let cur: Extent | null = null;
  for await (const e of extents(img, start, end)) {
    const plain = { ...e, knownZero: undefined };
    if (cur && mergeable(cur, plain)) {
      cur.length += e.length;
      continue;
    }
    if (cur) yield cur;
    cur = plain;
  }
  if (cur) yield cur;
}

/** A map range with exact offsets: the edges of --start-offset / --max-length past 2^53 may be odd. */
export type ExactExtent = Omit<Extent, 'offset' | 'length' | 'hostOffset'> & { offset: bigint; length: bigint; hostOffset?: bigint };

/**
 * mapImage for arguments of any size up to 2^63 - 1: the image is walked from and to
 * whole sectors (exact as numbers below 2^62) and the ranges are clipped exactly.
 */
export async function* mapImageExact(img: BlockImage, start: bigint, maxLength?: bigint): AsyncGenerator<ExactExtent> {
  const size = BigInt(img.virtualSize);
  const end = maxLength === undefined || start + maxLength > size ? size : start + maxLength;
  if (start >= end) return;
  const from = Number((start / 512n) * 512n);
  const to = Math.min(img.virtualSize, Number(((end + 511n) / 512n) * 512n));
  for await (const e of mapImage(img, from, to - from)) {
    const s0 = BigInt(e.offset);
    const s = s0 > start ? s0 : start;
    const t = s0 + BigInt(e.length) < end ? s0 + BigInt(e.length) : end;
    if (t <= s) continue;
    yield { ...e, offset: s, length: t - s, hostOffset: e.hostOffset === undefined ? undefined : BigInt(e.hostOffset) + (s - s0) };
  }
}

/** The name of each chain level, for the human output's "File" column. */
export function chainFilenames(img: BlockImage): string[] {
  const names: string[] = [];
  for (let cur: BlockImage | null = img; cur; cur = cur.backing) names.push(cur.filename);
  return names;
}
