/**
 * Which files an image may make qimg open on its own (backing files, external data
 * files). Images from untrusted sources (uploads, downloaded cloud images) can name
 * any path — /etc/shadow as a backing file is a classic. With `--untrusted` (or
 * QIMG_UNTRUSTED=1) such references must stay inside the image's own directory.
 */
import { realpathSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { QimgError } from './errors.js';

export function untrustedMode(): boolean {
  return process.env.QIMG_UNTRUSTED === '1';
}

function real(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return resolve(path);
  }
}

/** Refuses, in untrusted mode, a referenced file outside the referencing image's directory. */
export function assertReferenceAllowed(target: string, fromImage: string, kind: 'backing file' | 'data file'): void {
  if (!untrustedMode()) return;
  const dir = real(dirname(real(fromImage)));
  const path = real(target);
  if (path !== dir && !path.startsWith(dir.endsWith(sep) ? dir : dir + sep)) {
    throw new QimgError(`${kind} '${target}' lies outside the image's directory (refused for untrusted images)`, { file: fromImage });
  }
}
