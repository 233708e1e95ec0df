/**
 * Creating an image on remote storage (an NBD export): nothing is made, the export is
 * already there with its size. As qemu, the new image must fit ("Cannot grow NBD
 * nodes") and its first sector is zeroed, so an old header there is no longer probed.
 * Only raw is created this way; other formats' create paths write local files.
 */
import { QimgError } from '../core/errors.js';
import type { FormatDriver } from '../core/driver.js';
import type { OptionValue } from '../core/options.js';
import { openRemote } from '../io/remote.js';

export async function createOnRemote(driver: FormatDriver, name: string, size: number, options: Map<string, OptionValue>): Promise<void> {
  if (driver.name !== 'raw') {
    throw new QimgError(`Creating a ${driver.name} image on an NBD export is not supported (create it locally, or use convert -n onto a raw export)`, { file: name });
  }
  const prealloc = options.get('preallocation');
  if (prealloc !== undefined && prealloc !== 'off') throw new QimgError(`Unsupported preallocation mode '${String(prealloc)}' on an NBD export`, { file: name });
  const host = await openRemote(name, { writable: true });
  try {
    if (size > host.size) throw new QimgError('Cannot grow NBD nodes', { file: name });
    const head = Math.min(512, host.size);
    if (head > 0) await host.write(Buffer.alloc(head), 0);
    await host.flush();
  } finally {
    await host.close();
  }
}
