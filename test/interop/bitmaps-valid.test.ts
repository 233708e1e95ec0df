/**
 * Persistent dirty bitmaps kept valid by qimg, with QEMU 7.2 as the oracle.
 *
 * Every scenario builds its images once (qemu-img / qemu-io) in `setup/`, copies them to
 * `qemu/` and `qimg/`, applies the same operation with QEMU and with qimg, and then
 * requires, for every image of the scenario: the same bitmaps with the same flags and
 * granularities (qemu-img info, in order), the same dirty ranges for every bitmap that is
 * not in-use (qemu-nbd -B + nbdinfo --map), `qemu-img check` clean on qimg's copy and the
 * same guest data (qemu-img compare). CLI scenarios also require the same exit status,
 * stderr (`qemu-img: ` read as `qimg: `, QEMU's random node names `#blockNNN` ignored) and
 * stdout. Two qimg conventions are kept where they differ from qemu-img: the error line of
 * resize and snapshot names the image (`qimg: FILE: …`, as resize.test.ts and
 * snapshot.test.ts require), and a failed convert removes the output it created.
 *
 * Each scenario is two tests: `qemu: …` runs QEMU's side and checks what QEMU was seen to
 * do (the `fact`s below record QEMU 7.2's behaviour, they are not assumptions); `qimg: …`
 * runs qimg's side and compares.
 *
 * The images carry bitmaps of every kind: enabled with the default granularity (def) and
 * with 512 B, 4 KiB, 1 MiB and 2 MiB granules (g512, g4k, g1m, g2m), disabled (dis), and
 * one left in-use (bad) by a qemu-io killed with SIGKILL while it had the image open
 * read-write. The disk size, 5 MiB + 1.5 KiB, leaves a partial last granule for every
 * granularity above 512 B.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { openImage } from '../../src/index.js';
import { ROOT, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';
import { bitmapState, bitmapsOf, leaveBitmapsInUse, mergeRanges, nbdToolsAvailable, qemuIoSession, type BitmapInfo, type BitmapState, type Range } from '../helpers/nbd-bitmap.js';
import { Prng } from '../helpers/prng.js';

const enabled = qemuAvailable() && nbdToolsAvailable();
const tmp = tempDir('qimg-bitmaps-valid-');
afterAll(() => tmp.cleanup());
const BASES = join(tmp.path, 'bases');

const K = 1024;
const M = 1024 * K;
/** 5 MiB + 1.5 KiB: the last granule is partial for every granularity above 512 B. */
const SIZE = 5 * M + 1536;
const BIG = 2048 * M;
/** The data of src.qcow2 (the source of the convert -n scenarios), which also has a zero cluster at 4 MiB. */
const SRC_DATA: Range[] = [
  [100_000, 5000],
  [2 * M, 100 * K],
  [SIZE - 1392, 1392],
];

// ---------------------------------------------------------------------------------------
// building images

function must(r: RunResult, what: string): RunResult {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

function qi(dir: string, ...args: string[]): RunResult {
  return must(qemuImg(args, dir), `qemu-img ${args.join(' ')}`);
}

function io(dir: string, file: string, cmds: string[]): void {
  if (cmds.length === 0) return;
  const r = qemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], dir);
  if (r.status !== 0 || /error|fail|not supported/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${file} ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
}

/** Enabled bitmaps (name, -g) of the standard images. */
const ENABLED: Array<[string, string | null]> = [
  ['def', null],
  ['g512', '512'],
  ['g4k', '4k'],
  ['g1m', '1M'],
  ['g2m', '2M'],
];

interface ImageSpec {
  size?: number;
  /** qemu-io commands run before any bitmap exists */
  data?: string[];
  /** make an in-use bitmap `bad` (first in the directory) */
  inUse?: boolean;
  enabled?: Array<[string, string | null]>;
  disabled?: string[];
  /** qemu-io commands run once the bitmaps exist (bits set before the scenario) */
  prior?: string[];
  clusterSize?: string;
  backing?: string;
}

async function makeImage(dir: string, file: string, spec: ImageSpec = {}): Promise<void> {
  const opts = spec.clusterSize ? ['-o', `cluster_size=${spec.clusterSize}`] : [];
  const backing = spec.backing ? ['-b', spec.backing, '-F', 'qcow2'] : [];
  qi(dir, 'create', '-q', '-f', 'qcow2', ...opts, ...backing, file, String(spec.size ?? SIZE));
  io(dir, file, spec.data ?? []);
  if (spec.inUse ?? true) {
    qi(dir, 'bitmap', '--add', file, 'bad');
    await leaveBitmapsInUse(file, dir);
  }
  for (const [name, g] of spec.enabled ?? ENABLED) qi(dir, 'bitmap', '--add', ...(g ? ['-g', g] : []), file, name);
  for (const name of spec.disabled ?? ['dis']) qi(dir, 'bitmap', '--add', '--disable', file, name);
  io(dir, file, spec.prior ?? []);
}

/** Copies a base image into a scenario's setup directory. */
function put(dir: string, base: string, as = base): void {
  cpSync(join(BASES, base), join(dir, as));
}

/** Ranges of `file` allocated in the image itself (data or zero clusters), per qemu-img map. */
function allocated(dir: string, file: string): Range[] {
  const map = JSON.parse(qi(dir, 'map', '-f', 'qcow2', '--output=json', file).stdout) as Array<{ start: number; length: number; depth: number; present: boolean }>;
  return mergeRanges(map.filter((e) => e.depth === 0 && e.present).map((e): Range => [e.start, e.length]));
}

// ---------------------------------------------------------------------------------------
// the bitmap model used to state QEMU's behaviour

/** Ranges rounded out to `unit` (and cut at `size`), merged. */
function roundOut(ranges: Range[], unit: number, size = Infinity): Range[] {
  return mergeRanges(
    ranges
      .filter(([, l]) => l > 0)
      .map(([o, l]): Range => {
        const s = Math.floor(o / unit) * unit;
        const e = Math.min(size, Math.ceil((o + l) / unit) * unit);
        return [s, e - s];
      }),
  );
}

function clip(ranges: Range[], size: number): Range[] {
  return ranges.filter(([o]) => o < size).map(([o, l]): Range => [o, Math.min(l, size - o)]);
}

/**
 * The image's bitmaps after QEMU touched `touched` (bytes written, zeroed or discarded):
 * every enabled, consistent bitmap gains the granules those bytes meet; disabled and in-use
 * bitmaps, flags and granularities are unchanged.
 */
function expectMarked(before: BitmapState | null, after: BitmapState | null, touched: Range[], size: number): void {
  expect(before).not.toBeNull();
  expect(after?.bitmaps).toEqual(before!.bitmaps);
  for (const b of before!.bitmaps) {
    const live = b.flags.includes('auto') && !b.flags.includes('in-use');
    const want = live ? mergeRanges([...before!.dirty[b.name], ...roundOut(touched, b.granularity, size)]) : before!.dirty[b.name];
    expect(after!.dirty[b.name], `bitmap ${b.name}`).toEqual(want);
  }
}

// ---------------------------------------------------------------------------------------
// scenarios

type States = Record<string, BitmapState | null>;

interface Ctx {
  /** the scenario's setup directory (the images before the operation) */
  setup: string;
  before: States;
  after: States;
  /** QEMU's result (CLI scenarios) */
  r?: RunResult;
}

interface Scenario {
  name: string;
  /** images compared afterwards (relative to the scenario directory) */
  files: string[];
  setup(dir: string): void | Promise<void>;
  qemu(dir: string): RunResult | undefined;
  qimg(dir: string): Promise<RunResult | undefined>;
  /** compare stdout (default: yes) */
  stdout?: boolean;
  /** qimg's stderr from QEMU's (normalized) one, where qimg's own conventions differ */
  qimgStderr?(qemuStderr: string): string;
  /**
   * outputs a failed qemu-img convert leaves behind and qimg removes (README: "A failed
   * conversion removes the output it created"; test/hygiene)
   */
  removedByQimg?: string[];
  /** what QEMU was seen to do */
  fact?(c: Ctx): void;
}

const fmtOf = (file: string) => (file.endsWith('.raw') ? 'raw' : file.endsWith('.vmdk') ? 'vmdk' : 'qcow2');

/** Bitmap states by file content: most setups are plain copies of a few base images. */
const stateCache = new Map<string, BitmapState>();

function states(dir: string, files: string[]): States {
  const out: States = {};
  for (const f of files) {
    const p = join(dir, f);
    if (!existsSync(p)) out[f] = null;
    else if (fmtOf(f) !== 'qcow2') out[f] = { bitmaps: [], dirty: {} };
    else {
      const key = sha256File(p);
      if (!stateCache.has(key)) stateCache.set(key, bitmapState(p));
      out[f] = structuredClone(stateCache.get(key)!);
    }
  }
  return out;
}

/**
 * qemu-img's stderr as qimg prints it: its name, the random node name, and an error
 * with a second line (a hint, or cvtnum's message split over two lines) on one line —
 * qimg's rule for every error.
 */
const norm = (s: string) =>
  s
    .replace(/^qemu-img: /gm, 'qimg: ')
    .replace(/#block\d+/g, '#block')
    .replace(/ suffixes for\nqimg: kilobytes/g, ' suffixes for kilobytes')
    .replace(/\n(?!qimg: |$)/g, ' ')
    .replace(/'qemu-img bitmap/g, "'qimg bitmap");
/** qimg names the image in the error line of an operation on it (resize, snapshot: see resize.test.ts, snapshot.test.ts). */
const naming = (file: string) => (s: string) => s.replace(/^qimg: /, `qimg: ${file}: `);

/** A qemu-img command and the same qimg command, both run in the copy's directory. */
function cli(...args: string[]): Pick<Scenario, 'qemu' | 'qimg'> {
  return { qemu: (d) => qemuImg(args, d), qimg: async (d) => qimg(args, { cwd: d, timeout: 60_000 }) };
}

/** Library operations: write (pattern), zero, zero with unmap, discard. */
type Op = ['w', number, number, number] | ['z' | 'zu' | 'd', number, number];

function qemuIoCommand(op: Op): string {
  switch (op[0]) {
    case 'w':
      return `write -P ${op[3]} ${op[1]} ${op[2]}`;
    case 'z':
      return `write -z ${op[1]} ${op[2]}`;
    case 'zu':
      return `write -z -u ${op[1]} ${op[2]}`;
    case 'd':
      return `discard ${op[1]} ${op[2]}`;
  }
}

/** The same operations through qemu-io and through qimg's library (openImage writable). */
function lib(file: string, ops: Op[]): Pick<Scenario, 'qemu' | 'qimg'> {
  return {
    qemu: (d) => {
      // qemu-io opens the image read-write even without commands
      if (ops.length === 0) must(qemuIo(['-f', 'qcow2', '-c', 'flush', file], d), 'qemu-io flush');
      else io(d, file, ops.map(qemuIoCommand));
      return undefined;
    },
    qimg: async (d) => {
      const img = await openImage(join(d, file), { format: 'qcow2', writable: true });
      try {
        for (const op of ops) {
          if (op[0] === 'w') await img.write(op[1], Buffer.alloc(op[2], op[3]));
          else if (op[0] === 'd') await img.discard(op[1], op[2]);
          else await img.writeZeroes(op[1], op[2], { mayUnmap: op[0] === 'zu' });
        }
      } finally {
        await img.close();
      }
      return undefined;
    },
  };
}

const touchedBy = (ops: Op[]): Range[] => ops.map((op): Range => [op[1], op[2]]);

/** A library scenario on a copy of a base image; QEMU marks exactly the granules each request meets. */
function libScenario(name: string, base: string, ops: Op[], size = SIZE): Scenario {
  return {
    name,
    files: [base],
    setup: (d) => put(d, base),
    ...lib(base, ops),
    fact: (c) => expectMarked(c.before[base], c.after[base], touchedBy(ops), size),
  };
}

function unchanged(c: Ctx, file: string): void {
  expect(c.after[file]).toEqual(c.before[file]);
}

function succeeded(c: Ctx, stdout?: string): void {
  expect(c.r!.status, c.r!.stderr).toBe(0);
  expect(c.r!.stderr).toBe('');
  if (stdout !== undefined) expect(c.r!.stdout).toBe(stdout);
}

function refused(c: Ctx, stderr: string): void {
  expect(c.r!.status).toBe(1);
  expect(norm(c.r!.stderr)).toBe(stderr);
}

/** Many writes spread over the 2 GiB disk, fixed by a seed. */
function bigOps(): Op[] {
  const rng = new Prng(0xb17a);
  const ops: Op[] = [];
  for (let i = 0; i < 150; i++) {
    const len = rng.chance(0.5) ? rng.int(1, 8 * K) : rng.int(1, 256 * K);
    let off = rng.int(0, BIG - len);
    if (rng.chance(0.5)) off -= off % 512;
    const kind = rng.pick(['w', 'w', 'w', 'z', 'zu', 'd'] as const);
    ops.push(kind === 'w' ? ['w', off, len, 1 + (i % 250)] : [kind, off, len]);
  }
  ops.push(['w', BIG - 1000, 1000, 0x5a], ['zu', BIG - 70_000, 3000]);
  return ops;
}

const scenarios: Scenario[] = [
  // --- the library: writes, zero writes, discards ---------------------------------------
  libScenario('read-write open and close without writes', 'std.qcow2', []),
  libScenario('unaligned writes crossing granules', 'std.qcow2', [
    ['w', 1000, 70_000, 5],
    ['w', 65_000, 2000, 6],
    ['w', M - 100, 1100, 7],
    ['w', 2 * M - 300, 600, 8],
    ['w', 4 * M - 1, 2, 9],
  ]),
  libScenario('writes in the last partial granule of an odd-sized disk', 'std.qcow2', [
    ['w', SIZE - 1392, 1392, 6],
    ['w', SIZE - 512, 512, 7],
    ['w', 5 * M - 100, 100, 8],
  ]),
  libScenario('zero writes without unmap (allocated, unallocated, unaligned, tail)', 'std.qcow2', [
    ['z', 1000, 70_000],
    ['z', 1.5 * M, 64 * K],
    ['z', 3 * M + 100, 200],
    ['z', SIZE - 1392, 1392],
  ]),
  libScenario('zero writes with unmap', 'std.qcow2', [
    ['zu', 1000, 200_000],
    ['zu', 3 * M, 512 * K],
    ['zu', 1.5 * M, 64 * K],
    ['zu', SIZE - 1392, 1392],
  ]),
  libScenario('discards (unaligned, whole clusters, unallocated, tail)', 'std.qcow2', [
    ['d', 1000, 200_000],
    ['d', 3 * M, 64 * K],
    ['d', 1.5 * M, 64 * K],
    ['d', SIZE - 1392, 1392],
  ]),
  libScenario('a mixed sequence over the same granules', 'std.qcow2', [
    ['w', 100, 100, 1],
    ['d', 0, 64 * K],
    ['w', 64 * K + 511, 2, 2],
    ['zu', 60 * K, 8 * K],
    ['z', 4 * M + 4095, 2],
    ['w', 4 * M + 8 * K, 4 * K, 3],
  ]),
  {
    name: 'writes to an image with a backing file (COW, zero clusters, discard)',
    files: ['ov.qcow2', 'bk.qcow2'],
    async setup(d) {
      await makeImage(d, 'bk.qcow2', { data: ['write -P 1 0 2M', 'write -P 2 4M 1M'], inUse: false, enabled: [['bkdef', null]], disabled: [] });
      await makeImage(d, 'ov.qcow2', { backing: 'bk.qcow2', prior: ['write -P 3 2000000 3000'] });
    },
    ...lib('ov.qcow2', [
      ['w', 1000, 5000, 5],
      ['w', 70_000, 100_000, 6],
      ['zu', 1 * M, 64 * K],
      ['z', 1 * M + 100 * K, 1000],
      ['d', 4 * M, 128 * K],
      ['w', SIZE - 700, 700, 7],
    ]),
    fact(c) {
      const ops: Op[] = [
        ['w', 1000, 5000, 5],
        ['w', 70_000, 100_000, 6],
        ['zu', 1 * M, 64 * K],
        ['z', 1 * M + 100 * K, 1000],
        ['d', 4 * M, 128 * K],
        ['w', SIZE - 700, 700, 7],
      ];
      expectMarked(c.before['ov.qcow2'], c.after['ov.qcow2'], touchedBy(ops), SIZE);
      unchanged(c, 'bk.qcow2');
    },
  },
  libScenario('many writes over a 2 GiB sparse disk', 'big.qcow2', bigOps(), BIG),

  // --- commit -------------------------------------------------------------------------------
  {
    name: "commit: the top's allocated clusters, rounded to 64 KiB, land in the base's bitmaps",
    files: ['base.qcow2', 'top.qcow2'],
    async setup(d) {
      put(d, 'std.qcow2', 'base.qcow2');
      await makeImage(d, 'top.qcow2', {
        backing: 'base.qcow2',
        data: ['write -P 7 1000 5000', 'write -z 2M 64k', 'write -P 8 4M 70000', 'discard 3M 64k', `write -P 9 ${SIZE - 1392} 1392`],
        enabled: [['tdef', null], ['tg512', '512']],
        disabled: ['tdis'],
        prior: ['write -P 9 1200000 1000'],
      });
    },
    ...cli('commit', 'top.qcow2'),
    fact(c) {
      succeeded(c, 'Image committed.\n');
      expectMarked(c.before['base.qcow2'], c.after['base.qcow2'], roundOut(allocated(c.setup, 'top.qcow2'), 64 * K), SIZE);
      // emptying the top does not touch its bitmaps
      unchanged(c, 'top.qcow2');
    },
  },
  {
    name: "commit with 4 KiB base clusters and 512 B top clusters: the top's clusters rounded to 4 KiB",
    files: ['base.qcow2', 'top.qcow2'],
    async setup(d) {
      await makeImage(d, 'base.qcow2', { clusterSize: '4k', data: ['write -P 1 0 1M'], enabled: [['g512', '512'], ['def', null]] });
      await makeImage(d, 'top.qcow2', {
        clusterSize: '512',
        backing: 'base.qcow2',
        inUse: false,
        enabled: [['tg512', '512']],
        disabled: [],
        data: ['write -P 7 1000 5000', 'write -P 7 2000000 100', 'write -z 2M 64k', `write -P 3 ${SIZE - 1392} 1392`],
      });
    },
    ...cli('commit', 'top.qcow2'),
    fact(c) {
      succeeded(c, 'Image committed.\n');
      expectMarked(c.before['base.qcow2'], c.after['base.qcow2'], roundOut(allocated(c.setup, 'top.qcow2'), 4 * K), SIZE);
      unchanged(c, 'top.qcow2');
    },
  },
  {
    name: 'commit -b over an intermediate image with bitmaps',
    files: ['base.qcow2', 'mid.qcow2', 'top.qcow2'],
    async setup(d) {
      put(d, 'clean.qcow2', 'base.qcow2');
      await makeImage(d, 'mid.qcow2', { backing: 'base.qcow2', inUse: false, enabled: [['mdef', null]], disabled: [], data: ['write -P 5 1500000 1000'] });
      await makeImage(d, 'top.qcow2', { backing: 'mid.qcow2', inUse: false, enabled: [['tdef', null]], disabled: [], data: ['write -P 6 4000000 70000'] });
    },
    ...cli('commit', '-b', 'base.qcow2', 'top.qcow2'),
    fact(c) {
      succeeded(c, 'Image committed.\n');
      const above = mergeRanges([...allocated(c.setup, 'top.qcow2'), ...allocated(c.setup, 'mid.qcow2')]);
      expectMarked(c.before['base.qcow2'], c.after['base.qcow2'], roundOut(above, 64 * K), SIZE);
      unchanged(c, 'mid.qcow2');
      unchanged(c, 'top.qcow2');
    },
  },

  // --- rebase -------------------------------------------------------------------------------
  ...(['safe', 'unsafe', 'none'] as const).map((mode): Scenario => {
    const args = mode === 'safe' ? ['-b', 'rb.qcow2', '-F', 'qcow2'] : mode === 'unsafe' ? ['-u', '-b', 'rb.qcow2', '-F', 'qcow2'] : ['-b', ''];
    return {
      name: `rebase ${mode === 'safe' ? '(safe mode): the sectors where the old and new backing differ' : mode === 'unsafe' ? '-u: no writes' : "-b '': the old backing's data is written into the top"}`,
      files: ['rt.qcow2', 'ra.qcow2', 'rb.qcow2'],
      async setup(d) {
        qi(d, 'create', '-q', '-f', 'qcow2', 'ra.qcow2', String(SIZE));
        qi(d, 'create', '-q', '-f', 'qcow2', 'rb.qcow2', String(SIZE));
        io(d, 'ra.qcow2', ['write -P 1 0 1M', 'write -P 2 3000000 3000', `write -P 4 ${SIZE - 1392} 1392`]);
        io(d, 'rb.qcow2', ['write -P 1 0 1M', 'write -P 3 100000 1000', 'write -P 2 3000000 1000']);
        await makeImage(d, 'rt.qcow2', { backing: 'ra.qcow2', data: ['write -P 9 90000 20000'], prior: ['write -P 8 2500000 10'] });
      },
      ...cli('rebase', ...args, 'rt.qcow2'),
      fact(c) {
        succeeded(c, '');
        // rt has its own data at 64k..128k (so 100000..101000 is not rewritten)
        const touched: Range[] =
          mode === 'safe'
            ? [
                [3_001_000, 2000],
                [SIZE - 1392, 1392],
              ]
            : mode === 'none'
              ? [
                  [0, 64 * K],
                  [128 * K, M - 128 * K],
                  [3_000_000, 3000],
                  [SIZE - 1392, 1392],
                ]
              : [];
        expectMarked(c.before['rt.qcow2'], c.after['rt.qcow2'], touched, SIZE);
      },
    };
  }),

  // --- resize -------------------------------------------------------------------------------
  {
    name: 'resize grow: no new bits, the partial last granule keeps its bit',
    files: ['clean.qcow2'],
    setup(d) {
      put(d, 'clean.qcow2');
      io(d, 'clean.qcow2', [`write -P 4 ${SIZE - 1392} 1392`]);
    },
    ...cli('resize', 'clean.qcow2', '+3000320'),
    fact(c) {
      succeeded(c, 'Image resized.\n');
      // the same granules; a dirty partial last granule now reaches its full size
      const before = c.before['clean.qcow2']!;
      const after = c.after['clean.qcow2']!;
      expect(after.bitmaps).toEqual(before.bitmaps);
      for (const b of before.bitmaps) expect(after.dirty[b.name], b.name).toEqual(roundOut(before.dirty[b.name], b.granularity, SIZE + 3_000_320));
    },
  },
  {
    name: 'resize --shrink: bits past the new end dropped',
    files: ['clean.qcow2'],
    setup(d) {
      put(d, 'clean.qcow2');
      io(d, 'clean.qcow2', [`write -P 4 ${SIZE - 1392} 1392`, 'write -P 5 2999000 2000']);
    },
    ...cli('resize', '--shrink', 'clean.qcow2', '3000320'),
    fact(c) {
      succeeded(c, 'Image resized.\n');
      const before = c.before['clean.qcow2']!;
      const after = c.after['clean.qcow2']!;
      expect(after.bitmaps).toEqual(before.bitmaps);
      for (const b of before.bitmaps) expect(after.dirty[b.name], b.name).toEqual(clip(before.dirty[b.name], 3_000_320));
    },
  },
  {
    name: 'resize refused with an in-use bitmap',
    files: ['std.qcow2'],
    setup: (d) => put(d, 'std.qcow2'),
    ...cli('resize', 'std.qcow2', '+1M'),
    fact(c) {
      refused(c, "qimg: Bitmap 'bad' is inconsistent and cannot be used Try block-dirty-bitmap-remove to delete this bitmap from disk\n");
      unchanged(c, 'std.qcow2');
    },
  },

  // --- convert -n onto an image with bitmaps ------------------------------------------------
  {
    name: 'convert -n: the whole target is written, every enabled bitmap all dirty',
    files: ['std.qcow2', 'src.qcow2'],
    setup(d) {
      put(d, 'std.qcow2');
      put(d, 'src.qcow2');
    },
    ...cli('convert', '-n', '-O', 'qcow2', 'src.qcow2', 'std.qcow2'),
    fact(c) {
      succeeded(c, '');
      expectMarked(c.before['std.qcow2'], c.after['std.qcow2'], [[0, SIZE]], SIZE);
    },
  },
  {
    name: "convert -n --target-is-zero: only the source's non-zero 4 KiB blocks are written",
    files: ['zero.qcow2', 'src.qcow2'],
    async setup(d) {
      put(d, 'src.qcow2');
      // a target that reads as zeroes (its prior bits come from a zero write)
      await makeImage(d, 'zero.qcow2', { prior: ['write -z 2000000 3000'] });
    },
    ...cli('convert', '-n', '--target-is-zero', '-O', 'qcow2', 'src.qcow2', 'zero.qcow2'),
    fact(c) {
      succeeded(c, '');
      const touched = roundOut(SRC_DATA, 4096, SIZE);
      expectMarked(c.before['zero.qcow2'], c.after['zero.qcow2'], touched, SIZE);
    },
  },
  {
    name: "convert -n --bitmaps: the target's own bitmap sees the copy, the copied ones do not",
    files: ['own.qcow2', 'clean.qcow2'],
    async setup(d) {
      put(d, 'clean.qcow2');
      await makeImage(d, 'own.qcow2', { inUse: false, enabled: [['own', '512']], disabled: [] });
    },
    ...cli('convert', '-n', '-O', 'qcow2', '--bitmaps', 'clean.qcow2', 'own.qcow2'),
    fact(c) {
      succeeded(c, '');
      const src = c.before['clean.qcow2']!;
      const out = c.after['own.qcow2']!;
      expect(out.bitmaps).toEqual([{ name: 'own', granularity: 512, flags: ['auto'] }, ...src.bitmaps]);
      expect(out.dirty).toEqual({ own: [[0, SIZE]], ...src.dirty });
    },
  },
  {
    name: 'convert -n --bitmaps refused when the target has a bitmap of the same name',
    files: ['clean.qcow2', 'same.qcow2'],
    setup(d) {
      put(d, 'clean.qcow2');
      put(d, 'clean.qcow2', 'same.qcow2');
    },
    ...cli('convert', '-n', '-O', 'qcow2', '--bitmaps', 'clean.qcow2', 'same.qcow2'),
    fact(c) {
      // QEMU walks the source's bitmaps last to first
      refused(c, 'qimg: Failed to create bitmap dis: Bitmap already exists: dis\n');
    },
  },

  // --- snapshot -----------------------------------------------------------------------------
  {
    name: 'snapshot -c sets no bits',
    files: ['std.qcow2'],
    setup: (d) => put(d, 'std.qcow2'),
    ...cli('snapshot', '-c', 's1', 'std.qcow2'),
    fact(c) {
      succeeded(c, '');
      unchanged(c, 'std.qcow2');
    },
  },
  {
    name: 'snapshot -d sets no bits',
    files: ['std.qcow2'],
    setup(d) {
      put(d, 'std.qcow2');
      qi(d, 'snapshot', '-c', 's1', 'std.qcow2');
      io(d, 'std.qcow2', ['write -P 6 4M 4k']);
    },
    ...cli('snapshot', '-d', 's1', 'std.qcow2'),
    fact(c) {
      succeeded(c, '');
      unchanged(c, 'std.qcow2');
    },
  },
  {
    name: 'snapshot -a refused with enabled bitmaps',
    files: ['std.qcow2'],
    setup(d) {
      put(d, 'std.qcow2');
      qi(d, 'snapshot', '-c', 's1', 'std.qcow2');
      io(d, 'std.qcow2', ['write -P 6 4M 4k']);
    },
    ...cli('snapshot', '-a', 's1', 'std.qcow2'),
    qimgStderr: naming('std.qcow2'),
    fact(c) {
      refused(c, "qimg: Could not apply snapshot 's1': Device has active dirty bitmaps\n");
      unchanged(c, 'std.qcow2');
    },
  },
  {
    name: 'snapshot -a refused even when every bitmap is disabled',
    files: ['dis.qcow2'],
    async setup(d) {
      await makeImage(d, 'dis.qcow2', { inUse: false, enabled: [], disabled: ['dis', 'dis2'], data: ['write -P 1 0 64k'] });
      qi(d, 'snapshot', '-c', 's1', 'dis.qcow2');
    },
    ...cli('snapshot', '-a', 's1', 'dis.qcow2'),
    qimgStderr: naming('dis.qcow2'),
    fact(c) {
      refused(c, "qimg: Could not apply snapshot 's1': Device has active dirty bitmaps\n");
      unchanged(c, 'dis.qcow2');
    },
  },

  // --- amend --------------------------------------------------------------------------------
  ...['lazy_refcounts=on', 'refcount_bits=64'].map(
    (opt): Scenario => ({
      name: `amend -o ${opt}: bitmaps kept, no bits`,
      files: ['std.qcow2'],
      setup: (d) => put(d, 'std.qcow2'),
      ...cli('amend', '-o', opt, 'std.qcow2'),
      fact(c) {
        succeeded(c, '');
        unchanged(c, 'std.qcow2');
      },
    }),
  ),

  // --- bench -w -----------------------------------------------------------------------------
  {
    name: 'bench -w: each request marks its granules',
    files: ['std.qcow2'],
    setup: (d) => put(d, 'std.qcow2'),
    ...cli('bench', '-w', '-c', '10', '-s', '4k', '-S', '100000', '-o', '1000', 'std.qcow2'),
    stdout: false,
    fact(c) {
      expect(c.r!.status).toBe(0);
      const touched = Array.from({ length: 10 }, (_, i): Range => [1000 + i * 100_000, 4096]);
      expectMarked(c.before['std.qcow2'], c.after['std.qcow2'], touched, SIZE);
    },
  },
];

// --- qimg bitmap vs qemu-img bitmap -------------------------------------------------------

const LONG = 'n'.repeat(1024);
const bm = (title: string, args: string[], fact?: (c: Ctx) => void, extra: string[] = []): Scenario => ({
  name: `bitmap ${title}`,
  files: ['std.qcow2', ...extra],
  setup(d) {
    put(d, 'std.qcow2');
    for (const f of extra) put(d, f);
  },
  ...cli('bitmap', ...args),
  fact,
});

const after = (c: Ctx) => c.after['std.qcow2']!;
const before = (c: Ctx) => c.before['std.qcow2']!;
const info = (c: Ctx, name: string) => after(c).bitmaps.find((b) => b.name === name);
/** The bitmaps of std.qcow2 afterwards, with `name` as QEMU left it. */
function only(c: Ctx, name: string, flags: string[], granularity: number, dirty: Range[]): void {
  succeeded(c, '');
  expect(info(c, name)).toEqual({ name, granularity, flags });
  expect(after(c).dirty[name]).toEqual(dirty);
  for (const b of before(c).bitmaps) if (b.name !== name) expect(after(c).dirty[b.name], b.name).toEqual(before(c).dirty[b.name]);
}
const coarse = (c: Ctx, src: string, g: number) => roundOut(before(c).dirty[src], g, SIZE);

const inconsistent = (op: string, target: string) =>
  `qimg: Operation ${op} on bitmap ${target} failed: Bitmap 'bad' is inconsistent and cannot be used Try block-dirty-bitmap-remove to delete this bitmap from disk\n`;
const badGranularity = 'qimg: Operation add on bitmap x failed: Granularity must be power of 2 and at least 512\n';

scenarios.push(
  bm('--add', ['--add', 'std.qcow2', 'new'], (c) => only(c, 'new', ['auto'], 65536, [])),
  bm('--add -g 512 --disable', ['--add', '-g', '512', '--disable', 'std.qcow2', 'new'], (c) => only(c, 'new', [], 512, [])),
  bm('--add --disable', ['--add', '--disable', 'std.qcow2', 'new'], (c) => only(c, 'new', [], 65536, [])),
  bm('--add -g 2G (the largest granularity)', ['--add', '-g', '2G', 'std.qcow2', 'huge'], (c) => only(c, 'huge', ['auto'], 2 ** 31, [])),
  bm('--add -g 0 (the default granularity)', ['--add', '-g', '0', 'std.qcow2', 'zero'], (c) => only(c, 'zero', ['auto'], 65536, [])),
  bm('--clear', ['--clear', 'std.qcow2', 'def'], (c) => only(c, 'def', ['auto'], 65536, [])),
  bm('--enable', ['--enable', 'std.qcow2', 'dis'], (c) => only(c, 'dis', ['auto'], 65536, [])),
  bm('--disable', ['--disable', 'std.qcow2', 'g512'], (c) => only(c, 'g512', [], 512, before(c).dirty.g512)),
  bm('--remove', ['--remove', 'std.qcow2', 'g4k'], (c) => {
    succeeded(c, '');
    expect(after(c).bitmaps.map((b) => b.name)).toEqual(['bad', 'def', 'g512', 'g1m', 'g2m', 'dis']);
  }),
  bm('--remove of an in-use bitmap', ['--remove', 'std.qcow2', 'bad'], (c) => {
    succeeded(c, '');
    expect(after(c).bitmaps.map((b) => b.name)).toEqual(['def', 'g512', 'g4k', 'g1m', 'g2m', 'dis']);
  }),
  bm('--merge of a finer bitmap into a coarser one', ['--merge', 'g512', 'std.qcow2', 'g2m'], (c) =>
    only(c, 'g2m', ['auto'], 2 * M, mergeRanges([...before(c).dirty.g2m, ...coarse(c, 'g512', 2 * M)])),
  ),
  bm('--merge of a coarser bitmap into a finer one', ['--merge', 'g1m', 'std.qcow2', 'g512'], (c) =>
    only(c, 'g512', ['auto'], 512, mergeRanges([...before(c).dirty.g512, ...before(c).dirty.g1m])),
  ),
  bm('--merge into a disabled bitmap', ['--merge', 'def', 'std.qcow2', 'dis'], (c) => only(c, 'dis', [], 65536, before(c).dirty.def)),
  bm('--add -g 4k --merge (several operations in one call)', ['--add', '-g', '4k', '--merge', 'g512', 'std.qcow2', 'new'], (c) =>
    only(c, 'new', ['auto'], 4096, coarse(c, 'g512', 4096)),
  ),
  bm('--clear --disable --enable (in the order given)', ['--clear', '--disable', '--enable', 'std.qcow2', 'g4k'], (c) => only(c, 'g4k', ['auto'], 4096, [])),
  bm(
    '--merge from another image (-b -F)',
    ['--merge', 'ob', '-b', 'other.qcow2', '-F', 'qcow2', 'std.qcow2', 'g512'],
    (c) => {
      only(c, 'g512', ['auto'], 512, mergeRanges([...before(c).dirty.g512, ...c.before['other.qcow2']!.dirty.ob]));
      unchanged(c, 'other.qcow2');
    },
    ['other.qcow2'],
  ),
  bm(
    '--add --merge from another image (-b, format probed)',
    ['--add', '--merge', 'ob', '-b', 'other.qcow2', 'std.qcow2', 'new'],
    (c) => only(c, 'new', ['auto'], 65536, roundOut(c.before['other.qcow2']!.dirty.ob, 65536, SIZE)),
    ['other.qcow2'],
  ),
  // refusals
  bm('--add of an existing name', ['--add', 'std.qcow2', 'def'], (c) => refused(c, 'qimg: Operation add on bitmap def failed: Bitmap already exists: def\n')),
  bm('--add --add (the second add fails, the first stays)', ['--add', '--add', 'std.qcow2', 'z'], (c) => {
    refused(c, 'qimg: Operation add on bitmap z failed: Bitmap already exists: z\n');
    expect(info(c, 'z')).toEqual({ name: 'z', granularity: 65536, flags: ['auto'] });
  }),
  bm('--add --merge of a missing source (the add stays)', ['--add', '--merge', 'nope', 'std.qcow2', 'nb'], (c) => {
    refused(c, "qimg: Operation merge on bitmap nb failed: Dirty bitmap 'nope' not found\n");
    expect(info(c, 'nb')).toEqual({ name: 'nb', granularity: 65536, flags: ['auto'] });
  }),
  ...(['remove', 'clear'] as const).map((op) =>
    bm(`--${op} of a missing bitmap`, [`--${op}`, 'std.qcow2', 'nope'], (c) => refused(c, `qimg: Operation ${op} on bitmap nope failed: Dirty bitmap 'nope' not found\n`)),
  ),
  bm('--merge into a missing bitmap', ['--merge', 'def', 'std.qcow2', 'nope'], (c) => refused(c, "qimg: Operation merge on bitmap nope failed: Dirty bitmap 'nope' not found\n")),
  bm(
    '--merge of a bitmap missing in the other image',
    ['--merge', 'nope', '-b', 'other.qcow2', '-F', 'qcow2', 'std.qcow2', 'def'],
    (c) => refused(c, "qimg: Operation merge on bitmap def failed: Dirty bitmap 'nope' not found\n"),
    ['other.qcow2'],
  ),
  ...(['clear', 'enable', 'disable'] as const).map((op) => bm(`--${op} of an in-use bitmap`, [`--${op}`, 'std.qcow2', 'bad'], (c) => refused(c, inconsistent(op, 'bad')))),
  bm('--merge from an in-use bitmap', ['--merge', 'bad', 'std.qcow2', 'def'], (c) => refused(c, inconsistent('merge', 'def'))),
  bm('--merge into an in-use bitmap', ['--merge', 'def', 'std.qcow2', 'bad'], (c) => refused(c, inconsistent('merge', 'bad'))),
  bm('--add on a v2 image', ['--add', 'v2.qcow2', 'x'], (c) => refused(c, "qimg: Operation add on bitmap x failed: Can't make bitmap 'x' persistent in '#block': Cannot store dirty bitmaps in qcow2 v2 files\n"), ['v2.qcow2']),
  bm('--add on a raw image', ['--add', '-f', 'raw', 'r.raw', 'x'], (c) => refused(c, "qimg: Operation add on bitmap x failed: Can't store persistent bitmaps to #block: Operation not supported\n"), ['r.raw']),
  ...['100', '3000', '4G'].map((g) => bm(`--add -g ${g}`, ['--add', '-g', g, 'std.qcow2', 'x'], (c) => refused(c, badGranularity))),
  bm('--add -g abc', ['--add', '-g', 'abc', 'std.qcow2', 'x'], (c) =>
    refused(c, 'qimg: Invalid granularity specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n'),
  ),
  bm('--add of a 1024-character name', ['--add', 'std.qcow2', LONG], (c) =>
    refused(c, `qimg: Operation add on bitmap ${LONG} failed: Can't make bitmap '${LONG}' persistent in '#block': Name length exceeds maximum (1023 characters)\n`),
  ),
  bm('--add of an empty name', ['--add', 'std.qcow2', ''], (c) => refused(c, 'qimg: Operation add on bitmap  failed: Bitmap name cannot be empty\n')),
  bm('without an action', ['std.qcow2', 'x'], (c) => refused(c, 'qimg: Need at least one of --add, --remove, --clear, --enable, --disable, or --merge\n')),
  bm('without a bitmap name', ['--add', 'std.qcow2'], (c) => refused(c, 'qimg: Expecting filename and bitmap name\n')),
  bm('-g without --add', ['--clear', '-g', '512', 'std.qcow2', 'def'], (c) => refused(c, 'qimg: granularity only supported with --add\n')),
  bm('-F without -b', ['--clear', '-F', 'qcow2', 'std.qcow2', 'def'], (c) => refused(c, 'qimg: -F only supported with -b\n')),
  bm('-b without --merge', ['--clear', '-b', 'other.qcow2', 'std.qcow2', 'def'], (c) => refused(c, 'qimg: Merge bitmap source file only supported with --merge\n'), ['other.qcow2']),
);

// --- convert --bitmaps --------------------------------------------------------------------

const conv = (title: string, args: string[], files: string[], fact: (c: Ctx) => void, removedByQimg?: string[]): Scenario => ({
  name: `convert --bitmaps: ${title}`,
  files,
  removedByQimg,
  setup(d) {
    for (const f of ['clean.qcow2', 'std.qcow2', 'r.raw']) if (files.includes(f) || args.includes(f)) put(d, f);
  },
  ...cli('convert', ...args),
  fact,
});
const cannotCopy = "qimg: Cannot copy inconsistent bitmap 'bad' Try --skip-broken-bitmaps, or use 'qimg bitmap --remove' to delete it\n";

scenarios.push(
  conv('to qcow2, bitmaps and dirty ranges copied', ['--bitmaps', '-O', 'qcow2', 'clean.qcow2', 'out.qcow2'], ['out.qcow2', 'clean.qcow2'], (c) => {
    succeeded(c, '');
    expect(c.after['out.qcow2']).toEqual(c.before['clean.qcow2']);
  }),
  conv('an in-use source bitmap refused', ['--bitmaps', '-O', 'qcow2', 'std.qcow2', 'out.qcow2'], ['out.qcow2', 'std.qcow2'], (c) => {
    refused(c, cannotCopy);
    expect(c.after['out.qcow2']).toBeNull();
  }),
  conv('--skip-broken-bitmaps skips the in-use bitmap with a warning', ['--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'std.qcow2', 'out.qcow2'], ['out.qcow2', 'std.qcow2'], (c) => {
    expect(c.r!.status).toBe(0);
    expect(norm(c.r!.stderr)).toBe("qimg: warning: Skipping inconsistent bitmap 'bad'\n");
    const src = c.before['std.qcow2']!;
    expect(c.after['out.qcow2']).toEqual({ bitmaps: src.bitmaps.filter((b) => b.name !== 'bad'), dirty: src.dirty });
  }),
  conv('--skip-broken-bitmaps without --bitmaps refused', ['--skip-broken-bitmaps', '-O', 'qcow2', 'clean.qcow2', 'out.qcow2'], ['out.qcow2'], (c) => {
    refused(c, 'qimg: Use of --skip-broken-bitmaps requires --bitmaps\n');
    expect(c.after['out.qcow2']).toBeNull();
  }),
  ...(['raw', 'vmdk'] as const).map((fmt) =>
    conv(
      `to ${fmt} refused (after creating the target)`,
      ['--bitmaps', '-O', fmt, 'clean.qcow2', `out.${fmt}`],
      [`out.${fmt}`],
      (c) => {
        refused(c, `qimg: Format driver '${fmt}' does not support bitmaps\n`);
        // qemu-img leaves the target it created
        expect(c.after[`out.${fmt}`]).not.toBeNull();
      },
      [`out.${fmt}`],
    ),
  ),
  conv('to raw with an in-use source bitmap: the inconsistency is reported first', ['--bitmaps', '-O', 'raw', 'std.qcow2', 'out.raw'], ['out.raw'], (c) => {
    refused(c, cannotCopy);
    expect(c.after['out.raw']).toBeNull();
  }),
  conv(
    'to a qcow2 v2 target refused (after creating the target)',
    ['--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', 'clean.qcow2', 'out.qcow2'],
    ['out.qcow2'],
    (c) => {
      refused(c, "qimg: Format driver 'qcow2' does not support bitmaps\n");
      expect(c.after['out.qcow2']).not.toBeNull();
    },
    ['out.qcow2'],
  ),
  conv('from a raw source refused', ['--bitmaps', '-f', 'raw', '-O', 'qcow2', 'r.raw', 'out.qcow2'], ['out.qcow2'], (c) => {
    refused(c, 'qimg: Source lacks bitmap support\n');
    expect(c.after['out.qcow2']).toBeNull();
  }),
);

// ---------------------------------------------------------------------------------------

beforeAll(async () => {
  if (!enabled) return;
  mkdirSync(BASES, { recursive: true });
  const std: ImageSpec = { data: ['write -P 1 0 1M', 'write -P 2 3M 512k'], prior: ['write -P 3 2000000 3000'] };
  await makeImage(BASES, 'std.qcow2', std);
  await makeImage(BASES, 'clean.qcow2', { ...std, inUse: false });
  await makeImage(BASES, 'big.qcow2', {
    size: BIG,
    data: ['write -P 1 0 1M', 'write -P 2 1G 1M'],
    enabled: [
      ['def', null],
      ['g512', '512'],
      ['g2m', '2M'],
    ],
    prior: ['write -P 3 1500M 3000'],
  });
  await makeImage(BASES, 'other.qcow2', { inUse: false, enabled: [['ob', '4k']], disabled: [], prior: ['write -P 7 12345 6789'] });
  qi(BASES, 'create', '-q', '-f', 'qcow2', 'src.qcow2', String(SIZE));
  io(BASES, 'src.qcow2', [...SRC_DATA.map(([o, l], i) => `write -P ${9 - i} ${o} ${l}`), 'write -z 4M 64k']);
  qi(BASES, 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M');
  qi(BASES, 'create', '-q', '-f', 'raw', 'r.raw', '1M');
}, 60_000);

describe.skipIf(!enabled)('persistent dirty bitmaps kept valid (QEMU 7.2 as the oracle)', () => {
  it('the base images are what the scenarios expect', () => {
    const s = bitmapState(join(BASES, 'std.qcow2'));
    expect(s.bitmaps).toEqual([
      { name: 'bad', granularity: 65536, flags: ['in-use', 'auto'] },
      { name: 'def', granularity: 65536, flags: ['auto'] },
      { name: 'g512', granularity: 512, flags: ['auto'] },
      { name: 'g4k', granularity: 4096, flags: ['auto'] },
      { name: 'g1m', granularity: M, flags: ['auto'] },
      { name: 'g2m', granularity: 2 * M, flags: ['auto'] },
      { name: 'dis', granularity: 65536, flags: [] },
    ]);
    expect(s.dirty).toEqual({
      def: [[1966080, 65536]],
      g512: [[1999872, 3584]],
      g4k: [[1998848, 8192]],
      g1m: [[M, M]],
      g2m: [[0, 2 * M]],
      dis: [],
    });
  });

  // --- on disk while the image is open for writing, and after a crash ---------------------
  {
    const dir = join(tmp.path, 'open');
    const qd = join(dir, 'qemu');
    const md = join(dir, 'qimg');
    const seen: { opened?: BitmapInfo[]; written?: BitmapInfo[]; closed?: BitmapState } = {};
    const allInUse = (list: BitmapInfo[]) => list.map((b) => ({ ...b, flags: b.flags.includes('in-use') ? b.flags : ['in-use', ...b.flags] }));

    it('qemu: while open for writing every bitmap is in-use on disk (disabled ones too), until a clean close', async () => {
      mkdirSync(qd, { recursive: true });
      mkdirSync(md, { recursive: true });
      put(qd, 'std.qcow2');
      put(md, 'std.qcow2');
      const file = join(qd, 'std.qcow2');
      const before = bitmapsOf(file);
      const s = await qemuIoSession('std.qcow2', qd);
      try {
        seen.opened = bitmapsOf(file, 'qcow2', { forceShare: true });
        await s.run('write -P 5 1000 70000');
        seen.written = bitmapsOf(file, 'qcow2', { forceShare: true });
      } finally {
        await s.quit();
      }
      seen.closed = bitmapState(file);
      expect(seen.opened).toEqual(allInUse(before));
      expect(seen.written).toEqual(allInUse(before));
      expect(seen.closed.bitmaps).toEqual(before);
    }, 30_000);

    it('qimg: while open for writing every bitmap is in-use on disk (disabled ones too), until a clean close', async () => {
      expect(seen.closed, 'the qemu side did not run').toBeDefined();
      const file = join(md, 'std.qcow2');
      const img = await openImage(file, { format: 'qcow2', writable: true });
      try {
        expect(bitmapsOf(file, 'qcow2', { forceShare: true }), 'after opening').toEqual(seen.opened);
        await img.write(1000, Buffer.alloc(70_000, 5));
        expect(bitmapsOf(file, 'qcow2', { forceShare: true }), 'after a write').toEqual(seen.written);
      } finally {
        await img.close();
      }
      expect(bitmapState(file)).toEqual(seen.closed);
      expect(qemuImg(['check', file]).status).toBe(0);
      expect(qemuImg(['compare', join(qd, 'std.qcow2'), file]).status).toBe(0);
    }, 30_000);
  }
  {
    const dir = join(tmp.path, 'crash');
    const qd = join(dir, 'qemu');
    const md = join(dir, 'qimg');
    let crashed: BitmapState | undefined;

    it('qemu: killed after a flushed write, every bitmap is left in-use', async () => {
      mkdirSync(qd, { recursive: true });
      mkdirSync(md, { recursive: true });
      put(qd, 'std.qcow2');
      put(md, 'std.qcow2');
      const s = await qemuIoSession('std.qcow2', qd);
      await s.run('write -P 5 1000 70000');
      await s.run('flush');
      await s.kill();
      crashed = bitmapState(join(qd, 'std.qcow2'));
      expect(crashed.bitmaps.every((b) => b.flags.includes('in-use'))).toBe(true);
      expect(qemuImg(['check', join(qd, 'std.qcow2')]).status).toBe(0);
    }, 30_000);

    it('qimg: killed after a flushed write, every bitmap is left in-use', async () => {
      expect(crashed, 'the qemu side did not run').toBeDefined();
      const file = join(md, 'std.qcow2');
      const lib = pathToFileURL(join(ROOT, 'dist', 'index.js')).href;
      const script = `
        import { openImage } from ${JSON.stringify(lib)};
        const img = await openImage(process.argv[1], { format: 'qcow2', writable: true });
        await img.write(1000, Buffer.alloc(70000, 5));
        await img.flush();
        process.stdout.write('ready\\n');
        setInterval(() => {}, 1000);
      `;
      const child = spawn(process.execPath, ['--input-type=module', '-e', script, file], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      try {
        await new Promise<void>((resolve, reject) => {
          child.stdout.on('data', (d: Buffer) => {
            out += d.toString();
            if (out.includes('ready')) resolve();
          });
          child.once('exit', (code) => reject(new Error(`the writer exited (${code}) before writing: ${out}`)));
        });
      } finally {
        child.kill('SIGKILL');
        await exited;
      }
      expect(bitmapState(file)).toEqual(crashed);
      expect(qemuImg(['check', file]).status).toBe(0);
      expect(qemuImg(['compare', join(qd, 'std.qcow2'), file]).status).toBe(0);
    }, 30_000);
  }

  scenarios.forEach((sc, i) => {
    const dir = join(tmp.path, `s${i}`);
    const qd = join(dir, 'qemu');
    const md = join(dir, 'qimg');
    let qemuDone = false;
    let qemuResult: RunResult | undefined;
    let qemuStates: States = {};

    it(`qemu: ${sc.name}`, async () => {
      const sd = join(dir, 'setup');
      mkdirSync(sd, { recursive: true });
      await sc.setup(sd);
      cpSync(sd, qd, { recursive: true });
      cpSync(sd, md, { recursive: true });
      const before = sc.fact ? states(sd, sc.files) : {};
      qemuResult = sc.qemu(qd);
      qemuStates = states(qd, sc.files);
      qemuDone = true;
      sc.fact?.({ setup: sd, before, after: qemuStates, r: qemuResult });
    }, 30_000);

    it(`qimg: ${sc.name}`, async () => {
      expect(qemuDone, 'the qemu side of this scenario did not run').toBe(true);
      const r = await sc.qimg(md);
      if (qemuResult) {
        expect(r, 'qimg result').toBeDefined();
        const got = { status: r!.status, stderr: norm(r!.stderr), ...(sc.stdout === false ? {} : { stdout: r!.stdout }) };
        const stderr = norm(qemuResult.stderr);
        const want = { status: qemuResult.status, stderr: sc.qimgStderr ? sc.qimgStderr(stderr) : stderr, ...(sc.stdout === false ? {} : { stdout: qemuResult.stdout }) };
        expect(got).toEqual(want);
      }
      for (const f of sc.files) {
        const q = join(qd, f);
        const m = join(md, f);
        if (sc.removedByQimg?.includes(f)) {
          expect(existsSync(m), `${f} removed by qimg after the failure`).toBe(false);
          continue;
        }
        expect(existsSync(m), `${f} exists`).toBe(existsSync(q));
        if (!existsSync(q)) continue;
        const fmt = fmtOf(f);
        if (fmt === 'qcow2') {
          const ck = qemuImg(['check', '-f', fmt, m]);
          expect(ck.status, `qemu-img check ${f}:\n${ck.stdout}${ck.stderr}`).toBe(0);
        }
        const cmp = qemuImg(['compare', '-f', fmt, '-F', fmt, q, m]);
        expect(cmp.status, `qemu-img compare ${f}:\n${cmp.stdout}${cmp.stderr}`).toBe(0);
        expect(states(md, [f])[f], `bitmaps of ${f}`).toEqual(qemuStates[f]);
      }
    }, 30_000);
  });
});
