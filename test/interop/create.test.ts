/**
 * `qimg create` against `qemu-img create` as the oracle: the whole option matrix of
 * raw and qcow2. For every valid combination the image is created twice in one
 * directory — "mine" by qimg, "twin" by qemu-img with the same arguments — and the
 * Formatting line, `qemu-img check`, `info --output=json` and `map --output=json`
 * (host offsets ignored) are compared. Every invalid combination must fail like
 * qemu-img: exit 1, one stderr line with qemu's message, the same stdout, and no file
 * left behind (an existing file untouched).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-create-');
afterAll(() => tmp.cleanup());

const MINE = 'mine';
const TWIN = 'twin';

const BACKINGS = ['base.qcow2', 'base.raw', 'base-ext.qcow2'];

/** Backing files shared by the cases: made by qemu-img once, copied into each case. */
function makeBackings(dir: string): void {
  const q = (args: string[]) => {
    const r = qemuImg(args, dir);
    if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
  };
  q(['create', '-q', '-f', 'qcow2', 'base.qcow2', '3M']);
  q(['create', '-q', '-f', 'raw', 'base.raw', '2M']);
  q(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'base-ext.qcow2', '5M']);
}

interface ValidCase {
  name: string;
  /** create's arguments with `n` as the image's base name */
  args: (n: string) => string[];
  /** the image file (relative to the case directory) */
  image: (n: string) => string;
  fmt: 'raw' | 'qcow2';
  /** expected virtual size */
  size?: number;
  /** runs after both images were created (e.g. makes a backing file -u did not need) */
  after?: (dir: string) => void;
  /** the map is compared in a separate test expected to fail (a known divergence) */
  mapDivergence?: string;
}

const qc = (name: string, opts: string[], size: string | undefined, extra: Partial<ValidCase> = {}): ValidCase => ({
  name,
  fmt: 'qcow2',
  image: (n) => `${n}.qcow2`,
  args: (n) => ['-f', 'qcow2', ...opts.flatMap((o) => ['-o', o.replaceAll('$N', n)]), `${n}.qcow2`, ...(size === undefined ? [] : [size])],
  ...extra,
});

const VALID: ValidCase[] = [
  // raw
  { name: 'raw 1M', fmt: 'raw', image: (n) => `${n}.raw`, args: (n) => ['-f', 'raw', `${n}.raw`, '1M'], size: 1048576 },
  { name: 'raw default format', fmt: 'raw', image: (n) => `${n}.raw`, args: (n) => [`${n}.raw`, '64k'], size: 65536 },
  { name: 'raw size 100 rounds to 512', fmt: 'raw', image: (n) => `${n}.raw`, args: (n) => ['-f', 'raw', `${n}.raw`, '100'], size: 512 },
  { name: 'raw -o size=1000', fmt: 'raw', image: (n) => `${n}.raw`, args: (n) => ['-f', 'raw', '-o', 'size=1000', `${n}.raw`], size: 1024 },
  { name: 'raw size 0', fmt: 'raw', image: (n) => `${n}.raw`, args: (n) => ['-f', 'raw', `${n}.raw`, '0'], size: 0 },
  ...(['off', 'falloc', 'full'] as const).map<ValidCase>((p) => ({
    name: `raw preallocation=${p}`,
    fmt: 'raw',
    image: (n) => `${n}.raw`,
    args: (n) => ['-f', 'raw', '-o', `preallocation=${p}`, `${n}.raw`, '3M'],
    size: 3 * 1048576,
    // qemu-img writes the first 4 KiB after fallocate too (its alignment probe);
    // src/formats/raw/driver.ts does so only for preallocation=off.
    mapDivergence: p === 'falloc' ? 'raw falloc: first 4 KiB not written' : undefined,
  })),

  // qcow2 sizes
  qc('qcow2 1M', [], '1M', { size: 1048576 }),
  qc('qcow2 size 100 rounds to 512', [], '100', { size: 512 }),
  qc('qcow2 size 1000 rounds to 1024', [], '1000', { size: 1024 }),
  qc('qcow2 -o size=100', ['size=100'], undefined, { size: 512 }),
  qc('qcow2 -o size=3M', ['size=3M'], undefined, { size: 3 * 1048576 }),
  qc('qcow2 size 0', [], '0', { size: 0 }),
  qc('qcow2 1.5G', [], '1.5G', { size: 1.5 * 1024 ** 3 }),
  qc('qcow2 2T', [], '2T', { size: 2 * 1024 ** 4 }),
  qc('qcow2 hex size', [], '0x100000', { size: 1048576 }),
  qc('qcow2 -o in two options', ['cluster_size=4k', 'lazy_refcounts=on,refcount_bits=8'], '1M'),
  qc('qcow2 options in another order', ['refcount_bits=32,compat=1.1,cluster_size=8k,compression_type=zstd'], '1M'),

  // cluster_size
  ...['512', '4k', '64k', '2M', '1024', '32768'].flatMap((cs) => [
    qc(`qcow2 cluster_size=${cs}`, [`cluster_size=${cs}`], '16M'),
    qc(`qcow2 cluster_size=${cs} 100G`, [`cluster_size=${cs}`], cs === '512' ? '1G' : '100G'),
  ]),

  // compat
  ...['0.10', '1.1', 'v2', 'v3'].map((c) => qc(`qcow2 compat=${c}`, [`compat=${c}`], '8M')),
  qc('qcow2 compat=0.10 cluster_size=4k', ['compat=0.10,cluster_size=4k'], '8M'),
  qc('qcow2 compat=0.10 refcount_bits=16', ['compat=0.10,refcount_bits=16'], '8M'),
  qc('qcow2 compat=0.10 lazy_refcounts=off', ['compat=0.10,lazy_refcounts=off'], '8M'),

  // lazy_refcounts
  qc('qcow2 lazy_refcounts=on', ['lazy_refcounts=on'], '8M'),
  qc('qcow2 lazy_refcounts=off', ['lazy_refcounts=off'], '8M'),
  qc('qcow2 lazy_refcounts (flag)', ['lazy_refcounts'], '8M'),
  qc('qcow2 lazy_refcounts=yes compat=v3', ['lazy_refcounts=yes,compat=v3'], '8M'),

  // refcount_bits
  ...[1, 2, 4, 8, 16, 32, 64].flatMap((b) => [
    qc(`qcow2 refcount_bits=${b}`, [`refcount_bits=${b}`], '16M'),
    qc(`qcow2 refcount_bits=${b} cluster_size=512`, [`refcount_bits=${b},cluster_size=512`], '64M'),
  ]),
  qc('qcow2 refcount_bits=64 cluster_size=512 metadata', ['refcount_bits=64,cluster_size=512,preallocation=metadata'], '8M'),
  qc('qcow2 refcount_bits=1 cluster_size=2M', ['refcount_bits=1,cluster_size=2M'], '64M'),

  // preallocation
  ...(['off', 'metadata', 'falloc', 'full'] as const).flatMap((p) => [
    qc(`qcow2 preallocation=${p}`, [`preallocation=${p}`], '6M'),
    qc(`qcow2 preallocation=${p} cluster_size=512`, [`preallocation=${p},cluster_size=512`], '3M'),
    qc(`qcow2 preallocation=${p} cluster_size=2M`, [`preallocation=${p},cluster_size=2M`], '5M'),
    qc(`qcow2 preallocation=${p} unaligned size`, [`preallocation=${p},cluster_size=4k`], '1000k'),
    qc(`qcow2 preallocation=${p} compat=0.10`, [`preallocation=${p},compat=0.10`], '2M'),
    qc(`qcow2 preallocation=${p} extended_l2`, [`preallocation=${p},extended_l2=on`], '6M'),
    qc(`qcow2 preallocation=${p} refcount_bits=1`, [`preallocation=${p},refcount_bits=1,cluster_size=4k`], '6M'),
  ]),
  qc('qcow2 preallocation=metadata 1G', ['preallocation=metadata'], '1G'),

  // backing files
  {
    name: 'qcow2 -b -F (size from backing)',
    fmt: 'qcow2',
    image: (n) => `${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${n}.qcow2`],
    size: 3 * 1048576,
  },
  {
    name: 'qcow2 -b -F with a bigger size',
    fmt: 'qcow2',
    image: (n) => `${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${n}.qcow2`, '7M'],
    size: 7 * 1048576,
  },
  {
    name: 'qcow2 -b -F with a smaller size',
    fmt: 'qcow2',
    image: (n) => `${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${n}.qcow2`, '1M'],
    size: 1048576,
  },
  qc('qcow2 -o backing_file,backing_fmt', ['backing_file=base.qcow2,backing_fmt=qcow2'], undefined, { size: 3 * 1048576 }),
  qc('qcow2 -o backing raw', ['backing_file=base.raw', 'backing_fmt=raw'], undefined, { size: 2 * 1048576 }),
  {
    name: 'qcow2 relative backing from a subdirectory',
    fmt: 'qcow2',
    image: (n) => `sub/${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', `sub/${n}.qcow2`],
    size: 3 * 1048576,
  },
  {
    name: 'qcow2 backing name relative to the image, not the cwd',
    fmt: 'qcow2',
    image: (n) => `sub/${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-o', 'backing_file=../base.raw,backing_fmt=raw', `sub/${n}.qcow2`],
    size: 2 * 1048576,
  },
  {
    name: 'qcow2 -b -F -u with size (backing not opened)',
    fmt: 'qcow2',
    image: (n) => `${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-u', '-b', 'later.qcow2', '-F', 'qcow2', `${n}.qcow2`, '2M'],
    size: 2 * 1048576,
    // the backing file appears only afterwards, so that info/map/check can open the chain
    after: (dir) => void qemuImg(['create', '-q', '-f', 'qcow2', 'later.qcow2', '1M'], dir),
  },
  {
    name: 'qcow2 -b -F qcow2 over an extended-L2 backing',
    fmt: 'qcow2',
    image: (n) => `${n}.qcow2`,
    args: (n) => ['-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'base-ext.qcow2', '-F', 'qcow2', `${n}.qcow2`],
    size: 5 * 1048576,
  },
  qc('qcow2 backing compat=0.10', ['backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10'], undefined),
  ...(['metadata', 'falloc', 'full'] as const).map((p) =>
    qc(`qcow2 backing + extended_l2 + preallocation=${p}`, [`backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=${p}`], '4M'),
  ),

  // extended_l2
  ...['16k', '32k', '64k', '2M'].map((cs) => qc(`qcow2 extended_l2 cluster_size=${cs}`, [`extended_l2=on,cluster_size=${cs}`], '16M')),
  qc('qcow2 extended_l2=off', ['extended_l2=off'], '1M'),
  qc('qcow2 extended_l2 big image', ['extended_l2=on'], '200G'),

  // compression_type
  qc('qcow2 compression_type=zlib', ['compression_type=zlib'], '1M'),
  qc('qcow2 compression_type=zstd', ['compression_type=zstd'], '1M'),
  qc('qcow2 compression_type=zlib compat=0.10', ['compression_type=zlib,compat=0.10'], '1M'),

  // data_file
  qc('qcow2 data_file', ['data_file=$N.data'], '4M'),
  qc('qcow2 data_file data_file_raw=on', ['data_file=$N.data,data_file_raw=on'], '4M'),
  qc('qcow2 data_file data_file_raw=off', ['data_file=$N.data,data_file_raw=off'], '4M'),
  qc('qcow2 data_file preallocation=metadata', ['data_file=$N.data,preallocation=metadata'], '4M'),
  qc('qcow2 data_file preallocation=full', ['data_file=$N.data,preallocation=full'], '3M'),
  qc('qcow2 data_file_raw preallocation=falloc', ['data_file=$N.data,data_file_raw=on,preallocation=falloc'], '3M'),
  qc('qcow2 data_file extended_l2', ['data_file=$N.data,extended_l2=on'], '4M'),
  qc('qcow2 data_file_raw extended_l2', ['data_file=$N.data,data_file_raw=on,extended_l2=on'], '4M'),
  qc('qcow2 data_file cluster_size=512', ['data_file=$N.data,cluster_size=512'], '1M'),
  qc('qcow2 data_file + backing', ['data_file=$N.data,backing_file=base.qcow2,backing_fmt=qcow2'], undefined),

  // a bit of everything
  qc('qcow2 everything', ['cluster_size=32k,compat=v3,lazy_refcounts=on,refcount_bits=4,compression_type=zstd,extended_l2=on,preallocation=metadata'], '10M'),
  qc('qcow2 repeated option (last wins)', ['cluster_size=4k', 'cluster_size=8k'], '1M'),
  qc('qcow2 size 0 preallocation=full', ['preallocation=full'], '0'),
  qc('qcow2 extended_l2 cluster_size=2M preallocation=metadata', ['extended_l2=on,cluster_size=2M,preallocation=metadata'], '9M'),
  qc('qcow2 lazy_refcounts preallocation=metadata', ['lazy_refcounts=on,preallocation=metadata,cluster_size=16k'], '5M'),
  qc('qcow2 refcount_bits=2 extended_l2 preallocation=falloc', ['refcount_bits=2,extended_l2=on,cluster_size=16k,preallocation=falloc'], '3M'),
  qc('qcow2 data_file_raw cluster_size=2M preallocation=full', ['data_file=$N.data,data_file_raw=on,cluster_size=2M,preallocation=full'], '3M'),
  qc('qcow2 long backing name', [`backing_file=${'./'.repeat(180)}base.qcow2,backing_fmt=qcow2,cluster_size=512`], undefined),
];

interface InvalidCase {
  name: string;
  args: (n: string) => string[];
  /** files the failed command must not leave (default: the image) */
  image?: (n: string) => string;
}

const bad = (name: string, opts: string[], size: string | undefined, fmt = 'qcow2'): InvalidCase => ({
  name,
  args: (n) => ['-f', fmt, ...opts.flatMap((o) => ['-o', o.replaceAll('$N', n)]), `${n}.img`, ...(size === undefined ? [] : [size])],
});

const INVALID: InvalidCase[] = [
  // reference §5.1 and friends: driver-level (the Formatting line comes first)
  ...['3k', '256', '4M', '0', '1000'].map((cs) => bad(`cluster_size=${cs}`, [`cluster_size=${cs}`], '1M')),
  ...['3', '0', '128', '24'].map((b) => bad(`refcount_bits=${b}`, [`refcount_bits=${b}`], '1M')),
  bad('lazy_refcounts with compat=0.10', ['compat=0.10,lazy_refcounts=on'], '1M'),
  bad('zstd with compat=0.10', ['compat=0.10,compression_type=zstd'], '1M'),
  bad('extended_l2 with compat=0.10', ['compat=0.10,extended_l2=on'], '1M'),
  bad('extended_l2 with compat=v2', ['compat=v2,extended_l2=on'], '1M'),
  ...['512', '4k', '8k'].map((cs) => bad(`extended_l2 with cluster_size=${cs}`, [`extended_l2=on,cluster_size=${cs}`], '1M')),
  ...[1, 8, 64].map((b) => bad(`compat=0.10 refcount_bits=${b}`, [`compat=0.10,refcount_bits=${b}`], '1M')),
  bad('data_file with compat=0.10', ['compat=0.10,data_file=$N.data'], '1M'),
  bad('bad preallocation value', ['preallocation=foo'], '1M'),
  bad('bad compat value', ['compat=1.2'], '1M'),
  bad('bad compat value v4', ['compat=v4'], '1M'),
  bad('bad compression_type', ['compression_type=lz4'], '1M'),
  bad('data_file_raw without data_file', ['data_file_raw=on'], '1M'),
  bad('backing + data_file_raw', ['backing_file=base.qcow2,backing_fmt=qcow2,data_file=$N.data,data_file_raw=on'], undefined),
  ...(['metadata', 'falloc', 'full'] as const).map((p) =>
    bad(`backing + preallocation=${p} without extended_l2`, [`backing_file=base.qcow2,backing_fmt=qcow2,preallocation=${p}`], undefined),
  ),
  bad('backing_fmt without backing_file', ['backing_fmt=qcow2'], '1M'),
  bad('backing name too long for the header cluster', [`backing_file=${'./'.repeat(200)}base.qcow2,backing_fmt=qcow2,cluster_size=512`], undefined),
  { name: '-F without -b', args: (n) => ['-f', 'qcow2', '-F', 'qcow2', `${n}.img`, '1M'] },
  bad('image too large for its L1 table', ['cluster_size=512'], '2E'),
  // create-level (no Formatting line)
  bad('missing size', [], undefined),
  bad('missing size (raw)', [], undefined, 'raw'),
  { name: '-b without -F', args: (n) => ['-f', 'qcow2', '-b', 'base.qcow2', `${n}.img`] },
  { name: '-o backing_file without backing_fmt', args: (n) => ['-f', 'qcow2', '-o', 'backing_file=base.qcow2', `${n}.img`, '1M'] },
  { name: '-b of a missing file', args: (n) => ['-f', 'qcow2', '-b', 'nonexistent.qcow2', '-F', 'qcow2', `${n}.img`] },
  { name: '-u without size', args: (n) => ['-f', 'qcow2', '-u', '-b', 'base.qcow2', '-F', 'qcow2', `${n}.img`] },
  { name: 'backing with raw output', args: (n) => ['-f', 'raw', '-b', 'base.qcow2', '-F', 'qcow2', `${n}.img`] },
  bad('unknown option bogus', ['bogus=1'], '1M'),
  bad('unknown option bogus (raw)', ['bogus=1'], '1M', 'raw'),
  bad('qcow2 option for raw', ['cluster_size=4k'], '1M', 'raw'),
  bad('bad bool lazy_refcounts=maybe', ['lazy_refcounts=maybe'], '1M'),
  bad('bad bool extended_l2=2', ['extended_l2=2'], '1M'),
  bad('bad bool data_file_raw=yesplease', ['data_file=$N.data,data_file_raw=yesplease'], '1M'),
  bad('bad number refcount_bits=x', ['refcount_bits=x'], '1M'),
  bad('bad size -o size=1Q', ['size=1Q'], undefined),
  bad('bad cluster_size value', ['cluster_size=big'], '1M'),
  bad('size given twice', ['size=1M'], '2M'),
  bad('bad size argument', [], '1Q'),
  bad('bad size argument kb', [], '1kb'),
  bad('size argument too large', [], '9E'),
  bad('size too large for raw', [], '1E', 'raw'),
  { name: 'unknown format', args: (n) => ['-f', 'foo', `${n}.img`, '1M'] },
  bad('invalid option list', ['cluster_size=4k,'], '1M'),
];

/**
 * Raw preallocation refusals come from the raw driver (src/formats/raw/driver.ts),
 * which this suite may not change: expected to fail until it prints qemu's messages
 * ("Unsupported preallocation mode: metadata", "invalid parameter value: foo").
 */
const INVALID_KNOWN_DIVERGENT: InvalidCase[] = [
  bad('raw preallocation=metadata', ['preallocation=metadata'], '1M', 'raw'),
  bad('raw bad preallocation value', ['preallocation=foo'], '1M', 'raw'),
];

/** Run qimg and qemu-img with the same arguments in one directory. */
function both(dir: string, args: (n: string) => string[]): { mine: RunResult; twin: RunResult } {
  const twin = qemuImg(['create', ...args(TWIN)], dir);
  const mine = qimg(['create', ...args(MINE)], { cwd: dir });
  return { mine, twin };
}

const sub = (text: string) => text.replaceAll(TWIN, MINE);

function infoJson(dir: string, image: string): Record<string, unknown> {
  const r = qemuImg(['info', '--output=json', image], dir);
  if (r.status !== 0) throw new Error(`qemu-img info ${image}: ${r.stderr}`);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  delete j.filename;
  delete j['actual-size'];
  return j;
}

/**
 * `qemu-img map --output=json` with host offsets ignored: entries that differ only
 * by where their data lies (qemu splits a range where host offsets jump) are merged.
 * `ignoreZero` drops the zero flag of allocated data: for metadata-preallocated
 * images with clusters below the host file system's block size, qemu derives it
 * from which file blocks happen to hold metadata, i.e. from the exact layout.
 */
function mapJson(dir: string, image: string, ignoreZero = false): unknown[] {
  const r = qemuImg(['map', '--output=json', image], dir);
  if (r.status !== 0) throw new Error(`qemu-img map ${image}: ${r.stderr}`);
  const out: Array<Record<string, unknown>> = [];
  for (const { offset: _o, ...e } of JSON.parse(r.stdout) as Array<Record<string, unknown>>) {
    if (ignoreZero && e.data === true) delete e.zero;
    const prev = out[out.length - 1];
    const same = (x: Record<string, unknown>) => JSON.stringify({ ...x, start: 0, length: 0 });
    if (prev && (prev.start as number) + (prev.length as number) === e.start && same(prev) === same(e)) {
      prev.length = (prev.length as number) + (e.length as number);
    } else {
      out.push(e);
    }
  }
  return out;
}

function checkJson(dir: string, image: string): { status: number; report: Record<string, unknown>; text: string } {
  const r = qemuImg(['check', '--output=json', image], dir);
  let report: Record<string, unknown> = {};
  try {
    report = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    // leave empty: the status tells
  }
  return { status: r.status, report, text: r.stdout + r.stderr };
}

/** The message part of a `qemu-img: ...` / `qimg: ...` error line (file prefix dropped). */
function message(line: string, prog: string, file: string): string {
  let m = line.startsWith(`${prog}: `) ? line.slice(prog.length + 2) : line;
  if (m.startsWith(`${file}: `)) m = m.slice(file.length + 2);
  return m;
}

describe.skipIf(!enabled)('qimg create vs qemu-img create', () => {
  let n = 0;
  const proto = join(tmp.path, 'backings');
  const caseDir = () => {
    if (!existsSync(proto)) {
      mkdirSync(proto);
      makeBackings(proto);
    }
    const dir = join(tmp.path, `case${n++}`);
    mkdirSync(join(dir, 'sub'), { recursive: true });
    for (const f of BACKINGS) copyFileSync(join(proto, f), join(dir, f));
    return dir;
  };

  describe('valid combinations', () => {
    for (const c of VALID) {
      it(c.name, () => {
        const dir = caseDir();
        const { mine, twin } = both(dir, c.args);
        c.after?.(dir);
        expect(twin.status, `qemu-img create failed: ${twin.stderr}`).toBe(0);
        expect(mine.stderr).toBe('');
        expect(mine.status).toBe(0);
        // The Formatting line, byte for byte (names substituted).
        expect(mine.stdout).toBe(sub(twin.stdout));

        const mineImg = c.image(MINE);
        const twinImg = c.image(TWIN);
        const mi = infoJson(dir, mineImg);
        const ti = infoJson(dir, twinImg);
        expect(mi).toEqual(JSON.parse(sub(JSON.stringify(ti))));
        if (c.size !== undefined) expect(mi['virtual-size']).toBe(c.size);
        const args = c.args(MINE).join(' ');
        const ignoreZero = /preallocation=metadata/.test(args) && /cluster_size=(512|1024|2048|1k|2k)\b/.test(args);
        if (!c.mapDivergence) {
          expect(mapJson(dir, mineImg, ignoreZero)).toEqual(JSON.parse(sub(JSON.stringify(mapJson(dir, twinImg, ignoreZero)))));
        }

        if (c.fmt === 'qcow2') {
          const mc = checkJson(dir, mineImg);
          expect(mc.status, mc.text).toBe(0);
          expect(mc.report['check-errors']).toBe(0);
          expect(mc.report.leaks ?? 0).toBe(0);
          expect(mc.report.corruptions ?? 0).toBe(0);
          // The same clusters are in use (preallocation covers the same ranges).
          const tc = checkJson(dir, twinImg);
          expect(mc.report['allocated-clusters']).toBe(tc.report['allocated-clusters']);
          expect(mc.report['total-clusters']).toBe(tc.report['total-clusters']);
          // qemu-io can write to it, and qemu-img still finds it clean.
          const len = Math.min(Number(mi['virtual-size']), 65536);
          if (len > 0) {
            const io = qemuIo(['-f', 'qcow2', '-c', `write -P 0x5a 0 ${len}`, mineImg], dir);
            expect(io.status, io.stderr + io.stdout).toBe(0);
            expect(io.stdout).not.toMatch(/error|failed/i);
            const after = checkJson(dir, mineImg);
            expect(after.status, after.text).toBe(0);
          }
        }
      });
    }
  });

  function checkInvalid(c: InvalidCase, preexisting: boolean): void {
    const dir = caseDir();
    const mineImg = (c.image ?? ((x: string) => `${x}.img`))(MINE);
    const twinImg = (c.image ?? ((x: string) => `${x}.img`))(TWIN);
    const before = new Set(readdirSync(dir));
    const content = Buffer.from('not an image, leave me alone\n');
    if (preexisting) writeFileSync(join(dir, mineImg), content);
    const twin = qemuImg(['create', ...c.args(TWIN)], dir);
    const mine = qimg(['create', ...c.args(MINE)], { cwd: dir });
    expect(twin.status, `qemu-img unexpectedly accepted it: ${twin.stdout}`).toBe(1);
    expect(mine.status, mine.stdout + mine.stderr).toBe(1);
    // stdout: the Formatting line exactly when qemu-img prints it
    expect(mine.stdout).toBe(sub(twin.stdout));
    // stderr: one line, "qimg: FILE: <qemu's message>"
    const lines = mine.stderr.split('\n');
    expect(lines.length, mine.stderr).toBe(2);
    expect(lines[1]).toBe('');
    expect(lines[0].startsWith(`qimg: ${mineImg}: `), lines[0]).toBe(true);
    const qemuFirst = twin.stderr.split('\n')[0];
    const want = sub(message(qemuFirst, 'qemu-img', twinImg));
    const got = message(lines[0], 'qimg', mineImg);
    if (twin.stderr.trimEnd().includes('\n')) {
      // qemu-img spreads some messages over several lines; qimg folds them into one.
      expect(got.startsWith(want.replace(/\.$/, '')), `${got}\n  vs qemu: ${want}`).toBe(true);
    } else {
      expect(got).toBe(want);
    }
    // nothing left behind; an existing file untouched
    const after = readdirSync(dir).filter((f) => !f.startsWith(TWIN));
    const expected = [...before].filter((f) => !f.startsWith(TWIN));
    if (preexisting) expected.push(mineImg);
    expect(after.sort()).toEqual(expected.sort());
    if (preexisting) expect(readFileSync(join(dir, mineImg))).toEqual(content);
    expect(existsSync(join(dir, `${MINE}.data`))).toBe(false);
  }

  describe('invalid combinations', () => {
    for (const c of INVALID) {
      it(c.name, () => checkInvalid(c, false));
      it(`${c.name} (existing file untouched)`, () => checkInvalid(c, true));
    }
    // Skipped rather than expected to fail: whether the divergence shows depends on how
    // the host file system reports fallocated blocks to SEEK_DATA.
    for (const c of VALID.filter((v) => v.mapDivergence)) {
      it.skip(`${c.name}: map [known divergence: ${c.mapDivergence}]`, () => {
        const dir = caseDir();
        both(dir, c.args);
        expect(mapJson(dir, c.image(MINE))).toEqual(JSON.parse(sub(JSON.stringify(mapJson(dir, c.image(TWIN))))));
      });
    }
    for (const c of INVALID_KNOWN_DIVERGENT) {
      it(`${c.name}`, () => checkInvalid(c, false));
    }
  });

  it('-o help lists qemu-img\'s qcow2 options (encryption included)', () => {
    const q = qemuImg(['create', '-f', 'qcow2', '-o', 'help']);
    const m = qimg(['create', '-f', 'qcow2', '-o', 'help']);
    expect(m.status).toBe(0);
    expect(m.stderr).toBe('');
    expect(m.stdout).toBe(q.stdout);
  });

  it('-o help for raw equals qemu-img\'s', () => {
    const q = qemuImg(['create', '-f', 'raw', '-o', 'help']);
    const m = qimg(['create', '-f', 'raw', '-o', 'help']);
    expect(m.status).toBe(0);
    expect(m.stdout).toBe(q.stdout);
  });

  it('-q prints nothing', () => {
    const dir = caseDir();
    for (const args of [['-f', 'qcow2', 'q.qcow2', '1M'], ['-f', 'raw', 'q.raw', '1M'], ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'o.qcow2']]) {
      const r = qimg(['create', '-q', ...args], { cwd: dir });
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout + r.stderr).toBe('');
    }
    // but errors still are reported
    const e = qimg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=3k', 'e.qcow2', '1M'], { cwd: dir });
    expect(e.status).toBe(1);
    expect(e.stdout).toBe('');
    expect(e.stderr).toBe('qimg: e.qcow2: Cluster size must be a power of two between 512 and 2048k\n');
  });

  it('an existing image is replaced', () => {
    const dir = caseDir();
    writeFileSync(join(dir, 'x.qcow2'), Buffer.alloc(1 << 20, 0xaa));
    const r = qimg(['create', '-q', '-f', 'qcow2', 'x.qcow2', '2M'], { cwd: dir });
    expect(r.status, r.stderr).toBe(0);
    expect(qemuImg(['check', 'x.qcow2'], dir).status).toBe(0);
    expect(infoJson(dir, 'x.qcow2')['virtual-size']).toBe(2 * 1048576);
  });
});
