/**
 * Writing a new image file: created (or truncated) with qemu's message when that fails,
 * filled by the format, and on any failure closed and removed again, so that a failed
 * `create` leaves nothing behind.
 */
import { open, stat, unlink, type FileHandle } from 'node:fs/promises';
import { constants } from 'node:fs';
import { dirname, join } from 'node:path';
import { QimgError, describeSystemError } from '../core/errors.js';
import { lockImage } from './lock.js';
import { truncateFile } from './file.js';

/**
 * A URL names no local file (and a directory called "http:" must not make it one):
 * creation there is refused with qemu's words.
 */
export function assertCreatable(path: string): void {
  const scheme = /^(https?):\/\//i.exec(path)?.[1].toLowerCase();
  if (scheme) throw new QimgError(`Protocol driver '${scheme}' does not support image creation`, { file: path });
}

/**
 * Opens a file for a new image: created if missing, otherwise emptied — but only once
 * QEMU's write lock is ours, so an image in use (by QEMU, or by this very command as
 * its source: `convert x.raw x.raw`) is refused untouched, as qemu-img refuses it.
 */
export async function openNewImageFile(path: string): Promise<FileHandle> {
  assertCreatable(path);
  let handle: FileHandle;
  try {
    handle = await open(path, constants.O_RDWR | constants.O_CREAT, 0o644);
  } catch (err) {
    throw new QimgError(`Could not create '${path}': ${describeSystemError(err)}`, { cause: err });
  }
  try {
    lockImage(handle.fd, path, 'write');
    if ((await handle.stat()).isFile()) await handle.truncate(0);
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
  return handle;
}


/** Below this a length is no question for any file system qimg runs on. */
const PROBE_FROM = 2 ** 40;

/**
 * Whether the file system of `path` takes a file of `length` bytes, found out beside it
 * (a sparse scratch file, removed again) when `path` already exists: the new image
 * would otherwise truncate the existing file before its length is refused (EFBIG on
 * ext4 past 16 TiB), and a failed create must leave an existing file as it was. Throws
 * the system error (code EFBIG, EINVAL...) the real file would meet.
 */
export async function checkNewFileLength(path: string, length: number | bigint): Promise<void> {
  if (Number(length) < PROBE_FROM) return;
  const existing = await stat(path).then(
    (s) => s.isFile(),
    () => false,
  );
  if (!existing) return;
  const probe = join(dirname(path), `.qimg-probe-${process.pid}-${Date.now()}`);
  let handle: FileHandle;
  try {
    handle = await open(probe, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
  } catch {
    return; // no scratch file there: the real create reports what goes wrong
  }
  try {
    await truncateFile(handle, length);
  } finally {
    await handle.close().catch(() => undefined);
    await unlink(probe).catch(() => undefined);
  }
}

/** `reword` turns a failure of `fill` into what the format reports (as qemu's driver words it). */
export async function writeNewFile(
  path: string,
  fill: (handle: FileHandle) => Promise<void>,
  reword: (err: unknown) => unknown = (err) => err,
): Promise<void> {
  const handle = await openNewImageFile(path);
  const regular = (await handle.stat()).isFile();
  try {
    await fill(handle);
    await handle.close();
  } catch (err) {
    await handle.close().catch(() => undefined);
    // a device given as the output (/dev/null, a disk) is never removed
    if (regular) await unlink(path).catch(() => undefined);
    throw reword(err);
  }
}
