/**
 * Which files an image may make qimg open on its own (backing files, external data
 * files). Images from untrusted sources (uploads, downloaded cloud images) can name
 * any path — /etc/shadow as a backing file is a classic. With `--untrusted` (or
 * QIMG_UNTRUSTED=1) such references must stay inside the image's own directory, and
 * those of an image behind a URL on the URL's origin.
 */
import { realpathSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { QimgError } from './errors.js';
import { isHttpName, isRemoteName } from '../io/remote.js';
import { httpOrigin } from '../io/http-url.js';

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
  if (isHttpName(fromImage)) {
    // an image behind a URL may name only resources of the same origin (scheme, host, port)
    const origin = httpOrigin(fromImage);
    if (!isHttpName(target) || httpOrigin(target) !== origin) {
      throw new QimgError(`${kind} '${target}' lies outside the image's origin ${origin} (refused for untrusted images)`, { file: fromImage });
    }
    return;
  }
  if (isRemoteName(target) || isRemoteName(fromImage)) {
    // a local image naming a network resource (or an export naming anything) leaves its directory
    throw new QimgError(`${kind} '${target}' lies outside the image's directory (refused for untrusted images)`, { file: fromImage });
  }
  const dir = real(dirname(real(fromImage)));
  const path = real(target);
  if (path !== dir && !path.startsWith(dir.endsWith(sep) ? dir : dir + sep)) {
    throw new QimgError(`${kind} '${target}' lies outside the image's directory (refused for untrusted images)`, { file: fromImage });
  }
}
