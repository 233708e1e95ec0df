/**
 * The -l argument of convert and measure: `snapshot.id=ID,snapshot.name=NAME` (either
 * or both) or a plain string that names a snapshot by id or, failing that, by name.
 */
import { QimgError } from '../core/errors.js';
import { splitOptionString } from '../core/options.js';
import type { BlockImage } from '../core/block-image.js';

export type SnapshotParam = { id?: string; name?: string; idOrName?: string };

export function parseSnapshotParam(text: string): SnapshotParam {
  if (!text.startsWith('snapshot.')) return { idOrName: text };
  const p: SnapshotParam = {};
  for (const [k, v] of splitOptionString(text)) {
    if (k === 'snapshot.id') p.id = v;
    else if (k === 'snapshot.name') p.name = v;
    else throw new QimgError(`Invalid parameter '${k}'`);
  }
  if (p.id === undefined && p.name === undefined) throw new QimgError('Invalid snapshot parameter');
  return p;
}

/** Opens the snapshot view `p` names: an id first, then a name, as qemu-img. */
export async function openSnapshotView(img: BlockImage, p: SnapshotParam): Promise<BlockImage> {
  // qemu-img prints "Failed to load snapshot: ..." without a file name (empty `file`)
  if (!img.snapshot) {
    throw new QimgError(`Failed to load snapshot: Block format '${img.format}' used by device '' does not support temporarily loading internal snapshots`, { file: '' });
  }
  const load = img.snapshot.bind(img);
  try {
    if (p.idOrName === undefined) return await load({ id: p.id, name: p.name });
    try {
      return await load({ id: p.idOrName });
    } catch {
      return await load({ name: p.idOrName });
    }
  } catch (err) {
    if (err instanceof QimgError && err.message.startsWith('Failed to load snapshot')) throw new QimgError(err.message, { file: '', cause: err });
    throw err;
  }
}
