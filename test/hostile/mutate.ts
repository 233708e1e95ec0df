/**
 * Helpers for the hostile-input suite: byte patches on image copies, and one runner
 * that checks what every hostile case must hold: a clean exit (0, or 1 with exactly
 * one `qimg: ` line on stderr, nothing on stdout, no stack trace), a process that
 * ends (10 s spawn timeout as a hang guard, no timing asserted), an input left
 * untouched (sha256 and mtime), no output left behind by a failed convert, and, where
 * qemu-img can safely run on the same file, the same success/failure as qemu-img.
 */
import { copyFileSync, existsSync, openSync, closeSync, readFileSync, readSync, writeSync, ftruncateSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { spawn } from 'node:child_process';
import { QIMG, sha256File, type RunResult } from '../helpers/qemu.js';

/** info, map --output=json, convert -O raw, and info --backing-chain */
export type Cmd = 'info' | 'map' | 'convert' | 'chain';

/** A hang guard only: every command here finishes in well under a second. */
const TIMEOUT = 10_000;

// ---------------------------------------------------------------- byte patches

export function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function readAt(file: string, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const fd = openSync(file, 'r');
  try {
    readSync(fd, buf, 0, length, offset);
  } finally {
    closeSync(fd);
  }
  return buf;
}

export function setU8(file: string, offset: number, v: number): void {
  patch(file, offset, Buffer.from([v]));
}

export function setU16(file: string, offset: number, v: number): void {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  patch(file, offset, b);
}

export function setU32(file: string, offset: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  patch(file, offset, b);
}

export function setU64(file: string, offset: number, v: bigint | number): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(v)));
  patch(file, offset, b);
}

export function getU32(file: string, offset: number): number {
  return readAt(file, offset, 4).readUInt32BE(0);
}

export function getU64(file: string, offset: number): bigint {
  return readAt(file, offset, 8).readBigUInt64BE(0);
}

export function truncateTo(file: string, length: number): void {
  const fd = openSync(file, 'r+');
  try {
    ftruncateSync(fd, length);
  } finally {
    closeSync(fd);
  }
}

/** Header field offsets (docs/interop/qcow2.txt). */
export const H = {
  magic: 0,
  version: 4,
  backingOffset: 8,
  backingSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1Offset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatible: 72,
  compatible: 80,
  autoclear: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

export interface Extension {
  type: number;
  /** offset of the extension's type field */
  at: number;
  length: number;
}

/** The header extensions of a v3 image, as QEMU lays them out. */
export function extensions(file: string): Extension[] {
  const headerLength = getU32(file, H.headerLength);
  const area = readAt(file, headerLength, 4096);
  const out: Extension[] = [];
  for (let pos = 0; pos + 8 <= area.length; ) {
    const type = area.readUInt32BE(pos);
    const length = area.readUInt32BE(pos + 4);
    if (type === 0) break;
    out.push({ type, at: headerLength + pos, length });
    pos += 8 + ((length + 7) & ~7);
  }
  return out;
}

export function extension(file: string, type: number): Extension {
  const e = extensions(file).find((x) => x.type === type);
  if (!e) throw new Error(`${file}: no header extension 0x${type.toString(16)}`);
  return e;
}

export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;

/** Host offset of the L2 table for L1 index `i` (from the image itself). */
export function l2Offset(file: string, i = 0): number {
  const l1 = Number(getU64(file, H.l1Offset));
  return Number(getU64(file, l1 + 8 * i) & 0x00fffffffffffe00n);
}

// ---------------------------------------------------------------- running

export interface Fingerprint {
  sha: string;
  mtimeMs: number;
  size: number;
}

export function fingerprint(file: string): Fingerprint {
  const st = statSync(file);
  return { sha: sha256File(file), mtimeMs: st.mtimeMs, size: st.size };
}

export function copyTo(src: string, dir: string, name: string): string {
  const dst = join(dir, name);
  copyFileSync(src, dst);
  return dst;
}

/** Arguments of each command, relative to the image's directory. */
export function argsFor(cmd: Cmd, file: string, out = 'out.raw'): string[] {
  switch (cmd) {
    case 'info':
      return ['info', file];
    case 'map':
      return ['map', '--output=json', file];
    case 'convert':
      return ['convert', '-O', 'raw', file, out];
    case 'chain':
      return ['info', '--backing-chain', file];
  }
}

/** map --output=json ranges, without the "compressed" key qemu 7.2 does not print. */
export function mapRanges(text: string): Array<Record<string, unknown>> {
  return (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
}

/** What internal failures look like when they leak into a message. */
const INTERNAL = /TypeError|RangeError|ReferenceError|ERR_[A-Z_]{3,}|Cannot read propert|\bundefined\b|\bNaN\b|Infinity|0x-|\0/;

export function expectCleanFailure(r: RunResult, message: string | RegExp, what = ''): void {
  const ctx = `${what}\nstatus ${r.status}\nstderr: ${r.stderr}\nstdout: ${r.stdout.slice(0, 500)}`;
  expect(r.status, ctx).toBe(1);
  expect(r.stdout, ctx).toBe('');
  expect(r.stderr, ctx).toMatch(/^qimg: [^\n]+\n$/);
  expect(r.stderr, ctx).not.toContain('    at ');
  expect(r.stderr, ctx).not.toMatch(INTERNAL);
  if (typeof message === 'string') expect(r.stderr, ctx).toContain(message);
  else expect(r.stderr, ctx).toMatch(message);
}

export function expectSuccess(r: RunResult, what = ''): void {
  const ctx = `${what}\nstatus ${r.status}\nstderr: ${r.stderr}`;
  expect(r.status, ctx).toBe(0);
  expect(r.stderr, ctx).toBe('');
}

/**
 * A finished process (as helpers/qemu.ts's run, but asynchronous). The hang guard
 * kills the whole process group, so that a command run under /usr/bin/time goes too.
 */
export function runAsync(cmd: string, args: string[], cwd: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    let hung = false;
    const timer = setTimeout(() => {
      hung = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
    }, TIMEOUT);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (hung) {
        reject(new Error(`${cmd} ${args.join(' ')} did not finish within ${TIMEOUT / 1000} s (hang guard)`));
        return;
      }
      resolve({
        status: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

/** Runs qimg with the hang guard. */
export function runQimg(args: string[], cwd: string): Promise<RunResult> {
  return runAsync(process.execPath, [QIMG, ...args], cwd);
}

const TIME = '/usr/bin/time';
export const hasTime = existsSync(TIME);

/**
 * Runs qimg under GNU time (when there is one) for its peak RSS in KiB; the report
 * goes to a file of its own so that qimg's stderr stays as it is.
 */
export async function runQimgPeak(args: string[], cwd: string): Promise<RunResult & { rssKb?: number }> {
  if (!hasTime) return runQimg(args, cwd);
  const report = join(cwd, `time-${args[0]}-${process.hrtime.bigint()}.txt`);
  const r = await runAsync(TIME, ['-o', report, '-f', '%M', process.execPath, QIMG, ...args], cwd);
  const rssKb = Number(readFileSync(report, 'utf8').trim().split('\n').pop());
  rmSync(report);
  return { ...r, rssKb };
}

/** Runs qemu-img with the same guard (only where it is known not to hang). */
export function runQemu(args: string[], cwd: string): Promise<RunResult> {
  return runAsync('qemu-img', args, cwd);
}

export type Outcome = 'ok' | string | RegExp;

export interface Expectation {
  /** per command: 'ok' (exit 0) or the error message expected */
  expect: Partial<Record<Cmd, Outcome>>;
  /**
   * commands where qimg deliberately disagrees with qemu-img on success/failure
   * (the reason is the value); qemu-img's opposite result is asserted
   */
  differs?: Partial<Record<Cmd, string>>;
  /** commands not to run qemu-img for (it hangs, or would follow a hostile name) */
  noQemu?: Cmd[] | true;
  /** extra checks of a successful qimg run */
  then?: (cmd: Cmd, r: RunResult) => void;
  /** -f for both tools */
  format?: string;
  /** peak RSS bound for every qimg run, in KiB (checked where /usr/bin/time exists) */
  maxRssKb?: number;
}

/**
 * Runs each expected command on `name` (inside `dir`) with qimg and, unless told not
 * to, with qemu-img, all at once; checks the outcomes, the untouched input, convert's
 * output, and that both tools agree (and read the same data where both succeed).
 */
export async function checkImage(dir: string, name: string, e: Expectation, withQemu: boolean): Promise<void> {
  const file = join(dir, name);
  const before = fingerprint(file);
  const fmt = e.format ? ['-f', e.format] : [];
  const cmds = Object.keys(e.expect) as Cmd[];
  const argv = (cmd: Cmd, out: string) => {
    const a = argsFor(cmd, name, out);
    a.splice(1, 0, ...fmt);
    return a;
  };
  const useQemu = (cmd: Cmd) => withQemu && e.noQemu !== true && !(e.noQemu ?? []).includes(cmd);
  const runs = await Promise.all(
    cmds.map(async (cmd) => {
      const [r, q] = await Promise.all([
        e.maxRssKb ? runQimgPeak(argv(cmd, 'out-qimg.raw'), dir) : runQimg(argv(cmd, 'out-qimg.raw'), dir),
        useQemu(cmd) ? runQemu(argv(cmd, 'out-qemu.raw'), dir) : Promise.resolve(null),
      ]);
      return { cmd, r, q };
    }),
  );
  const after = fingerprint(file);
  const qimgOut = join(dir, 'out-qimg.raw');
  const qemuOut = join(dir, 'out-qemu.raw');
  try {
    for (const { cmd, r, q } of runs) {
      const outcome = e.expect[cmd]!;
      const what = `qimg ${argv(cmd, 'out-qimg.raw').join(' ')}`;
      const rss = (r as { rssKb?: number }).rssKb;
      if (e.maxRssKb && rss !== undefined) expect(rss, `${what}: peak RSS ${rss} KiB`).toBeLessThan(e.maxRssKb);
      if (outcome === 'ok') {
        expectSuccess(r, what);
        e.then?.(cmd, r);
      } else {
        expectCleanFailure(r, outcome, what);
        // A failed convert removes what it created.
        if (cmd === 'convert') expect(existsSync(qimgOut), `${what}: output left behind`).toBe(false);
      }
      if (!q) continue;
      const qemuOk = q.status === 0;
      const qimgOk = outcome === 'ok';
      const reason = e.differs?.[cmd];
      const ctx = `qemu-img ${argv(cmd, 'out-qemu.raw').join(' ')}: status ${q.status}, ${q.stderr.trim()}${reason ? ` (qimg differs: ${reason})` : ''}`;
      expect(qemuOk, ctx).toBe(reason ? !qimgOk : qimgOk);
      // Where both read the image, they must read the same thing.
      if (qemuOk && qimgOk && cmd === 'map') expect(mapRanges(r.stdout), `${what} vs qemu-img`).toEqual(mapRanges(q.stdout));
      if (qemuOk && qimgOk && cmd === 'convert') expect(sha256File(qimgOut), `${what}: output vs qemu-img's`).toBe(sha256File(qemuOut));
    }
    // Neither tool may write to the image (qemu-img opens it read-only too).
    expect(after, `the input changed`).toEqual(before);
  } finally {
    rmSync(qimgOut, { force: true });
    rmSync(qemuOut, { force: true });
  }
}
