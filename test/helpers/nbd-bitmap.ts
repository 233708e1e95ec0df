/**
 * Reading the persistent dirty bitmaps of an image the way QEMU sees them: the image is
 * served read-only by qemu-nbd with the bitmaps exported (`-B NAME`), and nbdinfo maps
 * the `qemu:dirty-bitmap:NAME` meta context. The list of bitmaps, their flags and
 * granularities come from `qemu-img info`. Under CI=true a missing qemu-nbd or nbdinfo
 * fails the suite instead of skipping it (as qemuAvailable does for qemu-img).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stopPidSync } from './processes.js';

const hasNbdTools = spawnSync('qemu-nbd', ['--version']).status === 0 && spawnSync('nbdinfo', ['--version']).status === 0;

/** Call at the top of a test file that reads bitmaps through NBD; returns whether to run its tests. */
export function nbdToolsAvailable(): boolean {
  if (!hasNbdTools && process.env.CI === 'true') {
    throw new Error('qemu-nbd and nbdinfo are required under CI=true (install qemu-utils and libnbd-bin)');
  }
  return hasNbdTools;
}

/** One element of `format-specific.data.bitmaps` of `qemu-img info --output=json`. */
export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

/** [offset, length] of one run of dirty bytes. */
export type Range = [number, number];

function sh(cmd: string, args: string[], what: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000, maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${what} failed (${r.status ?? r.signal}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** The bitmaps `qemu-img info` lists for `file` (empty when it has none); forceShare: -U (the image is open elsewhere). */
export function bitmapsOf(file: string, format = 'qcow2', opts: { forceShare?: boolean } = {}): BitmapInfo[] {
  const args = ['info', ...(opts.forceShare ? ['-U'] : []), '-f', format, '--output=json', file];
  const info = JSON.parse(sh('qemu-img', args, `qemu-img info ${file}`));
  const list = (info['format-specific']?.data?.bitmaps ?? []) as BitmapInfo[];
  return list.map((b) => ({ name: b.name, granularity: b.granularity, flags: [...b.flags] }));
}


/** Sorts and merges touching or overlapping ranges. */
export function mergeRanges(ranges: Range[]): Range[] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out: Range[] = [];
  for (const [off, len] of sorted) {
    if (len <= 0) continue;
    const last = out[out.length - 1];
    if (last && off <= last[0] + last[1]) last[1] = Math.max(last[1], off + len - last[0]);
    else out.push([off, len]);
  }
  return out;
}

interface NbdExtent {
  offset: number;
  length: number;
  type: number;
}

/**
 * The dirty ranges of several bitmaps of `file`, from one qemu-nbd session: name → merged
 * [offset, length] list. The bitmaps must be exportable (not in-use: qemu-nbd refuses an
 * inconsistent bitmap). qemu-nbd is always stopped by its pid, also when a step fails.
 */
export function dirtyRangesOf(file: string, names: string[], format = 'qcow2'): Record<string, Range[]> {
  const result: Record<string, Range[]> = {};
  if (names.length === 0) return result;
  const dir = mkdtempSync(join(tmpdir(), 'qimg-nbd-'));
  const sock = join(dir, 'nbd.sock');
  const pidFile = join(dir, 'qemu-nbd.pid');
  let pid = 0;
  try {
    // -t: stay up for one nbdinfo connection per bitmap.
    const args = ['-r', '-t', '-f', format, ...names.flatMap((n) => ['-B', n]), '--socket', sock, '--fork', '--pid-file', pidFile, file];
    const r = spawnSync('qemu-nbd', args, { encoding: 'utf8', timeout: 30_000 });
    if (existsSync(pidFile)) pid = Number(readFileSync(pidFile, 'utf8').trim());
    if (r.error) throw r.error;
    if (r.status !== 0) throw new Error(`qemu-nbd ${file} failed (${r.status ?? r.signal}): ${r.stderr}${r.stdout}`);
    if (!pid) throw new Error(`qemu-nbd ${file} wrote no pid file`);
    // One nbdinfo per bitmap, all at once (names passed through the environment).
    const env: NodeJS.ProcessEnv = { ...process.env, URI: `nbd+unix:///?socket=${sock}`, D: dir };
    const script = names.map((n, i) => {
      env[`B${i}`] = `qemu:dirty-bitmap:${n}`;
      return `( nbdinfo "--map=$B${i}" --json "$URI" > "$D/m${i}" 2> "$D/e${i}"; echo $? > "$D/s${i}" ) &`;
    });
    const r2 = spawnSync('sh', ['-c', `${script.join('\n')}\nwait`], { env, encoding: 'utf8', timeout: 60_000 });
    if (r2.error) throw r2.error;
    names.forEach((name, i) => {
      const status = existsSync(join(dir, `s${i}`)) ? readFileSync(join(dir, `s${i}`), 'utf8').trim() : 'none';
      if (status !== '0') throw new Error(`nbdinfo --map=qemu:dirty-bitmap:${name} ${file} failed (${status}): ${readFileSync(join(dir, `e${i}`), 'utf8')}`);
      const extents = JSON.parse(readFileSync(join(dir, `m${i}`), 'utf8')) as NbdExtent[];
      result[name] = mergeRanges(extents.filter((e) => (e.type & 1) !== 0).map((e): Range => [e.offset, e.length]));
    });
    return result;
  } finally {
    if (!pid && existsSync(pidFile)) pid = Number(readFileSync(pidFile, 'utf8').trim());
    if (pid) stopPidSync(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The dirty ranges of bitmap `bitmapName` of `file` (merged, sorted). */
export function dirtyRanges(file: string, bitmapName: string, format = 'qcow2'): Range[] {
  return dirtyRangesOf(file, [bitmapName], format)[bitmapName];
}

/** Everything QEMU reports about the bitmaps of an image. */
export interface BitmapState {
  bitmaps: BitmapInfo[];
  /** dirty ranges of each bitmap that is not in-use (qemu-nbd cannot export an in-use one) */
  dirty: Record<string, Range[]>;
}

/** `bitmapsOf` plus the dirty ranges of each consistent bitmap. */
export function bitmapState(file: string, format = 'qcow2'): BitmapState {
  const bitmaps = bitmapsOf(file, format);
  const names = bitmaps.filter((b) => !b.flags.includes('in-use')).map((b) => b.name);
  return { bitmaps, dirty: dirtyRangesOf(file, names, format) };
}

/** An interactive qemu-io holding an image open read-write. */
export interface QemuIoSession {
  /** Runs one qemu-io command and returns its output. */
  run(command: string): Promise<string>;
  /** Closes the image cleanly (`quit`) and waits for qemu-io to exit. */
  quit(): Promise<void>;
  /** Kills qemu-io with SIGKILL (the image is left as a crash leaves it) and waits for it. */
  kill(): Promise<void>;
}

/** Starts an interactive qemu-io on `file` and waits until it has opened the image. */
export async function qemuIoSession(file: string, cwd?: string, format = 'qcow2'): Promise<QemuIoSession> {
  const child = spawn('qemu-io', ['-f', format, file], { cwd, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let seen = 0;
  let waiter: (() => void) | undefined;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    waiter?.();
  });
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  child.once('exit', () => waiter?.());
  const prompt = () =>
    new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`qemu-io ${file}: no prompt after 10 s: ${out}`)), 10_000);
      waiter = () => {
        const at = out.indexOf('qemu-io> ', seen);
        if (at >= 0) {
          clearTimeout(timer);
          waiter = undefined;
          const text = out.slice(seen, at);
          seen = at + 'qemu-io> '.length;
          resolve(text);
        } else if (child.exitCode !== null || child.signalCode !== null) {
          clearTimeout(timer);
          reject(new Error(`qemu-io ${file} exited (${child.exitCode ?? child.signalCode}): ${out}`));
        }
      };
      waiter();
    });
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  try {
    await prompt();
  } catch (e) {
    await kill();
    throw e;
  }
  return {
    async run(command: string) {
      child.stdin.write(`${command}\n`);
      return prompt();
    },
    async quit() {
      child.stdin.end('quit\n');
      await exited;
    },
    kill,
  };
}

/**
 * Makes an in-use (inconsistent) persistent bitmap the way it happens in real life: opens
 * `file` read-write in an interactive qemu-io (QEMU marks every bitmap in-use on disk as
 * it opens the image) and kills it with SIGKILL. Every bitmap the image has at that
 * moment is left in-use.
 */
export async function leaveBitmapsInUse(file: string, cwd?: string, format = 'qcow2'): Promise<void> {
  const s = await qemuIoSession(file, cwd, format);
  await s.kill();
}
