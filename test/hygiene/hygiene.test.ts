/**
 * Failure hygiene (DESIGN.md §1 exit codes, §4 safety):
 * - an output that a failed command created is removed (and its external data file);
 * - the inputs of read-only commands are never modified: neither their bytes nor their
 *   mtime;
 * - ENOSPC / EFBIG / EIO in the middle of a convert or a commit give one clear error
 *   line (no stack trace) and a non-zero exit;
 * - an error while flushing metadata is never an exit 0.
 *
 * Full filesystems: a small tmpfs when mounting is allowed (root), and always a file
 * size limit (`ulimit -f`, EFBIG: Node ignores SIGXFSZ). EIO: device-mapper's error
 * target is often unavailable (containers), so an LD_PRELOAD fault injector
 * (faultfs.c, built with gcc when present) fails writes after N bytes or fsync.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readSync, rmSync, statSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, QIMG, ROOT, run, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const HAVE_QEMU = qemuAvailable();
const MiB = 1024 * 1024;
/** convert outputs the full-filesystem and EIO tests try: raw, qcow2, compressed qcow2 */
const OUTPUTS: Array<[string, string[]]> = [
  ['raw', []],
  ['qcow2', []],
  ['qcow2', ['-c']],
];

/** One line on stderr, qimg's shape, matching `re`, no stack trace. */
function expectOneCleanLine(r: RunResult, re: RegExp): void {
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^qimg: /);
  expect(lines[0]).toMatch(re);
  expect(r.stderr).not.toMatch(/^\s+at /m);
}

function expectFailed(r: RunResult): void {
  expect(r.status, `expected a failure, got exit ${r.status}: ${r.stdout}${r.stderr}`).not.toBe(0);
}

function randomFile(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  try {
    const chunk = Buffer.allocUnsafe(MiB);
    for (let p = 0; p < bytes; p += chunk.length) {
      randomFillSync(chunk);
      writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - p), p);
    }
  } finally {
    closeSync(fd);
  }
}

/** Bytes, size and mtime of files, after setting the mtime to a fixed past instant. */
function freeze(files: string[]): Map<string, { sha: string; size: number; mtimeMs: number }> {
  const past = new Date('2001-02-03T04:05:06Z');
  const m = new Map<string, { sha: string; size: number; mtimeMs: number }>();
  for (const f of files) {
    utimesSync(f, past, past);
    const st = statSync(f);
    m.set(f, { sha: sha256File(f), size: st.size, mtimeMs: st.mtimeMs });
  }
  return m;
}

function expectUntouched(frozen: Map<string, { sha: string; size: number; mtimeMs: number }>, what: string): void {
  for (const [f, before] of frozen) {
    const st = statSync(f);
    expect({ file: f, size: st.size, mtimeMs: st.mtimeMs, sha: sha256File(f) }, `${what} modified ${f}`).toEqual({ file: f, ...before });
  }
}

/** The guest content of an image as qemu-img reads it, as a file. */
function guestRaw(img: string, out: string): string {
  ok(qemuImg(['convert', '-U', '-O', 'raw', img, out]), 'qemu-img convert');
  return out;
}

/** Gives a qcow2 image (16-bit refcounts) one leaked cluster: a cluster appended with refcount 1. */
function withLeak(path: string): string {
  const fd = openSync(path, 'r+');
  try {
    const h = Buffer.alloc(104);
    readSync(fd, h, 0, 104, 0);
    const cs = 2 ** h.readUInt32BE(20);
    const reftable = Number(h.readBigUInt64BE(48));
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, reftable);
    const refblock = Number(e.readBigUInt64BE(0));
    const cluster = Math.ceil(statSync(path).size / cs);
    writeSync(fd, Buffer.alloc(cs), 0, cs, cluster * cs);
    const rc = Buffer.alloc(2);
    rc.writeUInt16BE(1);
    writeSync(fd, rc, 0, 2, refblock + 2 * cluster);
  } finally {
    closeSync(fd);
  }
  const c = qemuImg(['check', path]);
  if (c.status !== 3) throw new Error(`expected a leak in ${path}: ${c.stdout}${c.stderr}`);
  return path;
}

/** Writes an L2 entry of a (fresh, 64k-cluster) qcow2 image: makes a cluster's offset unaligned. */
function corruptClusterOffset(path: string, guestOffset: number): void {
  const fd = openSync(path, 'r+');
  try {
    const h = Buffer.alloc(48);
    readSync(fd, h, 0, 48, 0);
    const cs = 2 ** h.readUInt32BE(20);
    const l1 = Number(h.readBigUInt64BE(40));
    const span = (cs / 8) * cs;
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, l1 + 8 * Math.floor(guestOffset / span));
    const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const at = l2 + 8 * Math.floor((guestOffset % span) / cs);
    readSync(fd, e, 0, 8, at);
    e.writeBigUInt64BE(e.readBigUInt64BE(0) | 0x200n);
    writeSync(fd, e, 0, 8, at);
  } finally {
    closeSync(fd);
  }
}

describe.skipIf(!HAVE_QEMU)('failure hygiene', () => {
  let tmp: { path: string; cleanup: () => void };
  /** a 8 MiB tmpfs (null when mounting is not permitted) */
  let tmpfs: string | null = null;
  /** LD_PRELOAD fault injector (null without gcc, or when it does not take effect) */
  let faultfs: string | null = null;
  let src: string;

  beforeAll(() => {
    tmp = tempDir('qimg-hygiene-');
    src = join(tmp.path, 'src32.raw');
    randomFile(src, 32 * MiB);

    const mnt = join(tmp.path, 'tmpfs');
    mkdirSync(mnt);
    const m = run('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]);
    if (m.status === 0) tmpfs = mnt;

    const so = join(tmp.path, 'faultfs.so');
    const cc = run('gcc', ['-shared', '-fPIC', '-O1', '-o', so, join(ROOT, 'test', 'hygiene', 'faultfs.c'), '-ldl'], { timeout: 60_000 });
    if (cc.status === 0) {
      // Does it take effect in Node (libuv must use libc's pwrite, not io_uring)?
      const probe = join(tmp.path, 'eio-probe', 'f');
      mkdirSync(join(tmp.path, 'eio-probe'));
      const r = run(process.execPath, ['-e', `require('fs').promises.writeFile(${JSON.stringify(probe)}, 'x').then(() => console.log('written'), (e) => console.log(e.code))`], {
        env: { ...process.env, LD_PRELOAD: so, UV_USE_IO_URING: '0', FAULT_PATH: join(tmp.path, 'eio-probe'), FAULT_WRITE_AFTER: '0' },
      });
      if (r.stdout.trim() === 'EIO') faultfs = so;
    }
  });

  afterAll(() => {
    if (tmpfs) {
      if (run('umount', [tmpfs]).status !== 0) run('umount', ['-l', tmpfs]);
    }
    tmp?.cleanup();
  });

  /** Runs qimg with writes failing (EIO) as `fault` says, for files under `path`. */
  function qimgFaulty(args: string[], path: string, fault: { writeAfter?: number; sync?: boolean }): RunResult {
    const env: NodeJS.ProcessEnv = { ...process.env, LD_PRELOAD: faultfs!, UV_USE_IO_URING: '0', FAULT_PATH: path };
    if (fault.writeAfter !== undefined) env.FAULT_WRITE_AFTER = String(fault.writeAfter);
    if (fault.sync) env.FAULT_SYNC = '1';
    return qimg(args, { env });
  }

  /** qimg under a file size limit (bytes, rounded down to KiB): writes past it fail with EFBIG. */
  function qimgLimited(limitBytes: number, args: string[], cwd?: string): RunResult {
    return run('bash', ['-c', `ulimit -f ${Math.floor(limitBytes / 1024)}; exec "$0" "$@"`, process.execPath, QIMG, ...args], { cwd });
  }

  /** An empty directory on the small tmpfs (emptied of what earlier tests left). */
  function onTmpfs(name: string): string {
    for (const f of readdirSync(tmpfs!)) rmSync(join(tmpfs!, f), { recursive: true, force: true });
    const d = join(tmpfs!, name);
    mkdirSync(d);
    return d;
  }

  // ------------------------------------------------------------ created outputs

  describe('a failed command removes the output it created', () => {
    let corrupt: string;
    beforeAll(() => {
      corrupt = join(tmp.path, 'corrupt.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', corrupt, '64M']));
      ok(qemuIo(['-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 40M 4M', corrupt]));
      corruptClusterOffset(corrupt, 40 * MiB);
    });

    it('convert of a corrupt source leaves no output: qcow2, raw, qcow2 with an external data file', () => {
      const dir = join(tmp.path, 'failed-convert');
      mkdirSync(dir);
      for (const [fmt, extra] of [
        ['qcow2', []],
        ['raw', []],
        ['qcow2', ['-c']],
        ['qcow2', ['-o', 'data_file=out.data']],
      ] as const) {
        const out = join(dir, `out.${fmt}`);
        const r = qimg(['convert', '-O', fmt, ...extra, corrupt, out]);
        expectFailed(r);
        expectOneCleanLine(r, /corrupt/i);
        expect(existsSync(out), `convert -O ${fmt} ${extra.join(' ')} left ${out}`).toBe(false);
        expect(existsSync(join(dir, 'out.data')), `convert ${extra.join(' ')} left its data file`).toBe(false);
      }
    });

    it('convert -n into an existing target that fails keeps the target (it was not created)', () => {
      const out = join(tmp.path, 'existing.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', out, '64M']));
      const r = qimg(['convert', '-n', '-O', 'qcow2', corrupt, out]);
      expectFailed(r);
      expectOneCleanLine(r, /corrupt/i);
      expect(existsSync(out)).toBe(true);
    });

    it('create that runs out of space leaves no image and no data file (tmpfs and a file size limit)', () => {
      const cases: Array<[string, string[], string[]]> = [
        ['full.qcow2', ['-f', 'qcow2', '-o', 'preallocation=full'], []],
        ['full.raw', ['-f', 'raw', '-o', 'preallocation=full'], []],
        ['ext.qcow2', ['-f', 'qcow2', '-o', 'data_file=ext.data,preallocation=full'], ['ext.data']],
      ];
      const dirs: Array<{ dir: string; limited: boolean }> = [];
      if (tmpfs) dirs.push({ dir: onTmpfs('create'), limited: false });
      const limitedDir = join(tmp.path, 'create-limited');
      mkdirSync(limitedDir);
      dirs.push({ dir: limitedDir, limited: true });
      for (const { dir, limited } of dirs) {
        for (const [name, opts, others] of cases) {
          const out = join(dir, name);
          const args = ['create', '-q', ...opts, out, '64M'];
          const r = limited ? qimgLimited(8 * MiB, args) : qimg(args);
          expectFailed(r);
          // raw words EFBIG as qemu's file protocol does: "The image size is too large for file format 'raw'"
          expectOneCleanLine(r, limited ? /File too large|image size is too large/ : /No space left on device/);
          expect(existsSync(out), `create ${opts.join(' ')} left ${out}`).toBe(false);
          for (const o of others) expect(existsSync(join(dir, o)), `create ${opts.join(' ')} left ${o}`).toBe(false);
        }
      }
    });
  });

  // ------------------------------------------------------------ read-only commands

  describe('read-only commands leave their inputs untouched (bytes and mtime)', () => {
    let dir: string;
    let base: string;
    let img: string;
    let other: string;
    let dirty: string;
    beforeAll(() => {
      dir = join(tmp.path, 'ro');
      mkdirSync(dir);
      base = join(dir, 'base.raw');
      randomFile(base, 4 * MiB);
      img = join(dir, 'img.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', img]));
      ok(qemuIo(['-c', 'write -P 0x5a 1M 512k', '-c', 'write -z 3M 64k', img]));
      ok(qemuImg(['snapshot', '-c', 'sn1', img]));
      ok(qemuIo(['-c', 'write -P 0x6b 2M 64k', img]));
      other = join(dir, 'other.qcow2');
      ok(qemuImg(['convert', '-O', 'qcow2', img, other]));
      ok(qemuIo(['-c', 'write -P 0x7c 0 4k', other]));
      // A lazy-refcount image left dirty (as by a crash): opening it read-only must not repair it.
      dirty = join(dir, 'dirty.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '4M']));
      ok(qemuIo(['-c', 'write -P 0x33 0 256k', dirty]));
      const fd = openSync(dirty, 'r+');
      const b = Buffer.alloc(8);
      readSync(fd, b, 0, 8, 72);
      b.writeBigUInt64BE(b.readBigUInt64BE(0) | 1n);
      writeSync(fd, b, 0, 8, 72);
      closeSync(fd);
    });

    const out = () => join(tmp.path, 'ro-out.img');
    const commands: Array<[string, () => string[], number[]]> = [
      ['info', () => ['info', img], [0]],
      ['info --output=json --backing-chain', () => ['info', '--output=json', '--backing-chain', img], [0]],
      ['info (dirty image)', () => ['info', dirty], [0]],
      ['map', () => ['map', img], [0]],
      ['map --output=json', () => ['map', '--output=json', img], [0]],
      ['check', () => ['check', img], [0]],
      ['check --output=json (dirty image)', () => ['check', '--output=json', dirty], [0, 2, 3]],
      ['compare', () => ['compare', img, other], [0, 1]],
      ['compare (dirty image)', () => ['compare', dirty, img], [0, 1]],
      ['measure', () => ['measure', '-O', 'qcow2', img], [0]],
      ['convert (source)', () => ['convert', '-O', 'qcow2', img, out()], [0]],
      ['convert -l (snapshot of the source)', () => ['convert', '-l', 'sn1', '-O', 'raw', img, out()], [0]],
      ['convert (dirty source)', () => ['convert', '-O', 'raw', dirty, out()], [0]],
      ['snapshot -l', () => ['snapshot', '-l', img], [0]],
      ['snapshot -l (dirty image)', () => ['snapshot', '-l', dirty], [0]],
    ];
    it.each(commands)('%s', (_name, args, codes) => {
      const frozen = freeze([base, img, other, dirty]);
      const r = qimg(args());
      expect(codes, `exit ${r.status}: ${r.stderr}`).toContain(r.status);
      expectUntouched(frozen, args().join(' '));
    });
  });

  // ------------------------------------------------------------ ENOSPC / EFBIG

  describe('a full filesystem in the middle of a convert or a commit', () => {
    it('convert onto a full tmpfs: exit 1, one line, no output', (ctx) => {
      // mounting needs root: without it the file-size-limit test below covers the rule
      if (!tmpfs) return ctx.skip('mount -t tmpfs is not permitted');
      const dir = onTmpfs('convert');
      for (const [fmt, extra] of OUTPUTS) {
        const outFile = join(dir, `out.${fmt}`);
        const r = qimg(['convert', '-O', fmt, ...extra, src, outFile]);
        expectFailed(r);
        expectOneCleanLine(r, /No space left on device/);
        expect(r.stderr).toContain(outFile);
        expect(existsSync(outFile), `convert -O ${fmt} ${extra.join(' ')} left its output`).toBe(false);
      }
    });

    it('convert past a file size limit (EFBIG): exit 1, one line, no output', () => {
      const dir = join(tmp.path, 'convert-limited');
      mkdirSync(dir);
      for (const [fmt, extra] of OUTPUTS) {
        const outFile = join(dir, `out.${fmt}`);
        const r = qimgLimited(8 * MiB, ['convert', '-O', fmt, ...extra, src, outFile]);
        expectFailed(r);
        expectOneCleanLine(r, /File too large|image size is too large/);
        expect(existsSync(outFile), `convert -O ${fmt} ${extra.join(' ')} left its output`).toBe(false);
      }
    });

    /** An overlay with 12 MiB of data over an empty 32 MiB base in `baseDir`. */
    function commitPair(name: string, baseDir: string): { top: string; base: string; before: string } {
      const base = join(baseDir, `${name}-base.qcow2`);
      const top = join(tmp.path, `${name}-top.qcow2`);
      ok(qemuImg(['create', '-q', '-f', 'qcow2', base, '32M']));
      ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]));
      ok(qemuIo(['-c', `write -s ${src} 0 12M`, top]));
      const before = guestRaw(top, join(tmp.path, `${name}-before.raw`));
      return { top, base, before };
    }

    function expectCommitFailedCleanly(r: RunResult, p: { top: string; base: string; before: string }, re: RegExp): void {
      expectFailed(r);
      expectOneCleanLine(r, re);
      // The error names BASE (the file that could not be written), not the overlay.
      expect(r.stderr).toContain(p.base);
      // Nothing was dropped from the overlay: the chain reads as before.
      expect(qemuImg(['compare', '-q', p.before, p.top]).status, 'chain content changed').toBe(0);
      // BASE may leak clusters, never be corrupt.
      const check = qemuImg(['check', p.base]);
      expect([0, 3], check.stdout + check.stderr).toContain(check.status);
    }

    it('commit into a base on a full tmpfs: exit 1, one line naming the base, the overlay intact', (ctx) => {
      if (!tmpfs) return ctx.skip('mount -t tmpfs is not permitted');
      const p = commitPair('tmpfs', onTmpfs('commit'));
      expectCommitFailedCleanly(qimg(['commit', p.top]), p, /No space left on device/);
    });

    it('commit into a base past a file size limit (EFBIG): exit 1, one line naming the base, the overlay intact', () => {
      const dir = join(tmp.path, 'commit-limited');
      mkdirSync(dir);
      const p = commitPair('limited', dir);
      expectCommitFailedCleanly(qimgLimited(4 * MiB, ['commit', p.top]), p, /File too large/);
    });

    it('metadata that no longer fits at the end of a convert is an error, not exit 0', (ctx) => {
      // (a size limit cannot strike the metadata: it lies below the data; the fsync
      // failures below cover metadata flush errors without root)
      if (!tmpfs) return ctx.skip('mount -t tmpfs is not permitted');
      // 6 MiB of data: the output's allocated size is known from a conversion elsewhere;
      // the tmpfs gets 32 KiB less, so the data fits and the L2 table written at the end does not.
      const six = join(tmp.path, 'six.raw');
      randomFile(six, 6 * MiB);
      const ref = join(tmp.path, 'six.qcow2');
      ok(qimg(['convert', '-O', 'qcow2', six, ref]));
      const allocated = statSync(ref).blocks * 512;
      const mnt = join(tmp.path, 'meta-tmpfs');
      mkdirSync(mnt);
      ok(run('mount', ['-t', 'tmpfs', '-o', `size=${Math.floor(allocated / 1024) - 32}k`, 'tmpfs', mnt]), 'mount');
      try {
        const outFile = join(mnt, 'out.qcow2');
        const r = qimg(['convert', '-p', '-O', 'qcow2', six, outFile]);
        expectFailed(r);
        expectOneCleanLine(r, /No space left on device/);
        expect(existsSync(outFile)).toBe(false);
        // All data was copied before the failure: it was the metadata that did not fit.
        expect(r.stdout).toContain('(100.00/100%)');
      } finally {
        run('umount', [mnt]);
      }
    });
  });

  // ------------------------------------------------------------ EIO

  describe('EIO (fault injector)', () => {
    it('EIO in the middle of a convert: exit 1, one line, no output', (ctx) => {
      if (!faultfs) return ctx.skip('no gcc for the LD_PRELOAD fault injector');
      const dir = join(tmp.path, 'eio-convert');
      mkdirSync(dir);
      for (const [fmt, extra] of OUTPUTS) {
        const outFile = join(dir, `out.${fmt}`);
        const r = qimgFaulty(['convert', '-O', fmt, ...extra, src, outFile], dir, { writeAfter: 4 * MiB });
        expectFailed(r);
        expectOneCleanLine(r, /Input\/output error/);
        expect(r.stderr).toContain(outFile);
        expect(existsSync(outFile)).toBe(false);
      }
    });

    it('EIO in the middle of a commit: exit 1, one line naming the base, the overlay intact', (ctx) => {
      if (!faultfs) return ctx.skip('no gcc for the LD_PRELOAD fault injector');
      const dir = join(tmp.path, 'eio-commit');
      mkdirSync(dir);
      const base = join(dir, 'base.qcow2');
      const top = join(tmp.path, 'eio-top.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', base, '32M']));
      ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]));
      ok(qemuIo(['-c', `write -s ${src} 0 12M`, top]));
      const before = guestRaw(top, join(tmp.path, 'eio-before.raw'));
      const r = qimgFaulty(['commit', top], base, { writeAfter: 4 * MiB });
      expectFailed(r);
      expectOneCleanLine(r, /Input\/output error/);
      expect(r.stderr).toContain(base);
      expect(qemuImg(['compare', '-q', before, top]).status).toBe(0);
    });

    it('a failing fsync (metadata flush) is never exit 0', (ctx) => {
      if (!faultfs) return ctx.skip('no gcc for the LD_PRELOAD fault injector');
      const dir = join(tmp.path, 'eio-sync');
      mkdirSync(dir);
      const fresh = (name: string, opts: string[] = []) => {
        const f = join(dir, name);
        ok(qemuImg(['create', '-q', '-f', 'qcow2', ...opts, f, '16M']));
        ok(qemuIo(['-c', 'write -P 0x44 0 1M', '-c', 'write -z 2M 64k', f]));
        return f;
      };
      // commit: BASE is flushed before the overlay is emptied
      const base = fresh('sync-base.qcow2');
      const top = join(dir, 'sync-top.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]));
      ok(qemuIo(['-c', 'write -P 0x55 4M 1M', top]));
      const cases: Array<[string, string[], string, string?]> = [
        ['commit', ['commit', top], base],
        ['convert -t writeback', ['convert', '-t', 'writeback', '-O', 'qcow2', src, join(dir, 'wb.qcow2')], dir, join(dir, 'wb.qcow2')],
        ['snapshot -c', ['snapshot', '-c', 's1', fresh('snap.qcow2')], dir],
        ['amend -o compat=0.10', ['amend', '-o', 'compat=0.10', fresh('amend.qcow2')], dir],
        ['resize', ['resize', fresh('resize.qcow2'), '32M'], dir],
        ['create', ['create', '-q', '-f', 'qcow2', join(dir, 'new.qcow2'), '16M'], dir, join(dir, 'new.qcow2')],
        ['check -r leaks', ['check', '-r', 'leaks', withLeak(fresh('leaky.qcow2'))], dir],
        ['rebase -u', ['rebase', '-u', '-b', 'sync-base.qcow2', '-F', 'qcow2', fresh('rebase.qcow2')], dir],
      ];
      for (const [name, args, faultPath, output] of cases) {
        const r = qimgFaulty(args, faultPath, { sync: true });
        expect(r.status, `${name} with a failing fsync exited 0`).not.toBe(0);
        if (name.startsWith('check')) {
          // check reports what it repairs on stderr first (as qemu-img); the error comes last
          expect(r.stderr.trim().split('\n').pop()).toMatch(/^qimg: .*Input\/output error/);
          expect(r.stderr).not.toMatch(/^\s+at /m);
        } else expectOneCleanLine(r, /Input\/output error/);
        if (output) expect(existsSync(output), `${name} left its output`).toBe(false);
      }
    });

    it('the library: flush() and close() reject when fsync fails', (ctx) => {
      if (!faultfs) return ctx.skip('no gcc for the LD_PRELOAD fault injector');
      const dir = join(tmp.path, 'eio-lib');
      mkdirSync(dir);
      const f = join(dir, 'lib.qcow2');
      ok(qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']));
      const script = join(tmp.path, 'flush-probe.mjs');
      writeFileSync(
        script,
        `import { openImage } from ${JSON.stringify(join(ROOT, 'dist', 'index.js'))};
const img = await openImage(${JSON.stringify(f)}, { writable: true });
await img.write(0, Buffer.alloc(65536, 1));
const out = [];
try { await img.flush(); out.push('flush resolved'); } catch (e) { out.push('flush rejected: ' + e.message); }
try { await img.close(); out.push('close resolved'); } catch (e) { out.push('close rejected: ' + e.message); }
console.log(out.join('\\n'));
`,
      );
      const r = run(process.execPath, [script], { env: { ...process.env, LD_PRELOAD: faultfs, UV_USE_IO_URING: '0', FAULT_PATH: dir, FAULT_SYNC: '1' } });
      expect(r.stdout).toMatch(/^flush rejected: .*i\/o error/im);
      expect(r.stdout).toMatch(/^close rejected: .*i\/o error/im);
    });
  });
});
