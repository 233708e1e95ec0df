/**
 * The mutation fuzzer's case executor. It runs in a child process (forked by pool.ts
 * from an esbuild bundle of this file and the sources it imports), so that a hang can
 * be killed and a crash or an out-of-memory abort is reported with its seed.
 *
 * One case: derive everything from the case seed (fixture, probing or -f qcow2, 1-4
 * mutations), write the mutated image next to a mirror of the fixture tree (so that
 * relative backing and data file names resolve), then run what the read-only commands
 * run, in-process through the library:
 *   info      openImage(metadataOnly) + info() + persistent bitmaps + the human and
 *             JSON renderings (no NaN, undefined, ...)
 *   chain     info --backing-chain (chainInfo: follows the backing names, metadata only)
 *   read      openImage, every extent of extents() (map: contiguous, up to the virtual
 *             size), then the data extents in 1 MiB chunks (as convert reads them) and a
 *             sample of each zero / unallocated extent, which must read as zeros
 *   snapshot  the same for up to two internal snapshots (their L1 tables)
 *   oracle    (long runs with FUZZ_ORACLE=1) where qimg reads the image, the whole of
 *             it must equal what `qemu-img convert -O raw` makes of it, if qemu-img
 *             reads it too
 *   check     checkQcow2 without repairs; every log line clean
 * Each must succeed or throw a QimgError with a message that does not betray an
 * internal error (see badError). Afterwards the image file must be byte-identical to
 * what was written (read-only paths never write), no file descriptor may be left open,
 * and memory must have stayed bounded. The parent (pool.ts) adds the time limit and
 * the V8 heap limit.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { chainInfo, openImage, extents, QimgError, type BlockImage, type Extent } from '../../src/index.js';
import { checkQcow2 } from '../../src/formats/qcow2/check.js';
import { findDriver } from '../../src/core/driver.js';
import { infoJson, mapEntryJson, prettyJson } from '../../src/cli/output/json.js';
import { infoHuman } from '../../src/cli/output/human.js';
import { loadFixtures, planCase, type CaseFixture, type FixtureRef } from './mutations.js';
import { SecretStore } from '../../src/core/secrets.js';
import type { OpenOptions } from '../../src/core/open.js';

/** An encrypted fixture's key, as --object/--image-opts would give it (luks: key-secret). */
function keyOptions(fx: FixtureRef): Pick<OpenOptions, 'secrets' | 'imageOptions'> {
  if (fx.passphrase === undefined) return {};
  const secrets = new SecretStore();
  secrets.add('fuzz', Buffer.from(fx.passphrase));
  return { secrets, imageOptions: { [fx.format === 'luks' ? 'key-secret' : 'encrypt.key-secret']: 'fuzz' } };
}

export type { FixtureRef };

export interface InitMessage {
  type: 'init';
  /** the fixture images directory */
  root: string;
  /** this child's scratch directory */
  work: string;
  fixtures: FixtureRef[];
  /** where to keep the images of failing cases (optional) */
  saveDir?: string;
  /** keep every case's image there, not only failing ones (replays) */
  saveAll?: boolean;
  /** compare what qimg reads with what qemu-img converts (long runs) */
  oracle?: boolean;
}

export interface CaseMessage {
  type: 'case';
  seed: number;
}

export interface CaseResult {
  seed: number;
  fixture: string;
  mutations: string[];
  /** what is wrong (empty: the case passed) */
  failures: string[];
  /** per stage: 'ok' or the error class */
  outcome: Record<string, string>;
  /** per failed stage: the error message */
  messages: Record<string, string>;
  /** per stage: milliseconds */
  times: Record<string, number>;
  /** the child's peak resident memory so far, KiB */
  maxRssKb: number;
  /** the child must be replaced (its memory high-water mark no longer says anything) */
  restart?: boolean;
  ms: number;
}

/** Messages that betray an internal error (as in test/hostile/mutate.ts, plus Node's RangeError texts). */
export const INTERNAL =
  /TypeError|RangeError|ReferenceError|SyntaxError|AssertionError|ERR_[A-Z_]{3,}|Cannot read propert|Cannot set propert|\bundefined\b|\bNaN\b|Infinity|0x-|\0|is out of range|must be an integer|Invalid array length|Invalid typed array length|Array buffer allocation failed|Maximum call stack|is not a function|is not iterable|\[object /;

const CHUNK = 1024 * 1024;
/** Guest bytes one case reads at most (a hostile size may be huge; convert would be too). */
const READ_BUDGET = 256 * 1024 * 1024;
/** Bytes of each zero / unallocated extent that are read and compared with zeros. */
const ZERO_SAMPLE = 64 * 1024;
/** Extents listed at most per image (more is a deliberately fragmented image: stop). */
const MAX_EXTENTS = 200_000;
/** External memory above this is reported (every qemu limit is far below). */
const MEMORY_LIMIT = 768 * 1024 * 1024;
/**
 * Peak resident memory of the child above this is reported too: the kernel's high-water
 * mark sees what sampling misses (a transient allocation inside synchronous code).
 */
const RSS_LIMIT_KB = 1024 * 1024;

// ---------------------------------------------------------------- classification

/** Why an error thrown by qimg is not acceptable, or null when it is a clean error. */
export function badError(err: unknown): string | null {
  if (!(err instanceof QimgError)) {
    const e = err as { name?: string; message?: string; code?: string; stack?: string };
    const top = typeof e?.stack === 'string' ? e.stack.split('\n').slice(1, 4).map((s) => s.trim()).join(' < ') : '';
    return `non-QimgError ${e?.name ?? typeof err}${e?.code ? ` [${e.code}]` : ''}: ${e?.message ?? String(err)}${top ? ` (${top})` : ''}`;
  }
  const msg = err.message;
  if (!msg) return `${err.name} with an empty message`;
  // A name from the image, quoted in the message, may hold a newline (the CLI prints
  // the message on one line whatever it holds); anything else must be one line.
  if (msg.replace(/'[^']*'/g, "''").includes('\n')) return `${err.name} with a multi-line message: ${JSON.stringify(msg.slice(0, 300))}`;
  if (INTERNAL.test(msg)) return `${err.name} betrays an internal error: ${msg}`;
  // A QimgError wrapping a programming error (rather than a system or codec error).
  for (let c: unknown = err.cause, depth = 0; c && depth < 5; c = (c as { cause?: unknown }).cause, depth++) {
    if (c instanceof QimgError) continue;
    const ce = c as { name?: string; code?: string; message?: string };
    if (/^(TypeError|RangeError|ReferenceError|SyntaxError|AssertionError)$/.test(ce.name ?? '') || /^ERR_/.test(ce.code ?? '')) {
      return `${err.name} "${msg}" wraps ${ce.name}${ce.code ? ` [${ce.code}]` : ''}: ${ce.message}`;
    }
  }
  return null;
}

// ---------------------------------------------------------------- the case

let loaded: CaseFixture[] = [];
let workDir = '';
let saveDir: string | undefined;
let saveAll = false;
let oracle = false;

function openFds(): number {
  try {
    return readdirSync('/proc/self/fd').length;
  } catch {
    return -1;
  }
}

const ZEROS = Buffer.alloc(CHUNK);

function isZero(buf: Buffer): boolean {
  return buf.equals(ZEROS.subarray(0, buf.length));
}

/** Lists every extent and reads the image the way map and convert do. */
async function mapAndRead(img: BlockImage, what: string, failures: string[], budget: { left: number }): Promise<void> {
  const list: Extent[] = [];
  let end = 0;
  for await (const e of extents(img)) {
    if (e.offset !== end || !(e.length > 0)) failures.push(`${what}: extent ${e.offset}+${e.length} does not follow ${end}`);
    end = e.offset + e.length;
    mapEntryJson(e);
    list.push(e);
    if (list.length >= MAX_EXTENTS) break;
  }
  if (list.length < MAX_EXTENTS && end !== img.virtualSize) failures.push(`${what}: extents end at ${end}, virtual size ${img.virtualSize}`);
  const buf = Buffer.allocUnsafe(CHUNK);
  for (const e of list) {
    const len = e.kind === 'data' ? e.length : Math.min(e.length, ZERO_SAMPLE);
    for (let pos = e.offset; pos < e.offset + len && budget.left > 0; pos += CHUNK) {
      const n = Math.min(CHUNK, e.offset + len - pos);
      const part = buf.subarray(0, n);
      await img.read(pos, part);
      budget.left -= n;
      if (e.kind !== 'data' && !isZero(part)) failures.push(`${what}: ${e.kind} extent at ${e.offset} does not read as zeros`);
    }
    if (budget.left <= 0) break;
  }
}

/**
 * Misbehaviour on demand (QIMG_FUZZ_SELFTEST), so that the suite can show that the
 * harness catches each kind of failure: a hang, an out-of-memory abort, a stray
 * TypeError, a floating rejected promise, a write to the input.
 */
async function selfTest(file: string): Promise<void> {
  switch (process.env.QIMG_FUZZ_SELFTEST) {
    case 'hang':
      for (;;);
    case 'oom': {
      const hog: number[][] = [];
      for (;;) hog.push(new Array(1 << 20).fill(1.5));
    }
    case 'typeerror':
      throw new TypeError("Cannot read properties of undefined (reading 'length')");
    case 'unhandled':
      void Promise.reject(new RangeError('floating'));
      await new Promise((res) => setTimeout(res, 50));
      return;
    case 'write':
      writeFileSync(file, 'x', { flag: 'r+' });
      return;
  }
}

/** Largest virtual size compared with qemu-img (the whole image is read into memory). */
const ORACLE_MAX = 64 * 1024 * 1024;

/**
 * Where both tools read the image, they must read the same bytes: qimg's reads against
 * `qemu-img convert -O raw`. Returns what happened ('same', or why nothing was compared).
 */
async function compareWithQemu(file: string, format: string | undefined, failures: string[]): Promise<string> {
  const img = await openImage(file, { format });
  let ours: Buffer;
  try {
    if (img.virtualSize > ORACLE_MAX) return 'too big';
    ours = Buffer.alloc(img.virtualSize);
    for (let pos = 0; pos < ours.length; pos += CHUNK) await img.read(pos, ours.subarray(pos, Math.min(ours.length, pos + CHUNK)));
  } finally {
    await img.close();
  }
  const out = join(workDir, 'zz-oracle.raw');
  rmSync(out, { force: true });
  const r = spawnSync('qemu-img', ['convert', ...(format ? ['-f', format] : []), '-O', 'raw', file, out], {
    cwd: workDir,
    timeout: 8000,
    encoding: 'utf8',
    // as the child's own stdin (a backing file named /proc/self/fd/0 reads the same)
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (r.error || r.status !== 0) {
    // what qemu-img said, numbers and names blurred (so that outcomes group)
    const said = (r.stderr ?? '').split('\n')[0].replace(/^qemu-img: /, '').replace(/'[^']*'/g, "'...'").replace(/0x[0-9a-f]+|\d+/g, '#');
    return r.signal ? 'qemu-img timed out' : `qemu-img failed: ${said.slice(0, 120)}`;
  }
  const theirs = readFileSync(out);
  rmSync(out, { force: true });
  if (theirs.length !== ours.length) {
    failures.push(`oracle: qemu-img read ${theirs.length} bytes, qimg ${ours.length}`);
  } else if (!theirs.equals(ours)) {
    let at = 0;
    while (theirs[at] === ours[at]) at++;
    failures.push(`oracle: qimg reads differ from qemu-img's from byte ${at}`);
  }
  return 'same';
}

export async function runCase(seed: number): Promise<CaseResult> {
  const t0 = performance.now();
  const { fixture: fx, probe, mutated: m } = planCase(seed, loaded);
  const fixtureFormat = fx.format ?? 'qcow2';
  const format = probe ? undefined : fixtureFormat;
  const file = join(workDir, dirname(fx.rel), `zz-fuzz-case.${fixtureFormat}`);
  const keys = keyOptions(fx);
  writeFileSync(file, m.data);

  const failures: string[] = [];
  const outcome: Record<string, string> = {};
  const messages: Record<string, string> = {};
  const times: Record<string, number> = {};
  const fdsBefore = openFds();
  const rssBefore = process.resourceUsage().maxRSS;
  let peak = 0;
  const sample = () => {
    const u = process.memoryUsage();
    peak = Math.max(peak, u.arrayBuffers + u.external);
  };
  const timer = setInterval(sample, 20);

  /** Runs one stage; its outcome is 'ok', what fn returns, or the error's class. */
  const stage = async (name: string, fn: () => Promise<void | string>): Promise<boolean> => {
    const started = performance.now();
    try {
      outcome[name] = (await fn()) ?? 'ok';
      return true;
    } catch (err) {
      const bad = badError(err);
      outcome[name] = err instanceof QimgError ? err.name : 'BAD';
      messages[name] = String((err as Error)?.message ?? err).slice(0, 200);
      if (bad) failures.push(`${name}: ${bad}`);
      return false;
    } finally {
      sample();
      times[name] = Math.round(performance.now() - started);
    }
  };
  const textOk = (what: string, text: string) => {
    if (/\bNaN\b|\bundefined\b|Infinity|\[object /.test(text)) failures.push(`${what}: output shows an internal value: ${text.slice(0, 300)}`);
  };

  try {
    await stage('info', async () => {
      await selfTest(file);
      const img = await openImage(file, { format, metadataOnly: true, ...keys });
      try {
        const info = await img.info();
        textOk('info human', infoHuman(info));
        textOk('info json', prettyJson(infoJson(info)));
        if (img.persistentBitmaps) await img.persistentBitmaps();
      } finally {
        await img.close();
      }
    });

    await stage('chain', async () => {
      for (const info of await chainInfo(file, format)) textOk('info --backing-chain', prettyJson(infoJson(info)));
    });

    let snapshots: string[] = [];
    const budget = { left: READ_BUDGET };
    await stage('read', async () => {
      const img = await openImage(file, { format, ...keys });
      try {
        await mapAndRead(img, 'read', failures, budget);
        if (img.snapshot) snapshots = ((await img.info()).snapshots ?? []).map((s) => s.id);
      } finally {
        await img.close();
      }
    });

    if (snapshots.length) {
      await stage('snapshot', async () => {
        const img = await openImage(file, { format, ...keys });
        try {
          for (const id of snapshots.slice(0, 2)) {
            const snap = await img.snapshot!({ id });
            try {
              await mapAndRead(snap, `snapshot ${id}`, failures, budget);
            } finally {
              await snap.close();
            }
          }
        } finally {
          await img.close();
        }
      });
    }

    // (qemu-img would need the key on its command line: encrypted cases have no oracle)
    if (oracle && outcome.read === 'ok' && !keys.secrets) {
      await stage('oracle', () => compareWithQemu(file, format, failures));
    }

    await stage('check', async () => {
      const check = fixtureFormat === 'qcow2' ? checkQcow2 : findDriver(fixtureFormat)?.check;
      if (!check) return 'no check';
      await check(file, {
        fix: 0,
        log: (line) => {
          if (typeof line !== 'string' || line.includes('\n') || INTERNAL.test(line)) {
            failures.push(`check log line betrays an internal error: ${JSON.stringify(String(line).slice(0, 300))}`);
          }
        },
      });
    });
  } finally {
    clearInterval(timer);
  }

  // Read-only paths never write.
  const after = readFileSync(file);
  if (!after.equals(m.data)) failures.push(`the image file changed (${m.data.length} -> ${after.length} bytes)`);
  const fdsAfter = openFds();
  if (fdsBefore >= 0 && fdsAfter > fdsBefore) failures.push(`${fdsAfter - fdsBefore} file descriptor(s) left open`);
  if (peak > MEMORY_LIMIT) failures.push(`external memory peaked at ${Math.round(peak / 2 ** 20)} MiB`);
  const maxRss = process.resourceUsage().maxRSS;
  if (maxRss > RSS_LIMIT_KB && maxRss > rssBefore) {
    failures.push(`peak resident memory reached ${Math.round(maxRss / 1024)} MiB`);
  }

  if ((failures.length || saveAll) && saveDir) {
    mkdirSync(saveDir, { recursive: true });
    writeFileSync(join(saveDir, `fuzz-${seed}-${fx.name.replace(/\//g, '-')}.${fixtureFormat}`), m.data);
  }
  return {
    seed,
    fixture: `${fx.name}${probe ? ' (probed)' : ''}`,
    mutations: m.log,
    failures,
    outcome,
    messages,
    times,
    maxRssKb: maxRss,
    restart: maxRss > RSS_LIMIT_KB,
    ms: Math.round(performance.now() - t0),
  };
}

// ---------------------------------------------------------------- child process

/** Mirrors `root` into `work`: real directories, files as symlinks to the originals. */
function mirror(root: string, work: string): void {
  mkdirSync(work, { recursive: true });
  for (const name of readdirSync(root)) {
    const src = join(root, name);
    const dst = join(work, name);
    if (lstatSync(src).isDirectory()) mirror(src, dst);
    else if (!name.endsWith('.gz') && !name.endsWith('.tmp') && !existsSync(dst)) symlinkSync(src, dst);
  }
}

export function init(msg: InitMessage): void {
  mirror(msg.root, msg.work);
  workDir = msg.work;
  saveDir = msg.saveDir;
  saveAll = !!msg.saveAll;
  oracle = !!msg.oracle;
  // qemu 7.2 resolves data file names against the working directory
  process.chdir(msg.work);
  loaded = loadFixtures(msg.root, msg.fixtures);
}

function send(msg: unknown): void {
  process.send!(msg);
}

// Only as the forked child (vitest's own workers are forked processes too).
if (process.send && process.env.QIMG_FUZZ_CHILD === '1') {
  let current: number | undefined;
  const fatal = (kind: string) => (err: unknown) => {
    const e = err as Error;
    const text = `${kind}: ${e?.name ?? ''} ${e?.message ?? String(err)} ${(e?.stack ?? '').split('\n').slice(1, 4).join(' <')}`;
    // Report against the running case, then die: the parent starts a fresh child.
    process.send!({ type: 'fatal', seed: current, text }, () => process.exit(70));
  };
  process.on('uncaughtException', fatal('uncaught exception'));
  process.on('unhandledRejection', fatal('unhandled rejection'));
  process.on('message', (msg: InitMessage | CaseMessage) => {
    if (msg.type === 'init') {
      init(msg);
      send({ type: 'ready' });
      return;
    }
    current = msg.seed;
    runCase(msg.seed).then(
      (result) => {
        current = undefined;
        send({ type: 'result', result });
      },
      (err) => fatal('runner error')(err),
    );
  });
  process.on('disconnect', () => process.exit(0));
}
