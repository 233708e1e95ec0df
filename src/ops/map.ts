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

/** The name of each chain level, for the human output's "File" column. */
export function chainFilenames(img: BlockImage): string[] {
  const names: string[] = [];
  for (let cur: BlockImage | null = img; cur; cur = cur.backing) names.push(cur.filename);
  return names;
}
