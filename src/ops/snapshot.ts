/** `snapshot`: list, create, apply and delete internal snapshots (qcow2). */
import type { SnapshotInfo } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import type { Qcow2Image } from '../formats/qcow2/driver.js';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../formats/qcow2/snapshot-ops.js';

export type SnapshotAction = { kind: 'list' } | { kind: 'create' | 'apply' | 'delete'; name: string };

const VERB = { create: 'create', apply: 'apply', delete: 'delete' } as const;

/**
 * Runs one action; `list` returns the snapshots (empty for formats without any).
 * `extras`: --object secrets and --image-opts options for the open.
 */
export async function snapshotCommand(
  filename: string,
  format: string | undefined,
  action: SnapshotAction,
  forceShare = false,
  extras: Pick<OpenOptions, 'secrets' | 'imageOptions'> = {},
): Promise<SnapshotInfo[]> {
  if (action.kind === 'list') {
    const img = await openImage(filename, { format, metadataOnly: true, forceShare, ...extras });
    try {
      return (await img.info()).snapshots ?? [];
    } finally {
      await img.close();
    }
  }
  const img = await openImage(filename, { format, writable: true, noBacking: true, ...extras });
  try {
    if (img.format !== 'qcow2') {
      throw new QimgError(`Could not ${VERB[action.kind]} snapshot '${action.name}': Operation not supported`, { file: filename });
    }
    const q = img as Qcow2Image;
    if (action.kind === 'create') {
      try {
        await createSnapshot(q, action.name);
      } catch (err) {
        // qemu-img names the snapshot in every create failure ("Could not create snapshot 's1': ...").
        if (err instanceof QimgError && !err.message.startsWith('Could not')) {
          throw new QimgError(`Could not create snapshot '${action.name}': ${err.message}`, { file: err.file ?? filename, exitCode: err.exitCode, cause: err });
        }
        throw err;
      }
    } else if (action.kind === 'apply') {
      // qemu refuses before looking the snapshot up while any persistent bitmap is loaded
      // (enabled or not): reverting would leave them describing another disk state.
      if ((q.header.bitmaps?.nbBitmaps ?? 0) > 0) throw new QimgError(`Could not apply snapshot '${action.name}': Device has active dirty bitmaps`, { file: filename });
      await applySnapshot(q, action.name);
    } else await deleteSnapshot(q, action.name);
  } finally {
    await img.close();
  }
  return [];
}
