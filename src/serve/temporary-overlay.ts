/**
 * `serve -s` (qemu-nbd's --snapshot): the export is a temporary qcow2 overlay on the
 * image, so clients may write while the image itself is only read. The overlay lives in
 * a fresh directory under the system's temporary directory (TMPDIR) and is deleted when
 * the server closes it; the image's own --image-opts options apply to it as the
 * overlay's backing file.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { BlockImage } from '../core/block-image.js';
import { QimgError } from '../core/errors.js';
import { openImage } from '../core/open.js';
import type { ImageOptions, SecretStore } from '../core/secrets.js';
import { isRemoteName } from '../io/remote.js';
import { prepareCreate } from '../ops/create.js';

export interface OverlaySource {
  path: string;
  format?: string;
  imageOptions?: ImageOptions;
  secrets?: SecretStore;
}

/** The overlay image (writable) and what removes it once it is closed. */
export interface TemporaryOverlay {
  image: BlockImage;
  /** closes the overlay (if still open) and deletes its file */
  dispose(): Promise<void>;
}

export async function openTemporaryOverlay(src: OverlaySource): Promise<TemporaryOverlay> {
  // the image's size and format, read as any reader would (its options and secrets applied)
  const base = await openImage(src.path, { format: src.format, imageOptions: src.imageOptions, secrets: src.secrets, metadataOnly: true });
  const size = base.virtualSize;
  const format = base.format;
  await base.close();

  const dir = await mkdtemp(join(tmpdir(), 'qimg-serve-'));
  const file = join(dir, 'overlay.qcow2');
  let image: BlockImage | undefined;
  const dispose = async (): Promise<void> => {
    const open = image;
    image = undefined;
    await open?.close().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const backingFile = isRemoteName(src.path) ? src.path : resolve(src.path);
    const prepared = await prepareCreate({ filename: file, format: 'qcow2', optionStrings: [], size: String(size), backingFile, backingFormat: format, unsafe: true });
    if (prepared === 'help') throw new QimgError('no options to list');
    await prepared.run();
    // the image's options become the backing file's (backing.KEY) in the overlay's open
    const backingOptions: Record<string, string> = {};
    for (const [k, v] of Object.entries(src.imageOptions ?? {})) backingOptions[`backing.${k}`] = v;
    image = await openImage(file, { format: 'qcow2', writable: true, secrets: src.secrets, imageOptions: backingOptions });
    return { image, dispose };
  } catch (err) {
    await dispose();
    throw err;
  }
}
