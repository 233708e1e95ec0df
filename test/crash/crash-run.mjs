#!/usr/bin/env node
/**
 * Crash test: kill qimg with SIGKILL at random moments of a modifying operation, then
 * judge the image with qemu-img (the oracle).
 *
 *   npm run crash                 200 random kills + 60 crash points per operation
 *   node test/crash/crash-run.mjs [--kills N] [--points N] [--ops a,b] [--seed S]
 *                                 [--quick] [--allow KIND] [--json] [--keep DIR] [-v]
 *   env: CRASH_KILLS, CRASH_POINTS, CRASH_OPS, CRASH_SEED (decimal or "random"),
 *        CRASH_KEEP, CRASH_QUICK=1, CRASH_ALLOW
 *
 * Operations: convert (-O qcow2 of a 64 MiB source with scattered data, sometimes -c),
 * write (writer.mjs: seeded random writes/zero writes/discards/flushes through the
 * library), write-lazy (the same on lazy_refcounts=on images), snapshot (-c / -d on an
 * image with data and snapshots), commit (overlay into its base), amend
 * (refcount_bits=..., compat=0.10, compat=1.1).
 *
 * Each iteration: a fresh copy of a template image, the qimg process started, and
 * - random kills: SIGKILL after a random delay — a third uniformly in [5 ms, T] after
 *   the start (T: the variant's measured duration), the others a random time in
 *   [0, 1.1 (T - W)] after the image's first change (W: when the first write comes;
 *   inotify), since start-up takes most of a short run and varies with the load;
 * - crash points (--points, needs gcc): SIGKILL instead of the K-th write or truncate
 *   of the images (LD_PRELOAD injector test/hygiene/faultfs.c), K spread over all of
 *   the operation's writes — exact, reproducible crash moments.
 * Then:
 * - `qemu-img check --output=json`: corruptions must be 0 (leaks are allowed); with
 *   leaks, `qimg check -r leaks` must make `qemu-img check` exit 0. Lazy-refcount
 *   images (dirty after a kill) are judged after `qimg check -r all`: clean.
 * - data: write workloads — every range the journal records as flushed (and untouched
 *   by any later step) reads back as written; snapshot, commit and amend — the guest
 *   content (of the whole chain for commit) is what it was before the operation.
 * A run that finishes before its kill must exit 0 and leave a clean image.
 *
 * Prints per operation "N kills, C corruptions, L images with leaks" (and the same for
 * the crash points) and a summary line; exits 1 when any rule was broken. The failing
 * images are kept (a few per operation) with the seed and the command in repro.txt.
 * --allow KIND (oflag-copied) reports corruptions of that kind without failing: for a
 * known, reported bug only.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Rng, makeData } from './writer.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..', '..');
const QIMG = join(ROOT, 'bin', 'qimg.js');
const WRITER = join(HERE, 'writer.mjs');
const MiB = 1024 * 1024;
const SCRATCH = fs.existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

export const ALL_OPS = ['convert', 'write', 'write-lazy', 'snapshot', 'commit', 'amend', 'bitmaps'];

// ---------------------------------------------------------------- processes

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, timeout: opts.timeout ?? 180_000, cwd: opts.cwd });
  if (r.error) throw r.error;
  return { status: r.status ?? 128, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

function must(r, what) {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

const qemuImg = (args, cwd) => run('qemu-img', args, { cwd });
const qemuIo = (args, cwd) => run('qemu-io', args, { cwd });
const qimg = (args, cwd) => run(process.execPath, [QIMG, ...args], { cwd });

/**
 * Starts `node ARGS` and SIGKILLs it: `delay` = {ms} after the start, or {afterChange}
 * ms after the first change of one of the `watch` files (inotify); null: let it finish.
 * Also reports when the first of the `watch` files was first changed.
 */
async function runKilled(args, delay, cwd, watch = [], env = undefined) {
  for (let attempt = 0; ; attempt++) {
    await distReady();
    const res = await runKilledOnce(args, delay, cwd, watch, env);
    // dist/ rebuilt by someone else while this run started: run it again.
    if (attempt < 3 && /Cannot find module|ERR_MODULE_NOT_FOUND/.test(res.stderr)) continue;
    return res;
  }
}

/** Waits (up to 2 minutes) while dist/ is missing (a concurrent `npm run build`). */
async function distReady() {
  const files = [join(ROOT, 'dist', 'cli.cjs'), join(ROOT, 'dist', 'index.js')];
  for (let i = 0; i < 240 && !files.every((f) => fs.existsSync(f)); i++) await new Promise((r) => setTimeout(r, 500));
  await new Promise((r) => setTimeout(r, 0));
}

function runKilledOnce(args, delay, cwd, watch, env) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let firstChange = null;
    let timer = null;
    let child = null;
    const kill = () => child?.kill('SIGKILL');
    const watchers = [];
    for (const d of new Set(watch.map((f) => dirname(f)))) {
      const names = new Set(watch.filter((f) => dirname(f) === d).map((f) => basename(f)));
      try {
        watchers.push(
          fs.watch(d, (_event, name) => {
            if (firstChange === null && name && names.has(name)) {
              firstChange = performance.now() - t0;
              if (delay?.afterChange !== undefined && !timer) timer = setTimeout(kill, delay.afterChange);
            }
          }),
        );
      } catch {
        /* no inotify: the start of the work is then unknown */
      }
    }
    child = spawn(process.execPath, args, { cwd, stdio: ['ignore', 'ignore', 'pipe'], env: env ? { ...process.env, ...env } : process.env });
    let stderr = '';
    child.stderr.on('data', (d) => {
      if (stderr.length < 65536) stderr += d;
    });
    if (delay?.ms !== undefined) timer = setTimeout(kill, delay.ms);
    // No inotify event (an unusual filesystem): kill at the expected moment instead.
    const backstop = delay?.backstop !== undefined ? setTimeout(() => firstChange === null && !timer && kill(), delay.backstop) : null;
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (backstop) clearTimeout(backstop);
      const ms = performance.now() - t0;
      // Late inotify events still arrive in this turn of the loop: give them one.
      setImmediate(() => {
        for (const w of watchers) w.close();
        resolve({ killed: signal === 'SIGKILL', code, signal, ms, firstChange, stderr });
      });
    });
  });
}

// ---------------------------------------------------------------- judging

/** qemu-img check's findings in a few lines: its ERROR lines (the first 6, and how many). */
function summarizeCheck(stdout, stderr) {
  const lines = (stderr + '\n' + stdout).split('\n');
  const errors = lines.filter((l) => /^(ERROR|Warning|qemu-img:)/.test(l));
  const leaks = lines.filter((l) => /^Leaked cluster/.test(l)).length;
  const out = errors.slice(0, 6);
  if (errors.length > 6) out.push(`... ${errors.length} ERROR lines in all`);
  if (leaks) out.push(`(${leaks} leaked clusters)`);
  return out.join('\n') || stdout.trim().slice(0, 500);
}

/** `qemu-img check --output=json`: {status, corruptions, leaks, checkErrors, text}. */
function qemuCheck(img) {
  const r = qemuImg(['check', '--output=json', img]);
  const res = { status: r.status, corruptions: 0, leaks: 0, checkErrors: 0, text: summarizeCheck(r.stdout, r.stderr), kind: corruptionKind(r.stderr + '\n' + r.stdout) };
  if ([0, 2, 3].includes(r.status)) {
    try {
      const j = JSON.parse(r.stdout);
      res.corruptions = j.corruptions ?? 0;
      res.leaks = j.leaks ?? 0;
      res.checkErrors = j['check-errors'] ?? 0;
      return res;
    } catch {
      /* fall through: unparseable output counts as a failure */
    }
  }
  // qemu-img could not check the image at all (cannot open it, check errors).
  res.corruptions = 1;
  res.unreadable = true;
  return res;
}

/** Guest content as qemu-img reads it (the whole backing chain). */
export function readGuest(img) {
  const out = join(SCRATCH, `qimg-crash-${process.pid}.raw`);
  try {
    must(qemuImg(['convert', '-U', '-O', 'raw', img, out]), `qemu-img convert ${img}`);
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

function firstDiff(a, b) {
  if (a.length !== b.length) return `length ${a.length} != ${b.length}`;
  for (let p = 0; p < a.length; p += 65536) {
    const e = Math.min(a.length, p + 65536);
    if (!a.subarray(p, e).equals(b.subarray(p, e))) {
      for (let i = p; i < e; i++) if (a[i] !== b[i]) return `first difference at guest byte ${i} (0x${i.toString(16)}): got 0x${a[i].toString(16)}, want 0x${b[i].toString(16)}`;
    }
  }
  return null;
}

/**
 * Classes of corruption that qemu-img check reports: 'oflag-copied' when every ERROR
 * line is an OFLAG_COPIED mismatch (a flag/refcount disagreement), else 'other'.
 */
function corruptionKind(text) {
  const errors = text.split('\n').filter((l) => /^ERROR/.test(l));
  return errors.length > 0 && errors.every((l) => /^ERROR OFLAG_COPIED/.test(l)) ? 'oflag-copied' : 'other';
}

/** Keeps a copy of an image as the kill left it (before a repair), beside it. */
function preserve(img) {
  fs.copyFileSync(img, join(dirname(img), `as-killed-${basename(img)}`));
}

/**
 * The structural verdict on one image after a kill. Returns {corruptions, leaked,
 * problems[]} — problems are broken rules (corruptions, a repair that did not clean);
 * a corruption problem starts with its kind in brackets ("[oflag-copied] ...").
 */
function judgeImage(img, { lazy = false, completed = false } = {}) {
  const problems = [];
  if (lazy) {
    // A dirty lazy-refcount image needs its refcounts rebuilt; after that: clean.
    preserve(img);
    const rep = qimg(['check', '-r', 'all', img]);
    const after = qemuCheck(img);
    if (after.status !== 0) problems.push(`[${after.kind}] after qimg check -r all (exit ${rep.status}: ${rep.stderr.trim()}), qemu-img check exits ${after.status}: ${after.text}`);
    return { corruptions: after.corruptions, leaked: false, problems };
  }
  const c = qemuCheck(img);
  if (c.corruptions > 0 || c.checkErrors > 0) problems.push(`[${c.kind}] qemu-img check: ${c.corruptions} corruptions, ${c.checkErrors} check errors (exit ${c.status}): ${c.text}`);
  if (completed && c.leaks > 0) problems.push(`completed run left ${c.leaks} leaked clusters`);
  if (c.leaks > 0 && c.corruptions === 0) {
    preserve(img);
    const rep = qimg(['check', '-r', 'leaks', img]);
    const after = qemuCheck(img);
    if (after.status !== 0) problems.push(`qimg check -r leaks (exit ${rep.status}) did not clean the image: qemu-img check exits ${after.status}: ${after.text}`);
  }
  return { corruptions: c.corruptions, leaked: c.leaks > 0, problems };
}

/**
 * Checks the image against the writer's journal: steps before the last completed
 * flush are durable, steps after it may be anywhere between not done and done.
 */
export function verifyJournal(img, journalPath, initial) {
  const lines = fs.existsSync(journalPath) ? fs.readFileSync(journalPath, 'utf8').split('\n') : [];
  const entries = [];
  for (const l of lines) {
    if (!l) continue;
    try {
      entries.push(JSON.parse(l));
    } catch {
      // A torn last line (the kill came during its write): the step never started.
    }
  }
  let lastDurable = -1;
  entries.forEach((e, k) => {
    if (e.t === 'f' || e.t === 'closed') lastDurable = k;
  });
  // Durable writes and zero writes replayed in order; discarded ranges and steps
  // after the last completed flush are unknown (unless a later durable step covers them).
  const want = Buffer.from(initial);
  entries.forEach((e, k) => {
    if (k > lastDurable) return;
    if (e.t === 'w') makeData(e.seed, e.len).copy(want, e.off);
    else if (e.t === 'z') want.fill(0, e.off, e.off + e.len);
  });
  const got = readGuest(img);
  const unknown = unknownRanges(entries, lastDurable);
  for (const [off, len] of unknown) got.copy(want, off, off, off + len);
  const diff = firstDiff(got, want);
  const flushes = entries.filter((e) => e.t === 'f').length;
  return { ok: diff === null, detail: diff, flushes, steps: entries.filter((e) => ['w', 'z', 'd'].includes(e.t)).length, unknown: unknown.length };
}

/**
 * Ranges whose content is not determined: discards (until a later durable write or
 * zero write covers them) and every step after the last completed flush.
 */
function unknownRanges(entries, lastDurable) {
  /** list of [off, len] kept disjoint enough: a later durable overwrite trims them */
  let ranges = [];
  entries.forEach((e, k) => {
    if (!['w', 'z', 'd'].includes(e.t)) return;
    if (k > lastDurable || e.t === 'd') {
      ranges.push([e.off, e.len]);
      return;
    }
    // durable write/zero: its range is known again
    const a = e.off;
    const b = e.off + e.len;
    const next = [];
    for (const [o, l] of ranges) {
      const s = o;
      const t = o + l;
      if (t <= a || s >= b) next.push([o, l]);
      else {
        if (s < a) next.push([s, a - s]);
        if (t > b) next.push([b, t - b]);
      }
    }
    ranges = next;
  });
  return ranges;
}

// ---------------------------------------------------------------- templates

/** qemu-io commands writing `n` patterned extents (and a few zero writes) at random places. */
function qemuIoWrites(rng, size, n, { zeroes = 0.15, maxLen = 1 * MiB } = {}) {
  const cmds = [];
  for (let i = 0; i < n; i++) {
    const off = rng.int(0, size / 512 - 1) * 512;
    const len = Math.min(size - off, rng.int(1, maxLen / 512) * 512);
    if (rng.chance(zeroes)) cmds.push('-c', `write -z ${off} ${len}`);
    else cmds.push('-c', `write -P 0x${rng.int(1, 255).toString(16)} ${off} ${len}`);
  }
  return cmds;
}

function makeQcow2(path, size, opts, rng, writes, extra = []) {
  must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, ...extra, path, String(size)]), `qemu-img create ${path}`);
  if (writes > 0) must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, writes), path]), `qemu-io ${path}`);
}

/** A sparse raw file with scattered data (random and patterned) and zero runs inside data. */
function makeScatteredRaw(path, size, rng, extents) {
  const fd = fs.openSync(path, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (let i = 0; i < extents; i++) {
      const off = rng.int(0, size / 4096 - 1) * 4096 + (rng.chance(0.3) ? rng.int(0, 4095) : 0);
      const len = Math.min(size - off, rng.int(1, 192) * 4096);
      fs.writeSync(fd, makeData(rng.u32(), len), 0, len, off);
      if (rng.chance(0.3)) {
        const z = Math.min(size - off, rng.int(1, 32) * 4096);
        fs.writeSync(fd, Buffer.alloc(z), 0, z, off);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** mtime+size of the files an operation changes ('' for missing ones). */
function stamps(files) {
  return files
    .map((f) => {
      try {
        const st = fs.statSync(f, { bigint: true });
        return `${st.mtimeNs}:${st.size}`;
      } catch {
        return '';
      }
    })
    .join(',');
}

function copyImage(from, to) {
  fs.rmSync(to, { force: true });
  fs.copyFileSync(from, to);
}

// ---------------------------------------------------------------- operations

/**
 * Each operation: setup(dir, rng, quick) → variants [{name, T (typical ms), prepare(iterDir) →
 * {args, cwd, images, ...}}]; judge(ctx, result) → {corruptions, leaked, problems}.
 */
const OPS = {
  convert: {
    setup(dir, rng, quick) {
      const src = join(dir, 'src.raw');
      makeScatteredRaw(src, 64 * MiB, rng, 90);
      const all = [
        { name: 'qcow2 64k', extra: [] },
        { name: 'qcow2 4k', extra: ['-o', 'cluster_size=4k'] },
        { name: 'qcow2 -c', extra: ['-c'] },
        { name: 'qcow2 4k -c', extra: ['-c', '-o', 'cluster_size=4k'] },
        { name: 'qcow2 4k refcount_bits=1', extra: ['-o', 'cluster_size=4k,refcount_bits=1'] },
      ];
      const vs = quick ? all.filter((v) => ['qcow2 4k', 'qcow2 -c'].includes(v.name)) : all;
      return vs.map((v) => ({
        name: v.name,
        prepare(iterDir) {
          const out = join(iterDir, 'out.qcow2');
          fs.rmSync(out, { force: true });
          return { args: [QIMG, 'convert', '-O', 'qcow2', ...v.extra, src, out], out, src, watch: [out] };
        },
      }));
    },
    judge(job, res) {
      const { out, src } = job;
      if (!fs.existsSync(out)) return { notCreated: true };
      const head = Buffer.alloc(4);
      const fd = fs.openSync(out, 'r');
      const n = fs.readSync(fd, head, 0, 4, 0);
      fs.closeSync(fd);
      if (n < 4 || !head.equals(QCOW2_MAGIC)) {
        // Killed inside create before the header was written: not an image yet.
        return { notCreated: true };
      }
      const v = judgeImage(out, { completed: !res.killed });
      if (!res.killed && v.problems.length === 0) {
        const cmp = qemuImg(['compare', '-q', src, out]);
        if (cmp.status !== 0) v.problems.push(`completed convert differs from its source: ${cmp.stdout}${cmp.stderr}`);
      }
      return v;
    },
  },

  write: writeOp(false),
  'write-lazy': writeOp(true),
  bitmaps: bitmapsOp(),

  snapshot: {
    setup(dir, rng, quick) {
      const size = (quick ? 32 : 64) * MiB;
      const variants = [];
      for (const cs of quick ? ['4k'] : ['64k', '4k']) {
        const t = join(dir, `snap-${cs}.qcow2`);
        makeQcow2(t, size, `cluster_size=${cs}`, rng, 40);
        must(qemuImg(['snapshot', '-c', 's1', t]), 'snapshot s1');
        must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 25), t]), 'qemu-io');
        must(qemuImg(['snapshot', '-c', 's2', t]), 'snapshot s2');
        must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 25), t]), 'qemu-io');
        const content = readGuest(t);
        for (const action of quick ? [['-c', 'snew'], ['-d', 's1']] : [['-c', 'snew'], ['-d', 's1'], ['-d', 's2']]) {
          variants.push({
            name: `${action.join(' ')} ${cs}`,
            prepare(iterDir) {
              const img = join(iterDir, 'snap.qcow2');
              copyImage(t, img);
              return { args: [QIMG, 'snapshot', ...action, img], img, content, watch: [img] };
            },
          });
        }
      }
      return variants;
    },
    judge(job, res) {
      const v = judgeImage(job.img, { completed: !res.killed });
      const diff = firstDiff(readGuest(job.img), job.content);
      if (diff) v.problems.push(`active content changed: ${diff}`);
      return v;
    },
  },

  commit: {
    setup(dir, rng, quick) {
      const size = (quick ? 32 : 64) * MiB;
      const variants = [];
      for (const cs of quick ? ['4k'] : ['64k', '4k']) {
        const tdir = join(dir, `commit-${cs}`);
        fs.mkdirSync(tdir);
        makeQcow2(join(tdir, 'base.qcow2'), size, `cluster_size=${cs}`, rng, 40);
        makeQcow2(join(tdir, 'top.qcow2'), size, `cluster_size=${cs}`, rng, 50, ['-b', 'base.qcow2', '-F', 'qcow2']);
        const content = readGuest(join(tdir, 'top.qcow2'));
        variants.push({
          name: `commit ${cs}`,
          prepare(iterDir) {
            copyImage(join(tdir, 'base.qcow2'), join(iterDir, 'base.qcow2'));
            copyImage(join(tdir, 'top.qcow2'), join(iterDir, 'top.qcow2'));
            const top = join(iterDir, 'top.qcow2');
            return { args: [QIMG, 'commit', '-q', top], top, base: join(iterDir, 'base.qcow2'), content, watch: [top, join(iterDir, 'base.qcow2')] };
          },
        });
      }
      return variants;
    },
    judge(job, res) {
      const b = judgeImage(job.base, { completed: !res.killed });
      const t = judgeImage(job.top, { completed: !res.killed });
      const label = (who) => (p) => p.replace(/^(\[[a-z-]+\] )?/, (m) => `${m}${who}: `);
      const problems = [...b.problems.map(label('base')), ...t.problems.map(label('top'))];
      const diff = firstDiff(readGuest(job.top), job.content);
      if (diff) problems.push(`content of the chain changed: ${diff}`);
      return { corruptions: b.corruptions + t.corruptions, leaked: b.leaked || t.leaked, problems };
    },
  },

  amend: {
    setup(dir, rng, quick) {
      const size = 32 * MiB;
      const variants = [];
      const add = (name, template, opts) => {
        const content = readGuest(template);
        variants.push({
          name: `${name}: -o ${opts}`,
          prepare(iterDir) {
            const img = join(iterDir, 'amend.qcow2');
            copyImage(template, img);
            return { args: [QIMG, 'amend', '-o', opts, img], img, content, watch: [img] };
          },
        });
      };
      for (const [cs, widths] of quick
        ? [['4k', { snap: [4], plain: [1] }]]
        : [
            ['64k', { snap: [64], plain: [1] }],
            ['4k', { snap: [4], plain: [8, 1] }],
          ]) {
        // v3 with data, zero clusters and a snapshot
        const a = join(dir, `amend-snap-${cs}.qcow2`);
        makeQcow2(a, size, `cluster_size=${cs}`, rng, 40);
        must(qemuImg(['snapshot', '-c', 's1', a]), 'snapshot');
        must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 20, { zeroes: 0.4 }), a]), 'qemu-io');
        for (const bits of widths.snap) add(`v3+snapshot ${cs}`, a, `refcount_bits=${bits}`);
        add(`v3+snapshot ${cs}`, a, 'compat=0.10');
        // v3 without snapshots: down to 1-bit refcounts
        if (!quick) {
          const b = join(dir, `amend-plain-${cs}.qcow2`);
          makeQcow2(b, size, `cluster_size=${cs}`, rng, 40);
          for (const bits of widths.plain) add(`v3 ${cs}`, b, `refcount_bits=${bits}`);
          add(`v3 ${cs}`, b, 'compat=0.10');
        }
        // v2 upgraded
        const c = join(dir, `amend-v2-${cs}.qcow2`);
        makeQcow2(c, size, `cluster_size=${cs},compat=0.10`, rng, 40);
        add(`v2 ${cs}`, c, 'compat=1.1');
      }
      // v3 overlay whose zero clusters hide backing data: a downgrade must allocate
      const base = join(dir, 'amend-base.raw');
      makeScatteredRaw(base, size, rng, 30);
      const d = join(dir, 'amend-overlay.qcow2');
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', d]), 'create overlay');
      must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 30, { zeroes: 0.5 }), d]), 'qemu-io');
      add('v3 overlay', d, 'compat=0.10');
      return variants;
    },
    judge(job, res) {
      const v = judgeImage(job.img, { completed: !res.killed });
      const diff = firstDiff(readGuest(job.img), job.content);
      if (diff) v.problems.push(`guest content changed: ${diff}`);
      return v;
    },
  },
};

function writeOp(lazy) {
  return {
    setup(dir, rng, quick) {
      const size = (quick ? 16 : 32) * MiB;
      const variants = [];
      const base = join(dir, 'wbase.raw');
      makeScatteredRaw(base, size, rng, 30);
      const specs = [
        { name: '64k', cs: '64k' },
        { name: '4k', cs: '4k' },
        { name: '64k +snapshot', cs: '64k', snap: true },
        { name: '4k +snapshot', cs: '4k', snap: true, quick: true },
        { name: '4k overlay', cs: '4k', backing: true, quick: true },
      ];
      for (const s of specs.filter((x) => !quick || x.quick)) {
        const t = join(dir, `w-${s.name.replace(/[^a-z0-9]+/g, '_')}.qcow2`);
        const extra = s.backing ? ['-b', base, '-F', 'raw'] : [];
        makeQcow2(t, size, `cluster_size=${s.cs},lazy_refcounts=${lazy ? 'on' : 'off'}`, rng, 20, extra);
        if (s.snap) {
          must(qemuImg(['snapshot', '-c', 's1', t]), 'snapshot');
          must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 10), t]), 'qemu-io');
        }
        const initial = readGuest(t);
        variants.push({
          name: s.name,
          prepare(iterDir, iterRng) {
            const img = join(iterDir, 'w.qcow2');
            const journal = join(iterDir, 'journal.jsonl');
            copyImage(t, img);
            fs.rmSync(journal, { force: true });
            return { args: [WRITER, img, journal, String(iterRng.u32()), quick ? '150' : '300'], img, journal, initial, watch: [img] };
          },
        });
      }
      return variants;
    },
    judge(job, res) {
      const v = judgeImage(job.img, { lazy, completed: !res.killed });
      const j = verifyJournal(job.img, job.journal, job.initial);
      if (!j.ok) v.problems.push(`flushed data lost (${j.flushes} flushes, ${j.steps} steps in the journal): ${j.detail}`);
      return v;
    },
  };
}

/**
 * The write workload on an image with persistent bitmaps (b0 enabled at 4 KiB, b1
 * disabled with bits set). After any kill: qemu-img check as for every write; each
 * bitmap either flagged in-use (never trusted), dropped with the autoclear bit (QEMU's
 * in-place update window), or clean, and a clean b0 covers every
 * write, zero write and discard of the journal (the last intent line excepted: a kill
 * before that step flagged the bitmaps writes nothing); b1 never changes. Bits are
 * read by QEMU itself (qemu-nbd -B, nbdinfo --map) when nbdinfo is installed.
 */
function bitmapsOp() {
  return {
    setup(dir, rng, quick) {
      const size = (quick ? 16 : 32) * MiB;
      const variants = [];
      for (const cs of quick ? ['64k'] : ['64k', '4k']) {
        const t = join(dir, `bm-${cs}.qcow2`);
        makeQcow2(t, size, `cluster_size=${cs}`, rng, 10);
        must(qemuImg(['bitmap', '--add', '-g', '4k', t, 'b0']), 'bitmap --add b0');
        must(qemuImg(['bitmap', '--add', '-g', '64k', t, 'b1']), 'bitmap --add b1');
        must(qemuIo(['-f', 'qcow2', ...qemuIoWrites(rng, size, 5), t]), 'qemu-io');
        must(qemuImg(['bitmap', '--disable', '--clear', t, 'b0']), 'bitmap --clear b0');
        must(qemuImg(['bitmap', '--enable', '--disable', t, 'b1']), 'bitmap --disable b1');
        must(qemuImg(['bitmap', '--enable', t, 'b0']), 'bitmap --enable b0');
        const initial = readGuest(t);
        const b1 = dirtyRanges(t, 'b1');
        variants.push({
          name: `bitmaps ${cs}`,
          prepare(iterDir, iterRng) {
            const img = join(iterDir, 'w.qcow2');
            const journal = join(iterDir, 'journal.jsonl');
            copyImage(t, img);
            fs.rmSync(journal, { force: true });
            return { args: [WRITER, img, journal, String(iterRng.u32()), quick ? '150' : '300'], img, journal, initial, b1, watch: [img] };
          },
        });
      }
      return variants;
    },
    judge(job, res) {
      const v = judgeImage(job.img, { completed: !res.killed });
      const j = verifyJournal(job.img, job.journal, job.initial);
      if (!j.ok) v.problems.push(`flushed data lost (${j.flushes} flushes, ${j.steps} steps in the journal): ${j.detail}`);
      const info = JSON.parse(qemuImg(['info', '--output=json', '-U', job.img]).stdout || '{}');
      const bitmaps = info['format-specific']?.data?.bitmaps ?? [];
      const flags = Object.fromEntries(bitmaps.map((b) => [b.name, b.flags]));
      if (!flags.b0 || !flags.b1) {
        // QEMU's own window: a kill while the in-use flags are written in place leaves the
        // autoclear bit off, and then every bitmap is dropped as untrustworthy (never a
        // stale one trusted). Anything else is a loss.
        const autoclear = readU64(job.img, 88);
        if (!(res.killed && (autoclear & 1n) === 0n)) v.problems.push(`bitmaps lost: ${JSON.stringify(bitmaps)} (autoclear ${autoclear})`);
        return v;
      }
      if (!res.killed && (flags.b0.includes('in-use') || flags.b1.includes('in-use'))) v.problems.push(`a completed run left bitmaps in use: ${JSON.stringify(bitmaps)}`);
      if (!haveNbdinfo()) return v;
      if (!flags.b1.includes('in-use') && JSON.stringify(dirtyRanges(job.img, 'b1')) !== JSON.stringify(job.b1)) v.problems.push('the disabled bitmap b1 changed');
      if (!flags.b0.includes('in-use')) {
        const dirty = dirtyRanges(job.img, 'b0');
        const steps = readJournal(job.journal).filter((e) => ['w', 'z', 'd'].includes(e.t));
        if (res.killed) steps.pop();
        for (const e of steps) {
          const a = Math.floor(e.off / 4096) * 4096;
          const b = Math.ceil((e.off + e.len) / 4096) * 4096;
          if (!dirty.some(([o, l]) => o <= a && o + l >= Math.min(b, job.initial.length))) {
            v.problems.push(`clean bitmap b0 misses step ${e.i} (${e.t} ${e.off}+${e.len})`);
            break;
          }
        }
      }
      return v;
    },
  };
}

function readU64(path, offset) {
  const fd = fs.openSync(path, 'r');
  try {
    const b = Buffer.alloc(8);
    fs.readSync(fd, b, 0, 8, offset);
    return b.readBigUInt64BE(0);
  } finally {
    fs.closeSync(fd);
  }
}

function readJournal(path) {
  const out = [];
  for (const l of fs.existsSync(path) ? fs.readFileSync(path, 'utf8').split('\n') : []) {
    try {
      if (l) out.push(JSON.parse(l));
    } catch {
      // a torn last line: that step never started
    }
  }
  return out;
}

let nbdinfoChecked;
function haveNbdinfo() {
  if (nbdinfoChecked === undefined) {
    try {
      nbdinfoChecked = run('nbdinfo', ['--version']).status === 0 && run('qemu-nbd', ['--version']).status === 0;
    } catch {
      nbdinfoChecked = false; // not installed
    }
  }
  if (!nbdinfoChecked && process.env.CI === 'true') throw new Error('qemu-nbd and nbdinfo (libnbd-bin) are needed to read bitmaps');
  return nbdinfoChecked;
}

/** Dirty [offset, length] runs of a bitmap, as QEMU reads them (merged). */
function dirtyRanges(img, name) {
  if (!haveNbdinfo()) return [];
  const dir = fs.mkdtempSync(join(tmpdir(), 'qimg-crash-nbd-'));
  const sock = join(dir, 's');
  const pidFile = join(dir, 'pid');
  try {
    must(run('qemu-nbd', ['-r', '-f', 'qcow2', '-B', name, '-k', sock, '--fork', '--pid-file', pidFile, img]), 'qemu-nbd');
    try {
      const r = must(run('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`]), 'nbdinfo');
      const out = [];
      for (const e of JSON.parse(r.stdout)) {
        if (!(e.type & 1)) continue;
        const last = out[out.length - 1];
        if (last && last[0] + last[1] === e.offset) last[1] += e.length;
        else out.push([e.offset, e.length]);
      }
      return out;
    } finally {
      try {
        process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGTERM');
      } catch {
        // already gone
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- driver

function parseArgs(argv) {
  const o = {
    kills: Number(process.env.CRASH_KILLS ?? 200),
    ops: (process.env.CRASH_OPS ?? ALL_OPS.join(',')).split(',').filter(Boolean),
    seed: process.env.CRASH_SEED ?? '20240611',
    json: false,
    keep: process.env.CRASH_KEEP,
    verbose: false,
    /** crash points per operation (SIGKILL at the K-th write, LD_PRELOAD injector) */
    points: Number(process.env.CRASH_POINTS ?? 60),
    /** fewer variants and templates (the CI test) */
    quick: process.env.CRASH_QUICK === '1',
    /** corruption kinds reported but not failing the run (a known, reported bug) */
    allow: (process.env.CRASH_ALLOW ?? '').split(',').filter(Boolean),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--kills') o.kills = Number(argv[++i]);
    else if (a === '--ops') o.ops = argv[++i].split(',').filter(Boolean);
    else if (a === '--seed') o.seed = argv[++i];
    else if (a === '--json') o.json = true;
    else if (a === '--keep') o.keep = argv[++i];
    else if (a === '-v' || a === '--verbose') o.verbose = true;
    else if (a === '--quick') o.quick = true;
    else if (a === '--points') o.points = Number(argv[++i]);
    else if (a === '--allow') o.allow = argv[++i].split(',').filter(Boolean);
    else throw new Error(`unknown argument ${a}`);
  }
  o.seed = o.seed === 'random' ? (Math.random() * 2 ** 32) >>> 0 : Number(o.seed) >>> 0;
  for (const op of o.ops) if (!OPS[op]) throw new Error(`unknown operation ${op} (have: ${ALL_OPS.join(', ')})`);
  return o;
}

function describeDelay(d) {
  return d.ms !== undefined ? `${d.ms.toFixed(1)} ms after the start` : `${d.afterChange.toFixed(1)} ms after the first change of the image`;
}

function opSeed(seed, op) {
  let h = seed ^ 0x811c9dc5;
  for (let i = 0; i < op.length; i++) h = Math.imul(h ^ op.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Builds the LD_PRELOAD fault injector (test/hygiene/faultfs.c) into `dir`; null without gcc. */
function buildFaultfs(dir) {
  const so = join(dir, 'faultfs.so');
  try {
    const r = run('gcc', ['-shared', '-fPIC', '-O1', '-o', so, join(HERE, '..', 'hygiene', 'faultfs.c'), '-ldl']);
    return r.status === 0 ? so : null;
  } catch {
    return null;
  }
}

async function runOp(op, o, log) {
  const spec = OPS[op];
  const seed = opSeed(o.seed, op);
  const rng = new Rng(seed);
  const dir = fs.mkdtempSync(join(tmpdir(), `qimg-crash-${op}-`));
  const iterDir = join(dir, 'iter');
  fs.mkdirSync(iterDir);
  const stats = {
    op,
    seed,
    kills: 0,
    touched: 0,
    finished: 0,
    known: 0,
    knownIterations: 0,
    notCreated: 0,
    corruptions: 0,
    leaky: 0,
    points: 0,
    pointCorruptions: 0,
    pointLeaky: 0,
    failures: [],
  };
  let attempts = 0;

  /**
   * One iteration: a fresh copy of the variant's images, the run (killed as `delay`
   * says, or at a crash point with `env`), the verdict, and the bookkeeping.
   * Returns the run's result (null when it did not count).
   */
  async function iterate(v, delay, env, what) {
    attempts++;
    for (const f of fs.readdirSync(iterDir)) fs.rmSync(join(iterDir, f), { force: true, recursive: true });
    const job = v.prepare(iterDir, rng);
    const before = stamps(job.watch);
    const res = await runKilled(job.args, delay, iterDir, job.watch, env);
    const point = env !== undefined;
    if (!res.killed && res.code === 0 && !point) {
      // Faster than measured (the machine's load varies): aim earlier from now on.
      v.T = Math.max(20, Math.min(v.T, res.ms));
      if (res.firstChange !== null) v.W = Math.min(v.W, res.firstChange);
      v.W = Math.min(v.W, v.T * 0.9);
    }
    if (res.killed) {
      if (point) stats.points++;
      else stats.kills++;
      if (!point && stamps(job.watch) !== before) stats.touched++;
    } else {
      if (!point) stats.finished++;
      if (res.code !== 0) {
        stats.failures.push({ variant: v.name, delay: what, problems: [`exited ${res.code} without being killed: ${res.stderr.trim()}`] });
        return null;
      }
    }
    const verdict = spec.judge(job, res);
    if (verdict.notCreated) {
      stats.notCreated++;
      return res;
    }
    if (point) {
      stats.pointCorruptions += verdict.corruptions;
      if (verdict.leaked) stats.pointLeaky++;
    } else {
      stats.corruptions += verdict.corruptions;
      if (verdict.leaked) stats.leaky++;
    }
    if (verdict.problems.length === 0) return res;
    const known = verdict.problems.every((p) => o.allow.some((k) => p.startsWith(`[${k}]`)));
    if (known) {
      stats.known += verdict.corruptions;
      stats.knownIterations++;
    }
    const keep = o.keep ?? join(tmpdir(), `qimg-crash-failures-${o.seed}`);
    const where = join(keep, `${op}-${attempts}`);
    // A few examples are enough (disk space): the first 10 failures, 3 known issues.
    const kept = known ? stats.knownIterations <= 3 : stats.failures.length < 10;
    if (kept) {
      fs.mkdirSync(where, { recursive: true });
      for (const f of fs.readdirSync(iterDir)) fs.copyFileSync(join(iterDir, f), join(where, f));
      fs.writeFileSync(
        join(where, 'repro.txt'),
        `seed ${o.seed} (operation seed ${seed}), attempt ${attempts}, variant ${v.name}, SIGKILL ${what}\n` +
          `command: node ${job.args.join(' ')}\n` +
          (point ? `crash point: UV_USE_IO_URING=0 LD_PRELOAD=faultfs.so (test/hygiene/faultfs.c) FAULT_PATH=<dir>/ ${Object.entries(env).filter(([k]) => k.startsWith('FAULT_KILL')).map(([k, x]) => `${k}=${x}`).join(' ')}\n` : '') +
          `rerun: CRASH_SEED=${o.seed} node test/crash/crash-run.mjs --ops ${op} --kills ${o.kills}${o.points ? ` --points ${o.points}` : ''}${o.quick ? ' --quick' : ''}\n` +
          `as-killed-*: the images as the kill left them (the others after the repairs the judge tried)\n\n` +
          verdict.problems.join('\n') +
          '\n',
      );
    }
    const failure = { variant: v.name, delay: what, attempt: attempts, killed: res.killed, problems: verdict.problems, kept: kept ? where : undefined };
    if (known) {
      log(`  known issue (${o.allow.join(', ')} allowed) ${op} [${v.name}] attempt ${attempts}, SIGKILL ${what}: ${verdict.corruptions} corruptions ${kept ? `(kept in ${where})` : ''}`);
      return res;
    }
    stats.failures.push(failure);
    log(`  FAIL ${op} [${v.name}] attempt ${attempts}, SIGKILL ${what}: ${verdict.problems.join(' | ').slice(0, 2000)}${kept ? ` (kept in ${where})` : ''}`);
    return res;
  }

  try {
    const tSetup = Date.now();
    const variants = spec.setup(dir, rng, o.quick);
    // Typical duration of each variant, and when it starts writing: full runs (which
    // must succeed and leave a clean image) — two in long runs, one in short ones.
    for (const v of variants) {
      v.T = Infinity;
      v.W = Infinity;
      for (let k = 0; k < (o.kills >= 50 ? 2 : 1); k++) {
        const job = v.prepare(iterDir, rng);
        const res = await runKilled(job.args, null, iterDir, job.watch);
        if (res.code !== 0) throw new Error(`${op} (${v.name}) failed without a kill: exit ${res.code}: ${res.stderr}`);
        const verdict = spec.judge(job, res);
        if (verdict.problems?.length) stats.failures.push({ variant: v.name, delay: null, problems: verdict.problems });
        v.T = Math.max(20, Math.min(v.T, res.ms));
        v.W = Math.min(v.W, res.firstChange ?? v.T / 2);
      }
      v.W = Math.min(v.W, v.T * 0.9);
    }
    stats.setupSeconds = Math.round((Date.now() - tSetup) / 100) / 10;
    if (o.verbose) log(`${op}: setup ${stats.setupSeconds}s; first write / duration: ${variants.map((v) => `${v.name} ${Math.round(v.W)}/${Math.round(v.T)}ms`).join(', ')}`);

    // Random kills.
    const maxAttempts = o.kills * 3;
    while (stats.kills < o.kills && attempts < maxAttempts) {
      const v = variants[rng.int(0, variants.length - 1)];
      // A third of the kills anywhere in [5 ms, T] after the start; the others at a
      // random moment of the work itself: timed from the first change of the image
      // (start-up takes most of a short run, and its length varies with the load).
      let delay;
      if (rng.chance(1 / 3)) delay = { ms: 5 + rng.next() * (v.T - 5) };
      else {
        const afterChange = rng.next() * 1.1 * (v.T - v.W);
        delay = { afterChange, backstop: 2 * (v.W + afterChange) };
      }
      await iterate(v, delay, undefined, describeDelay(delay));
    }

    // Crash points: SIGKILL instead of the K-th write (or truncate) of the images, K
    // spread over all of the operation's writes (LD_PRELOAD fault injector).
    const so = o.points > 0 ? buildFaultfs(dir) : null;
    if (o.points > 0 && !so) log(`${op}: crash points skipped (no gcc to build test/hygiene/faultfs.c)`);
    if (so) {
      const base = { UV_USE_IO_URING: '0', LD_PRELOAD: so, FAULT_PATH: iterDir + '/' };
      const perVariant = Math.max(1, Math.round(o.points / variants.length));
      for (const v of variants) {
        const countFile = join(dir, 'count');
        fs.rmSync(countFile, { force: true });
        for (const f of fs.readdirSync(iterDir)) fs.rmSync(join(iterDir, f), { force: true, recursive: true });
        const job = v.prepare(iterDir, rng);
        const r = await runKilled(job.args, null, iterDir, [], { ...base, FAULT_COUNT_FILE: countFile });
        const n = r.code === 0 && fs.existsSync(countFile) ? Number(fs.readFileSync(countFile, 'utf8')) : 0;
        if (!n) {
          log(`${op} [${v.name}]: crash points skipped (the fault injector counted no writes)`);
          continue;
        }
        v.writes = n;
        // Every write when there are few; else evenly spread points with a random offset.
        const points = [];
        if (n <= perVariant) for (let k = 1; k <= n; k++) points.push(k);
        else for (let i = 0; i < perVariant; i++) points.push(1 + Math.floor(((i + rng.next()) * n) / perVariant));
        for (const k of points) await iterate(v, null, { ...base, FAULT_KILL_AT: String(k) }, `at crash point ${k} of ${n} writes`);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return stats;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const log = (s) => process.stdout.write(s + '\n');
  if (!o.json) log(`crash test: ${o.kills} kills per operation, seed ${o.seed}, operations ${o.ops.join(', ')}`);
  const all = [];
  for (const op of o.ops) {
    const t0 = Date.now();
    const s = await runOp(op, o, o.json ? () => undefined : log);
    s.seconds = Math.round((Date.now() - t0) / 1000);
    all.push(s);
    if (!o.json) {
      const extra = [];
      if (s.finished) extra.push(`${s.finished} runs finished before their kill`);
      if (s.notCreated) extra.push(`${s.notCreated} kills before the output had a header`);
      if (s.knownIterations) extra.push(`${s.known} of the corruptions in ${s.knownIterations} images of the allowed kind ${o.allow.join(', ')}`);
      if (s.failures.length) extra.push(`${s.failures.length} FAILED`);
      extra.unshift(`${s.touched} of the kills after the operation had written`);
      log(`${op}: ${s.kills} kills, ${s.corruptions} corruptions, ${s.leaky} images with leaks (${extra.join(', ')}) [${s.seconds}s]`);
      if (s.points) log(`${op} crash points: ${s.points} kills at exact writes, ${s.pointCorruptions} corruptions, ${s.pointLeaky} images with leaks`);
    }
  }
  const kills = all.reduce((n, s) => n + s.kills, 0);
  const corruptions = all.reduce((n, s) => n + s.corruptions + s.pointCorruptions, 0);
  const points = all.reduce((n, s) => n + s.points, 0);
  const failures = all.reduce((n, s) => n + s.failures.length, 0);
  const known = all.reduce((n, s) => n + s.known, 0);
  if (o.json) process.stdout.write(JSON.stringify({ seed: o.seed, ops: all }) + '\n');
  else log(`summary: ${kills} random kills and ${points} crash-point kills over ${all.length} operations, ${corruptions} corruptions${known ? ` (${known} of an allowed kind: ${o.allow.join(', ')})` : ''}, ${failures} failed iterations (seed ${o.seed})`);
  process.exitCode = failures > 0 || corruptions > known ? 1 : 0;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((err) => {
    process.stderr.write(`crash-run: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
  });
}
