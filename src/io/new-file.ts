/**
 * Writing a new image file: created (or truncated) with qemu's message when that fails,
 * filled by the format, and on any failure closed and removed again, so that a failed
 * `create` leaves nothing behind.
 */
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { constants } from 'node:fs';
import { QimgError, describeSystemError } from '../core/errors.js';

/** `reword` turns a failure of `fill` into what the format reports (as qemu's driver words it). */
export async function writeNewFile(
  path: string,
  fill: (handle: FileHandle) => Promise<void>,
  reword: (err: unknown) => unknown = (err) => err,
): Promise<void> {
  let handle: FileHandle;
  try {
    handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC, 0o644);
  } catch (err) {
    throw new QimgError(`Could not create '${path}': ${describeSystemError(err)}`, { cause: err });
  }
  try {
    await fill(handle);
    await handle.close();
  } catch (err) {
    await handle.close().catch(() => undefined);
    await unlink(path).catch(() => undefined);
    throw reword(err);
  }
}
