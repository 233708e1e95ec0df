/**
 * `qimg convert` against qemu-img as the oracle. For every conversion the output must
 * pass `qemu-img check`, `qemu-img compare` with the source must say identical, qemu's
 * own conversion of the output back to raw must equal qemu's raw of the source, and
 * where qemu-img can do the same conversion ("twin"), `info` and `map` (host offsets
 * ignored) must agree with the twin. Then every flag: -c, several sources, -l, -B/-F,
 * -n / --target-is-zero, -S, -m, -W, -p / --progress=json, -q, -t, and failures
 * (no output left behind, the source never modified).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';
import { Prng } from '../helpers/prng.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-convert-');
afterAll(() => tmp.cleanup());
const fixtures = loadManifest();

let counter = 0;
/** A fresh directory under the temp dir. */
function newDir(): string {
  const d = join(tmp.path, `c${counter++}`);
  mkdirSync(d);
  return d;
}

// ------------------------------------------------------------------ helpers

/** Fingerprints (sha256 + mtime) of every fixture a test used: none may change. */
const touched = new Map<string, { sha: string; mtime: number }>();

/** A fixture's path relative to IMAGES_DIR (commands run there: data files resolve). */
function src(name: string): string {
  const f = fixtures.find((x) => x.name === name);
  if (!f) throw new Error(`no fixture ${name}`);
  const rel = fixturePath(f);
  if (!touched.has(rel)) {
    const abs = join(IMAGES_DIR, rel);
    touched.set(rel, { sha: sha256File(abs), mtime: statSync(abs).mtimeMs });
  }
  return rel;
}

function q(args: string[], cwd = IMAGES_DIR): RunResult {
  return ok(qemuImg(args, cwd), `qemu-img ${args.join(' ')}`);
}

/** qimg convert that must succeed silently. */
function convertOk(args: string[], cwd = IMAGES_DIR): RunResult {
  const r = qimg(['convert', ...args], { cwd });
  expect(r.stderr, `qimg convert ${args.join(' ')}`).toBe('');
  expect(r.status).toBe(0);
  return r;
}

/** sha256 of qemu-img's raw conversion of `file`. */
function qemuRawSha(file: string, cwd = IMAGES_DIR, extra: string[] = []): string {
  const out = join(tmp.path, `raw-${counter++}.raw`);
  q(['convert', ...extra, '-O', 'raw', file, out], cwd);
  const h = sha256File(out);
  rmSync(out);
  return h;
}

const refCache = new Map<string, string>();
function refSha(file: string, cwd = IMAGES_DIR): string {
  const key = `${cwd}\0${file}`;
  if (!refCache.has(key)) refCache.set(key, qemuRawSha(file, cwd));
  return refCache.get(key)!;
}

function expectCheckClean(file: string, cwd = IMAGES_DIR): void {
  const r = qemuImg(['check', file], cwd);
  expect(r.status, `qemu-img check ${file}: ${r.stdout}${r.stderr}`).toBe(0);
}

function expectIdentical(a: string, b: string, cwd = IMAGES_DIR, extra: string[] = []): void {
  const r = qemuImg(['compare', ...extra, a, b], cwd);
  expect(r.stdout + r.stderr, `qemu-img compare ${a} ${b}`).toBe('Images are identical.\n');
  expect(r.status).toBe(0);
}

function checkJson(file: string, cwd = IMAGES_DIR): Record<string, number> {
  const r = qemuImg(['check', '--output=json', file], cwd);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Record<string, number>;
}

function infoJson(file: string, cwd = IMAGES_DIR): Record<string, unknown> {
  const j = JSON.parse(q(['info', '--output=json', file], cwd).stdout) as Record<string, unknown>;
  delete j.filename;
  delete j['actual-size'];
  return j;
}

type MapEntry = { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number };

function rawMap(file: string, cwd = IMAGES_DIR, extra: string[] = []): MapEntry[] {
  return JSON.parse(q(['map', '--output=json', ...extra, file], cwd).stdout) as MapEntry[];
}

/**
 * `qemu-img map --output=json` with host offsets dropped and neighbours merged.
 * `ignoreZero` drops the zero flag of data ranges: with preallocation=metadata qemu
 * leaves zero blocks inside allocated clusters as host-file holes that map reports,
 * while qimg writes whole clusters (the same guest content, a different host layout).
 */
function mapJson(file: string, cwd = IMAGES_DIR, ignoreZero = false): unknown[] {
  const out: Array<Record<string, unknown>> = [];
  for (const { offset: _o, ...e } of rawMap(file, cwd) as Array<Record<string, unknown>>) {
    if (ignoreZero && e.data === true) delete e.zero;
    const prev = out[out.length - 1];
    const same = (x: Record<string, unknown>) => JSON.stringify({ ...x, start: 0, length: 0 });
    if (prev && (prev.start as number) + (prev.length as number) === e.start && same(prev) === same(e)) {
      prev.length = (prev.length as number) + (e.length as number);
    } else out.push(e);
  }
  return out;
}

/** qemu-img's error lines as qimg prints them. */
const norm = (text: string) => text.replace(/^qemu-img: /gm, 'qimg: ');

// ------------------------------------------------------------------ the matrix

/** A representative subset of the fixtures: chains, compression, extended L2, data files, snapshots, v2, odd sizes, 512 B / 2 MiB clusters. */
const SOURCES = [
  'chain-top',
  'compressed-zlib',
  'compressed-zstd',
  'extl2-64k',
  'extl2-chain-top',
  'datafile-off',
  'datafile-raw',
  'snapshots',
  'compat-v2',
  'odd-size',
  'raw-odd-size',
  'raw-holes',
  'cluster-512',
  'cluster-2m',
  'grow-top',
  'rawchain-top',
  'unaligned',
  'prealloc-metadata',
];

/** Every qcow2 create option on the target, each with a different source. `$D` is the data file. */
const TARGET_OPTIONS: Array<[string, string]> = [
  ['cluster_size=512', 'unaligned'],
  ['cluster_size=2M', 'chain-top'],
  ['cluster_size=4k', 'compressed-zstd'],
  ['compat=0.10', 'extl2-64k'],
  ['compat=0.10,cluster_size=16k', 'snapshots'],
  ['refcount_bits=1', 'odd-size'],
  ['refcount_bits=64', 'cluster-512'],
  ['refcount_bits=8,cluster_size=1k', 'raw-holes'],
  ['lazy_refcounts=on', 'grow-top'],
  ['extended_l2=on', 'raw-odd-size'],
  ['extended_l2=on,cluster_size=32k', 'unaligned'],
  ['compression_type=zstd', 'compressed-zlib'],
  ['preallocation=metadata', 'chain-top'],
  ['preallocation=falloc', 'rawchain-top'],
  ['preallocation=full', 'odd-size'],
  ['preallocation=metadata,extended_l2=on', 'extl2-chain-top'],
  ['data_file=$D', 'unaligned'],
  ['data_file=$D,data_file_raw=on', 'datafile-off'],
  ['compat=1.1,lazy_refcounts=on,refcount_bits=32,cluster_size=8k', 'cluster-2m'],
];

describe.skipIf(!enabled)('convert: fixtures to raw', () => {
  for (const name of SOURCES) {
    it(name, () => {
      const s = src(name);
      const dir = newDir();
      const mine = join(dir, 'mine.raw');
      const twin = join(dir, 'twin.raw');
      convertOk(['-O', 'raw', s, mine]);
      q(['convert', '-O', 'raw', s, twin]);
      expect(sha256File(mine)).toBe(sha256File(twin));
      expectIdentical(s, mine);
      // the same sparse layout (zero detection at 4 KiB)
      expect(rawMap(mine, IMAGES_DIR, ['-f', 'raw'])).toEqual(rawMap(twin, IMAGES_DIR, ['-f', 'raw']));
    });
  }
});

describe.skipIf(!enabled)('convert: fixtures to qcow2', () => {
  const cases: Array<[string, string]> = [...SOURCES.map((s): [string, string] => ['', s]), ...TARGET_OPTIONS];
  for (const [opts, name] of cases) {
    it(`${name}${opts ? ` -o ${opts}` : ''}`, () => {
      const s = src(name);
      const dir = newDir();
      const mine = join(dir, 'mine.qcow2');
      const twin = join(dir, 'twin.qcow2');
      const o = (who: string) => (opts ? ['-o', opts.replaceAll('$D', join(dir, `${who}.data`))] : []);
      convertOk(['-O', 'qcow2', ...o('mine'), s, mine]);
      q(['convert', '-O', 'qcow2', ...o('twin'), s, twin]);
      expectCheckClean(mine);
      expectIdentical(s, mine);
      expect(qemuRawSha(mine)).toBe(refSha(s));
      // the options took effect as with qemu-img (info), and the same ranges are allocated (map)
      expect(JSON.stringify(infoJson(mine))).toBe(JSON.stringify(infoJson(twin)).replaceAll('twin.data', 'mine.data'));
      expect(mapJson(mine, IMAGES_DIR, opts.includes('preallocation=metadata'))).toEqual(mapJson(twin, IMAGES_DIR, opts.includes('preallocation=metadata')));
      const c = checkJson(mine);
      expect(c['allocated-clusters']).toBe(checkJson(twin)['allocated-clusters']);
    });
  }

  it('raw -> qcow2 -> raw round trip with -f on both sides', () => {
    const dir = newDir();
    const s = src('raw-holes');
    convertOk(['-f', 'raw', '-O', 'qcow2', s, join(dir, 'a.qcow2')]);
    convertOk(['-f', 'qcow2', '-O', 'raw', join(dir, 'a.qcow2'), join(dir, 'b.raw')]);
    expect(sha256File(join(dir, 'b.raw'))).toBe(sha256File(join(IMAGES_DIR, s)));
  });
});

// ------------------------------------------------------------------ -c

/** A raw source of whole clusters of different kinds, then a partial last cluster. */
function compressSource(path: string, cluster: number, kinds: string[], tail: number): void {
  const rng = new Prng(cluster + kinds.length);
  const parts: Buffer[] = [];
  const block = (kind: string, len: number): Buffer => {
    const b = Buffer.alloc(len);
    if (kind === 'pattern') for (let i = 0; i < len; i++) b[i] = (i % 251) ^ ((i >> 9) & 7);
    else if (kind === 'text') b.write('the quick brown fox jumps over the lazy dog. '.repeat(Math.ceil(len / 45)).slice(0, len));
    else if (kind === 'random') for (let i = 0; i + 4 <= len; i += 4) b.writeUInt32LE(rng.u32(), i);
    return b;
  };
  for (const k of kinds) parts.push(block(k, cluster));
  if (tail > 0) parts.push(block('text', tail));
  writeFileSync(path, Buffer.concat(parts));
}

describe.skipIf(!enabled)('convert -c', () => {
  const K = ['pattern', 'random', 'zero', 'text', 'pattern'];
  const cases: Array<{ name: string; opts: string[]; cluster: number; kinds: string[]; tail: number }> = [
    { name: 'zlib (default)', opts: [], cluster: 65536, kinds: K, tail: 20480 },
    { name: 'zstd', opts: ['-o', 'compression_type=zstd'], cluster: 65536, kinds: K, tail: 20480 },
    { name: 'extended L2', opts: ['-o', 'extended_l2=on'], cluster: 65536, kinds: K, tail: 33280 },
    { name: '512 B clusters, zstd', opts: ['-o', 'cluster_size=512,compression_type=zstd'], cluster: 512, kinds: [...K, ...K], tail: 0 },
    { name: '2 MiB clusters, odd last cluster', opts: ['-o', 'cluster_size=2M'], cluster: 2 * 1048576, kinds: ['pattern', 'random'], tail: 512 * 1001 },
    { name: '4k clusters, -W -m 4', opts: ['-o', 'cluster_size=4k', '-W', '-m', '4'], cluster: 4096, kinds: [...K, 'random', 'text'], tail: 1536 },
  ];
  for (const c of cases) {
    it(c.name, () => {
      const dir = newDir();
      const source = join(dir, 'src.raw');
      compressSource(source, c.cluster, c.kinds, c.tail);
      const mine = join(dir, 'mine.qcow2');
      const twin = join(dir, 'twin.qcow2');
      convertOk(['-c', '-O', 'qcow2', ...c.opts, source, mine]);
      q(['convert', '-c', '-O', 'qcow2', ...c.opts, source, twin]);
      expectIdentical(source, mine, dir, ['-f', 'raw', '-F', 'qcow2']);
      expect(qemuRawSha(mine, dir)).toBe(sha256File(source));
      const mc = checkJson(mine, dir);
      const tc = checkJson(twin, dir);
      expect(mc['compressed-clusters']).toBeGreaterThan(0);
      expect(mc['compressed-clusters']).toBe(tc['compressed-clusters']);
      expect(mc['allocated-clusters']).toBe(tc['allocated-clusters']);
      expect(mapJson(mine, dir)).toEqual(mapJson(twin, dir));
      // 7.2's map gives no host offset for compressed data: the random cluster is
      // stored plainly (it has one), the pattern cluster compressed (it has none).
      const map = rawMap(mine, dir);
      const at = (off: number) => map.find((e) => e.start <= off && off < e.start + e.length)!;
      expect(at(c.cluster).offset, 'incompressible cluster is stored uncompressed').toBeTypeOf('number');
      expect(at(0).offset, 'compressible cluster is compressed').toBeUndefined();
      expect(at(0).data).toBe(true);
    });
  }

  it('-S 0 -c: every cluster compressed, holes of a sparse source too (as qemu-img)', () => {
    const dir = newDir();
    const s = src('raw-holes');
    convertOk(['-S', '0', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', s, join(dir, 'mine.qcow2')]);
    q(['convert', '-S', '0', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', s, join(dir, 'twin.qcow2')]);
    const mc = checkJson(join(dir, 'mine.qcow2'));
    expect(mc['compressed-clusters']).toBe(checkJson(join(dir, 'twin.qcow2'))['compressed-clusters']);
    expect(mc['allocated-clusters']).toBe(mc['total-clusters']);
    expect(mapJson(join(dir, 'mine.qcow2'))).toEqual(mapJson(join(dir, 'twin.qcow2')));
    expectIdentical(s, join(dir, 'mine.qcow2'));
  });

  it('compressed fixture sources re-compressed (zstd -> zlib, zlib -> zstd)', () => {
    for (const [name, type] of [
      ['compressed-zstd', 'zlib'],
      ['convert-compressed-zlib', 'zstd'],
    ]) {
      const s = src(name);
      const out = join(newDir(), 'out.qcow2');
      convertOk(['-c', '-O', 'qcow2', '-o', `compression_type=${type}`, s, out]);
      expectCheckClean(out);
      expectIdentical(s, out);
      expect(checkJson(out)['compressed-clusters']).toBeGreaterThan(0);
      expect((infoJson(out)['format-specific'] as { data: Record<string, unknown> }).data['compression-type']).toBe(type);
    }
  });

  it('errors: raw target, preallocation', () => {
    const s = src('unaligned');
    const dir = newDir();
    for (const args of [
      ['-c', '-O', 'raw', s],
      ['-c', '-O', 'qcow2', '-o', 'preallocation=metadata', s],
      ['-c', '-O', 'qcow2', '-o', 'preallocation=full', s],
    ]) {
      const m = qimg(['convert', ...args, join(dir, 'm.img')], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', ...args, join(dir, 't.img')], IMAGES_DIR);
      expect(t.status).toBe(1);
      expect(m.status).toBe(1);
      expect(m.stderr).toBe(norm(t.stderr));
      expect(existsSync(join(dir, 'm.img'))).toBe(false);
    }
  });
});

// ------------------------------------------------------------------ several sources

describe.skipIf(!enabled)('convert: several sources are concatenated', () => {
  const names = ['unaligned', 'raw-odd-size', 'odd-size', 'compressed-zstd', 'chain-top'];
  it('to raw: the same bytes as qemu-img', () => {
    const dir = newDir();
    const files = names.map(src);
    convertOk([...files, join(dir, 'mine.raw')]);
    q(['convert', ...files, join(dir, 'twin.raw')]);
    expect(sha256File(join(dir, 'mine.raw'))).toBe(sha256File(join(dir, 'twin.raw')));
  });
  it('to qcow2 (and -c): identical to qemu-img\'s concatenation', () => {
    const dir = newDir();
    const files = names.map(src);
    const twin = join(dir, 'twin.raw');
    q(['convert', ...files, twin]);
    for (const extra of [[], ['-c']]) {
      const mine = join(dir, `mine${extra.length}.qcow2`);
      convertOk([...extra, '-O', 'qcow2', ...files, mine]);
      expectCheckClean(mine);
      expectIdentical(twin, mine, IMAGES_DIR, ['-f', 'raw']);
      expect(infoJson(mine)['virtual-size']).toBe(statSync(twin).size);
    }
  });
  it('-f applies to every source', () => {
    const dir = newDir();
    const files = [src('raw-holes'), src('raw-odd-size')];
    convertOk(['-f', 'raw', ...files, join(dir, 'mine.raw')]);
    q(['convert', '-f', 'raw', ...files, join(dir, 'twin.raw')]);
    expect(sha256File(join(dir, 'mine.raw'))).toBe(sha256File(join(dir, 'twin.raw')));
  });
});

// ------------------------------------------------------------------ -l

describe.skipIf(!enabled)('convert -l (internal snapshots)', () => {
  const params = ['s1', '1', '2', 's2', 'snapshot.id=3', 'snapshot.name=s1', 'snapshot.id=3,snapshot.name=s2', 'snapshot.id=4'];
  it('by name, by id and snapshot.id=..,snapshot.name=..: the same data as qemu-img', () => {
    const s = src('snapshots');
    const dir = newDir();
    for (const p of params) {
      const mine = join(dir, 'mine.raw');
      const twin = join(dir, 'twin.raw');
      convertOk(['-l', p, '-O', 'raw', s, mine]);
      q(['convert', '-l', p, '-O', 'raw', s, twin]);
      expect(sha256File(mine), p).toBe(sha256File(twin));
      rmSync(mine);
      rmSync(twin);
    }
  });
  it('to qcow2: clean and equal to qemu-img\'s raw of the snapshot', () => {
    const s = src('snapshots');
    const out = join(newDir(), 'out.qcow2');
    convertOk(['-l', 'snapshot.name=s1', '-O', 'qcow2', s, out]);
    expectCheckClean(out);
    expect(qemuRawSha(out)).toBe(qemuRawSha(s, IMAGES_DIR, ['-l', 's1']));
    // the output has no snapshots of its own
    expect(infoJson(out).snapshots).toBeUndefined();
  });
  it('errors: missing snapshot, id/name mismatch, bad key, several sources, raw source', () => {
    const s = src('snapshots');
    const dir = newDir();
    const cases: string[][] = [
      ['-l', 'nope', s],
      ['-l', 'snapshot.id=9', s],
      ['-l', 'snapshot.id=1,snapshot.name=s2', s],
      ['-l', 's1', s, s],
      ['-l', 's1', src('raw-holes')],
      ['-l', 's1', src('unaligned')],
    ];
    for (const args of cases) {
      const m = qimg(['convert', ...args, join(dir, 'm.raw')], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', ...args, join(dir, 't.raw')], IMAGES_DIR);
      expect(t.status, args.join(' ')).toBe(1);
      expect(m.status, args.join(' ')).toBe(1);
      expect(m.stderr, args.join(' ')).toBe(norm(t.stderr));
      expect(m.stdout).toBe('');
      expect(existsSync(join(dir, 'm.raw'))).toBe(false);
    }
    // qemu adds a second line ("Failed in parsing snapshot param ..."); the first matches
    const m = qimg(['convert', '-l', 'snapshot.foo=1', s, join(dir, 'm.raw')], { cwd: IMAGES_DIR });
    const t = qemuImg(['convert', '-l', 'snapshot.foo=1', s, join(dir, 't.raw')], IMAGES_DIR);
    expect([m.status, t.status]).toEqual([1, 1]);
    expect(m.stderr.split('\n')[0]).toBe(norm(t.stderr).split('\n')[0]);
  });
});

// ------------------------------------------------------------------ -B / -b with -F

describe.skipIf(!enabled)('convert -B/-b with -F (the output is an overlay)', () => {
  /** A private copy of the chain fixtures (backing names resolve next to the output). */
  function chainDir(): string {
    const dir = newDir();
    src('chain-top');
    src('grow-top');
    src('rawchain-top');
    for (const d of ['chain', 'grow', 'rawchain']) cpSync(join(IMAGES_DIR, d), join(dir, d), { recursive: true });
    return dir;
  }

  /** Per 512-byte sector: does the map put it in the top layer (depth 0)? */
  function topCoverage(map: MapEntry[], size: number): boolean[] {
    const cov = new Array<boolean>(Math.ceil(size / 512)).fill(false);
    for (const e of map) if (e.depth === 0 && e.present) for (let o = e.start; o < e.start + e.length; o += 512) cov[o / 512] = true;
    return cov;
  }

  const cases: Array<{ name: string; cwd: string; source: string; backing: string; fmt: string }> = [
    { name: 'three-layer chain onto its middle layer', cwd: 'chain', source: 'top.qcow2', backing: 'mid/mid.qcow2', fmt: 'qcow2' },
    { name: 'a source without backing file (unallocated = zeros)', cwd: 'chain', source: 'base.qcow2', backing: 'mid/mid.qcow2', fmt: 'qcow2' },
    { name: 'over a shorter backing file', cwd: 'grow', source: 'top.qcow2', backing: 'base.qcow2', fmt: 'qcow2' },
    { name: 'over a raw backing file', cwd: 'rawchain', source: 'top.qcow2', backing: 'base.raw', fmt: 'raw' },
  ];
  for (const c of cases) {
    it(c.name, () => {
      const root = chainDir();
      const cwd = join(root, c.cwd);
      convertOk(['-O', 'qcow2', '-B', c.backing, '-F', c.fmt, c.source, 'mine.qcow2'], cwd);
      q(['convert', '-O', 'qcow2', '-B', c.backing, '-F', c.fmt, c.source, 'twin.qcow2'], cwd);
      const info = infoJson('mine.qcow2', cwd);
      expect(info['backing-filename']).toBe(c.backing);
      expect(info['backing-filename-format']).toBe(c.fmt);
      expectCheckClean('mine.qcow2', cwd);
      expectIdentical(c.source, 'mine.qcow2', cwd);
      expect(qemuRawSha('mine.qcow2', cwd)).toBe(qemuRawSha(c.source, cwd));
      expect(mapJson('mine.qcow2', cwd)).toEqual(mapJson('twin.qcow2', cwd));
      if (c.cwd === 'chain' && c.source === 'top.qcow2') {
        // (the same cluster size on both sides; else whole target clusters are allocated)
        // only what the source's top layer holds is in the output's top layer
        const size = Number(info['virtual-size']);
        expect(topCoverage(rawMap('mine.qcow2', cwd), size)).toEqual(topCoverage(rawMap(c.source, cwd), size));
      }
    });
  }

  it('-b is the same as -B', () => {
    const cwd = join(chainDir(), 'chain');
    convertOk(['-O', 'qcow2', '-B', 'mid/mid.qcow2', '-F', 'qcow2', 'top.qcow2', 'a.qcow2'], cwd);
    convertOk(['-O', 'qcow2', '-b', 'mid/mid.qcow2', '-F', 'qcow2', 'top.qcow2', 'b.qcow2'], cwd);
    expect(mapJson('a.qcow2', cwd)).toEqual(mapJson('b.qcow2', cwd));
    expectIdentical('top.qcow2', 'b.qcow2', cwd);
  });

  it('errors: missing -F, raw target, missing backing file', () => {
    const cwd = join(chainDir(), 'chain');
    for (const args of [
      ['-O', 'qcow2', '-B', 'mid/mid.qcow2', 'top.qcow2'],
      ['-O', 'raw', '-B', 'mid/mid.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ]) {
      const m = qimg(['convert', ...args, 'm.qcow2'], { cwd });
      const t = qemuImg(['convert', ...args, 't.qcow2'], cwd);
      expect([m.status, t.status]).toEqual([1, 1]);
      expect(m.stderr).toBe(norm(t.stderr));
      expect(existsSync(join(cwd, 'm.qcow2'))).toBe(false);
    }
    // qemu-img creates the image first and leaves it behind; qimg fails before.
    const m = qimg(['convert', '-O', 'qcow2', '-B', 'nope.qcow2', '-F', 'qcow2', 'top.qcow2', 'm.qcow2'], { cwd });
    expect(m.status).toBe(1);
    expect(m.stderr).toMatch(/^qimg: .*nope\.qcow2.*\n$/);
    expect(existsSync(join(cwd, 'm.qcow2'))).toBe(false);
  });
});

// ------------------------------------------------------------------ -n, --target-is-zero

describe.skipIf(!enabled)('convert -n / --target-is-zero', () => {
  const s = () => src('unaligned');
  const SIZE = 1048576;

  /** A twin pair of existing targets made by `make`, returned as [mine, twin]. */
  function pair(dir: string, ext: string, make: (file: string) => void): [string, string] {
    const files: [string, string] = [join(dir, `mine.${ext}`), join(dir, `twin.${ext}`)];
    for (const f of files) make(f);
    return files;
  }
  const filled = (fmt: string, size: number, prealloc: string[] = []) => (f: string) => {
    q(['create', '-q', '-f', fmt, ...prealloc, f, String(size)]);
    ok(qemuIo(['-f', fmt, '-c', `write -P 0xff 0 ${size}`, f]));
  };

  it('into a larger existing qcow2 target full of data: the tail stays, as with qemu-img', () => {
    const [mine, twin] = pair(newDir(), 'qcow2', filled('qcow2', 4 * SIZE));
    convertOk(['-n', '-O', 'qcow2', s(), mine]);
    q(['convert', '-n', '-O', 'qcow2', s(), twin]);
    expectCheckClean(mine);
    expect(qemuRawSha(mine)).toBe(qemuRawSha(twin));
    // the first SIZE bytes are the source: compare the prefix through a raw copy
    const raw = join(tmp.path, `pfx${counter++}.raw`);
    q(['convert', '-O', 'raw', mine, raw]);
    const buf = readFileSync(raw);
    writeFileSync(raw, buf.subarray(0, SIZE));
    expectIdentical(s(), raw, IMAGES_DIR, ['-F', 'raw']);
  });

  it('into a larger empty qcow2 target: compare warns about the size, identical', () => {
    const dir = newDir();
    const t = join(dir, 't.qcow2');
    q(['create', '-q', '-f', 'qcow2', t, '4M']);
    convertOk(['-n', '-O', 'qcow2', s(), t]);
    expectCheckClean(t);
    const r = qemuImg(['compare', s(), t], IMAGES_DIR);
    expect(r.stdout).toBe('Warning: Image size mismatch!\nImages are identical.\n');
  });

  it('into a preallocated raw file (no flags: zeros written, as qemu-img)', () => {
    const [mine, twin] = pair(newDir(), 'raw', filled('raw', SIZE, ['-o', 'preallocation=full']));
    convertOk(['-n', s(), mine]);
    q(['convert', '-n', s(), twin]);
    expect(sha256File(mine)).toBe(sha256File(twin));
    expectIdentical(s(), mine, IMAGES_DIR, ['-F', 'raw']);
  });

  it('--target-is-zero -n: zero ranges are not written (the same bytes as qemu-img)', () => {
    const [mine, twin] = pair(newDir(), 'raw', filled('raw', SIZE, ['-o', 'preallocation=full']));
    convertOk(['-n', '--target-is-zero', s(), mine]);
    q(['convert', '-n', '--target-is-zero', s(), twin]);
    expect(sha256File(mine)).toBe(sha256File(twin));
    // the 0xff left where the source is zero proves the promise was taken
    expect(readFileSync(mine).subarray(16384, 16400).every((b) => b === 0xff)).toBe(true);
    // on a truly zero target it is identical
    const dir = newDir();
    const z = join(dir, 'z.raw');
    q(['create', '-q', '-f', 'raw', '-o', 'preallocation=full', z, String(SIZE)]);
    convertOk(['-n', '--target-is-zero', s(), z]);
    expectIdentical(s(), z, IMAGES_DIR, ['-F', 'raw']);
  });

  it('errors: smaller target, -n with -o, --target-is-zero without -n, missing target', () => {
    const dir = newDir();
    const small = join(dir, 'small.qcow2');
    q(['create', '-q', '-f', 'qcow2', small, '512k']);
    const before = sha256File(small);
    const cases: Array<[string[], string | null]> = [
      [['-n', '-O', 'qcow2', s(), small], 'qimg: output file is smaller than input file\n'],
      [['-n', '-O', 'qcow2', '-o', 'cluster_size=4k', s(), small], null],
      [['--target-is-zero', s(), join(dir, 'new.raw')], null],
      [['-n', s(), join(dir, 'missing.raw')], null],
    ];
    for (const [args, want] of cases) {
      const m = qimg(['convert', ...args], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', ...args], IMAGES_DIR);
      expect([m.status, t.status], args.join(' ')).toEqual([1, 1]);
      if (want) expect(m.stderr).toBe(want);
      // qemu doubles "Could not open 'X':" for a missing file; the rest is the same
      expect(m.stderr).toBe(norm(t.stderr).replace(/(Could not open '[^']*': )\1/, '$1'));
    }
    expect(sha256File(small)).toBe(before);
    expect(existsSync(join(dir, 'new.raw'))).toBe(false);
    expect(existsSync(join(dir, 'missing.raw'))).toBe(false);
  });

  it('--target-is-zero with a backing file is refused (qemu-img prints the same, but exits 0)', () => {
    const dir = newDir();
    const t = join(dir, 't.qcow2');
    q(['create', '-q', '-f', 'qcow2', t, '1M']);
    const args = ['-n', '--target-is-zero', '-O', 'qcow2', '-B', join(IMAGES_DIR, src('chain-base')), '-F', 'qcow2', s(), t];
    const m = qimg(['convert', ...args], { cwd: IMAGES_DIR });
    const tw = qemuImg(['convert', ...args], IMAGES_DIR);
    expect(m.status).toBe(1);
    expect(m.stderr).toBe(norm(tw.stderr));
  });
});

// ------------------------------------------------------------------ -S, -m, -W, -t, -q, -p

describe.skipIf(!enabled)('convert -S / -m / -W / -t', () => {
  it('-S 0: a fully allocated raw file (st_blocks), as qemu-img', () => {
    const dir = newDir();
    const s = src('raw-holes');
    convertOk(['-S', '0', s, join(dir, 'mine.raw')]);
    q(['convert', '-S', '0', s, join(dir, 'twin.raw')]);
    const st = statSync(join(dir, 'mine.raw'));
    expect(st.blocks * 512).toBeGreaterThanOrEqual(st.size);
    expect(st.blocks).toBe(statSync(join(dir, 'twin.raw')).blocks);
    expect(sha256File(join(dir, 'mine.raw'))).toBe(sha256File(join(IMAGES_DIR, s)));
    // and to qcow2: every cluster allocated as data
    convertOk(['-S', '0', '-O', 'qcow2', src('unaligned'), join(dir, 'mine.qcow2')]);
    q(['convert', '-S', '0', '-O', 'qcow2', src('unaligned'), join(dir, 'twin.qcow2')]);
    expect(mapJson(join(dir, 'mine.qcow2'))).toEqual(mapJson(join(dir, 'twin.qcow2')));
    expectIdentical(src('unaligned'), join(dir, 'mine.qcow2'));
  });

  it('-S 64k: the same sparse layout as qemu-img', () => {
    const dir = newDir();
    for (const [name, fmt] of [
      ['unaligned', 'raw'],
      ['raw-holes', 'qcow2'],
    ]) {
      const s = src(name);
      const mine = join(dir, `mine-${name}.${fmt}`);
      const twin = join(dir, `twin-${name}.${fmt}`);
      convertOk(['-S', '64k', '-O', fmt, s, mine]);
      q(['convert', '-S', '64k', '-O', fmt, s, twin]);
      expectIdentical(s, mine);
      if (fmt === 'raw') {
        expect(sha256File(mine)).toBe(sha256File(twin));
        expect(rawMap(mine, IMAGES_DIR, ['-f', 'raw'])).toEqual(rawMap(twin, IMAGES_DIR, ['-f', 'raw']));
      } else expect(mapJson(mine)).toEqual(mapJson(twin));
    }
  });

  it('invalid -S values: qemu-img\'s messages', () => {
    const dir = newDir();
    for (const v of ['1000', '17M', '-1']) {
      const m = qimg(['convert', '-S', v, src('unaligned'), join(dir, 'm.raw')], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', '-S', v, src('unaligned'), join(dir, 't.raw')], IMAGES_DIR);
      expect([m.status, t.status], v).toEqual([1, 1]);
      // qemu splits the "suffixes" message over two lines; qimg keeps one
      expect(m.stderr, v).toBe(norm(t.stderr).replace(/\nqimg: (kilobytes)/, ' $1'));
      expect(existsSync(join(dir, 'm.raw'))).toBe(false);
    }
  });

  it('-m 1, -m 16 and -W give the same output; -m 17 and -m 0 are refused', () => {
    const dir = newDir();
    const s = src('chain-top');
    const ref = refSha(s);
    for (const extra of [['-m', '1'], ['-m', '16'], ['-W'], ['-W', '-m', '16']]) {
      const raw = join(dir, `m${counter++}.raw`);
      convertOk([...extra, s, raw]);
      expect(sha256File(raw), extra.join(' ')).toBe(ref);
      const qc = join(dir, `m${counter++}.qcow2`);
      convertOk([...extra, '-O', 'qcow2', '-o', 'cluster_size=4k', s, qc]);
      expectCheckClean(qc);
      expect(qemuRawSha(qc), extra.join(' ')).toBe(ref);
    }
    for (const v of ['17', '0']) {
      const m = qimg(['convert', '-m', v, s, join(dir, 'x.raw')], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', '-m', v, s, join(dir, 'y.raw')], IMAGES_DIR);
      expect([m.status, t.status]).toEqual([1, 1]);
      expect(m.stderr).toBe(norm(t.stderr));
      expect(existsSync(join(dir, 'x.raw'))).toBe(false);
    }
  });

  it('-t none / writeback / unsafe and -T writeback -U: the same output', () => {
    const dir = newDir();
    const s = src('compressed-zlib');
    for (const extra of [['-t', 'none'], ['-t', 'writeback'], ['-t', 'unsafe'], ['-T', 'writeback', '-U']]) {
      const out = join(dir, `t${counter++}.qcow2`);
      convertOk([...extra, '-O', 'qcow2', s, out]);
      expectCheckClean(out);
      expectIdentical(s, out);
    }
    const m = qimg(['convert', '-t', 'bogus', s, join(dir, 'x.raw')], { cwd: IMAGES_DIR });
    const t = qemuImg(['convert', '-t', 'bogus', s, join(dir, 'y.raw')], IMAGES_DIR);
    expect([m.status, t.status]).toEqual([1, 1]);
    expect(m.stderr).toBe(norm(t.stderr));
    // (qemu-img leaves y.raw behind here; qimg creates nothing)
    expect(existsSync(join(dir, 'x.raw'))).toBe(false);
  });
});

describe.skipIf(!enabled)('convert -p / --progress=json / -q', () => {
  const LINE = /^ {4}\((\d{1,3}\.\d\d)\/100%\)$/;
  /** The percentages of qemu-img's progress format: updates separated by \r, a final \n. */
  function progressValues(stdout: string): number[] {
    expect(stdout.endsWith('\r\n'), JSON.stringify(stdout)).toBe(true);
    const parts = stdout.slice(0, -2).split('\r');
    return parts.map((p) => {
      const m = LINE.exec(p);
      expect(m, JSON.stringify(p)).not.toBeNull();
      return Number(m![1]);
    });
  }

  it('-p (not a TTY): qemu-img\'s "    (NN.NN/100%)" updates on stdout', () => {
    const dir = newDir();
    const s = src('cluster-2m');
    const m = qimg(['convert', '-p', '-O', 'qcow2', s, join(dir, 'm.qcow2')], { cwd: IMAGES_DIR });
    const t = qemuImg(['convert', '-p', '-O', 'qcow2', s, join(dir, 't.qcow2')], IMAGES_DIR);
    expect(m.status).toBe(0);
    expect(m.stderr).toBe('');
    const mine = progressValues(m.stdout);
    const twin = progressValues(t.stdout);
    expect(mine[0]).toBe(0);
    expect(mine[mine.length - 1]).toBe(100);
    expect(twin[twin.length - 1]).toBe(100);
    for (let i = 1; i < mine.length; i++) expect(mine[i]).toBeGreaterThanOrEqual(mine[i - 1]);
    expectIdentical(s, join(dir, 'm.qcow2'));
  });

  it('--progress=json: one object per line with done/total/elapsed, the last done == total', () => {
    const dir = newDir();
    const s = src('cluster-2m');
    const m = qimg(['convert', '--progress=json', '-O', 'raw', s, join(dir, 'm.raw')], { cwd: IMAGES_DIR });
    expect(m.status).toBe(0);
    expect(m.stderr).toBe('');
    const lines = m.stdout.trimEnd().split('\n');
    expect(lines.length).toBeGreaterThanOrEqual(2);
    const objs = lines.map((l) => JSON.parse(l) as { done: number; total: number; elapsed: number });
    const size = statSync(join(dir, 'm.raw')).size;
    for (const o of objs) {
      expect(Object.keys(o).sort()).toEqual(['done', 'elapsed', 'total']);
      expect(o.total).toBe(size);
      expect(o.elapsed).toBeGreaterThanOrEqual(0);
    }
    for (let i = 1; i < objs.length; i++) expect(objs[i].done).toBeGreaterThanOrEqual(objs[i - 1].done);
    expect(objs[objs.length - 1].done).toBe(size);
    expect(sha256File(join(dir, 'm.raw'))).toBe(refSha(s));
  });

  it('-q (also with -p): nothing on stdout or stderr', () => {
    const dir = newDir();
    for (const extra of [['-q'], ['-q', '-p']]) {
      const m = qimg(['convert', ...extra, '-O', 'qcow2', src('unaligned'), join(dir, `q${counter++}.qcow2`)], { cwd: IMAGES_DIR });
      expect(m.status).toBe(0);
      expect(m.stdout + m.stderr).toBe('');
    }
  });
});

// ------------------------------------------------------------------ failures

describe.skipIf(!enabled)('convert failures leave no output and never touch the source', () => {
  /** A qcow2 whose second data cluster has an unaligned host offset: reading it fails. */
  function corruptSource(dir: string): string {
    const f = join(dir, 'bad.qcow2');
    q(['create', '-q', '-f', 'qcow2', f, '1M']);
    ok(qemuIo(['-c', 'write -P 1 0 64k', '-c', 'write -P 2 512k 64k', f]));
    const buf = readFileSync(f);
    const l1 = Number(buf.readBigUInt64BE(40));
    const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const entry = buf.readBigUInt64BE(l2 + 8 * 8);
    buf.writeBigUInt64BE(entry + 512n, l2 + 8 * 8);
    writeFileSync(f, buf);
    return f;
  }

  it('a source that fails while being read (raw and qcow2 targets)', () => {
    const dir = newDir();
    const bad = corruptSource(dir);
    const before = { sha: sha256File(bad), mtime: statSync(bad).mtimeMs };
    for (const fmt of ['raw', 'qcow2']) {
      const out = join(dir, `out.${fmt}`);
      const m = qimg(['convert', '-O', fmt, bad, out], { cwd: dir });
      expect(m.status).toBe(1);
      expect(m.stderr).toMatch(/^qimg: [^\n]*unaligned[^\n]*\n$/);
      expect(m.stdout).toBe('');
      expect(existsSync(out)).toBe(false);
      // qemu-img fails on it too
      expect(qemuImg(['convert', '-O', fmt, bad, join(dir, `twin.${fmt}`)], dir).status).toBe(1);
    }
    expect(sha256File(bad)).toBe(before.sha);
    expect(statSync(bad).mtimeMs).toBe(before.mtime);
  });

  it('an existing -n target is kept when the conversion fails', () => {
    const dir = newDir();
    const bad = corruptSource(dir);
    const t = join(dir, 't.raw');
    q(['create', '-q', '-f', 'raw', t, '1M']);
    const m = qimg(['convert', '-n', bad, t], { cwd: dir });
    expect(m.status).toBe(1);
    expect(existsSync(t)).toBe(true);
  });

  it('bad target options, unknown format, missing or unreadable sources: no output, qemu-img\'s message', () => {
    const dir = newDir();
    const cases: Array<{ args: string[]; exact: boolean }> = [
      { args: ['-O', 'qcow2', '-o', 'cluster_size=3k', src('unaligned')], exact: true },
      { args: ['-O', 'qcow2', '-o', 'compat=0.10,compression_type=zstd', src('unaligned')], exact: true },
      { args: ['-O', 'qcow2', '-o', 'bogus=1', src('unaligned')], exact: true },
      { args: ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k', src('unaligned')], exact: true },
      { args: ['-O', 'qcow2', '-f', 'qcow2', src('raw-holes')], exact: false },
      { args: ['-O', 'qcow2', 'does-not-exist.qcow2'], exact: false },
      { args: ['-O', 'raw', src('missing-backing')], exact: false },
      { args: ['-O', 'raw', src('unaligned'), 'does-not-exist.raw'], exact: false },
    ];
    for (const c of cases) {
      const what = c.args.join(' ');
      const m = qimg(['convert', ...c.args, join(dir, 'out.img')], { cwd: IMAGES_DIR });
      const t = qemuImg(['convert', ...c.args, join(dir, 'twin.img')], IMAGES_DIR);
      expect(t.status, what).toBe(1);
      expect(m.status, what).toBe(1);
      expect(m.stdout).toBe('');
      expect(m.stderr, what).toMatch(/^qimg: [^\n]+\n$/);
      if (c.exact) expect(m.stderr, what).toBe(norm(t.stderr).replaceAll('twin.img', 'out.img'));
      expect(existsSync(join(dir, 'out.img')), what).toBe(false);
      rmSync(join(dir, 'twin.img'), { force: true });
    }
  });

  it('no fixture used as a source was modified (sha256 and mtime)', () => {
    expect(touched.size).toBeGreaterThan(10);
    for (const [rel, fp] of touched) {
      const abs = join(IMAGES_DIR, rel);
      expect(sha256File(abs), rel).toBe(fp.sha);
      expect(statSync(abs).mtimeMs, rel).toBe(fp.mtime);
    }
  });
});
