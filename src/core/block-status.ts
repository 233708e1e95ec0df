/**
 * Chain-resolved block status, with qemu's semantics: ask each layer from the top;
 * the first layer that has data or zero answers; a layer without a backing file (or
 * whose backing file is shorter than the offset) reads as zero without being
 * "present". Answered from metadata only: no data is read.
 */
import type { BlockImage, Extent } from './block-image.js';

/**
 * The extent at `offset`, at most `length` bytes (offset < top.virtualSize).
 * `qemuSpans`: cut every layer's answer where QEMU's would end (see
 * BlockImage.statusSpan), for the one output that shows it (compare -s).
 */
export async function extentAt(top: BlockImage, offset: number, length: number, opts: { qemuSpans?: boolean } = {}): Promise<Extent> {
  let img: BlockImage = top;
  let depth = 0;
  let n = Math.min(length, top.virtualSize - offset);
  for (;;) {
    if (opts.qemuSpans && img.statusSpan) n = Math.min(n, img.statusSpan - (offset % img.statusSpan));
    const st = await img.layerStatus(offset, n);
    n = Math.min(n, st.length);
    if (st.data || st.zero) {
      return {
        offset,
        length: n,
        kind: st.zero ? 'zero' : 'data',
        depth,
        present: true,
        data: st.data,
        zero: st.zero,
        compressed: !!st.compressed,
        hostOffset: st.hostOffset,
        file: st.file,
        knownZero: st.data && st.readsAsZero ? true : undefined,
      };
    }
    const below = img.backing;
    if (!below || offset >= below.virtualSize) {
      // Nothing here and nothing below: reads as zeros. The offset is still reported
      // for preallocated-but-unallocated subclusters as qemu does.
      return {
        offset,
        length: n,
        kind: 'unallocated',
        depth,
        present: false,
        data: false,
        zero: true,
        compressed: false,
        hostOffset: st.hostOffset,
        file: st.file,
      };
    }
    n = Math.min(n, below.virtualSize - offset);
    img = below;
    depth++;
  }
}

/** Two extents qemu-img map prints as one range. */
export function mergeable(a: Extent, b: Extent): boolean {
  if (a.offset + a.length !== b.offset) return false;
  if (a.depth !== b.depth || a.present !== b.present || a.data !== b.data || a.zero !== b.zero) return false;
  if (a.compressed !== b.compressed || !!a.knownZero !== !!b.knownZero) return false;
  if ((a.hostOffset === undefined) !== (b.hostOffset === undefined)) return false;
  if (a.hostOffset !== undefined && a.hostOffset + a.length !== b.hostOffset) return false;
  return a.file === b.file;
}

/** Every extent of [start, end), merged as qemu-img map merges them. */
export async function* extents(top: BlockImage, start = 0, end = top.virtualSize): AsyncGenerator<Extent> {
  end = Math.min(end, top.virtualSize);
  let cur: Extent | null = null;
  let pos = start;
  while (pos < end) {
    const e = await extentAt(top, pos, end - pos);
    pos += e.length;
    if (cur && mergeable(cur, e)) {
      cur.length += e.length;
      continue;
    }
    if (cur) yield cur;
    cur = e;
  }
  if (cur) yield cur;
}
