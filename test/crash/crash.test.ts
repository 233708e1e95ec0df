/**
 * Crash safety in CI: a short version of `npm run crash` (test/crash/crash-run.mjs),
 * which kills qimg with SIGKILL at random moments of convert -O qcow2, the random
 * write workload (plain, lazy_refcounts=on, and with persistent bitmaps), snapshot -c/-d, commit and amend, and
 * then requires `qemu-img check` to find no corruption (leaks are allowed and
 * `qimg check -r leaks` must remove them) and flushed data to be intact.
 *
 * CRASH_CI_KILLS (default 15) random kills per operation, CRASH_CI_POINTS (default 6)
 * kills at exact write calls (the LD_PRELOAD injector of test/hygiene/faultfs.c, when
 * gcc is there); CRASH_SEED picks the sequence.
 * The long run: `npm run crash` (200 kills per operation).
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { qemuAvailable, ROOT, run } from '../helpers/qemu.js';

const HAVE_QEMU = qemuAvailable();
const KILLS = Number(process.env.CRASH_CI_KILLS ?? 15);
const POINTS = Number(process.env.CRASH_CI_POINTS ?? 6);
const SEED = process.env.CRASH_SEED ?? '4242';

/**
 * Known bug, reported (not fixed here: src/formats/qcow2/snapshot-ops.ts): snapshot
 * create/delete change refcounts and the OFLAG_COPIED flags of the active L2/L1 tables
 * in place, in two writes; a kill between them leaves flags that disagree with the
 * refcounts, which qemu-img check counts as corruptions. Only that kind is tolerated,
 * for snapshot only; any other corruption fails. Remove once snapshot-ops switches
 * the metadata atomically.
 */
// No kind of corruption is tolerated for any operation (snapshot operations switch
// their metadata atomically since the OFLAG_COPIED window was found).
const ALLOWED: Record<string, string[]> = {};

interface OpStats {
  op: string;
  seed: number;
  kills: number;
  touched: number;
  finished: number;
  notCreated: number;
  corruptions: number;
  known: number;
  leaky: number;
  points: number;
  pointCorruptions: number;
  pointLeaky: number;
  failures: Array<{ variant: string; delay: unknown; problems: string[]; kept?: string }>;
}

function crashRun(op: string): OpStats {
  const args = [join(ROOT, 'test', 'crash', 'crash-run.mjs'), '--ops', op, '--kills', String(KILLS), '--seed', SEED, '--json', '--quick', '--points', String(POINTS)];
  if (ALLOWED[op]) args.push('--allow', ALLOWED[op].join(','));
  const r = run(process.execPath, args, { timeout: 300_000 });
  const last = r.stdout.trim().split('\n').pop() ?? '';
  let parsed: { ops: OpStats[] };
  try {
    parsed = JSON.parse(last) as { ops: OpStats[] };
  } catch {
    throw new Error(`crash-run ${op} gave no result (exit ${r.status}): ${r.stderr}${r.stdout}`);
  }
  return parsed.ops[0];
}

describe.skipIf(!HAVE_QEMU)(`crash safety: SIGKILL at random moments (${KILLS} kills per operation)`, () => {
  it.each(['convert', 'write', 'write-lazy', 'snapshot', 'commit', 'amend', 'bitmaps'])(
    '%s',
    (op) => {
      const s = crashRun(op);
      const note =
        `${op}: ${s.kills} kills, ${s.corruptions} corruptions, ${s.leaky} images with leaks, ${s.touched} kills after the first write; ` +
        `${s.points} crash points, ${s.pointCorruptions} corruptions, ${s.pointLeaky} images with leaks; ${s.known} corruptions of an allowed kind (seed ${s.seed})`;
      console.log(note);
      expect(s.failures.map((f) => `${f.variant} (${JSON.stringify(f.delay)}): ${f.problems.join(' | ')}${f.kept ? ` [kept in ${f.kept}]` : ''}`), note).toEqual([]);
      expect(s.corruptions + s.pointCorruptions - s.known, note).toBe(0);
      expect(s.kills, note).toBeGreaterThanOrEqual(Math.floor(KILLS * 0.8));
    },
    300_000,
  );
});
