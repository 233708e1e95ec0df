/**
 * Loading koffi, the FFI library behind the libc calls Node lacks (OFD locks, SEEK_DATA,
 * fallocate). Its package entry spends several milliseconds finding out which prebuilt
 * binary fits (it reads Node's own ELF header to tell glibc from musl) on every start:
 * a tenth of a metadata command's time. The prebuilt glibc binary is tried first,
 * straight from its package; anything unexpected falls back to koffi's own loader.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The koffi calls qimg makes. */
export interface Koffi {
  load(name: string): { func(signature: string): (...args: unknown[]) => unknown };
  errno(): number;
  address(buf: Buffer): unknown;
}

let cached: Koffi | undefined;

export function loadKoffi(): Koffi {
  cached ??= loadPrebuilt() ?? (createRequire(import.meta.url)('koffi') as Koffi);
  return cached;
}

function loadPrebuilt(): Koffi | null {
  if (process.platform !== 'linux') return null;
  const rel = join('node_modules', '@koromix', `koffi-linux-${process.arch}`, `linux_${process.arch}`, 'koffi.node');
  // node_modules beside dist/ (the bundle) or beside src/io (tests run the sources)
  for (let dir = dirname(fileURLToPath(import.meta.url)), i = 0; i < 4; dir = dirname(dir), i++) {
    const file = join(dir, rel);
    if (!existsSync(file)) continue;
    try {
      const mod = { exports: {} as Partial<Koffi> };
      process.dlopen(mod, file);
      const k = mod.exports;
      if (typeof k.load === 'function' && typeof k.errno === 'function' && typeof k.address === 'function') return k as Koffi;
    } catch {
      // a musl system, or a binary this Node cannot load: koffi's loader decides
    }
    return null;
  }
  return null;
}
