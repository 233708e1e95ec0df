/**
 * `qimg bench` against `qemu-img bench` as the oracle: piped stdout is qemu-img's lines
 * (the time aside) for reads and writes, flush intervals and every option; bad values
 * give qemu-img's messages in qemu-img's order; write runs leave the image reading as
 * qemu-img's run leaves it (two copies, qemu-img compare); requests that leave the
 * image fail as in qemu; a 0-byte image gets a clear error where qemu-img 7.2 dies of
 * SIGFPE. The operation itself is checked on a recording image: `depth` requests in
 * flight through read/write, at qemu's offsets, with the flushes the interval asks for.
 * On a terminal a summary table follows qemu-img's lines.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile, spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BlockImage, ImageInfo, LayerStatus } from '../../src/core/block-image.js';
import { bench } from '../../src/ops/bench.js';
import { QIMG, ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-bench-');
afterAll(() => tmp.cleanup());
const p = (name: string) => join(tmp.path, name);

function runAsync(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd: tmp.path, encoding: 'utf8', timeout: 60_000 }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') return reject(err);
      resolve({ status: err ? (err.code as number) : 0, stdout, stderr });
    });
  });
}

async function inParallel<T>(items: readonly T[], fn: (item: T) => Promise<unknown>, limit = 3): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/** Output as qimg prints it: its name, the size message on one line, no time. */
const normal = (s: string) =>
  s
    .replace(/qemu-img/g, 'qimg')
    .replace(/ for\nqimg: kilobytes/g, ' for kilobytes')
    .replace(/Run completed in \d+\.\d{3} seconds\./g, 'Run completed in T seconds.');

/**
 * Both tools with the same arguments: exit code, stdout and stderr must agree. Write
 * runs go one after the other (each takes the image's write lock).
 */
async function same(args: string[]): Promise<RunResult> {
  const q = args.includes('-w') ? await runAsync('qemu-img', ['bench', ...args]) : undefined;
  const [q2, m] = await Promise.all([q ?? runAsync('qemu-img', ['bench', ...args]), runAsync(process.execPath, [QIMG, 'bench', ...args])]);
  return check(args, q2, m);
}

function check(args: string[], q: RunResult, m: RunResult): RunResult {
  const what = `bench ${args.join(' ')}`;
  expect(m.status, what).toBe(q.status);
  expect(normal(m.stdout), what).toBe(normal(q.stdout));
  expect(m.stderr, what).toBe(normal(q.stderr));
  if (m.status === 0) expect(m.stdout, what).toMatch(/Run completed in \d+\.\d{3} seconds\.\n$/);
  return m;
}

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'raw', p('r.raw'), '4M']));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', p('q.qcow2'), '4M']));
  ok(qemuIo(['-c', 'write -P 9 0 1M', p('q.qcow2')]));
  ok(qemuImg(['create', '-q', '-f', 'raw', p('s10k.raw'), '10k']));
  writeFileSync(p('empty.raw'), '');
});

describe.skipIf(!enabled)('bench output', () => {
  it('piped stdout is exactly qemu-img\'s lines (reads, writes, flush intervals, options)', async () => {
    const cases = [
      ['-c', '1000', 'q.qcow2'],
      ['-c', '500', '-f', 'raw', 'r.raw'],
      ['-c', '100', '-d', '1', '-s', '512', '-S', '8k', '-o', '1k', 'q.qcow2'],
      ['-c', '100', '-d', '100000', 'r.raw'],
      ['-c', '0', 'r.raw'],
      ['-c', '200', '-s', '0', 'r.raw'],
      ['-c', '0x10', '-d', '010', '--pattern', '0x7f', 'r.raw'],
      ['-c', '100', '-w', '-f', 'raw', '--pattern=7', 'r.raw'],
      ['-c', '100', '-w', '-f', 'qcow2', '--flush-interval=64', 'q.qcow2'],
      ['-c', '100', '-w', '-f', 'raw', '--flush-interval=100', '--no-drain', 'r.raw'],
      ['-c', '100', '-w', '-f', 'raw', '--flush-interval=0', '--no-drain', 'r.raw'],
      ['-c', '10', '-d', '4', '-w', '-f', 'raw', '--flush-interval=4', '-t', 'unsafe', 'r.raw'],
      ['-c', '10', '-q', 'r.raw'], // 7.2 prints its lines even with -q
      ['-c', '10', '-n', '-t', 'none', 'r.raw'],
      ['-c', '10', '-i', 'native', '-t', 'directsync', 'r.raw'],
      ['-c', '10', '-i', 'io_uring', '-t', 'writethrough', '-U', 'q.qcow2'],
      ['-c', '10', '--image-opts', 'driver=qcow2,file.filename=q.qcow2'],
      ['-c', '10', '-n', '--image-opts', 'driver=raw,file.filename=r.raw,cache.direct=on'],
      ['-c', '2', '-f', 'raw', 's10k.raw'],
      ['-c', '3', '-S', '6k', '-f', 'raw', 's10k.raw'], // wraps around the end
      ['-c', '2', '-d', '1', '-o', '10k', '-s', '0', '-f', 'raw', 's10k.raw'],
      ['-c', '0', 'empty.raw'],
    ];
    // the write runs one at a time, apart from the reads of the same images
    await inParallel(cases.filter((c) => !c.includes('-w')), (c) => same(c));
    for (const c of cases.filter((c) => c.includes('-w'))) await same(c);
  });

  it('10.1 long option names give the same run as the short ones', async () => {
    const long = await runAsync(process.execPath, [
      QIMG, 'bench', '--count=300', '--depth', '8', '--buffer-size=2k', '--step-size=6k', '--offset=512', '--format=qcow2', '--cache=writeback', '--aio=threads', '--force-share', '--quiet', 'q.qcow2',
    ]);
    const short = ok(qemuImg(['bench', '-c', '300', '-d', '8', '-s', '2k', '-S', '6k', '-o', '512', '-f', 'qcow2', '-t', 'writeback', '-i', 'threads', '-U', '-q', 'q.qcow2'], tmp.path));
    expect(long.status).toBe(0);
    expect(normal(long.stdout)).toBe(normal(short.stdout));
  });

  it('bad values, combinations and opens: qemu-img\'s messages, first bad option first', async () => {
    const cases = [
      ['-c', '-1', 'r.raw'],
      ['-c', 'x', 'r.raw'],
      ['-c', '1k', 'r.raw'],
      ['-c', '08', 'r.raw'],
      ['-c', '2147483648', 'r.raw'],
      ['-d', 'x', 'r.raw'],
      ['-d', '2147483648', '-c', '1', 'r.raw'],
      ['-o', 'x', 'r.raw'],
      ['-s', 'x', 'r.raw'],
      ['-s', '2G', 'r.raw'],
      ['-S', '3G', 'r.raw'],
      ['--pattern=256', '-w', 'r.raw'],
      ['--pattern=x', 'r.raw'],
      ['--flush-interval=x', '-w', 'r.raw'],
      ['-c', '100', '--flush-interval=10', 'r.raw'], // reads
      ['-c', '100', '-w', '--flush-interval=10', 'r.raw'], // smaller than the depth
      ['-t', 'foo', '-c', 'x', 'r.raw'], // in command-line order
      ['-c', 'x', '-t', 'foo', 'r.raw'],
      ['-i', 'aio', '-c', '1', 'r.raw'],
      ['-t', 'NONE', 'r.raw'],
      ['-c', '1'],
      ['-c', '1', 'a', 'b'],
      ['--flush-interval=1', 'r.raw', 'r.raw'],
      ['-c'],
      ['--bogus', 'r.raw'],
      ['-n', '-c', '1', 'r.raw'],
      ['-n', '-t', 'writethrough', '-c', '1', 'r.raw'],
      ['-i', 'native', '-i', 'threads', '-c', '1', 'r.raw'],
      ['-n', '-c', '1', '--image-opts', 'driver=raw,file.filename=r.raw'],
      ['-U', '-w', '-c', '1', 'r.raw'],
      ['-U', '-c', '1', '--image-opts', 'driver=raw,file.filename=r.raw,force-share=off'],
      ['-w', '-c', '1', '--image-opts', 'driver=raw,file.filename=r.raw,read-only=on'],
      ['--image-opts', '-f', 'raw', 'driver=raw,file.filename=r.raw'],
      // requests that leave the image: the run fails after qemu-img's lines
      ['-c', '10', '-o', '4M', '-f', 'raw', 'r.raw'],
      ['-c', '3', '-d', '1', '-f', 'raw', 's10k.raw'],
      ['-c', '2', '-d', '1', '-o', '11k', '-s', '0', '-f', 'raw', 's10k.raw'],
    ];
    await inParallel(cases, (c) => same(c));
    // where qimg keeps its own wording for open failures (as every qimg command)
    for (const [args, text] of [
      [['-c', '1', 'nonexist'], "qimg: Could not open 'nonexist': No such file or directory\n"],
      [['-n', '-c', '1', 'nonexist'], "qimg: Could not open 'nonexist': No such file or directory\n"],
      [['-c', '1', '-f', 'foo', 'r.raw'], "qimg: r.raw: Unknown driver 'foo'\n"],
      [['-c', '1', '-f', 'qcow2', 'r.raw'], 'qimg: r.raw: Image is not in qcow2 format\n'],
      // 10.1's --object (7.2's bench has none), refused as the other commands refuse it
      [['--object', 'foo,id=x', 'r.raw'], "qimg: Parameter 'qom-type' does not accept value 'foo'\n"],
    ] as const) {
      const m = qimg(['bench', ...args], { cwd: tmp.path });
      expect(m.status).toBe(1);
      expect(m.stdout).toBe('');
      expect(m.stderr).toBe(text);
    }
  });

  it('a 0-byte image: one clear error line, exit 1, no crash (qemu-img 7.2 dies of SIGFPE)', () => {
    expect(spawnSync('qemu-img', ['bench', '-c', '1', '-f', 'raw', p('empty.raw')]).signal).toBe('SIGFPE');
    for (const args of [['-c', '1'], ['-c', '5', '-w', '-d', '2'], []]) {
      const m = qimg(['bench', ...args, '-f', 'raw', 'empty.raw'], { cwd: tmp.path });
      expect(m.status).toBe(1);
      expect(m.stdout).toBe('');
      expect(m.stderr).toBe('qimg: empty.raw: the image is empty (0 bytes): there is no room for a request\n');
    }
    // zero-length requests have room (as qemu 10.0+, which resets the offset to 0)
    const z = qimg(['bench', '-c', '3', '-s', '0', '-f', 'raw', 'empty.raw'], { cwd: tmp.path });
    expect(z.status).toBe(0);
    expect(normal(z.stdout)).toBe('Sending 3 read requests, 0 bytes each, 64 in parallel (starting at offset 0, step size 0)\nRun completed in T seconds.\n');
  });
});

describe.skipIf(!enabled)('bench -w leaves the image as qemu-img leaves it', () => {
  it('pattern bytes at the same offsets: raw byte for byte, qcow2 (also over a backing file) by qemu-img compare', async () => {
    ok(qemuImg(['create', '-q', '-f', 'qcow2', p('base.qcow2'), '2M']));
    ok(qemuIo(['-c', 'write -P 0x31 0 2M', p('base.qcow2')]));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('over.qcow2'), '3M']));
    ok(qemuImg(['create', '-q', '-f', 'raw', p('w.raw'), '1M']));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', p('w.qcow2'), '1M']));
    const cases: Array<[string, string, string[]]> = [
      ['w.raw', 'raw', ['-c', '100', '--pattern=0xa5']],
      ['w.raw', 'raw', ['-c', '300', '-s', '3000', '-S', '7000', '-o', '333', '--pattern=7']], // wraps around, unaligned
      ['w.raw', 'raw', ['-c', '100', '-d', '1', '-s', '4k', '-S', '12k', '-o', '5k', '--pattern=9']], // fails at the end, one at a time
      ['w.raw', 'raw', ['-c', '64', '-s', '16k', '-S', '0', '--pattern=3', '-t', 'writethrough', '-d', '4', '--flush-interval=8']],
      ['w.qcow2', 'qcow2', ['-c', '77', '-s', '512', '-S', '9999', '--pattern=1', '--flush-interval=64']],
      ['w.qcow2', 'qcow2', ['-c', '200', '-s', '1k', '-S', '3k', '--pattern=3', '--flush-interval=64', '--no-drain', '-t', 'unsafe']],
      ['w.qcow2', 'qcow2', ['-c', '50', '-s', '6k', '-S', '20k', '-o', '1k', '--pattern=4', '-t', 'directsync', '-d', '8']],
      ['over.qcow2', 'qcow2', ['-c', '60', '-s', '40k', '-S', '50k', '-o', '3k', '--pattern=0x42']], // partial clusters over the backing data
    ];
    await inParallel(cases, async ([file, fmt, args]) => {
      const a = p(`A-${args.join('')}.${fmt}`);
      const b = p(`B-${args.join('')}.${fmt}`);
      copyFileSync(p(file), a);
      copyFileSync(p(file), b);
      const q = await runAsync('qemu-img', ['bench', '-w', '-f', fmt, ...args, a]);
      const m = await runAsync(process.execPath, [QIMG, 'bench', '-w', '-f', fmt, ...args, b]);
      const what = args.join(' ');
      expect(m.status, what).toBe(q.status);
      expect(normal(m.stderr), what).toBe(normal(q.stderr));
      const c = await runAsync('qemu-img', ['compare', '-f', fmt, '-F', fmt, a, b]);
      expect(c.stdout, what).toBe('Images are identical.\n');
      if (fmt === 'raw') expect(readFileSync(a).equals(readFileSync(b)), what).toBe(true);
      else expect((await runAsync('qemu-img', ['check', b])).status, what).toBe(0);
    });
  });
});

/** An image that records what bench asks of it; each request takes a few milliseconds. */
class RecordingImage implements BlockImage {
  readonly format = 'test';
  readonly filename = 'recording';
  readonly backing = null;
  readonly readOnly = false;
  readonly allocationUnit = 512;
  inFlight = 0;
  maxInFlight = 0;
  /** each request's [kind, offset, length, requests in flight when it started] */
  log: Array<[string, number, number, number]> = [];
  constructor(readonly virtualSize: number) {}
  private async request(kind: string, offset: number, length: number): Promise<void> {
    this.log.push([kind, offset, length, this.inFlight]);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await new Promise((r) => setTimeout(r, 1 + (offset % 3)));
    this.inFlight--;
  }
  read(offset: number, buf: Buffer): Promise<void> {
    return this.request('read', offset, buf.length);
  }
  write(offset: number, data: Buffer): Promise<void> {
    expect(data.every((b) => b === 0x5c)).toBe(true);
    return this.request('write', offset, data.length);
  }
  async flush(): Promise<void> {
    this.log.push(['flush', 0, 0, this.inFlight]);
  }
  writeZeroes(): Promise<void> {
    throw new Error('not used');
  }
  discard(): Promise<void> {
    throw new Error('not used');
  }
  async layerStatus(_offset: number, length: number): Promise<LayerStatus> {
    return { length, data: true, zero: false };
  }
  async info(): Promise<ImageInfo> {
    return { filename: this.filename, format: this.format, virtualSize: this.virtualSize };
  }
  async close(): Promise<void> {}
}

describe('bench requests go through the image, depth at a time', () => {
  it('reads: depth in flight, qemu\'s offsets (step, wrap modulo the size)', async () => {
    const img = new RecordingImage(100_000);
    const r = await bench(img, { count: 500, depth: 16, bufferSize: 1000, stepSize: 7000, offset: 3000 });
    expect(r.requests).toBe(500);
    expect(img.maxInFlight).toBe(16);
    expect(r.maxInFlight).toBe(16);
    let o = 3000;
    for (const [kind, offset, length] of img.log) {
      expect([kind, offset, length]).toEqual(['read', o, 1000]);
      o = (o + 7000) % 100_000;
    }
    expect(r.latency!.max).toBeGreaterThanOrEqual(r.latency!.min);
  });

  it('writes with a flush interval: drained before each flush, or beside the requests with --no-drain', async () => {
    const drained = new RecordingImage(1 << 20);
    const d = await bench(drained, { count: 100, depth: 8, bufferSize: 4096, write: true, pattern: 0x5c, flushInterval: 32 });
    const flushes = drained.log.filter(([k]) => k === 'flush');
    expect(flushes.length).toBe(3); // after requests 32, 64 and 96
    expect(d.flushes).toBe(3);
    for (const f of flushes) expect(f[3]).toBe(0);
    expect(drained.log.findIndex(([k]) => k === 'flush')).toBe(32);
    expect(drained.maxInFlight).toBe(8);

    const beside = new RecordingImage(1 << 20);
    const b = await bench(beside, { count: 100, depth: 8, bufferSize: 4096, write: true, pattern: 0x5c, flushInterval: 32, drainOnFlush: false });
    expect(b.flushes).toBe(3);
    expect(beside.log.filter(([k]) => k === 'flush').some((f) => f[3] > 0)).toBe(true);
    // unsafe ignores flushes; writethrough flushes after every write
    expect((await bench(new RecordingImage(1 << 20), { count: 64, depth: 8, write: true, pattern: 0x5c, flushInterval: 8, cache: 'unsafe' })).flushes).toBe(0);
    const wt = new RecordingImage(1 << 20);
    await bench(wt, { count: 20, depth: 4, write: true, pattern: 0x5c, cache: 'writethrough' });
    expect(wt.log.filter(([k]) => k === 'flush').length).toBe(20);
  });

  it('a request past the end fails the run once the requests in flight are done', async () => {
    const img = new RecordingImage(10_240);
    await expect(bench(img, { count: 3, depth: 2, bufferSize: 4096 })).rejects.toThrow('Failed request: Input/output error');
    expect(img.inFlight).toBe(0);
  });
});

describe.skipIf(!enabled || spawnSync('script', ['--version']).status !== 0)('bench on a terminal', () => {
  it('a summary table follows qemu-img\'s lines on a TTY only (not piped, not with -q)', () => {
    const inTty = (args: string) =>
      spawnSync('script', ['-qec', `${process.execPath} ${QIMG} bench ${args}`, '/dev/null'], { cwd: tmp.path, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } });
    const t = inTty('-c 300 -w -f raw --flush-interval=100 r.raw');
    expect(t.status).toBe(0);
    const lines = t.stdout.replace(/\r/g, '').split('\n');
    expect(lines[0]).toBe('Sending 300 write requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)');
    expect(lines[1]).toBe('Sending flush every 100 requests');
    expect(lines[2]).toMatch(/^Run completed in \d+\.\d{3} seconds\.$/);
    expect(lines[3]).toMatch(/^┌─+┬─+┐$/);
    expect(t.stdout).toMatch(/write requests +│ 300 × 4\.00 KiB/);
    expect(t.stdout).toMatch(/flushes +│ 2 /);
    expect(t.stdout).toMatch(/latency p50/);
    const quiet = inTty('-q -c 10 r.raw').stdout.replace(/\r/g, '');
    expect(normal(quiet)).toBe('Sending 10 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\nRun completed in T seconds.\n');
  });
});
