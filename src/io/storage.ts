/**
 * Storage by name, local or remote: the one door for code that opens a file an image
 * names (a VMDK extent, an external data file) or reopens an image for its check, so
 * that the same code works on a local path and on a URL.
 */
import { ImageFile } from './file.js';
import type { HostFile } from './host.js';
import type { LockMode } from './lock.js';
import { isRemoteName, openRemote } from './remote.js';

export async function openStorage(name: string, opts: { writable?: boolean; lock?: LockMode } = {}): Promise<HostFile> {
  // remote storage takes no local locks
  if (isRemoteName(name)) return openRemote(name, { writable: !!opts.writable });
  return ImageFile.open(name, opts);
}
