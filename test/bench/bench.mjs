#!/usr/bin/env node
// qimg vs qemu-img benchmark (`npm run bench`).
//
// Generates its workloads on the spot (deterministically, sparse), converts each one with
// the built qimg (bin/qimg.js) and with qemu-img in the same run, alternating the two tools,
// and prints the medians, the ratio qimg/qemu-img, the target and the peak memory of each.
// Results also go to test/bench/last-results.json.
//
// Environment:
//   BENCH_SCALE        size factor for every workload (default 1; 0.05 is a one-minute smoke test)
//   BENCH_RUNS         timed runs per tool per workload (default 3)
//   BENCH_META_RUNS    timed runs for the fast metadata rows (default max(BENCH_RUNS, 10))
//   BENCH_DIR          work directory (default: a fresh directory under os.tmpdir())
//   BENCH_KEEP=1       keep the work directory (and its images) at the end
//   BENCH_DROP_CACHES  0 = never drop the page cache (default: drop before every timed run when allowed)
//   BENCH_ONLY         comma-separated workload ids to run (e.g. raw-qcow2,info); default all
//   BENCH_TIMEOUT      seconds before a single command is killed (default 3600)
//
// No build step: this is plain ESM and only needs `npm run build` to have produced dist/.

import { spawnSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import Table from 'cli-table3';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const QIMG_BIN = path.join(ROOT, 'bin', 'qimg.js');
const RESULTS = path.join(HERE, 'last-results.json');
const NODE = process.execPath;
const TIME = '/usr/bin/time';
const HAVE_TIME = fs.existsSync(TIME);

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

const SCALE = num(process.env.BENCH_SCALE, 1);
const RUNS = Math.max(1, Math.floor(num(process.env.BENCH_RUNS, 3)));
const META_RUNS = Math.max(1, Math.floor(num(process.env.BENCH_META_RUNS, Math.max(RUNS, 10))));
const KEEP = process.env.BENCH_KEEP === '1';
const TIMEOUT_MS = num(process.env.BENCH_TIMEOUT, 3600) * 1000;
const ONLY = process.env.BENCH_ONLY ? new Set(process.env.BENCH_ONLY.split(',').map((s) => s.trim())) : null;
const MEM_LIMIT_MIB = 256;
const SEED = 0x51a6e;

function num(v, dflt) {
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`bad number: ${v}`);
  return n;
}

/** A size scaled by BENCH_SCALE, rounded to whole MiB (at least 1 MiB). */
const scaled = (bytes) => Math.max(MiB, Math.round((bytes * SCALE) / MiB) * MiB);

const SIZES = {
  big: scaled(4 * GiB), // mixed raw: ~40 % random, ~20 % text, rest holes
  sub: scaled(1 * GiB), // the first part of the same layout (chain base, compression input)
  dense: scaled(1 * GiB), // all random
  empty: scaled(64 * GiB), // almost empty qcow2
};

/** The curves' points: image sizes (scaled), chain depths and virtual sizes (not scaled). */
const CURVE = {
  sizes: [1, 4, 16].map((g) => ({ label: `${g}G`, size: scaled(g * GiB), file: `curve-${g}g.qcow2` })),
  depths: [1, 16, 64, 256],
  chainSize: scaled(1 * GiB),
  vsizes: [40, 48].map((bits) => ({ label: `2^${bits}`, size: 2 ** bits, file: `vsize-${bits}.qcow2` })),
};

const log = (msg) => process.stderr.write(`[bench] ${msg}\n`);
const fmtBytes = (b) => (b >= GiB ? `${(b / GiB).toFixed(2)} GiB` : `${(b / MiB).toFixed(1)} MiB`);

// ---------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------

/** mulberry32: small, seeded, the same sequence everywhere. */
function prng(seed) {
  let s = seed >>> 0;
  const u32 = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const next = () => u32() / 0x100000000;
  const int = (lo, hi) => lo + Math.floor(next() * (hi - lo + 1));
  return { u32, next, int };
}

/**
 * Random-looking bytes that depend only on (key, absolute offset): AES-128-CTR keystream with
 * the counter block = offset / 16. Fast (GB/s) and position-deterministic, so a file made from
 * the first part of a layout is byte-identical to the start of the full one.
 */
function keyFor(name) {
  return createHash('sha256').update(`qimg-bench:${SEED}:${name}`).digest().subarray(0, 16);
}
function randomAt(key, offset, buf) {
  if (offset % 16 !== 0) throw new Error('randomAt: offset must be 16-aligned');
  const iv = Buffer.alloc(16);
  let block = BigInt(offset / 16);
  for (let i = 15; i >= 0; i--) {
    iv[i] = Number(block & 0xffn);
    block >>= 8n;
  }
  const c = createCipheriv('aes-128-ctr', key, iv);
  const zero = Buffer.alloc(buf.length);
  const n = c.update(zero).copy(buf, 0);
  c.final();
  return n;
}

/** Text-like compressible data: log lines from a small vocabulary (zlib ~4-6x). */
let textPool = null;
function getTextPool() {
  if (textPool) return textPool;
  const r = prng(SEED ^ 0x7e47);
  const levels = ['INFO ', 'DEBUG', 'WARN ', 'INFO ', 'INFO ', 'ERROR'];
  const verbs = ['GET', 'PUT', 'POST', 'GET', 'DELETE', 'GET'];
  const paths = ['/api/v1/items', '/api/v1/users', '/static/app.js', '/healthz', '/api/v2/orders', '/login'];
  const words = ['cache miss', 'cache hit', 'retrying', 'connection reset by peer', 'ok', 'slow query', 'flushed'];
  const parts = [];
  let len = 0;
  let t = 1_700_000_000_000;
  const size = 8 * MiB;
  while (len < size) {
    t += r.int(0, 250);
    const line =
      `${new Date(t).toISOString()} ${levels[r.int(0, levels.length - 1)]} [worker-${String(r.int(0, 15)).padStart(2, '0')}] ` +
      `${verbs[r.int(0, verbs.length - 1)]} ${paths[r.int(0, paths.length - 1)]}/${r.int(0, 99999)} ` +
      `status=${r.next() < 0.9 ? 200 : 404} bytes=${r.int(0, 65535)} dur=${r.int(0, 999)}ms ${words[r.int(0, words.length - 1)]}\n`;
    parts.push(line);
    len += line.length;
  }
  textPool = Buffer.from(parts.join('')).subarray(0, size);
  return textPool;
}
function textAt(offset, buf) {
  const pool = getTextPool();
  let done = 0;
  while (done < buf.length) {
    const p = (offset + done) % pool.length;
    const n = Math.min(pool.length - p, buf.length - done);
    pool.copy(buf, done, p, p + n);
    done += n;
  }
}

/**
 * The mixed layout: consecutive chunks of 1-8 MiB (4 KiB aligned), each random data (40 %),
 * text (20 %) or a hole (40 %). Chunks are drawn in order, so a smaller size gives a prefix.
 */
function mixedLayout(size) {
  const r = prng(SEED);
  const extents = [];
  let off = 0;
  while (off < size) {
    const len = Math.min(size - off, r.int(256, 2048) * 4 * KiB);
    const x = r.next();
    const kind = x < 0.4 ? 'random' : x < 0.6 ? 'text' : 'hole';
    if (kind !== 'hole') extents.push({ off, len, kind });
    off += len;
  }
  return extents;
}

/** Writes a sparse raw image: truncate to size, then positional writes of the extents. */
function writeSparseRaw(file, size, extents, key) {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (const e of extents) {
      for (let done = 0; done < e.len; ) {
        const n = Math.min(buf.length, e.len - done);
        const b = buf.subarray(0, n);
        if (e.kind === 'random') randomAt(key, e.off + done, b);
        else textAt(e.off + done, b);
        let w = 0;
        while (w < n) w += fs.writeSync(fd, b, w, n - w, e.off + done + w);
        done += n;
      }
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 512 * MiB, ...opts });
  if (r.error) throw r.error;
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
  }
  return r;
}

/**
 * The two tools' own files: node (99 MB) with qimg's bundle, code cache and koffi, and
 * qemu-img with its shared libraries. A cold run drops the page cache for the data and
 * then reads these back, so that the rows compare copying cold data, not how long each
 * program takes to come off the disk (node's binary alone costs ~100 ms cold).
 */
let toolFiles = null;
function warmTools() {
  if (!toolFiles) {
    toolFiles = [NODE, path.join(ROOT, 'bin', 'qimg.js'), path.join(ROOT, 'package.json')];
    const dist = path.join(ROOT, 'dist');
    for (const f of fs.readdirSync(dist)) toolFiles.push(path.join(dist, f));
    const koffi = path.join(ROOT, 'node_modules', 'koffi');
    const walk = (dir) => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        const p = path.join(dir, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name.endsWith('.node') ? p.includes(`${process.platform}_${process.arch}`) : /\.(c?js|json)$/.test(e.name)) toolFiles.push(p);
      }
    };
    if (fs.existsSync(koffi)) walk(koffi);
    const prebuilt = path.join(ROOT, 'node_modules', '@koromix'); // the binary qimg loads directly
    if (fs.existsSync(prebuilt)) walk(prebuilt);
    const qemu = spawnSync('sh', ['-c', 'command -v qemu-img'], { encoding: 'utf8' }).stdout.trim();
    if (qemu) {
      toolFiles.push(qemu);
      const libs = spawnSync('ldd', [qemu], { encoding: 'utf8' }).stdout ?? '';
      for (const m of libs.matchAll(/=> (\/\S+)/g)) toolFiles.push(m[1]);
    }
    for (const lib of (spawnSync('ldd', [NODE], { encoding: 'utf8' }).stdout ?? '').matchAll(/=> (\/\S+)/g)) toolFiles.push(lib[1]);
  }
  const buf = Buffer.allocUnsafe(4 * MiB);
  for (const f of toolFiles) {
    let fd;
    try {
      fd = fs.openSync(f, 'r');
      while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
    } catch {
      // a file that went away (a rewritten code cache) is simply not warmed
    } finally {
      if (fd !== undefined) fs.closeSync(fd);
    }
  }
}

let dropCaches = false;
function tryDropCaches() {
  try {
    sh('sync', []);
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

/**
 * One timed run: under /usr/bin/time -f '%e %M' (max RSS), wall time from hrtime (ms
 * resolution; %e only has 10 ms, too coarse for the metadata rows, and is kept in the JSON).
 */
function timed(cmd, args, { captureStdout = false, cold = dropCaches } = {}) {
  if (cold) {
    sh('sync', []);
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    warmTools();
  }
  const full = HAVE_TIME ? [TIME, ['-f', '%e %M', cmd, ...args]] : [cmd, args];
  const t0 = process.hrtime.bigint();
  const r = spawnSync(full[0], full[1], {
    encoding: 'utf8',
    maxBuffer: 512 * MiB,
    timeout: TIMEOUT_MS,
    stdio: ['ignore', captureStdout ? 'pipe' : 'ignore', 'pipe'],
  });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  let stderr = r.stderr ?? '';
  let timeE = null;
  let rssKiB = null;
  if (HAVE_TIME) {
    const lines = stderr.trimEnd().split('\n');
    const m = /^(\d+(?:\.\d+)?) (\d+)$/.exec(lines[lines.length - 1] ?? '');
    if (m) {
      timeE = Number(m[1]);
      rssKiB = Number(m[2]);
      lines.pop();
    }
    stderr = lines.filter((l) => !/^Command (exited with non-zero status|terminated by signal)/.test(l)).join('\n');
  }
  const ok = !r.error && r.status === 0;
  const error = ok ? null : r.error ? String(r.error.message) : `exit ${r.status ?? r.signal}: ${stderr.trim().slice(0, 300)}`;
  return { ok, error, wall, timeE, rssKiB, stdout: r.stdout ?? '' };
}

function rmf(file) {
  fs.rmSync(file, { force: true });
}

function allocated(file) {
  try {
    const st = fs.statSync(file);
    return { size: st.size, allocated: st.blocks * 512 };
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------

function generate(dir) {
  const f = (n) => path.join(dir, n);
  const t0 = Date.now();
  const want = (id) => !ONLY || ONLY.has(id);
  // The curve rows alone (BENCH_ONLY=curve-...) need none of the main rows' images.
  if (!ONLY || [...ONLY].some((id) => !id.startsWith('curve-'))) {
    const key = keyFor('mixed');
    const layout = mixedLayout(SIZES.big);
    const sum = (k) => layout.filter((e) => e.kind === k).reduce((a, e) => a + e.len, 0);
    log(
      `big.raw ${fmtBytes(SIZES.big)}: ${layout.length} extents, random ${fmtBytes(sum('random'))}, ` +
        `text ${fmtBytes(sum('text'))}, holes ${fmtBytes(SIZES.big - sum('random') - sum('text'))}`,
    );
    writeSparseRaw(f('big.raw'), SIZES.big, layout, key);

    // The "1 GiB subset": the same layout and data, cut at SIZES.sub.
    const subLayout = mixedLayout(SIZES.sub);
    log(`sub.raw ${fmtBytes(SIZES.sub)} (prefix of big.raw)`);
    writeSparseRaw(f('sub.raw'), SIZES.sub, subLayout, key);

    log(`dense.raw ${fmtBytes(SIZES.dense)} (all random)`);
    writeSparseRaw(f('dense.raw'), SIZES.dense, [{ off: 0, len: SIZES.dense, kind: 'random' }], keyFor('dense'));

    log('big.qcow2 (qemu-img convert -O qcow2)');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', f('big.raw'), f('big.qcow2')]);

    log('sub.qcow2 + top.qcow2 overlay (qemu-img create -b, qemu-io writes ~10 %)');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', f('sub.raw'), f('sub.qcow2')]);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', f('sub.qcow2'), '-F', 'qcow2', f('top.qcow2')]);
    {
      const r = prng(SEED ^ 0x70b);
      const cmds = [];
      let written = 0;
      while (written < SIZES.sub * 0.1) {
        const len = Math.min(SIZES.sub, r.int(16, 512) * 4 * KiB); // 64 KiB - 2 MiB
        const off = r.int(0, (SIZES.sub - len) / (4 * KiB)) * 4 * KiB; // 4 KiB aligned: partial clusters too
        cmds.push('-c', r.next() < 0.1 ? `write -z ${off} ${len}` : `write -P ${r.int(1, 255)} ${off} ${len}`);
        written += len;
      }
      sh('qemu-io', ['-f', 'qcow2', f('top.qcow2'), ...cmds]);
    }

    log('subc.qcow2 (qemu-img convert -c -O qcow2 of sub.raw)');
    sh('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', f('sub.raw'), f('subc.qcow2')]);

    log(`empty.qcow2 ${fmtBytes(SIZES.empty)} (qemu-img create + a few qemu-io writes)`);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f('empty.qcow2'), String(SIZES.empty)]);
    {
      const r = prng(SEED ^ 0xe3);
      const cmds = [];
      for (let i = 0; i < 8; i++) {
        const len = r.int(1, 16) * 64 * KiB;
        const off = r.int(0, (SIZES.empty - len) / (64 * KiB)) * 64 * KiB;
        cmds.push('-c', `write -P ${r.int(1, 255)} ${off} ${len}`);
      }
      cmds.push('-c', `write -P 0x5a ${SIZES.empty - 64 * KiB} ${64 * KiB}`);
      sh('qemu-io', ['-f', 'qcow2', f('empty.qcow2'), ...cmds]);
    }
    // The foreign formats' inputs: the 1 GiB subset as each of them, written by qemu-img.
    const foreign = [
      ['vmdkso-qcow2', 'sub.so.vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
      ['vhdx-raw', 'sub.vhdx', ['-O', 'vhdx']],
      ['vdi-qcow2', 'sub.vdi', ['-O', 'vdi']],
      ['vpc-qcow2', 'sub.vhd', ['-O', 'vpc']],
    ];
    for (const [id, name, args] of foreign) {
      if (!want(id)) continue;
      log(`${name} (qemu-img convert ${args.join(' ')} of sub.raw)`);
      sh('qemu-img', ['convert', '-f', 'raw', ...args, f('sub.raw'), f(name)]);
    }
    if (want('luks-raw')) {
      log('sub.luks.qcow2 (qemu-img convert to a LUKS-encrypted qcow2 of sub.raw)');
      shRetryingCalibration('qemu-img', ['convert', '-f', 'raw', ...BENCH_SECRET, '-O', 'qcow2', '-o', LUKS_OPTS, f('sub.raw'), f('sub.luks.qcow2')]);
    }

  }
  // Curves (issue #10 item 4): the same kind of image at growing sizes, chain depths and
  // virtual sizes, each converted to qcow2. Time should follow the data stored, not the
  // virtual size or the number of layers without data; memory stays bounded throughout.
  for (const c of CURVE.sizes) {
    const id = `curve-size-${c.label}`;
    if (!want(id)) continue;
    log(`${c.file} ${fmtBytes(c.size)} qcow2, 1/8 stored (qemu-img create + qemu-io writes)`);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f(c.file), String(c.size)]);
    qemuIoWrites(f(c.file), spreadWrites(c.size, 8, SEED ^ 0xc0));
  }
  const depths = CURVE.depths.filter((d) => want(`curve-chain-${d}`));
  if (depths.length) {
    const deepest = Math.max(...depths);
    log(`chain of ${deepest} layers over a ${fmtBytes(CURVE.chainSize)} base (1/8 stored), 64 KiB written per overlay`);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f('chain-1.qcow2'), String(CURVE.chainSize)]);
    qemuIoWrites(f('chain-1.qcow2'), spreadWrites(CURVE.chainSize, 8, SEED ^ 0xc1));
    for (let d = 2; d <= deepest; d++) {
      const name = `chain-${d}.qcow2`;
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `chain-${d - 1}.qcow2`, '-F', 'qcow2', f(name)]);
      const off = ((d * 4 + 1) * MiB) % (CURVE.chainSize - 64 * KiB);
      sh('qemu-io', ['-f', 'qcow2', f(name), '-c', `write -P ${d % 255 + 1} ${off} ${64 * KiB}`]);
    }
  }
  for (const v of CURVE.vsizes) {
    const id = `curve-vsize-${v.label}`;
    if (!want(id)) continue;
    log(`${v.file}: ${v.label} bytes virtual, 16 MiB stored in 64 places`);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f(v.file), String(v.size)]);
    const r = prng(SEED ^ 0xc2);
    const writes = [];
    for (let i = 0; i < 64; i++) {
      const slot = Math.floor(v.size / 64 / MiB) * MiB;
      writes.push({ off: i * slot + r.int(0, Math.floor(slot / MiB) - 1) * MiB, len: 256 * KiB, pattern: r.int(1, 255) });
    }
    qemuIoWrites(f(v.file), writes);
  }
  sh('sync', []);
  return (Date.now() - t0) / 1000;
}

/** The encrypted rows' secret and LUKS options (a short PBKDF time: the rows time the data, not the KDF). */
const BENCH_SECRET = ['--object', 'secret,id=benchsec,data=qimg-bench-passphrase'];
const LUKS_OPTS = 'encrypt.format=luks,encrypt.key-secret=benchsec,encrypt.iter-time=10';
const luksImageOpts = (file) => `driver=qcow2,file.filename=${file},encrypt.key-secret=benchsec`;

/** qemu-img 7.2's PBKDF calibration fails now and then on VMs ("Unable to get accurate CPU usage"). */
function shRetryingCalibration(cmd, args) {
  for (let i = 0; ; i++) {
    const r = sh(cmd, args, { allowFail: true });
    if (r.status === 0) return r;
    if (i >= 8 || !/accurate CPU usage/.test(r.stderr)) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  }
}

/** qemu-io pattern writes, a few hundred per process. */
function qemuIoWrites(file, writes) {
  for (let i = 0; i < writes.length; i += 400) {
    const cmds = writes.slice(i, i + 400).flatMap((w) => ['-c', `write -P ${w.pattern} ${w.off} ${w.len}`]);
    sh('qemu-io', ['-f', 'qcow2', file, ...cmds]);
  }
}

/** Writes of 256 KiB - 2 MiB covering about 1/`every` of `size`, evenly spread. */
function spreadWrites(size, every, seed) {
  const r = prng(seed);
  const writes = [];
  const stride = 8 * MiB;
  for (let base = 0; base + stride <= size; base += stride) {
    let want = stride / every;
    while (want > 0) {
      const len = Math.min(want, r.int(1, 8) * 256 * KiB);
      const off = base + r.int(0, (stride - len) / (64 * KiB)) * 64 * KiB;
      writes.push({ off, len, pattern: r.int(1, 255) });
      want -= len;
    }
  }
  return writes;
}

/** The rows. args use {in} / {out} placeholders; the same arguments go to both tools. */
function workloads(dir) {
  const f = (n) => path.join(dir, n);
  const conv = (id, name, args, input, outFmt, target) => ({ id, name, kind: 'convert', args, input: f(input), outFmt, target });
  // Rows that change images in place (commit, rebase): before every run, untimed, each
  // tool gets fresh copies of sub.qcow2 (base) and top.qcow2 (its overlay, pointed at
  // the copy); `result` names the image to compare between the tools afterwards.
  const modify = (id, name, argsOf, result, target) => ({
    id,
    name,
    kind: 'modify',
    target,
    prepare(tool) {
      const work = { base: f(`work-${tool}-base.qcow2`), top: f(`work-${tool}-top.qcow2`) };
      fs.copyFileSync(f('sub.qcow2'), work.base);
      fs.copyFileSync(f('top.qcow2'), work.top);
      sh('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', work.base, '-F', 'qcow2', work.top]);
      return { args: argsOf(work), result: work[result], files: [work.base, work.top] };
    },
  });
  return [
    conv('raw-qcow2', 'raw→qcow2 (4G mixed)', ['convert', '-O', 'qcow2'], 'big.raw', 'qcow2', { ratio: 0.9 }),
    conv('qcow2-raw', 'qcow2→raw (4G mixed)', ['convert', '-O', 'raw'], 'big.qcow2', 'raw', { ratio: 0.9 }),
    conv('dense-qcow2', 'dense raw→qcow2 (1G)', ['convert', '-O', 'qcow2'], 'dense.raw', 'qcow2', { ratio: 0.9 }),
    conv('chain-flat', 'chain→flat qcow2 (1G)', ['convert', '-O', 'qcow2'], 'top.qcow2', 'qcow2', { ratio: 0.9 }),
    conv('cqcow2-raw', 'compressed qcow2→raw (1G)', ['convert', '-O', 'raw'], 'subc.qcow2', 'raw', { ratio: 0.9 }),
    conv('raw-qcow2-c', 'raw→qcow2 -c zlib (1G)', ['convert', '-c', '-O', 'qcow2'], 'sub.raw', 'qcow2', { ratio: 0.4, memMiB: 160 }),
    conv('vmdkso-qcow2', 'streamOptimized vmdk→qcow2 (1G)', ['convert', '-O', 'qcow2'], 'sub.so.vmdk', 'qcow2', { ratio: 0.9 }),
    conv('vhdx-raw', 'vhdx→raw (1G)', ['convert', '-O', 'raw'], 'sub.vhdx', 'raw', { ratio: 0.9 }),
    conv('raw-vmdk', 'raw→vmdk monolithicSparse (1G)', ['convert', '-O', 'vmdk'], 'sub.raw', 'vmdk', { ratio: 0.9 }),
    conv('vdi-qcow2', 'vdi→qcow2 (1G)', ['convert', '-O', 'qcow2'], 'sub.vdi', 'qcow2', { ratio: 0.9 }),
    conv('vpc-qcow2', 'vhd (vpc)→qcow2 (1G)', ['convert', '-O', 'qcow2'], 'sub.vhd', 'qcow2', { ratio: 0.9 }),
    {
      ...conv('raw-luks', 'raw→LUKS qcow2 (1G, aes-256-xts)', ['convert', ...BENCH_SECRET, '-O', 'qcow2', '-o', LUKS_OPTS], 'sub.raw', 'qcow2', { ratio: 1.0 }),
      encryptedOutput: true,
    },
    {
      ...conv('luks-raw', 'LUKS qcow2→raw (1G, aes-256-xts)', ['convert', ...BENCH_SECRET, '--image-opts'], 'sub.luks.qcow2', 'raw', { ratio: 1.0 }),
      imageOptsInput: true,
    },
    conv('empty-raw', 'qcow2→raw (64G almost empty)', ['convert', '-O', 'raw'], 'empty.qcow2', 'raw', { node: 1.3 }),
    modify('commit', 'commit top into base (1G, ~10 % in top)', (work) => ['commit', '-q', work.top], 'base', { ratio: 0.9 }),
    modify('rebase', "rebase -b '' (safe: base's data into the top, 1G)", (work) => ['rebase', '-f', 'qcow2', '-b', '', work.top], 'top', { ratio: 0.9 }),
    ...CURVE.sizes.map((c) =>
      conv(`curve-size-${c.label}`, `curve: qcow2→qcow2 ${c.label} (1/8 stored)`, ['convert', '-O', 'qcow2'], c.file, 'qcow2', { ratio: 0.9 }),
    ),
    ...CURVE.depths.map((d) =>
      conv(`curve-chain-${d}`, `curve: chain ${d} deep→flat qcow2`, ['convert', '-O', 'qcow2'], `chain-${d}.qcow2`, 'qcow2', { ratio: 0.9 }),
    ),
    ...CURVE.vsizes.map((v) =>
      conv(`curve-vsize-${v.label}`, `curve: ${v.label} B virtual→qcow2`, ['convert', '-O', 'qcow2'], v.file, 'qcow2', { ratio: 0.9 }),
    ),
    ...nbdWorkloads(f),
    { id: 'info', name: 'info (4G qcow2)', kind: 'meta', args: ['info', f('big.qcow2')], target: { node: 1.3 } },
    { id: 'map', name: 'map --output=json (4G qcow2)', kind: 'meta', args: ['map', '--output=json', f('big.qcow2')], target: { node: 1.3 } },
  ];
}

// ---------------------------------------------------------------------------------------
// NBD rows: a server started untimed (`--fork --pid-file`, on a unix socket) and the
// client's transfer timed. qimg's side is `qimg serve` + a qimg client; the other side
// is qemu-nbd + qemu-img, or qemu-nbd + nbdcopy (libnbd's copier). Only the client's
// time and memory are measured; both servers run the same way.
// ---------------------------------------------------------------------------------------

/** A server daemon (qemu-nbd or `qimg serve`) on a unix socket, until stopNbdServer. */
function startNbdServer(tool, dir, tag, args) {
  const sock = path.join(dir, `nbd-${tag}.sock`);
  const pidFile = path.join(dir, `nbd-${tag}.pid`);
  rmf(sock);
  rmf(pidFile);
  const [cmd, pre] = tool === 'qimg' ? [NODE, [QIMG_BIN, 'serve']] : ['qemu-nbd', []];
  sh(cmd, [...pre, '--fork', '--pid-file', pidFile, '-t', '-k', sock, ...args]);
  return { sock, pidFile, uri: `nbd+unix:///?socket=${sock}`, pid: Number(fs.readFileSync(pidFile, 'utf8').trim()) };
}

function stopNbdServer(server) {
  if (!server) return;
  try {
    process.kill(server.pid, 'SIGTERM');
  } catch {
    return;
  }
  // wait (bounded) until it has flushed and exited: the next run reuses its files
  for (let i = 0; i < 600; i++) {
    try {
      process.kill(server.pid, 0);
    } catch {
      break;
    }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
  }
  rmf(server.sock);
  rmf(server.pidFile);
}

function nbdWorkloads(f) {
  const big = f('big.qcow2');
  // qimg against qemu-nbd + qemu-img (peer 'qemu-img') or qemu-nbd + nbdcopy (peer 'nbdcopy')
  const read = (id, name, outFmt, peer) => ({
    id,
    name,
    kind: 'nbd',
    outFmt,
    target: { ratio: 1.0 },
    prepare(tool) {
      const out = f(`nbd-out-${tool}.${outFmt}`);
      rmf(out);
      const server = startNbdServer(tool, path.dirname(big), `${id}-${tool}`, ['-r', '-f', 'qcow2', big]);
      const args =
        tool === 'qimg'
          ? [NODE, [QIMG_BIN, 'convert', '-f', 'raw', '-O', outFmt, server.uri, out]]
          : peer === 'nbdcopy'
            ? ['nbdcopy', [server.uri, out]]
            : ['qemu-img', ['convert', '-f', 'raw', '-O', outFmt, server.uri, out]];
      return { cmd: args, result: out, files: [out], server, settle: () => stopNbdServer(server) };
    },
  });
  const write = (id, name, peer) => ({
    id,
    name,
    kind: 'nbd',
    outFmt: 'raw',
    target: { ratio: 1.0 },
    prepare(tool) {
      const out = f(`nbd-target-${tool}.raw`);
      rmf(out);
      fs.closeSync(fs.openSync(out, 'w'));
      fs.truncateSync(out, SIZES.big);
      const server = startNbdServer(tool, path.dirname(big), `${id}-${tool}`, ['-f', 'raw', out]);
      const args =
        tool === 'qimg'
          ? [NODE, [QIMG_BIN, 'convert', '-n', '-f', 'qcow2', '-O', 'raw', big, server.uri]]
          : peer === 'nbdcopy'
            ? ['nbdcopy', ['--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', big, ']', server.uri]]
            : ['qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', big, server.uri]];
      // the server flushes and closes before the result is compared
      return { cmd: args, result: out, files: [out], server, settle: () => stopNbdServer(server) };
    },
  });
  return [
    read('nbd-read', 'NBD: served qcow2 → qcow2 (4G mixed; vs qemu-nbd + qemu-img)', 'qcow2', 'qemu-img'),
    write('nbd-write', 'NBD: qcow2 → served raw (4G mixed; vs qemu-nbd + qemu-img)', 'qemu-img'),
    read('nbd-read-nbdcopy', 'NBD: served qcow2 → raw (4G mixed; vs qemu-nbd + nbdcopy)', 'raw', 'nbdcopy'),
    write('nbd-write-nbdcopy', 'NBD: qcow2 → served raw (4G mixed; vs qemu-nbd + nbdcopy)', 'nbdcopy'),
  ];
}

function toolCmd(tool, args) {
  return tool === 'qimg' ? [NODE, [QIMG_BIN, ...args]] : ['qemu-img', args];
}

/** Correctness of qimg's output against qemu-img's (once per workload). */
function verify(w, qimgRes, qemuRes, outQ, outE, notes) {
  if (!qimgRes.ok) return `qimg failed: ${qimgRes.error}`;
  if (!qemuRes.ok) return `qemu-img failed: ${qemuRes.error}`;
  if (w.kind === 'modify' || w.kind === 'nbd') {
    // outQ/outE: the images each tool changed or wrote
    const fmt = w.outFmt ?? 'qcow2';
    const c = sh('qemu-img', ['compare', '-f', fmt, '-F', fmt, outE, outQ], { allowFail: true });
    if (c.status !== 0) return `compare: ${(c.stdout + c.stderr).trim().split('\n')[0] || `exit ${c.status}`}`;
    if (fmt === 'raw') return null;
    const k = sh('qemu-img', ['check', '-f', fmt, outQ], { allowFail: true });
    if (k.status !== 0) return `check exit ${k.status}: ${(k.stdout + k.stderr).trim().split('\n').slice(-1)[0]}`;
    return null;
  }
  if (w.kind === 'convert' && w.encryptedOutput) {
    const c = sh('qemu-img', ['compare', ...BENCH_SECRET, '--image-opts', luksImageOpts(outE), luksImageOpts(outQ)], { allowFail: true });
    if (c.status !== 0) return `compare: ${(c.stdout + c.stderr).trim().split('\n')[0] || `exit ${c.status}`}`;
    const k = sh('qemu-img', ['check', ...BENCH_SECRET, '--image-opts', luksImageOpts(outQ)], { allowFail: true });
    if (k.status !== 0) return `check exit ${k.status}: ${(k.stdout + k.stderr).trim().split('\n').slice(-1)[0]}`;
    return null;
  }
  if (w.kind === 'convert') {
    const fmt = w.outFmt;
    const c = sh('qemu-img', ['compare', '-f', fmt, '-F', fmt, outE, outQ], { allowFail: true });
    if (c.status !== 0) return `compare: ${(c.stdout + c.stderr).trim().split('\n')[0] || `exit ${c.status}`}`;
    if (['qcow2', 'vmdk', 'vdi', 'vhdx', 'qed', 'parallels'].includes(fmt)) {
      const k = sh('qemu-img', ['check', '-f', fmt, outQ], { allowFail: true });
      if (k.status !== 0) return `check exit ${k.status}: ${(k.stdout + k.stderr).trim().split('\n').slice(-1)[0]}`;
    }
    return null;
  }
  if (w.id === 'map') {
    try {
      // The mapping must be identical on every field qemu-img prints; fields that only newer
      // qemu-img versions print (e.g. "compressed", 8.2+) are noted, not failed.
      const q = JSON.parse(qimgRes.stdout);
      const e = JSON.parse(qemuRes.stdout);
      const extra = new Set();
      const pick = (a, ref) => Object.fromEntries(Object.keys(ref).map((k) => [k, a[k]]));
      for (let i = 0; i < q.length; i++) {
        for (const k of Object.keys(q[i])) if (!(k in (e[i] ?? {}))) extra.add(k);
      }
      const same = q.length === e.length && q.every((x, i) => JSON.stringify(pick(x, e[i])) === JSON.stringify(e[i]));
      if (!same) return 'map JSON differs from qemu-img';
      if (extra.size) notes.push(`map JSON has fields qemu-img 7.2 does not print: ${[...extra].join(', ')}`);
      return null;
    } catch (e) {
      return `map output is not JSON: ${e.message}`;
    }
  }
  const norm = (s) => s.split('\n').map((l) => l.trimEnd()).join('\n').trim();
  return norm(qimgRes.stdout) === norm(qemuRes.stdout) ? null : 'info output differs from qemu-img';
}

function median(xs) {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
const maxOrNull = (xs) => (xs.some((x) => x != null) ? Math.max(...xs.filter((x) => x != null)) : null);

function runWorkload(w, dir) {
  const runs = w.target.node ? META_RUNS : RUNS;
  // Rows judged against `node -e 0` measure start-up cost: dropping the cache there mostly
  // measures re-reading the node binary (noisy), so they and the baseline always run warm.
  const cold = dropCaches && !w.target.node;
  const ext = w.outFmt === 'qcow2' ? 'qcow2' : 'raw';
  const outOf = (tool) => path.join(dir, `out-${tool}.${ext}`);
  const argsFor = (tool) => (w.kind === 'convert' ? [...w.args, w.imageOptsInput ? luksImageOpts(w.input) : w.input, outOf(tool)] : w.args);
  const samples = { qimg: [], 'qemu-img': [] };
  const rss = { qimg: [], 'qemu-img': [] };
  let failure = null;
  let outputs = null;
  const notes = [];

  const prepared = {};
  const once = (tool, capture) => {
    if (w.kind === 'convert') rmf(outOf(tool));
    if (w.prepare) prepared[tool] = w.prepare(tool);
    const [cmd, args] = prepared[tool]?.cmd ?? toolCmd(tool, prepared[tool]?.args ?? argsFor(tool));
    let r = timed(cmd, args, { captureStdout: capture, cold });
    // qemu-img 7.2's PBKDF calibration fails at random on VMs: such a run is repeated
    for (let i = 0; i < 8 && !r.ok && /accurate CPU usage/.test(r.error ?? ''); i++) {
      if (w.kind === 'convert') rmf(outOf(tool));
      r = timed(cmd, args, { captureStdout: capture, cold });
    }
    prepared[tool]?.settle?.();
    if (r.rssKiB != null) rss[tool].push(r.rssKiB);
    return r;
  };
  const cleanup = () => {
    if (w.kind === 'convert') {
      rmf(outOf('qimg'));
      rmf(outOf('qemu-img'));
      sh('sync', []);
    }
    if (w.prepare) {
      for (const p of Object.values(prepared)) for (const file of p.files) rmf(file);
      sh('sync', []);
    }
  };
  const verifyPair = (rq, re) => {
    if (w.prepare) {
      failure = verify(w, rq, re, prepared.qimg.result, prepared['qemu-img'].result, notes);
      return;
    }
    failure = verify(w, rq, re, outOf('qimg'), outOf('qemu-img'), notes);
    if (w.kind === 'convert') outputs = { qimg: allocated(outOf('qimg')), 'qemu-img': allocated(outOf('qemu-img')) };
  };

  // Warm mode: one untimed warm-up pair, which also is the verification pair.
  // Cold mode (page cache dropped before every run): verification on the first timed pair.
  let verified = false;
  if (!cold) {
    const rq = once('qimg', true);
    const re = once('qemu-img', true);
    verifyPair(rq, re);
    verified = true;
    cleanup();
  }
  for (let i = 0; i < runs; i++) {
    const order = i % 2 === 0 ? ['qimg', 'qemu-img'] : ['qemu-img', 'qimg'];
    const res = {};
    for (const tool of order) {
      res[tool] = once(tool, !verified);
      if (res[tool].ok) samples[tool].push({ wall: res[tool].wall, timeE: res[tool].timeE, rssKiB: res[tool].rssKiB });
      else if (tool === 'qimg') failure ??= `qimg failed: ${res[tool].error}`;
      else failure ??= `qemu-img failed: ${res[tool].error}`;
      if (w.kind === 'convert' && verified) rmf(outOf(tool));
    }
    if (!verified) {
      verifyPair(res.qimg, res['qemu-img']);
      verified = true;
    }
    cleanup();
  }
  return {
    id: w.id,
    name: w.name,
    kind: w.kind,
    target: w.target,
    runs,
    failure,
    notes,
    outputs,
    qimg: { median: median(samples.qimg.map((s) => s.wall)), peakRssKiB: maxOrNull(rss.qimg), samples: samples.qimg },
    'qemu-img': {
      median: median(samples['qemu-img'].map((s) => s.wall)),
      peakRssKiB: maxOrNull(rss['qemu-img']),
      samples: samples['qemu-img'],
    },
  };
}

function runBaseline() {
  const samples = [];
  const rss = [];
  timed(NODE, ['-e', '0'], { cold: false });
  for (let i = 0; i < META_RUNS; i++) {
    const r = timed(NODE, ['-e', '0'], { cold: false });
    if (r.ok) samples.push({ wall: r.wall, timeE: r.timeE, rssKiB: r.rssKiB });
    if (r.rssKiB != null) rss.push(r.rssKiB);
  }
  return { median: median(samples.map((s) => s.wall)), peakRssKiB: maxOrNull(rss), samples };
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

function checkPrereqs() {
  for (const [cmd, args] of [['qemu-img', ['--version']], ['qemu-io', ['--version']]]) {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.error || r.status !== 0) throw new Error(`${cmd} is needed for the benchmark`);
  }
  // The CLI bundle may be rebuilt concurrently; build it if it is missing.
  if (!fs.existsSync(path.join(ROOT, 'dist', 'cli.cjs'))) {
    log('dist/cli.cjs missing: npm run build');
    sh('npm', ['run', 'build'], { cwd: ROOT, stdio: 'inherit' });
  }
}

function setupDir() {
  if (process.env.BENCH_DIR) {
    const dir = path.resolve(process.env.BENCH_DIR);
    const existed = fs.existsSync(dir);
    fs.mkdirSync(dir, { recursive: true });
    return { dir, created: !existed };
  }
  return { dir: fs.mkdtempSync(path.join(os.tmpdir(), 'qimg-bench-')), created: true };
}

const OUR_FILES = [
  'big.raw', 'sub.raw', 'dense.raw', 'big.qcow2', 'sub.qcow2', 'top.qcow2', 'subc.qcow2', 'empty.qcow2',
  'out-qimg.raw', 'out-qimg.qcow2', 'out-qemu-img.raw', 'out-qemu-img.qcow2',
  'nbd-out-qimg.qcow2', 'nbd-out-qemu-img.qcow2', 'nbd-out-qimg.raw', 'nbd-out-qemu-img.raw', 'nbd-target-qimg.raw', 'nbd-target-qemu-img.raw',
  'sub.so.vmdk', 'sub.vhdx', 'sub.vdi', 'sub.vhd', 'sub.luks.qcow2',
  ...CURVE.sizes.map((c) => c.file),
  ...Array.from({ length: Math.max(...CURVE.depths) }, (_, i) => `chain-${i + 1}.qcow2`),
  ...CURVE.vsizes.map((v) => v.file),
];
function cleanupDir({ dir, created }) {
  if (KEEP) {
    log(`work directory kept: ${dir}`);
    return;
  }
  if (created) fs.rmSync(dir, { recursive: true, force: true });
  else for (const n of OUR_FILES) rmf(path.join(dir, n)); // a user-given directory: only our files
}

function fmtS(x) {
  return x == null ? 'n/a' : x.toFixed(3);
}
function fmtMiB(kib) {
  return kib == null ? 'n/a' : (kib / 1024).toFixed(0);
}

function judge(row, baseline) {
  const q = row.qimg.median;
  const e = row['qemu-img'].median;
  row.ratio = q != null && e != null && e > 0 ? q / e : null;
  row.ratioNode = row.target.node && q != null && baseline.median ? q / baseline.median : null;
  const misses = [];
  if (row.target.ratio != null && !(row.ratio != null && row.ratio <= row.target.ratio)) misses.push('time');
  if (row.target.node != null && !(row.ratioNode != null && row.ratioNode <= row.target.node)) misses.push('time');
  const mem = row.qimg.peakRssKiB;
  if (mem != null && mem / 1024 >= (row.target.memMiB ?? MEM_LIMIT_MIB)) misses.push('mem');
  row.result = row.failure ? 'FAILED' : misses.length ? `miss (${misses.join(', ')})` : 'pass';
  return row;
}

/**
 * The curves (issue #10 item 4) read across their rows: time should follow the data
 * stored, not the virtual size nor the number of layers, and memory stay bounded.
 *   size:   qimg's time per stored GiB at the largest point ≤ 1.25× the 4G point's
 *           (the 1G point is mostly start-up)
 *   chain:  qimg's time at the deepest point over its time at depth 1 ≤ qemu-img's
 *   vsize:  2^48 bytes virtual ≤ 2× the time of 2^40 (the same data stored)
 */
function curveSummary(rows) {
  const byId = new Map(rows.map((r) => [r.id, r]));
  const lines = [];
  const verdicts = [];
  const pt = (r) => `${fmtS(r.qimg.median)}/${fmtS(r['qemu-img'].median)} s, ${fmtMiB(r.qimg.peakRssKiB)}/${fmtMiB(r['qemu-img'].peakRssKiB)} MiB`;
  const group = (name, ids, label, check) => {
    const pts = ids.map((id, i) => [label[i], byId.get(id)]).filter(([, r]) => r && r.qimg.median != null && r['qemu-img'].median != null);
    if (pts.length < 2) return;
    lines.push(`curve ${name} (qimg/qemu-img): ${pts.map(([l, r]) => `${l} ${pt(r)}`).join('; ')}`);
    const mem = pts.every(([, r]) => r.qimg.peakRssKiB == null || r.qimg.peakRssKiB / 1024 < MEM_LIMIT_MIB);
    const { ok, why } = check(pts);
    verdicts.push({ curve: name, pass: ok && mem, why: `${why}; memory ${mem ? 'under' : 'NOT under'} ${MEM_LIMIT_MIB} MiB` });
    lines.push(`  ${ok && mem ? 'pass' : 'miss'}: ${why}; peak memory ${mem ? 'under' : 'NOT under'} ${MEM_LIMIT_MIB} MiB at every point`);
  };
  group('size, 1/8 stored', CURVE.sizes.map((c) => `curve-size-${c.label}`), CURVE.sizes.map((c) => c.label), (pts) => {
    const perGiB = pts.map(([l, r]) => [l, r.qimg.median / ((CURVE.sizes.find((c) => c.label === l).size / 8) / GiB)]);
    const ref = perGiB.find(([l]) => l === '4G') ?? perGiB[0];
    const last = perGiB[perGiB.length - 1];
    return { ok: last[1] <= ref[1] * 1.25, why: `qimg s per stored GiB ${perGiB.map(([l, v]) => `${l} ${v.toFixed(2)}`).join(', ')}` };
  });
  group('chain depth', CURVE.depths.map((d) => `curve-chain-${d}`), CURVE.depths.map(String), (pts) => {
    const g = (tool) => pts[pts.length - 1][1][tool].median / pts[0][1][tool].median;
    return { ok: g('qimg') <= g('qemu-img'), why: `time ×${g('qimg').toFixed(1)} from depth ${pts[0][0]} to ${pts[pts.length - 1][0]} (qemu-img ×${g('qemu-img').toFixed(1)})` };
  });
  group('virtual size', CURVE.vsizes.map((v) => `curve-vsize-${v.label}`), CURVE.vsizes.map((v) => v.label), (pts) => {
    const g = pts[pts.length - 1][1].qimg.median / pts[0][1].qimg.median;
    return { ok: g <= 2, why: `time ×${g.toFixed(2)} from ${pts[0][0]} to ${pts[pts.length - 1][0]} bytes virtual, the same data stored` };
  });
  return { lines, verdicts };
}

async function main() {
  checkPrereqs();
  const qemuVersion = sh('qemu-img', ['--version']).stdout.split('\n')[0];
  const work = setupDir();
  const started = Date.now();
  const loadStart = os.loadavg()[0].toFixed(2);
  let interrupted = false;
  const onSignal = (sig) => {
    if (interrupted) return;
    interrupted = true;
    log(`${sig}: cleaning up`);
    try {
      cleanupDir(work);
    } finally {
      process.exit(130);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  try {
    const free = fs.statfsSync(work.dir);
    const need = 13 * GiB * SCALE;
    if (free.bavail * free.bsize < need) log(`warning: ~${fmtBytes(need)} needed in ${work.dir}, ${fmtBytes(free.bavail * free.bsize)} free`);

    const canDrop = tryDropCaches();
    dropCaches = canDrop && process.env.BENCH_DROP_CACHES !== '0';
    const cacheNote = dropCaches
      ? "page cache dropped before every timed run (cold data; the tools' own binaries, bundle and libraries read back in), except the rows judged against node -e 0 (warm, after a warm-up run)"
      : `warm page cache, one untimed warm-up run per tool (${canDrop ? 'BENCH_DROP_CACHES=0' : 'cannot drop caches here'})`;
    log(`scale ${SCALE}, ${RUNS} run(s) (${META_RUNS} for metadata rows), ${cacheNote}`);
    log(`work directory ${work.dir}`);

    const genSeconds = generate(work.dir);
    log(`workloads generated in ${genSeconds.toFixed(1)} s`);

    const benchStart = Date.now();
    const rows = [];
    let baseline = null;
    for (const w of workloads(work.dir)) {
      if (ONLY && !ONLY.has(w.id)) continue;
      if (w.target.node && !baseline) {
        log('baseline: node -e 0');
        baseline = runBaseline();
      }
      log(`${w.name}: ${w.target.node ? META_RUNS : RUNS} run(s) per tool`);
      const t0 = Date.now();
      const row = runWorkload(w, work.dir);
      row.seconds = (Date.now() - t0) / 1000;
      rows.push(row);
      if (row.failure) log(`  FAILED: ${row.failure}`);
    }
    baseline ??= runBaseline();
    for (const row of rows) judge(row, baseline);
    const benchSeconds = (Date.now() - benchStart) / 1000;

    const table = new Table({
      head: ['workload', 'qimg s', 'qemu-img s', 'qimg/qemu', 'qimg/node', 'target', 'result', 'qimg RSS MiB', 'qemu RSS MiB'],
      colAligns: ['left', 'right', 'right', 'right', 'right', 'left', 'left', 'right', 'right'],
      style: { head: [], border: [] },
    });
    for (const r of rows) {
      const target = [r.target.ratio != null ? `≤${r.target.ratio.toFixed(1)}× qemu` : `≤${r.target.node}× node`, `<${r.target.memMiB ?? MEM_LIMIT_MIB} MiB`].join(', ');
      table.push([
        r.name,
        fmtS(r.qimg.median),
        fmtS(r['qemu-img'].median),
        r.ratio == null ? 'n/a' : r.ratio.toFixed(2),
        r.ratioNode == null ? '' : r.ratioNode.toFixed(2),
        target,
        r.result,
        fmtMiB(r.qimg.peakRssKiB),
        fmtMiB(r['qemu-img'].peakRssKiB),
      ]);
    }
    table.push(['baseline: node -e 0', fmtS(baseline.median), '', '', '1.00', '', '', fmtMiB(baseline.peakRssKiB), '']);

    console.log();
    console.log(`qimg benchmark — scale ${SCALE}, medians of ${RUNS} run(s) (${META_RUNS} for info/map/64G/node), ${cacheNote}`);
    console.log(`${qemuVersion}; node ${process.version}; ${os.cpus().length} CPUs, load average ${loadStart} at start (other work on the machine makes the numbers noisy); wall time via hrtime, peak RSS via ${HAVE_TIME ? '/usr/bin/time %M' : 'n/a (no /usr/bin/time)'}`);
    console.log(table.toString());
    const curves = curveSummary(rows);
    for (const line of curves.lines) console.log(line);
    for (const r of rows) if (r.failure) console.log(`FAILED ${r.name}: ${r.failure}`);
    for (const r of rows) for (const n of r.notes) console.log(`note ${r.name}: ${n}`);
    const summary = {
      pass: rows.filter((r) => r.result === 'pass').length,
      miss: rows.filter((r) => r.result.startsWith('miss')).length,
      failed: rows.filter((r) => r.result === 'FAILED').length,
    };
    console.log(`${summary.pass} pass, ${summary.miss} miss, ${summary.failed} failed; generation ${genSeconds.toFixed(0)} s, benchmark ${benchSeconds.toFixed(0)} s`);

    const json = {
      date: new Date().toISOString(),
      scale: SCALE,
      runs: RUNS,
      metaRuns: META_RUNS,
      cache: dropCaches ? 'cold' : 'warm',
      node: process.version,
      qemu: qemuVersion,
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? null,
      loadAverageAtStart: Number(loadStart),
      sizes: SIZES,
      memLimitMiB: MEM_LIMIT_MIB,
      generationSeconds: genSeconds,
      benchmarkSeconds: benchSeconds,
      baseline,
      rows,
      curves: curves.verdicts,
      summary,
    };
    fs.writeFileSync(RESULTS, JSON.stringify(json, null, 2) + '\n');
    log(`results written to ${path.relative(process.cwd(), RESULTS)} (total ${((Date.now() - started) / 1000).toFixed(0)} s)`);
    process.exitCode = summary.failed ? 1 : 0;
  } finally {
    if (!interrupted) cleanupDir(work);
  }
}

main().catch((err) => {
  process.stderr.write(`bench: ${err && err.stack ? err.stack : err}\n`);
  process.exit(2);
});
