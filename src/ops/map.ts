/** `map`: the allocation of every guest range through the backing chain. */
import type { BlockImage, Extent } from '../core/block-image.js';
import { extents } from '../core/block-status.js';

export async function* mapImage(img: BlockImage, start = 0, length?: number): AsyncGenerator<Extent> {
  const end = length === undefined ? img.virtualSize : Math.min(img.virtualSize, start + length);
  yield* extents(img, start, end);
}

/** The name of each chain level, for the human output's "File" column. */
export function chainFilenames(img: BlockImage): string[] {
  const names: string[] = [];
  for (let cur: BlockImage | null = img; cur; cur = cur.backing) names.push(cur.filename);
  return names;
}
