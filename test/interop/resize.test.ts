/**
 * `resize` against qemu-img 7.2 as the oracle: the same commands on twin copies of an
 * image (one for qimg, one for qemu-img) must give images that compare identical, with
 * the same virtual size and allocation map (host offsets aside), and `qemu-img check`
 * clean. Covers raw and qcow2, absolute and relative sizes, --shrink, internal
 * snapshots, L1 table growth, preallocation, a longer backing file below the grown
 * area, and the messages.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-resize-');
afterAll(() => tmp.cleanup());

const MiB = 1 << 20;
const SHRINK_WARNING =
  "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

let dirs = 0;
function newDir(): string {
  const d = join(tmp.path, `d${dirs++}`);
  mkdirSync(d);
  return d;
}

function must(r: RunResult, what: string): RunResult {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

function io(dir: string, image: string, cmds: string[], fmt = 'qcow2'): string {
  const r = qemuIo(['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), image], dir);
  if (r.status !== 0 || /error|fail|mismatch/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

function clean(dir: string, image: string, what = ''): void {
  const r = qemuImg(['check', image], dir);
  expect(r.status, `${what}: qemu-img check ${image}:\n${r.stdout}${r.stderr}`).toBe(0);
}

function virtualSize(dir: string, image: string, fmt = 'qcow2'): number {
  return (JSON.parse(must(qemuImg(['info', '-f', fmt, '--output=json', image], dir), 'info').stdout) as { 'virtual-size': number })['virtual-size'];
}

function contentSha(dir: string, image: string, snapshot?: string): string {
  const out = join(dir, 'content.raw');
  must(qemuImg(['convert', ...(snapshot ? ['-l', snapshot] : []), '-O', 'raw', image, out], dir), `convert ${image}`);
  const h = sha256File(out);
  rmSync(out);
  return h;
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json` without host offsets, neighbours with the same flags merged. */
function layout(dir: string, image: string, fmt = 'qcow2'): string[] {
  const entries = JSON.parse(must(qemuImg(['map', '--output=json', '-f', fmt, image], dir), `map ${image}`).stdout) as MapEntry[];
  const out: MapEntry[] = [];
  for (const e of entries) {
    delete e.offset;
    const last = out[out.length - 1];
    if (last && last.depth === e.depth && last.present === e.present && last.zero === e.zero && last.data === e.data && last.start + last.length === e.start) last.length += e.length;
    else out.push(e);
  }
  return out.map((e) => `${e.start}+${e.length} depth=${e.depth} present=${e.present} zero=${e.zero} data=${e.data}`);
}

/** m/IMAGE (qimg's) equals q/IMAGE (qemu-img's). */
function sameImage(m: string, q: string, image: string, fmt = 'qcow2', what = ''): void {
  const cmp = qemuImg(['compare', '-f', fmt, '-F', fmt, join(m, image), join(q, image)]);
  expect(cmp.stdout + cmp.stderr, `${what} ${image}`).toBe('Images are identical.\n');
  expect(virtualSize(m, image, fmt), `${what} virtual size`).toBe(virtualSize(q, image, fmt));
  expect(layout(m, image, fmt), `${what} allocation`).toEqual(layout(q, image, fmt));
  if (fmt === 'qcow2') clean(m, image, what);
  else expect(statSync(join(m, image)).size, `${what} file size`).toBe(statSync(join(q, image)).size);
}

/** One image, copied for each tool (so that snapshot dates etc. are the same). */
function twin(make: (dir: string) => void, files: string[]): { m: string; q: string } {
  const src = newDir();
  make(src);
  const m = newDir();
  const q = newDir();
  for (const f of files) {
    copyFileSync(join(src, f), join(m, f));
    copyFileSync(join(src, f), join(q, f));
  }
  return { m, q };
}

/** Runs the same resize with both tools; qimg must succeed with qemu-img's output. */
function both(m: string, q: string, args: string[]): void {
  const r = qimg(['resize', ...args], { cwd: m });
  const qr = qemuImg(['resize', ...args], q);
  expect(qr.status, `qemu-img resize ${args.join(' ')}: ${qr.stderr}`).toBe(0);
  expect(r, `qimg resize ${args.join(' ')}: ${r.stderr}`).toMatchObject({ status: 0, stdout: qr.stdout, stderr: '' });
  expect(r.stdout).toBe(args.includes('-q') ? '' : 'Image resized.\n');
}

describe.skipIf(!enabled)('resize vs qemu-img', () => {
  it('qcow2: grow and shrink, absolute and relative sizes; shrunk data does not come back', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], d), 'create');
      io(d, 'a.qcow2', ['write -P 0x11 0 4M', 'write -z 1M 64k', 'write -P 0x12 2000k 3k']);
    }, ['a.qcow2']);
    const steps: string[][] = [
      ['a.qcow2', '6M'],
      ['a.qcow2', '+1M'],
      ['--shrink', 'a.qcow2', '3M'],
      ['--shrink', 'a.qcow2', '--', '-1024k'],
      ['a.qcow2', '+3000k'],
      ['-q', 'a.qcow2', '+512'],
      ['--shrink', 'a.qcow2', '--', '-512'],
      ['--shrink', 'a.qcow2', '2049k'],
    ];
    for (const args of steps) {
      both(m, q, args);
      sameImage(m, q, 'a.qcow2', 'qcow2', args.join(' '));
    }
    expect(virtualSize(m, 'a.qcow2')).toBe(2049 * 1024);
    // after shrinking to 2048k and growing back, everything past 2048k reads zeros
    io(m, 'a.qcow2', ['read -P 0 2048k 1k', 'read -P 0x11 0 64k']);
    io(m, 'a.qcow2', ['write -P 0x13 2040k 9k']);
    clean(m, 'a.qcow2', 'write after resizes');
  });

  it('qcow2: growing after a shrink to inside a cluster reads zeros past the old end', () => {
    // Known qemu-img 7.2 difference: it keeps the shrunk-away tail of that last cluster
    // and shows it again after growing (stale 0x11 bytes); qimg zeroes it.
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], d), 'create');
      io(d, 'a.qcow2', ['write -P 0x11 0 4M']);
    }, ['a.qcow2']);
    for (const args of [['--shrink', 'a.qcow2', '2072k'], ['a.qcow2', '3M']]) both(m, q, args);
    io(m, 'a.qcow2', ['read -P 0x11 0 2072k', 'read -P 0 2072k 1000k']);
    expect(qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', join(m, 'a.qcow2'), join(q, 'a.qcow2')]).stdout).toMatch(/^(Images are identical|Content mismatch at offset 2121728!)\n$/);
    expect(layout(m, 'a.qcow2')).toEqual(layout(q, 'a.qcow2'));
    clean(m, 'a.qcow2');
  });

  it('raw: grow and shrink, absolute and relative, sizes not a multiple of 512', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'raw', 'a.raw', '1M'], d), 'create');
      io(d, 'a.raw', ['write -P 0x21 0 1M'], 'raw');
    }, ['a.raw']);
    for (const args of [
      ['-f', 'raw', 'a.raw', '3M'],
      ['-f', 'raw', 'a.raw', '+100'],
      ['-f', 'raw', '--shrink', 'a.raw', '--', '-2M'],
      ['-f', 'raw', '--shrink', 'a.raw', '700001'],
      ['-f', 'raw', 'a.raw', '+1M'],
    ]) {
      both(m, q, args);
      sameImage(m, q, 'a.raw', 'raw', args.join(' '));
      expect(sha256File(join(m, 'a.raw'))).toBe(sha256File(join(q, 'a.raw')));
    }
    expect(statSync(join(m, 'a.raw')).size).toBe(700416 + MiB); // 700001 counts as its 512-byte round-up
  });

  it('qcow2 with internal snapshots: their contents stay, applying one restores its size', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'a.qcow2', '2M'], d), 'create');
      io(d, 'a.qcow2', ['write -P 0x31 0 2M']);
      must(qemuImg(['snapshot', '-c', 'q1', 'a.qcow2'], d), 'qemu snapshot');
      io(d, 'a.qcow2', ['write -P 0x32 1M 1M']);
      must(qimg(['snapshot', '-c', 'm1', 'a.qcow2'], { cwd: d }), 'qimg snapshot');
      io(d, 'a.qcow2', ['write -P 0x33 1536k 512k']);
    }, ['a.qcow2']);
    const snaps = { q1: contentSha(m, 'a.qcow2', 'q1'), m1: contentSha(m, 'a.qcow2', 'm1') };
    for (const args of [['a.qcow2', '+3M'], ['--shrink', 'a.qcow2', '1M'], ['a.qcow2', '3M']]) {
      both(m, q, args);
      sameImage(m, q, 'a.qcow2', 'qcow2', args.join(' '));
      // convert -l reads a snapshot at the current virtual size: compare against qemu-img's twin
      for (const s of ['q1', 'm1']) expect(contentSha(m, 'a.qcow2', s), `${s} after ${args.join(' ')}`).toBe(contentSha(q, 'a.qcow2', s));
    }
    const mi = JSON.parse(must(qemuImg(['info', '--output=json', 'a.qcow2'], m), 'info').stdout) as { snapshots: unknown[] };
    const qi = JSON.parse(must(qemuImg(['info', '--output=json', 'a.qcow2'], q), 'info').stdout) as { snapshots: unknown[] };
    expect(mi.snapshots).toEqual(qi.snapshots);
    // applying a snapshot gives back its content and its 2M size
    must(qimg(['snapshot', '-a', 'q1', 'a.qcow2'], { cwd: m }), 'apply q1');
    expect(virtualSize(m, 'a.qcow2')).toBe(2 * MiB);
    expect(contentSha(m, 'a.qcow2')).toBe(snaps.q1);
    clean(m, 'a.qcow2', 'apply q1');
    must(qemuImg(['snapshot', '-a', 'm1', 'a.qcow2'], m), 'qemu apply m1');
    expect(contentSha(m, 'a.qcow2')).toBe(snaps.m1);
    clean(m, 'a.qcow2', 'apply m1');
  });

  it('growth that needs a bigger L1 table (512-byte clusters, and 64 KiB clusters past 512 MiB)', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'small.qcow2', '64k'], d), 'create');
      io(d, 'small.qcow2', ['write -P 0x41 0 64k']);
      must(qemuImg(['snapshot', '-c', 's1', 'small.qcow2'], d), 'snapshot');
      io(d, 'small.qcow2', ['write -P 0x42 1k 8k']);
      must(qemuImg(['create', '-q', '-f', 'qcow2', 'big.qcow2', '100M'], d), 'create');
      io(d, 'big.qcow2', ['write -P 0x43 99M 1M']);
    }, ['small.qcow2', 'big.qcow2']);
    const l1Size = (dir: string, f: string) => readFileSync(join(dir, f)).readUInt32BE(36);
    expect(l1Size(m, 'small.qcow2')).toBe(2);
    const s1 = contentSha(m, 'small.qcow2', 's1');
    for (const args of [['small.qcow2', '+10M'], ['big.qcow2', '1G'], ['big.qcow2', '+3G']]) {
      both(m, q, args);
      sameImage(m, q, args[0], 'qcow2', args.join(' '));
    }
    expect(l1Size(m, 'small.qcow2')).toBeGreaterThan(300);
    expect(l1Size(m, 'big.qcow2')).toBe(l1Size(q, 'big.qcow2'));
    expect(l1Size(m, 'big.qcow2')).toBe(8);
    // the new L2 ranges take writes, and the snapshot still reads as before (through its own L1)
    io(m, 'small.qcow2', ['write -P 0x44 9M 8k', 'write -P 0x45 64k 1k']);
    io(m, 'big.qcow2', ['write -P 0x46 3500M 64k', 'write -P 0x47 600M 1k']);
    clean(m, 'small.qcow2', 'small written');
    clean(m, 'big.qcow2', 'big written');
    io(m, 'big.qcow2', ['read -P 0x43 99M 1M', 'read -P 0 100M 1M']);
    must(qimg(['snapshot', '-a', 's1', 'small.qcow2'], { cwd: m }), 'apply s1');
    expect(contentSha(m, 'small.qcow2')).toBe(s1);
    clean(m, 'small.qcow2', 'apply s1');
  });

  for (const mode of ['metadata', 'falloc', 'full'] as const) {
    it(`--preallocation=${mode} on grow`, () => {
      const { m, q } = twin((d) => {
        must(qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], d), 'create');
        io(d, 'a.qcow2', ['write -P 0x51 0 700k']);
        if (mode !== 'metadata') {
          must(qemuImg(['create', '-q', '-f', 'raw', 'a.raw', '1M'], d), 'create raw');
          io(d, 'a.raw', ['write -P 0x52 0 1M'], 'raw');
        }
      }, mode === 'metadata' ? ['a.qcow2'] : ['a.qcow2', 'a.raw']);
      both(m, q, [`--preallocation=${mode}`, 'a.qcow2', '+3M']);
      sameImage(m, q, 'a.qcow2', 'qcow2', mode);
      io(m, 'a.qcow2', ['read -P 0 1M 3M', 'write -P 0x53 2M 64k']);
      clean(m, 'a.qcow2', `${mode} written`);
      if (mode !== 'metadata') {
        // the new space is really allocated
        expect(statSync(join(m, 'a.qcow2')).blocks * 512).toBeGreaterThanOrEqual(4 * MiB);
        both(m, q, ['-f', 'raw', `--preallocation=${mode}`, 'a.raw', '+3M']);
        sameImage(m, q, 'a.raw', 'raw', `raw ${mode}`);
        expect(statSync(join(m, 'a.raw')).blocks * 512).toBeGreaterThanOrEqual(4 * MiB);
        expect(sha256File(join(m, 'a.raw'))).toBe(sha256File(join(q, 'a.raw')));
      }
    });
  }

  it('new space reads as zeros over a longer backing file', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], d), 'create');
      io(d, 'base.qcow2', ['write -P 0x61 0 4M']);
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'a.qcow2', '1M'], d), 'create');
      io(d, 'a.qcow2', ['write -P 0x62 0 100k']);
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', 'b.qcow2', '1000k'], d), 'create');
    }, ['base.qcow2', 'a.qcow2', 'b.qcow2']);
    for (const args of [['a.qcow2', '3M'], ['a.qcow2', '+3M'], ['b.qcow2', '+1001k'], ['--shrink', 'b.qcow2', '999k'], ['b.qcow2', '5M']]) {
      both(m, q, args);
      sameImage(m, q, args[args.length - 2], 'qcow2', args.join(' '));
    }
    io(m, 'a.qcow2', ['read -P 0x62 0 100k', 'read -P 0x61 100k 924k', 'read -P 0 1M 5M']);
    io(m, 'b.qcow2', ['read -P 0x61 0 999k', 'read -P 0 999k 4121k']);
  });

  it('messages and exit codes as qemu-img', () => {
    const { m, q } = twin((d) => {
      must(qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], d), 'create');
      io(d, 'a.qcow2', ['write -P 0x71 0 4M']);
      must(qemuImg(['create', '-q', '-f', 'raw', 'a.raw', '1M'], d), 'create raw');
    }, ['a.qcow2', 'a.raw']);
    const before = { qcow2: sha256File(join(m, 'a.qcow2')), raw: sha256File(join(m, 'a.raw')) };
    const failing: Array<{ args: string[]; lines: string[] }> = [
      { args: ['a.qcow2', '2M'], lines: ['Use the --shrink option to perform a shrink operation.', SHRINK_WARNING] },
      { args: ['a.qcow2', '--', '-1M'], lines: ['Use the --shrink option to perform a shrink operation.', SHRINK_WARNING] },
      { args: ['-f', 'raw', 'a.raw', '1000'], lines: ['Use the --shrink option to perform a shrink operation.', SHRINK_WARNING] },
      { args: ['a.qcow2', '0'], lines: ['New image size must be positive'] },
      { args: ['--shrink', 'a.qcow2', '--', '-4M'], lines: ['New image size must be positive'] },
      { args: ['--shrink', 'a.qcow2', '--', '-5M'], lines: ['New image size must be positive'] },
      { args: ['a.qcow2', '+100'], lines: ['The new size must be a multiple of 512'] },
      { args: ['--shrink', 'a.qcow2', '1000000'], lines: ['The new size must be a multiple of 512'] },
      { args: ['--shrink', '--preallocation=full', 'a.qcow2', '1M'], lines: ['Preallocation can only be used for growing images'] },
    ];
    for (const f of failing) {
      const file = f.args.find((a) => a.startsWith('a.'))!;
      const qr = qemuImg(['resize', ...f.args], q);
      const r = qimg(['resize', ...f.args], { cwd: m });
      const what = f.args.join(' ');
      expect(qr.status, what).toBe(1);
      expect(qr.stderr, what).toBe(f.lines.map((l) => `qemu-img: ${l}\n`).join(''));
      expect(r.status, what).toBe(1);
      expect(r.stdout, what).toBe('');
      // qimg names the file in error lines (not in warnings)
      expect(r.stderr, what).toBe(f.lines.map((l) => (l.startsWith('warning: ') ? `qimg: ${l}\n` : `qimg: ${file}: ${l}\n`)).join(''));
    }
    expect(sha256File(join(m, 'a.qcow2'))).toBe(before.qcow2);
    expect(sha256File(join(m, 'a.raw'))).toBe(before.raw);
    // --shrink asked for: no warning (qemu-img 7.2 prints it only with the refusal)
    for (const args of [['--shrink', 'a.qcow2', '3M'], ['-f', 'raw', '--shrink', 'a.raw', '1000']]) {
      const qr = qemuImg(['resize', ...args], q);
      const r = qimg(['resize', ...args], { cwd: m });
      expect(qr).toMatchObject({ status: 0, stdout: 'Image resized.\n', stderr: '' });
      expect(r).toMatchObject({ status: 0, stdout: 'Image resized.\n', stderr: '' });
    }
    sameImage(m, q, 'a.qcow2');
    sameImage(m, q, 'a.raw', 'raw');
  });
});
