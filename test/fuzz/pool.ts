/**
 * The mutation fuzzer's driver: bundles fuzz-runner.ts (with the sources it imports,
 * so no prior build is needed) into one ESM file with esbuild, forks a few children
 * with a bounded V8 heap, hands them case seeds, and turns a case that takes too long
 * (killed, then retried once in a fresh child to rule out a loaded machine), a child
 * that dies (crash, out of memory) or a failing case result into a reported failure
 * with its seed.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { build } from 'esbuild';
import { ROOT } from '../helpers/qemu.js';
import { FIXTURES_DIR, IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import type { CaseResult, InitMessage } from './fuzz-runner.js';
import { loadFixtures, planCase, type CaseFixture, type FixtureRef } from './mutations.js';

export interface FuzzOptions {
  masterSeed: number;
  /** which fixtures: the qcow2 corpus (default) or the other formats' */
  family?: 'qcow2' | 'foreign';
  /** cases derived from masterSeed (0, 1, 2, ...) */
  cases: number;
  /** stop starting new cases after this many seconds */
  seconds?: number;
  /** case seeds run before the derived ones (regressions) */
  seeds?: number[];
  /** parallel children (default: cores, at most 2) */
  jobs?: number;
  /** a case taking longer is killed (and retried once with twice the time) */
  timeoutMs?: number;
  /** keep the images of failing cases here */
  saveDir?: string;
  /** keep every case's image in saveDir */
  saveAll?: boolean;
  /** compare reads with qemu-img's (slower: one qemu-img per readable case) */
  oracle?: boolean;
  /** progress lines every `progressEvery` ms (long runs) */
  progress?: (line: string) => void;
  progressEvery?: number;
  /** every case result as it arrives */
  onResult?: (r: CaseResult) => void;
  /** misbehaviour of the runner to provoke (the harness's own test) */
  selfTest?: string;
}

export interface Failure {
  seed: number;
  fixture: string;
  mutations: string[];
  problems: string[];
}

export interface FuzzSummary {
  cases: number;
  failures: Failure[];
  ms: number;
  /** stage -> outcome -> count */
  outcomes: Record<string, Record<string, number>>;
  slowest: Array<{ seed: number; ms: number; fixture: string }>;
  /** highest peak resident memory of a child, KiB */
  maxRssKb: number;
}

/** A fixed 32-bit seed for case `index` of a run with `master`. */
export function caseSeed(master: number, index: number): number {
  let h = (master ^ Math.imul(index + 1, 0x9e3779b9)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/** Heap limit of each child (an allocation bomb must die, not eat the machine). */
const HEAP_MB = 512;

let bundles = 0;

/**
 * Bundles the runner for one run; the file lives in node_modules/.cache (so that bare
 * imports resolve) until the run ends.
 */
async function bundleRunner(): Promise<string> {
  const dir = join(ROOT, 'node_modules', '.cache', 'qimg-fuzz');
  mkdirSync(dir, { recursive: true });
  const outfile = join(dir, `runner-${process.pid}-${++bundles}.mjs`);
  await build({
    entryPoints: [join(ROOT, 'test', 'fuzz', 'fuzz-runner.ts')],
    outfile,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    packages: 'external',
    sourcemap: 'inline',
    logLevel: 'error',
  });
  return outfile;
}


/** The qcow2 fixtures (gunzipped where needed), cluster-2m less often (16 MiB per case). */
export function fuzzFixtures(): FixtureRef[] {
  return loadManifest()
    .filter((f) => f.format === 'qcow2')
    .map((f) => ({ name: f.name, rel: fixturePath(f), weight: fixtureWeight(f.features) }));
}

const FOREIGN_DIR = join(FIXTURES_DIR, 'foreign');

/** The fixture tree a family's paths are relative to. */
function familyRoot(opts: FuzzOptions): string {
  return opts.family === 'foreign' ? FOREIGN_DIR : IMAGES_DIR;
}

/** The other formats' fixtures (fixtures/foreign/FORMAT/manifest.json), paths relative to fixtures/foreign. */
export function foreignFuzzFixtures(): FixtureRef[] {
  const out: FixtureRef[] = [];
  if (!existsSync(FOREIGN_DIR)) return out;
  for (const fmt of readdirSync(FOREIGN_DIR).sort()) {
    const manifest = join(FOREIGN_DIR, fmt, 'manifest.json');
    if (!existsSync(manifest)) continue;
    const entries = JSON.parse(readFileSync(manifest, 'utf8')) as Array<{ name: string; file: string; format: string; passphrase?: string }>;
    for (const e of entries) {
      const rel = join(fmt, e.file);
      // gzipped fixtures are unpacked in memory (loadFixtures); very large ones are left out
      if (statSync(join(FOREIGN_DIR, rel)).size > 8 * 1024 * 1024) continue;
      out.push({ name: `${fmt}/${e.name}`, rel, weight: 1, format: e.format, passphrase: e.passphrase });
    }
  }
  return out;
}

/** Fixtures with more structure to break come up more often; cluster-2m (16 MiB) less. */
function fixtureWeight(features: string[]): number {
  if (features.includes('cluster-2m')) return 0.25;
  if (features.includes('snapshots')) return 4;
  if (features.some((x) => /^compressed|^extended-l2|^bitmaps|^cluster-512|^encrypted|^refcount-|^dirty/.test(x))) return 2;
  return 1;
}

interface Child {
  proc: ChildProcess;
  /** the last few KiB of its stderr (crash and out-of-memory reports) */
  stderr: string;
  /** resolves with the child's next message or its exit */
  next: () => Promise<Msg>;
  dir: string;
}

type Msg =
  | { type: 'ready' }
  | { type: 'result'; result: CaseResult }
  | { type: 'fatal'; seed?: number; text: string }
  | { type: 'exit'; code: number | null; signal: string | null };

async function startChild(bundle: string, fixtures: FixtureRef[], opts: FuzzOptions): Promise<Child> {
  const dir = mkdtempSync(join(tmpdir(), 'qimg-fuzz-'));
  const proc = fork(bundle, [], {
    cwd: dir,
    execArgv: [`--max-old-space-size=${HEAP_MB}`, '--enable-source-maps'],
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    serialization: 'advanced',
    env: { ...process.env, QIMG_FUZZ_CHILD: '1', QIMG_FUZZ_SELFTEST: opts.selfTest ?? '' },
  });
  const queue: Msg[] = [];
  const waiters: Array<(m: Msg) => void> = [];
  const push = (m: Msg) => {
    const w = waiters.shift();
    if (w) w(m);
    else queue.push(m);
  };
  const child: Child = {
    proc,
    stderr: '',
    dir,
    next: () => (queue.length ? Promise.resolve(queue.shift()!) : new Promise((res) => waiters.push(res))),
  };
  proc.stderr!.on('data', (b: Buffer) => {
    child.stderr = (child.stderr + b.toString('utf8')).slice(-4000);
  });
  proc.on('message', (m: Msg) => push(m));
  proc.on('exit', (code, signal) => push({ type: 'exit', code, signal }));
  // Sending to a child that just died: its exit is reported as a message already.
  proc.on('error', () => undefined);
  const init: InitMessage = { type: 'init', root: familyRoot(opts), work: join(dir, 'images'), fixtures, saveDir: opts.saveDir, saveAll: opts.saveAll, oracle: opts.oracle };
  proc.send(init);
  const first = await child.next();
  if (first.type !== 'ready') throw new Error(`fuzz runner did not start: ${JSON.stringify(first)} ${child.stderr}`);
  return child;
}

function stopChild(c: Child): void {
  try {
    c.proc.kill('SIGKILL');
  } catch {
    // gone
  }
  rmSync(c.dir, { recursive: true, force: true });
}

/** Runs one case on `child`: the result, or what went wrong with the child (it is then dead). */
async function runOn(child: Child, seed: number, timeoutMs: number): Promise<{ result?: CaseResult; dead?: string }> {
  child.proc.send({ type: 'case', seed });
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), timeoutMs)));
  const m = await Promise.race([child.next(), timeout]);
  clearTimeout(timer);
  if (m === 'timeout') return { dead: `hang: no result within ${timeoutMs / 1000} s` };
  if (m.type === 'result') return { result: m.result };
  if (m.type === 'fatal') {
    // seed undefined: it died between cases (a promise of the previous case, most likely)
    return { dead: `child died${m.seed === seed ? '' : ' after the previous case'}: ${m.text}` };
  }
  if (m.type === 'exit') {
    const oom = /heap out of memory|Allocation failed|FATAL ERROR/.test(child.stderr);
    return { dead: `${oom ? 'out of memory' : 'crash'}: child exited (code ${m.code}, signal ${m.signal}) ${child.stderr.trim().split('\n').slice(-3).join(' | ')}` };
  }
  return { dead: `unexpected message ${JSON.stringify(m)}` };
}

export async function runFuzz(opts: FuzzOptions): Promise<FuzzSummary> {
  const bundle = await bundleRunner();
  try {
    return await runWith(bundle, opts);
  } finally {
    rmSync(bundle, { force: true });
  }
}

async function runWith(bundle: string, opts: FuzzOptions): Promise<FuzzSummary> {
  const t0 = Date.now();
  const fixtures = opts.family === 'foreign' ? foreignFuzzFixtures() : fuzzFixtures();
  if (fixtures.length === 0) throw new Error(`no fixtures for the ${opts.family ?? 'qcow2'} fuzzer`);
  const jobs = opts.jobs ?? Math.max(1, Math.min(2, availableParallelism()));
  const timeoutMs = opts.timeoutMs ?? 15_000;
  const seeds = [...(opts.seeds ?? [])];
  let nextIndex = 0;
  const takeSeed = (): number | undefined => {
    if (seeds.length) return seeds.shift();
    if (nextIndex >= opts.cases) return undefined;
    if (opts.seconds !== undefined && Date.now() - t0 > opts.seconds * 1000) return undefined;
    return caseSeed(opts.masterSeed, nextIndex++);
  };

  const summary: FuzzSummary = { cases: 0, failures: [], ms: 0, outcomes: {}, slowest: [], maxRssKb: 0 };
  const record = (r: CaseResult) => {
    opts.onResult?.(r);
    summary.cases++;
    summary.maxRssKb = Math.max(summary.maxRssKb, r.maxRssKb);
    for (const [stage, o] of Object.entries(r.outcome)) {
      const s = (summary.outcomes[stage] ??= {});
      s[o] = (s[o] ?? 0) + 1;
    }
    summary.slowest.push({ seed: r.seed, ms: r.ms, fixture: r.fixture });
    summary.slowest.sort((a, b) => b.ms - a.ms);
    summary.slowest.length = Math.min(summary.slowest.length, 5);
    if (r.failures.length) summary.failures.push({ seed: r.seed, fixture: r.fixture, mutations: r.mutations, problems: r.failures });
  };

  let planned: CaseFixture[] | undefined;
  let lastProgress = Date.now();
  const worker = async () => {
    let child = await startChild(bundle, fixtures, opts);
    try {
      for (let seed = takeSeed(); seed !== undefined; seed = takeSeed()) {
        const first = await runOn(child, seed, timeoutMs);
        if (first.result) {
          record(first.result);
          if (first.result.restart) {
            stopChild(child);
            child = await startChild(bundle, fixtures, opts);
          }
        } else {
          // Rule out a loaded machine: once more, in a fresh child, with twice the time.
          stopChild(child);
          child = await startChild(bundle, fixtures, opts);
          const again = await runOn(child, seed, 2 * timeoutMs);
          // A retry that finishes within the normal time says the machine was busy.
          if (again.result && again.result.failures.length === 0 && again.result.ms > timeoutMs) {
            again.result.failures.push(`slow: took ${again.result.ms} ms on retry, first try: ${first.dead}`);
          }
          if (again.result) record(again.result);
          else {
            summary.cases++;
            // The child is gone: describe (and keep) the case from its seed here.
            planned ??= loadFixtures(familyRoot(opts), fixtures);
            const p = planCase(seed, planned);
            if (opts.saveDir) {
              mkdirSync(opts.saveDir, { recursive: true });
              writeFileSync(join(opts.saveDir, `fuzz-${seed}-${p.fixture.name.replace(/\//g, '-')}.${p.fixture.format ?? 'img'}`), p.mutated.data);
            }
            summary.failures.push({
              seed,
              fixture: `${p.fixture.name}${p.probe ? ' (probed)' : ''}`,
              mutations: p.mutated.log,
              problems: [first.dead!, `retry: ${again.dead}`],
            });
            stopChild(child);
            child = await startChild(bundle, fixtures, opts);
          }
        }
        if (opts.progress && Date.now() - lastProgress > (opts.progressEvery ?? 30_000)) {
          lastProgress = Date.now();
          opts.progress(`fuzz: ${summary.cases} cases, ${summary.failures.length} failures, ${Math.round((Date.now() - t0) / 1000)} s`);
        }
      }
    } finally {
      stopChild(child);
    }
  };
  await Promise.all(Array.from({ length: jobs }, worker));
  summary.ms = Date.now() - t0;
  return summary;
}

/** Failures grouped by what went wrong (digits blurred), one block per group with its seeds. */
export function describeFailures(failures: Failure[], max = 20): string {
  const groups = new Map<string, Failure[]>();
  for (const f of failures) {
    const key = f.problems[0].replace(/0x[0-9a-f]+|\d+/gi, '#').slice(0, 160);
    const g = groups.get(key) ?? [];
    g.push(f);
    groups.set(key, g);
  }
  const out: string[] = [];
  for (const [, g] of [...groups].slice(0, max)) {
    const f = g[0];
    out.push(
      `${g.length}x  seed ${f.seed} (${f.fixture})${g.length > 1 ? ` [also ${g.slice(1, 6).map((x) => x.seed).join(', ')}]` : ''}\n` +
        f.problems.map((p) => `    ${p}`).join('\n') +
        '\n' +
        f.mutations.map((m) => `      - ${m}`).join('\n'),
    );
  }
  if (groups.size > max) out.push(`... and ${groups.size - max} more kinds`);
  return out.join('\n');
}

export function summaryLine(s: FuzzSummary, masterSeed: number): string {
  const pct = (stage: string) => {
    const o = s.outcomes[stage] ?? {};
    const total = Object.values(o).reduce((a, b) => a + b, 0);
    return total ? `${Math.round((100 * (o.ok ?? 0)) / total)}%` : '-';
  };
  return (
    `fuzz: ${s.cases} cases, ${s.failures.length} failures (master seed ${masterSeed}, ${(s.ms / 1000).toFixed(1)} s; ` +
    `ok: info ${pct('info')}, read ${pct('read')}, snapshot ${pct('snapshot')}, check ${pct('check')}; ` +
    `peak RSS ${Math.round(s.maxRssKb / 1024)} MiB)`
  );
}
