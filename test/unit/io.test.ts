/**
 * The file layer: complete positional reads (zeros past EOF), data/hole runs from
 * SEEK_DATA/SEEK_HOLE through koffi, and the portable fallback when the native
 * library is unavailable (QIMG_NO_NATIVE=1), down to an end-to-end convert.
 */
import { describe, expect, it, afterAll, afterEach } from 'vitest';
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ImageFile } from '../../src/io/file.js';
import { fileRunAt } from '../../src/io/sparse.js';
import { native, resetNativeForTests, SEEK_DATA, ENXIO } from '../../src/io/native.js';
import { QimgError } from '../../src/core/errors.js';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { qimg, sha256File, tempDir } from '../helpers/qemu.js';

const tmp = tempDir('qimg-io-');
afterAll(() => tmp.cleanup());

const KiB = 1024;
const MiB = 1024 * 1024;

/** A deterministic, non-zero byte pattern. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 31 + seed * 7) % 251) + 1;
  return b;
}

/**
 * A sparse 4 MiB file: data at [0, 64K) and [1M, 1M+64K), holes elsewhere (the
 * tail is a hole up to EOF).
 */
function makeSparse(name: string): { path: string; size: number; content: Buffer } {
  const path = join(tmp.path, name);
  const size = 4 * MiB;
  const content = Buffer.alloc(size);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  for (const [off, seed] of [
    [0, 1],
    [MiB, 2],
  ]) {
    const p = pattern(64 * KiB, seed);
    writeSync(fd, p, 0, p.length, off);
    p.copy(content, off);
  }
  closeSync(fd);
  return { path, size, content };
}

/** Whether the filesystem of the temp dir reports holes at all. */
function fsHasHoles(): boolean {
  const lib = native();
  if (!lib) return false;
  const path = join(tmp.path, 'probe-holes');
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, MiB);
    return lib.lseek(fd, 0, SEEK_DATA) === -ENXIO;
  } finally {
    closeSync(fd);
  }
}

function withNoNative<T>(fn: () => T): T {
  const saved = process.env.QIMG_NO_NATIVE;
  process.env.QIMG_NO_NATIVE = '1';
  resetNativeForTests();
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env.QIMG_NO_NATIVE;
    else process.env.QIMG_NO_NATIVE = saved;
    resetNativeForTests();
  }
}

afterEach(() => {
  // never leak the fallback into other tests
  resetNativeForTests();
});

describe('ImageFile', () => {
  it('reads past EOF as zeros (partly and entirely)', async () => {
    const path = join(tmp.path, 'short.bin');
    const data = pattern(1000, 3);
    const fd = openSync(path, 'w');
    writeSync(fd, data);
    closeSync(fd);
    const f = await ImageFile.open(path);
    try {
      expect(f.size).toBe(1000);
      const buf = Buffer.alloc(4096, 0xaa);
      await f.read(buf, 0);
      expect(buf.subarray(0, 1000).equals(data)).toBe(true);
      expect(buf.subarray(1000).every((b) => b === 0)).toBe(true);
      const far = Buffer.alloc(512, 0xaa);
      await f.read(far, 10 * MiB);
      expect(far.every((b) => b === 0)).toBe(true);
      const mid = await f.readBytes(900, 200);
      expect(mid.subarray(0, 100).equals(data.subarray(900))).toBe(true);
      expect(mid.subarray(100).every((b) => b === 0)).toBe(true);
      // zero-length read is a no-op
      await f.read(Buffer.alloc(0), 0);
    } finally {
      await f.close();
    }
  });

  it('reads the holes of a sparse file as zeros', async () => {
    const s = makeSparse('sparse-read.bin');
    const f = await ImageFile.open(s.path);
    try {
      const all = await f.readBytes(0, s.size);
      expect(all.equals(s.content)).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('writes, grows and truncates through the object', async () => {
    const path = join(tmp.path, 'rw.bin');
    closeSync(openSync(path, 'w'));
    const f = await ImageFile.open(path, { writable: true });
    try {
      expect(f.writable).toBe(true);
      await f.write(pattern(512, 4), 4096);
      expect(f.size).toBe(4608);
      await f.truncate(2048);
      expect(f.size).toBe(2048);
      await f.flush();
    } finally {
      await f.close();
    }
    expect(readFileSync(path).length).toBe(2048);
  });

  it('fails to open with one clear message', async () => {
    const missing = join(tmp.path, 'missing.bin');
    const err = await ImageFile.open(missing).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QimgError);
    expect((err as QimgError).message).toBe(`Could not open '${missing}': No such file or directory`);
    expect((err as QimgError).file).toBe(missing);
    const dir = join(tmp.path, 'a-dir');
    mkdirSync(dir, { recursive: true });
    await expect(ImageFile.open(dir)).rejects.toThrow(/^Could not open '.*a-dir': Is a directory$/);
  });

  it('reports allocated size below the apparent size for a sparse file', async () => {
    const s = makeSparse('sparse-alloc.bin');
    const f = await ImageFile.open(s.path);
    try {
      const allocated = await f.allocatedSize();
      expect(allocated % 512).toBe(0);
      if (fsHasHoles()) expect(allocated).toBeLessThan(s.size);
    } finally {
      await f.close();
    }
  });
});

describe('fileRunAt with SEEK_DATA/SEEK_HOLE', () => {
  const holes = fsHasHoles();

  it.skipIf(!holes)('gives data and hole runs of a sparse file', async () => {
    const s = makeSparse('sparse-runs.bin');
    const fd = openSync(s.path, 'r');
    try {
      const big = 1 << 30;
      expect(fileRunAt(fd, s.size, 0, big)).toEqual({ data: true, length: 64 * KiB, eof: false });
      expect(fileRunAt(fd, s.size, 64 * KiB, big)).toEqual({ data: false, length: MiB - 64 * KiB, eof: false });
      expect(fileRunAt(fd, s.size, MiB, big)).toEqual({ data: true, length: 64 * KiB, eof: false });
      expect(fileRunAt(fd, s.size, MiB + 64 * KiB, big)).toEqual({ data: false, length: s.size - MiB - 64 * KiB, eof: true });
      // from the middle of runs
      expect(fileRunAt(fd, s.size, 1000, big)).toEqual({ data: true, length: 64 * KiB - 1000, eof: false });
      expect(fileRunAt(fd, s.size, 100 * KiB, big)).toEqual({ data: false, length: MiB - 100 * KiB, eof: false });
      // clipped by the asked length
      expect(fileRunAt(fd, s.size, 0, 4096)).toEqual({ data: true, length: 4096, eof: false });
      expect(fileRunAt(fd, s.size, 64 * KiB, 4096)).toEqual({ data: false, length: 4096, eof: false });
      expect(fileRunAt(fd, s.size, 3 * MiB, MiB)).toEqual({ data: false, length: MiB, eof: true });
      // at and past EOF
      expect(fileRunAt(fd, s.size, s.size, big)).toEqual({ data: false, length: 0, eof: true });
      expect(fileRunAt(fd, s.size, s.size + 5, big)).toEqual({ data: false, length: 0, eof: true });
    } finally {
      closeSync(fd);
    }
  });

  it.skipIf(!holes)('a walk over the runs covers the file exactly, and data runs hold all the data', async () => {
    const s = makeSparse('sparse-walk.bin');
    const f = await ImageFile.open(s.path);
    try {
      let pos = 0;
      const runs: Array<[number, number, boolean]> = [];
      for (;;) {
        const r = f.runAt(pos, 256 * KiB);
        if (r.length === 0) break;
        runs.push([pos, r.length, r.data]);
        if (!r.data) {
          const bytes = await f.readBytes(pos, r.length);
          expect(bytes.every((b) => b === 0)).toBe(true);
        }
        pos += r.length;
        if (r.eof) break;
      }
      expect(pos).toBe(s.size);
      const dataBytes = runs.filter((r) => r[2]).reduce((n, r) => n + r[1], 0);
      expect(dataBytes).toBe(128 * KiB);
    } finally {
      await f.close();
    }
  });

  it('a file without holes is one data run', () => {
    const path = join(tmp.path, 'dense.bin');
    const fd0 = openSync(path, 'w');
    writeSync(fd0, pattern(8192, 5));
    closeSync(fd0);
    const fd = openSync(path, 'r');
    try {
      expect(fileRunAt(fd, 8192, 0, 1 << 20)).toEqual({ data: true, length: 8192, eof: true });
      expect(fileRunAt(fd, 8192, 4096, 1000)).toEqual({ data: true, length: 1000, eof: false });
    } finally {
      closeSync(fd);
    }
  });
});

describe('without the native library (QIMG_NO_NATIVE=1)', () => {
  it('native() is null and every byte is reported as data', () => {
    const s = makeSparse('sparse-fallback.bin');
    withNoNative(() => {
      expect(native()).toBeNull();
      const fd = openSync(s.path, 'r');
      try {
        expect(fileRunAt(fd, s.size, 0, 1 << 30)).toEqual({ data: true, length: s.size, eof: true });
        expect(fileRunAt(fd, s.size, 64 * KiB, MiB)).toEqual({ data: true, length: MiB, eof: false });
        expect(fileRunAt(fd, s.size, s.size - 10, MiB)).toEqual({ data: true, length: 10, eof: true });
        expect(fileRunAt(fd, s.size, s.size, MiB)).toEqual({ data: false, length: 0, eof: true });
      } finally {
        closeSync(fd);
      }
    });
    // back to normal afterwards (on Linux, where koffi loads)
    if (process.platform === 'linux') expect(native()).not.toBeNull();
  });

  it('reads are unchanged', async () => {
    const s = makeSparse('sparse-fallback-read.bin');
    const saved = process.env.QIMG_NO_NATIVE;
    process.env.QIMG_NO_NATIVE = '1';
    resetNativeForTests();
    try {
      const f = await ImageFile.open(s.path);
      try {
        expect(f.runAt(0, s.size)).toEqual({ data: true, length: s.size, eof: true });
        expect((await f.readBytes(0, s.size)).equals(s.content)).toBe(true);
      } finally {
        await f.close();
      }
    } finally {
      if (saved === undefined) delete process.env.QIMG_NO_NATIVE;
      else process.env.QIMG_NO_NATIVE = saved;
      resetNativeForTests();
    }
  });
});

describe('convert -O raw with and without the native library (built CLI)', () => {
  const manifest = loadManifest();
  const pick = ['raw-holes', 'cluster-64k', 'chain-top', 'extl2-64k'];
  for (const name of pick) {
    const f = manifest.find((m) => m.name === name);
    if (!f) continue;
    it(`${name}: same bytes, and the same as qemu-img's`, () => {
      const src = fixturePath(f);
      const outNative = join(tmp.path, `${name}.native.raw`);
      const outFallback = join(tmp.path, `${name}.fallback.raw`);
      const env = { ...process.env };
      delete env.QIMG_NO_NATIVE;
      const a = qimg(['convert', '-O', 'raw', src, outNative], { cwd: IMAGES_DIR, env });
      expect(a.stderr).toBe('');
      expect(a.status).toBe(0);
      const b = qimg(['convert', '-O', 'raw', src, outFallback], { cwd: IMAGES_DIR, env: { ...env, QIMG_NO_NATIVE: '1' } });
      expect(b.stderr).toBe('');
      expect(b.status).toBe(0);
      const sha = sha256File(outNative);
      expect(sha256File(outFallback)).toBe(sha);
      const expected = readFileSync(join(IMAGES_DIR, '..', 'expected', `${name}.raw.sha256`), 'utf8').trim().split(/\s+/)[0];
      expect(sha).toBe(expected);
    });
  }

  it('map of a sparse raw file without native support reports one data range', () => {
    const s = makeSparse('sparse-map.bin');
    const env = { ...process.env, QIMG_NO_NATIVE: '1' };
    const r = qimg(['map', '--output=json', '-f', 'raw', s.path], { env });
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([{ start: 0, length: s.size, depth: 0, present: true, zero: false, data: true, compressed: false, offset: 0 }]);
  });
});
