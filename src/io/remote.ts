/**
 * Names that denote storage on another host rather than a local path: NBD exports
 * (`nbd://`, `nbd+unix://`, qemu's `nbd:HOST:PORT`) and HTTP(S) resources. Such storage
 * has no real path, takes no local locks and is opened by its protocol's client.
 */
import { QimgError } from '../core/errors.js';
import type { HostFile } from './host.js';
import { NbdExportFile } from './nbd/export-file.js';
import type { NbdClientTls } from './nbd/tls-client.js';
import { HttpFile } from './http-file.js';

const NBD_NAME = /^(nbd|nbds|nbd\+tcp|nbd\+unix|nbds\+unix):/i;
const HTTP_NAME = /^https?:\/\//i;

export function isNbdName(name: string): boolean {
  return NBD_NAME.test(name);
}

export function isHttpName(name: string): boolean {
  return HTTP_NAME.test(name);
}

export function isRemoteName(name: string): boolean {
  return isNbdName(name) || isHttpName(name);
}

export interface RemoteOpenOptions {
  writable: boolean;
  /** NBD: STARTTLS with these credentials */
  tls?: NbdClientTls;
}

/** Opens the storage a remote name denotes. */
export async function openRemote(name: string, opts: RemoteOpenOptions): Promise<HostFile> {
  if (isNbdName(name)) return NbdExportFile.open(name, opts);
  if (opts.tls) throw new QimgError(`Could not open '${name}': tls-creds is an option of NBD exports`, { file: name });
  if (isHttpName(name)) return HttpFile.open(name, { writable: opts.writable });
  throw new QimgError(`Could not open '${name}': ${opts.writable ? 'writable ' : ''}remote storage is not supported`, { file: name });
}

