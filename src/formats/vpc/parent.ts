/**
 * Where a differencing disk's parent is: the parent locators of its dynamic disk
 * header. Windows writes W2ru (path relative to the child) and W2ku (absolute path),
 * both UTF-16LE; Virtual PC for Mac writes MacX (a UTF-8 file:// URL). The header's
 * own parent name (UTF-16BE) is for messages only.
 */
import { existsSync } from 'node:fs';
import { CorruptImageError } from '../../core/errors.js';
import { resolveRelative } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { utf16, type DynHeader } from './structs.js';

/** Longest locator qimg reads (the spec's names are at most a few hundred bytes). */
const MAX_LOCATOR_BYTES = 64 * 1024;

export interface ParentCandidate {
  /** platform code it came from */
  platform: string;
  /** the text as stored */
  stored: string;
  /** a local path to try (relative names are relative to the child), or undefined */
  path?: string;
}

/** A Windows path as a local one: separators turned round, a leading ".\" dropped. */
function fromWindows(text: string): string | undefined {
  if (/^[A-Za-z]:/.test(text) || text.startsWith('\\\\')) return undefined; // drive letter or UNC share
  const p = text.replace(/\\/g, '/');
  return p.startsWith('./') ? p.slice(2) : p;
}

function fromMacUrl(text: string): string | undefined {
  const m = /^file:\/\/(?:localhost)?(\/.*)$/.exec(text);
  if (!m) return undefined;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return undefined;
  }
}

/** Reads the locators qimg understands, in the order they are tried: W2ru, W2ku, MacX. */
export async function readParentCandidates(file: HostFile, header: DynHeader): Promise<ParentCandidate[]> {
  const order = ['W2ru', 'W2ku', 'MacX'];
  const found: ParentCandidate[] = [];
  for (const loc of header.locators) {
    if (!order.includes(loc.platformCode) || loc.dataLength === 0) continue;
    if (loc.dataLength > MAX_LOCATOR_BYTES || loc.dataOffset + BigInt(loc.dataLength) > BigInt(file.size)) {
      throw new CorruptImageError(file.path, `parent locator ${loc.platformCode} lies outside the image or is too long`);
    }
    const data = await file.readBytes(Number(loc.dataOffset), loc.dataLength);
    if (loc.platformCode === 'MacX') {
      const text = data.toString('utf8').replace(/\0.*$/s, '');
      found.push({ platform: 'MacX', stored: text, path: fromMacUrl(text) });
    } else {
      const text = utf16(data, false);
      found.push({ platform: loc.platformCode, stored: text, path: text === '' ? undefined : fromWindows(text) });
    }
  }
  found.sort((a, b) => order.indexOf(a.platform) - order.indexOf(b.platform));
  return found;
}

/**
 * The parent name to open: the first candidate that exists (relative to the child),
 * else the first usable one (so that a missing parent is named), else none.
 */
export function chooseParent(candidates: ParentCandidate[], childPath: string): ParentCandidate | undefined {
  const usable = candidates.filter((c) => c.path !== undefined);
  return usable.find((c) => existsSync(resolveRelative(c.path!, childPath))) ?? usable[0];
}
