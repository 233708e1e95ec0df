/**
 * The mutation fuzzer (see fuzz-runner.ts for what one case checks, mutations.ts for
 * the mutations, pool.ts for the children that run them).
 *
 * In CI: the regression seeds of the bugs the fuzzer found (with the qemu-img oracle),
 * then a fixed master seed and a fixed number of cases. `npm run fuzz` is the long run:
 *   FUZZ_SECONDS  how long to start new cases (default 600)
 *   FUZZ_CASES    how many cases at most (default: no limit)
 *   FUZZ_SEED     master seed (default: random, printed)
 *   FUZZ_REPLAY   comma-separated case seeds to run alone (prints what they did; with
 *                 FUZZ_SAVE, keeps their images)
 *   FUZZ_JOBS     parallel children (default: cores, at most 2)
 *   FUZZ_TIMEOUT  ms one case may take (default 15000; retried once with twice that)
 *   FUZZ_SAVE     a directory to keep the images of failing cases in
 *   FUZZ_VERBOSE  1: print every case (fixture, mutations, outcome of each stage)
 *   FUZZ_ORACLE   1: where qimg reads a case, compare all it reads with what
 *                 `qemu-img convert -O raw` makes of the same image (slower)
 *   FUZZ_FAMILY   qcow2 (default) or foreign: the other formats' fixtures
 *                 (fixtures/foreign/*), mutated format-blind
 * It prints `fuzz: N cases, F failures (...)` and the failures with their seeds.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IMAGES_DIR, prepareFixtures } from '../helpers/fixtures.js';
import { decompressCluster, DecompressError, useNativeZstdForTests } from '../../src/formats/qcow2/compress.js';
import { COMPRESSION_ZSTD } from '../../src/formats/qcow2/constants.js';
import { checkQcow2 } from '../../src/formats/qcow2/check.js';
import { imageInfo } from '../../src/index.js';
import { caseSeed, describeFailures, runFuzz, summaryLine, type FuzzOptions } from './pool.js';
import type { CaseResult } from './fuzz-runner.js';
import { qemuAvailable } from '../helpers/qemu.js';

const env = process.env;
const long = env.FUZZ_LONG === '1' || !!env.FUZZ_CASES || !!env.FUZZ_SECONDS || !!env.FUZZ_REPLAY;

/** Master seed and size of the CI run (20-30 s on a 2-core machine, two children). */
const CI_SEED = 20240601;
const CI_CASES = 3000;
/** The other formats' run in CI (VMDK, VDI, VHD, VHDX, QED, qcow, parallels, dmg, ...). */
const CI_FOREIGN_SEED = 20261204;
const CI_FOREIGN_CASES = 1500;
const family = env.FUZZ_FAMILY === 'foreign' ? 'foreign' : 'qcow2';

/**
 * Case seeds of the bugs the fuzzer found; they run before the seeded cases, with the
 * qemu-img oracle where qemu-img is installed. `outcome` pins what a stage must end in
 * where the bug was a divergence from qemu-img rather than a crash. A seed stands for
 * the case mutations.ts makes of it: after changing how mutations are drawn, replay
 * these (FUZZ_REPLAY=seed) and check that they still make the case described. The
 * hand-made forms of the same bugs are the tests below.
 */
const REGRESSIONS: Array<{ seed: number; bug: string; outcome?: Record<string, string> }> = [
  {
    seed: 2365489836,
    bug:
      'chain-top, nb_snapshots 0 -> 8 (the header cluster read as snapshot entries): check printed ' +
      'snapshot names with their NUL bytes (snapshot.ts, check.ts)',
  },
  {
    seed: 2996123204,
    bug:
      'convert-compressed-zstd-512, flipped bytes in a zstd frame shared by many clusters: fzstd decoded ' +
      'megabytes per cluster, moving its window per block, 4-10 s for one read (compress.ts)',
    outcome: { read: 'CorruptImageError' },
  },
  {
    seed: 180765342,
    bug:
      'extl2-chain-base, virtual size 10848099 (not whole sectors): qimg read 355 bytes more than ' +
      'qemu-img, which counts the disk in 512-byte sectors (header.ts; oracle)',
    outcome: { read: 'ok' },
  },
  {
    seed: 433178305,
    bug: 'convert-compressed-zstd-512, one bit flipped: a zstd frame with more than a cluster of data, read by qimg, EIO in qemu (compress.ts; oracle)',
    outcome: { read: 'CorruptImageError' },
  },
  {
    seed: 3607645073,
    bug: 'convert-compressed-zstd-4k, bits flipped in a zstd frame: fzstd decoded garbage, libzstd (QEMU) finds the corruption; qimg now decodes with libzstd (compress.ts; oracle)',
    outcome: { read: 'CorruptImageError' },
  },
  {
    seed: 1475940416,
    bug: "cluster-4k, the end-of-extensions marker's length 0 -> 0xffff: qemu refuses the image, qimg opened it (header.ts; oracle)",
    outcome: { info: 'CorruptImageError' },
  },
  {
    seed: 1553286565,
    bug: 'datafile-raw, an L1 entry pointing at another L2 table: data file host offsets that are not the guest offsets, refused by qemu, read by qimg (entries.ts; oracle)',
    outcome: { read: 'CorruptImageError' },
  },
];

/** Cases over the other formats' fixtures (FUZZ_FAMILY=foreign) that once failed. */
const FOREIGN_REGRESSIONS: Array<{ seed: number; bug: string }> = [
  {
    seed: 1642009221,
    bug:
      'parallels-unclean-4k, virtual size 4 PiB past a 256-entry BAT: map walked the space past the BAT ' +
      'one cluster at a time (parallels/image.ts; qemu-img 7.2 aborts on an assertion)',
  },
  {
    seed: 2584935398,
    bug:
      'bochs-growing-v1 truncated to 511 bytes: qemu probes the first 2 KiB padded with zeros and reads it as ' +
      'bochs, qimg probed the 511 bytes it had and read raw (core/open.ts; oracle)',
  },
];

/** sha256 of every file of the fixture tree (the originals are only ever read). */
function fixtureHashes(dir = IMAGES_DIR, out: Record<string, string> = {}): Record<string, string> {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) fixtureHashes(p, out);
    else if (!name.endsWith('.tmp')) out[p] = createHash('sha256').update(readFileSync(p)).digest('hex');
  }
  return out;
}

function num(v: string | undefined): number | undefined {
  return v === undefined || v === '' ? undefined : Number(v);
}

/** A zstd frame: single segment with a 4-byte content size, then the given blocks. */
function zstdFrame(contentSize: number, blocks: Buffer[]): Buffer {
  const head = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xa0, 0, 0, 0, 0]);
  head.writeUInt32LE(contentSize, 5);
  return Buffer.concat([head, ...blocks]);
}

/** An RLE block of `size` bytes of `byte`. */
function rleBlock(size: number, byte: number, last: boolean): Buffer {
  const h = (size << 3) | (1 << 1) | (last ? 1 : 0);
  return Buffer.from([h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff, byte]);
}

describe.skipIf(long).each([
  ['libzstd', true],
  ['fzstd (no libzstd)', false],
])('zstd clusters from hostile images, decoded by %s (found by the fuzzer)', (_name, native) => {
  const cs = 65536;
  beforeAll(() => useNativeZstdForTests(native));
  afterAll(() => useNativeZstdForTests(true));
  it('reads a frame followed by the next cluster\'s data, and a cluster made of two frames', () => {
    const data = Buffer.alloc(cs, 7);
    const frame = zstdFrame(cs, [rleBlock(cs, 7, true)]);
    expect(decompressCluster(COMPRESSION_ZSTD, Buffer.concat([frame, Buffer.alloc(300, 0xee)]), cs)).toEqual(data);
    const half = zstdFrame(cs / 2, [rleBlock(cs / 2, 7, true)]);
    expect(decompressCluster(COMPRESSION_ZSTD, Buffer.concat([half, half, Buffer.alloc(9, 0xee)]), cs)).toEqual(data);
  });
  it('refuses a frame with more data than a cluster, as QEMU does (found with the qemu-img oracle)', () => {
    const half = zstdFrame(cs / 2, [rleBlock(cs / 2, 7, true)]);
    const long = zstdFrame(cs, [rleBlock(cs, 7, true)]);
    expect(() => decompressCluster(COMPRESSION_ZSTD, Buffer.concat([half, long]), cs)).toThrow(/more data than a cluster/);
    expect(() => decompressCluster(COMPRESSION_ZSTD, zstdFrame(cs + 1, [rleBlock(cs + 1, 7, true)]), cs)).toThrow(DecompressError);
  });
  it('refuses a 2 GiB window at once instead of allocating and moving it', () => {
    // fzstd itself accepts windows up to this size (and then moves all of it per block)
    const frame = zstdFrame(0x7fe00000, [rleBlock(1, 1, false), rleBlock(1, 2, false), rleBlock(1, 3, true)]);
    expect(() => decompressCluster(COMPRESSION_ZSTD, frame, cs)).toThrow(/window of \d+ bytes is too large/);
  });
  it('bounds the work of many tiny blocks in a large window', () => {
    const blocks = Array.from({ length: 200_000 }, (_, i) => rleBlock(1, i & 0xff, i === 199_999));
    const frame = zstdFrame(8 * 1024 * 1024, blocks);
    // (fzstd before the bound: 200000 moves of an 8 MiB window, minutes)
    expect(() => decompressCluster(COMPRESSION_ZSTD, frame, 2 * 1024 * 1024)).toThrow(native ? DecompressError : /too many zstd blocks/);
  });
  it('refuses truncated frames, reserved block types and dictionaries with a DecompressError', () => {
    const frame = zstdFrame(cs, [rleBlock(cs, 7, true)]);
    for (const bad of [frame.subarray(0, 10), Buffer.from([...frame.subarray(0, 9), 0x07, 0, 0]), Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x01, 0x50, 0x01, 0, 0, 0])]) {
      expect(() => decompressCluster(COMPRESSION_ZSTD, bad, cs)).toThrow(DecompressError);
    }
  });
  it.runIf(native)('refuses a frame whose content is not its declared size (libzstd checks it)', () => {
    // declared 4098 bytes, holds 4096: a corruption QEMU reports as an I/O error
    expect(() => decompressCluster(COMPRESSION_ZSTD, zstdFrame(4098, [rleBlock(4096, 7, true)]), 4096)).toThrow(DecompressError);
  });
});

describe.skipIf(long)('snapshot names are C strings, as QEMU reads them (found by the fuzzer)', () => {
  it('info and check stop a name at its first NUL', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qimg-fuzz-nul-'));
    try {
      const file = join(dir, 'nul.qcow2');
      const img = readFileSync(join(IMAGES_DIR, 'snapshots.qcow2'));
      // snapshot 4 (the fourth entry): a NUL inside its name, and an unaligned L1 offset
      // so that check names it in an error line
      let p = Number(img.readBigUInt64BE(64));
      for (let i = 0; i < 3; i++) p += Math.ceil((40 + img.readUInt32BE(p + 36) + img.readUInt16BE(p + 12) + img.readUInt16BE(p + 14)) / 8) * 8;
      const nameAt = p + 40 + img.readUInt32BE(p + 36) + img.readUInt16BE(p + 12);
      img[nameAt + 5] = 0;
      img.writeBigUInt64BE(img.readBigUInt64BE(p) + 512n, p);
      writeFileSync(file, img);
      const info = await imageInfo(file);
      expect(info.snapshots?.map((x) => x.name)).toContain('a-rat');
      const lines: string[] = [];
      await checkQcow2(file, { fix: 0, log: (l) => lines.push(l) });
      expect(lines.join('\n')).toContain('ERROR snapshot 4 (a-rat) l1_offset=');
      expect(lines.join('\n')).not.toContain('\0');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(long)('virtual sizes are whole sectors, as QEMU counts them (found by the fuzzer)', () => {
  it('a size that is not a multiple of 512 is rounded down', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qimg-fuzz-size-'));
    try {
      const file = join(dir, 'odd.qcow2');
      const img = readFileSync(join(IMAGES_DIR, 'cluster-64k.qcow2'));
      img.writeBigUInt64BE(BigInt(4 * 1024 * 1024 + 7), 24);
      writeFileSync(file, img);
      expect((await imageInfo(file)).virtualSize).toBe(4 * 1024 * 1024);
      const res = await checkQcow2(file, { fix: 0, log: () => undefined });
      expect(res.totalClusters).toBe(64);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(long)('the fuzz harness', () => {
  // Each kind of failure provoked in the runner must come back as a failure with its seed.
  const kinds: Array<[string, RegExp]> = [
    ['hang', /^hang: no result/],
    ['oom', /^out of memory/],
    ['typeerror', /^info: non-QimgError TypeError/],
    ['unhandled', /^child died: unhandled rejection: RangeError floating/],
    ['write', /^the image file changed/],
  ];
  it.each(kinds)('reports %s', async (selfTest, expected) => {
    // Filling the child's heap takes a few seconds on a busy machine; the rest is instant.
    const timeoutMs = selfTest === 'oom' ? 10_000 : 1500;
    const s = await runFuzz({ masterSeed: 1, cases: 1, jobs: 1, timeoutMs, selfTest });
    expect(s.cases).toBe(1);
    expect(s.failures.length).toBe(1);
    expect(s.failures[0].seed).toBe(caseSeed(1, 0));
    expect(s.failures[0].problems[0]).toMatch(expected);
  });
});

/** Runs the fuzzer, prints its summary (and each case when asked), returns the failure report. */
async function fuzzAndReport(
  opts: FuzzOptions,
  replay: boolean,
  collect?: (r: CaseResult) => void,
): Promise<{ cases: number; report: string; failures: number }> {
  const verbose = env.FUZZ_VERBOSE === '1' || replay;
  const s = await runFuzz({
    ...opts,
    onResult: (r) => {
      collect?.(r);
      if (!verbose) return;
      const stages = Object.entries(r.outcome).map(([k, v]) => `${k} ${v} ${r.times[k]} ms${r.messages[k] ? ` (${r.messages[k]})` : ''}`);
      console.log(
        `case ${r.seed} ${r.fixture} ${r.ms} ms: ${stages.join(', ')}\n` +
          r.mutations.map((m) => `    - ${m}`).join('\n') +
          (r.failures.length ? `\n  FAILED: ${r.failures.join('\n  ')}` : ''),
      );
    },
  });
  const report = describeFailures(s.failures);
  console.log(
    `${summaryLine(s, opts.masterSeed)}\n` +
      `slowest: ${s.slowest.map((x) => `${x.seed} ${x.fixture} ${x.ms} ms`).join('; ')}\n` +
      `outcomes: ${JSON.stringify(s.outcomes)}` +
      (report ? `\n${report}` : ''),
  );
  return { cases: s.cases, report, failures: s.failures.length };
}

describe('mutation fuzzer', () => {
  // gzipped fixtures unpacked now, not by the run between the two hashes of the tree
  beforeAll(() => prepareFixtures());
  const replay = env.FUZZ_REPLAY ? env.FUZZ_REPLAY.split(',').map((s) => Number(s.trim()) >>> 0) : undefined;
  const seconds = replay ? undefined : (num(env.FUZZ_SECONDS) ?? (long ? 600 : undefined));
  const masterSeed =
    env.FUZZ_SEED === undefined || env.FUZZ_SEED === '' || env.FUZZ_SEED === 'random'
      ? long
        ? (Math.random() * 2 ** 32) >>> 0
        : CI_SEED
      : Number(env.FUZZ_SEED) >>> 0;
  const cases = replay ? 0 : (num(env.FUZZ_CASES) ?? (long ? Infinity : CI_CASES));
  const timeout = long && seconds !== undefined ? (seconds + 300) * 1000 : 30 * 60 * 1000;
  const common = {
    jobs: num(env.FUZZ_JOBS),
    timeoutMs: num(env.FUZZ_TIMEOUT),
    saveDir: env.FUZZ_SAVE || undefined,
  };

  it.skipIf(long)(
    `the ${REGRESSIONS.length} regression seeds pass (reads compared with qemu-img's)`,
    async () => {
      // Under CI=true qemu-img must be there (qemuAvailable throws otherwise).
      const oracle = qemuAvailable();
      const outcomes = new Map<number, Record<string, string>>();
      const r = await fuzzAndReport(
        { ...common, masterSeed: CI_SEED, cases: 0, seeds: REGRESSIONS.map((x) => x.seed), oracle },
        false,
        (res) => outcomes.set(res.seed, res.outcome),
      );
      expect(r.cases).toBe(REGRESSIONS.length);
      expect(r.failures, r.report).toBe(0);
      for (const reg of REGRESSIONS) {
        for (const [stage, want] of Object.entries(reg.outcome ?? {})) {
          expect(outcomes.get(reg.seed)?.[stage], `seed ${reg.seed}: ${reg.bug}`).toBe(want);
        }
      }
    },
    timeout,
  );

  it(
    long ? 'long run' : `${CI_CASES} seeded cases end in a clean error or clean reads`,
    async () => {
      const before = fixtureHashes();
      const r = await fuzzAndReport(
        {
          ...common,
          family,
          masterSeed,
          cases,
          seconds,
          seeds: replay,
          saveAll: !!replay,
          oracle: env.FUZZ_ORACLE === '1',
          progress: long ? (line) => console.log(line) : undefined,
        },
        !!replay,
      );
      expect(fixtureHashes(), 'a fixture file changed').toEqual(before);
      expect(r.cases).toBeGreaterThan(0);
      expect(r.failures, r.report).toBe(0);
    },
    timeout,
  );

  it.skipIf(long)(
    `${CI_FOREIGN_CASES} seeded cases over the other formats' fixtures end in a clean error or clean reads`,
    async () => {
      const before = fixtureHashes(join(IMAGES_DIR, '..', 'foreign'));
      const r = await fuzzAndReport({ ...common, family: 'foreign', masterSeed: CI_FOREIGN_SEED, cases: CI_FOREIGN_CASES }, false);
      expect(fixtureHashes(join(IMAGES_DIR, '..', 'foreign')), 'a fixture file changed').toEqual(before);
      expect(r.cases).toBe(CI_FOREIGN_CASES);
      expect(r.failures, r.report).toBe(0);
    },
    timeout,
  );

  it.skipIf(long)(
    `the ${FOREIGN_REGRESSIONS.length} regression seeds over the other formats' fixtures pass`,
    async () => {
      const seeds = FOREIGN_REGRESSIONS.map((x) => x.seed);
      const oracle = qemuAvailable();
      const r = await fuzzAndReport({ ...common, family: 'foreign', masterSeed: CI_FOREIGN_SEED, cases: 0, seeds, oracle }, false);
      expect(r.cases).toBe(seeds.length);
      expect(r.failures, r.report).toBe(0);
    },
    timeout,
  );
});
