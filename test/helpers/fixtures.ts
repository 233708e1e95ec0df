/** The fixture corpus made by fixtures/make-fixtures.sh, decompressed where stored gzipped. */
import { existsSync, readFileSync, writeFileSync, mkdirSync, renameSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { ROOT } from './qemu.js';

export interface Fixture {
  name: string;
  file: string;
  format: 'qcow2' | 'raw';
  features: string[];
  readable: boolean;
  gzip: boolean;
  notes: string;
}

export const FIXTURES_DIR = join(ROOT, 'fixtures');
/** qemu 7.2 resolves data-file names against the working directory: run from here. */
export const IMAGES_DIR = join(FIXTURES_DIR, 'images');

export function loadManifest(): Fixture[] {
  return JSON.parse(readFileSync(join(FIXTURES_DIR, 'manifest.json'), 'utf8')) as Fixture[];
}

/**
 * Path of the fixture relative to IMAGES_DIR, decompressing gzipped ones next to
 * their .gz (ignored by git) on first use.
 */
export function fixturePath(f: Fixture): string {
  const rel = f.file.replace(/^images\//, '');
  if (!f.gzip) return rel;
  const plain = rel.replace(/\.gz$/, '');
  const abs = join(IMAGES_DIR, plain);
  if (!existsSync(abs)) {
    mkdirSync(dirname(abs), { recursive: true });
    // write then rename: test files running in parallel may race here
    const tmp = `${abs}.${process.pid}.tmp`;
    writeFileSync(tmp, gunzipSync(readFileSync(join(IMAGES_DIR, rel))));
    renameSync(tmp, abs);
  }
  return plain;
}

/**
 * Decompresses every gzipped fixture that is not yet (fixturePath does it on first
 * use): for whoever needs the fixture tree as it will stay, such as the fuzzer, which
 * hashes the tree before and after its run (on a fresh clone, the first use would
 * otherwise fall inside the run and count as a changed fixture).
 */
export function prepareFixtures(): void {
  for (const f of loadManifest()) if (f.gzip) fixturePath(f);
}
