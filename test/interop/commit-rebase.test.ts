/**
 * `commit` and `rebase` against qemu-img 7.2 as the oracle. Every chain is made twice
 * from the same qemu-io writes: one copy for qimg, one for qemu-img; after the same
 * command each image of one copy must compare identical (`qemu-img compare`) to its
 * twin, report the same virtual size, backing file and allocation map (host offsets
 * aside), and `qemu-img check` clean.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-commit-rebase-');
afterAll(() => tmp.cleanup());

let dirs = 0;
function newDir(): string {
  const d = join(tmp.path, `d${dirs++}`);
  mkdirSync(d, { recursive: true });
  return d;
}

function must(r: RunResult, what: string): RunResult {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

function io(dir: string, image: string, cmds: string[], fmt = 'qcow2'): void {
  const r = qemuIo(['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), image], dir);
  if (r.status !== 0 || /error|fail/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
}

function create(dir: string, name: string, size: string | null, backing?: string, fmt = 'qcow2', backingFmt = 'qcow2'): void {
  const args = ['create', '-q', '-f', fmt, ...(backing ? ['-b', backing, '-F', backingFmt] : []), name, ...(size ? [size] : [])];
  must(qemuImg(args, dir), `create ${name}`);
}

function clean(dir: string, image: string, what = ''): void {
  const r = qemuImg(['check', image], dir);
  expect(r.status, `${what}: qemu-img check ${image}:\n${r.stdout}${r.stderr}`).toBe(0);
}

function contentSha(dir: string, image: string): string {
  const out = join(dir, 'content.raw');
  must(qemuImg(['convert', '-O', 'raw', image, out], dir), `convert ${image}`);
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

interface Info {
  'virtual-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  format: string;
}

function info(dir: string, image: string): Info {
  return JSON.parse(must(qemuImg(['info', '--output=json', image], dir), `info ${image}`).stdout) as Info;
}

/** The image in qimg's copy equals its twin in qemu-img's copy in every observable way. */
function sameImage(mDir: string, qDir: string, image: string, fmt = 'qcow2'): void {
  const cmp = qemuImg(['compare', '-f', fmt, '-F', fmt, join(mDir, image), join(qDir, image)]);
  expect(cmp.stdout + cmp.stderr, image).toBe('Images are identical.\n');
  expect(cmp.status).toBe(0);
  const mi = info(mDir, image);
  const qi = info(qDir, image);
  expect(mi['virtual-size'], `${image} virtual size`).toBe(qi['virtual-size']);
  expect(mi['backing-filename'], `${image} backing file`).toBe(qi['backing-filename']);
  expect(mi['backing-filename-format'], `${image} backing format`).toBe(qi['backing-filename-format']);
  expect(layout(mDir, image, fmt), `${image} allocation`).toEqual(layout(qDir, image, fmt));
  if (fmt === 'qcow2') clean(mDir, image, image);
}

/** The same chain in two directories, made by the same commands. */
function twin(build: (dir: string) => void): { m: string; q: string } {
  const root = newDir();
  const m = join(root, 'm');
  const q = join(root, 'q');
  for (const d of [m, q]) {
    mkdirSync(d);
    build(d);
  }
  return { m, q };
}

/**
 * base (2M) <- mid (3M) <- top (4M): data at every level, zero writes over lower
 * data, a layer longer than the one below it, a sub-cluster write.
 */
function chain3(dir: string): void {
  create(dir, 'base.qcow2', '2M');
  io(dir, 'base.qcow2', ['write -P 0x11 0 1M', 'write -P 0x12 1536k 512k']);
  create(dir, 'mid.qcow2', '3M', 'base.qcow2');
  io(dir, 'mid.qcow2', ['write -P 0x21 512k 1M', 'write -z 0 64k', 'write -P 0x22 2560k 64k']);
  create(dir, 'top.qcow2', '4M', 'mid.qcow2');
  io(dir, 'top.qcow2', ['write -P 0x31 1M 1M', 'write -z 64k 64k', 'write -z 1600k 128k', 'write -P 0x32 3M 512', 'write -P 0x33 200k 3k']);
}

describe.skipIf(!enabled)('commit vs qemu-img', () => {
  const variants: Array<{ label: string; args: string[] }> = [
    { label: 'no option (top emptied)', args: [] },
    { label: '-d', args: ['-d'] },
    { label: '-b base.qcow2', args: ['-b', 'base.qcow2'] },
    { label: '-b mid.qcow2', args: ['-b', 'mid.qcow2'] },
  ];
  for (const v of variants) {
    it(`3-layer chain, commit ${v.label}: base, mid and top equal qemu-img's`, () => {
      const { m, q } = twin(chain3);
      const before = contentSha(m, 'top.qcow2');
      const r = qimg(['commit', ...v.args, 'top.qcow2'], { cwd: m });
      expect(r, r.stderr).toMatchObject({ status: 0, stdout: 'Image committed.\n', stderr: '' });
      must(qemuImg(['commit', ...v.args, 'top.qcow2'], q), 'qemu-img commit');
      for (const image of ['base.qcow2', 'mid.qcow2', 'top.qcow2']) sameImage(m, q, image);
      // the top's content never changes; the layer committed into now holds it
      expect(contentSha(m, 'top.qcow2')).toBe(before);
      const into = v.args[0] === '-b' ? v.args[1] : 'mid.qcow2';
      expect(info(m, into)['virtual-size']).toBe(4 << 20); // grown to the top's size
      if (v.args.length === 0) {
        // emptied: nothing allocated in the top any more
        expect(layout(m, 'top.qcow2').filter((l) => l.includes('depth=0 present=true'))).toEqual([]);
      }
    });
  }

  it('zero writes in the top become zeros in the base; a shorter base grows', () => {
    const { m, q } = twin((dir) => {
      create(dir, 'base.qcow2', '1M', undefined);
      io(dir, 'base.qcow2', ['write -P 0x55 0 1M']);
      create(dir, 'top.qcow2', '2M', 'base.qcow2');
      io(dir, 'top.qcow2', ['write -z 0 64k', 'write -z 200k 4k', 'write -P 0x66 1536k 64k']);
    });
    must(qimg(['commit', 'top.qcow2'], { cwd: m }), 'qimg commit');
    must(qemuImg(['commit', 'top.qcow2'], q), 'qemu-img commit');
    for (const image of ['base.qcow2', 'top.qcow2']) sameImage(m, q, image);
    // read the base alone
    const out = join(m, 'base.raw');
    must(qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', 'base.qcow2', out], m), 'convert');
    const b = readFileSync(out);
    expect(b.length).toBe(2 << 20);
    expect(b.subarray(0, 65536).every((x) => x === 0)).toBe(true);
    expect(b.subarray(200 << 10, (204 << 10)).every((x) => x === 0)).toBe(true);
    expect(b[65536]).toBe(0x55);
    expect(b[(204 << 10)]).toBe(0x55);
    expect(b.subarray(1 << 20, 1536 << 10).every((x) => x === 0)).toBe(true);
    expect(b[1536 << 10]).toBe(0x66);
  });

  it('layers shorter than the top: their zeros past the end reach BASE, a longer file below BASE stays hidden', () => {
    // root (4M, all data) <- base (2M) <- mid (1M) <- top (4M): beyond 1M the top reads
    // zeros (mid ends there), also after BASE grows over root's data.
    for (const args of [[], ['-b', 'base.qcow2']]) {
      const { m, q } = twin((dir) => {
        create(dir, 'root.qcow2', '4M');
        io(dir, 'root.qcow2', ['write -P 0x99 0 4M']);
        create(dir, 'base.qcow2', '2M', 'root.qcow2');
        io(dir, 'base.qcow2', ['write -P 0x11 0 64k']);
        create(dir, 'mid.qcow2', '1M', 'base.qcow2');
        io(dir, 'mid.qcow2', ['write -P 0x22 512k 64k']);
        create(dir, 'top.qcow2', '4M', 'mid.qcow2');
        io(dir, 'top.qcow2', ['write -P 0x33 3M 64k']);
      });
      const before = contentSha(m, 'top.qcow2');
      must(qimg(['commit', ...args, 'top.qcow2'], { cwd: m }), 'qimg commit');
      must(qemuImg(['commit', ...args, 'top.qcow2'], q), 'qemu-img commit');
      for (const image of ['root.qcow2', 'base.qcow2', 'mid.qcow2', 'top.qcow2']) sameImage(m, q, image);
      expect(contentSha(m, 'top.qcow2'), args.join(' ')).toBe(before);
    }
  });

  it('-b names BASE relative to the image directory (as qemu-img), not to the current one', () => {
    const { m, q } = twin((dir) => {
      mkdirSync(join(dir, 'sub'));
      chain3(join(dir, 'sub'));
    });
    // from the parent directory: "sub/base.qcow2" is not in the chain, "base.qcow2" is
    const bad = qimg(['commit', '-b', 'sub/base.qcow2', 'sub/top.qcow2'], { cwd: m });
    const qbad = qemuImg(['commit', '-b', 'sub/base.qcow2', 'sub/top.qcow2'], q);
    expect(qbad.status).toBe(1);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toBe(qbad.stderr.replace(/^qemu-img: /, 'qimg: '));
    must(qimg(['commit', '-b', 'base.qcow2', 'sub/top.qcow2'], { cwd: m }), 'qimg commit');
    must(qemuImg(['commit', '-b', 'base.qcow2', 'sub/top.qcow2'], q), 'qemu-img commit');
    for (const image of ['sub/base.qcow2', 'sub/mid.qcow2', 'sub/top.qcow2']) sameImage(m, q, image);
  });

  it('a top with an internal snapshot: emptied, the snapshot kept', () => {
    const { m, q } = twin((dir) => {
      create(dir, 'base.qcow2', '2M');
      io(dir, 'base.qcow2', ['write -P 0x11 0 1M']);
      create(dir, 'top.qcow2', '2M', 'base.qcow2');
      io(dir, 'top.qcow2', ['write -P 0x12 512k 1M']);
      must(qemuImg(['snapshot', '-c', 's1', 'top.qcow2'], dir), 'snapshot');
      io(dir, 'top.qcow2', ['write -P 0x13 0 64k']);
    });
    must(qimg(['commit', 'top.qcow2'], { cwd: m }), 'qimg commit');
    must(qemuImg(['commit', 'top.qcow2'], q), 'qemu-img commit');
    for (const image of ['base.qcow2', 'top.qcow2']) sameImage(m, q, image);
    const snapSha = (dir: string) => {
      const out = join(dir, 's1.raw');
      must(qemuImg(['convert', '-l', 's1', '-O', 'raw', 'top.qcow2', out], dir), 'convert -l');
      return sha256File(out);
    };
    expect(snapSha(m)).toBe(snapSha(q));
  });

  it('raw base', () => {
    const { m, q } = twin((dir) => {
      create(dir, 'base.raw', '1M', undefined, 'raw');
      io(dir, 'base.raw', ['write -P 0x44 0 1M'], 'raw');
      create(dir, 'top.qcow2', '3M', 'base.raw', 'qcow2', 'raw');
      io(dir, 'top.qcow2', ['write -P 0x45 512k 1M', 'write -z 0 64k']);
    });
    must(qimg(['commit', 'top.qcow2'], { cwd: m }), 'qimg commit');
    must(qemuImg(['commit', 'top.qcow2'], q), 'qemu-img commit');
    expect(sha256File(join(m, 'base.raw'))).toBe(sha256File(join(q, 'base.raw')));
    sameImage(m, q, 'top.qcow2');
  });

  it('messages: no backing file, -q, -p', () => {
    const { m, q } = twin(chain3);
    for (const fmtArgs of [[], ['-f', 'qcow2']]) {
      const before = sha256File(join(m, 'base.qcow2'));
      const r = qimg(['commit', ...fmtArgs, 'base.qcow2'], { cwd: m });
      const qr = qemuImg(['commit', ...fmtArgs, 'base.qcow2'], q);
      expect(qr.stderr).toBe('qemu-img: Image does not have a backing file\n');
      expect(r.status).toBe(qr.status);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^qimg: (base\.qcow2: )?Image does not have a backing file\n$/);
      expect(sha256File(join(m, 'base.qcow2'))).toBe(before);
    }
    expect(qimg(['commit', '-q', '-d', 'top.qcow2'], { cwd: m })).toMatchObject({ status: 0, stdout: '', stderr: '' });
    const p = qimg(['commit', '-p', 'mid.qcow2'], { cwd: m });
    expect(p.status).toBe(0);
    expect(p.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r.*\(100\.00\/100%\)\r\nImage committed\.\n$/s);
    must(qemuImg(['commit', '-q', '-d', 'top.qcow2'], q), 'qemu commit');
    must(qemuImg(['commit', '-p', 'mid.qcow2'], q), 'qemu commit');
    for (const image of ['base.qcow2', 'mid.qcow2', 'top.qcow2']) sameImage(m, q, image);
  });
});

// ------------------------------------------------------------------ rebase

/** The classic recipe's images: base <- modified <- diff (in sub/, names relative to it). */
function recipe(dir: string): void {
  const sub = join(dir, 'sub');
  mkdirSync(sub);
  create(sub, 'base.qcow2', '4M');
  io(sub, 'base.qcow2', ['write -P 0x01 0 3M']);
  create(sub, 'small.qcow2', '1M');
  io(sub, 'small.qcow2', ['write -P 0x06 0 1M']);
  create(sub, 'modified.qcow2', null, 'base.qcow2');
  io(sub, 'modified.qcow2', ['write -P 0x02 512k 1M', 'write -z 1536k 64k', 'write -P 0x05 3M 4k', 'write -P 0x07 100k 1k']);
  create(sub, 'diff.qcow2', null, 'modified.qcow2');
  io(sub, 'diff.qcow2', ['write -P 0x08 0 64k', 'write -z 2M 64k']);
}

describe.skipIf(!enabled)('rebase vs qemu-img', () => {
  const cases: Array<{ label: string; args: string[] }> = [
    { label: 'safe, onto the original base (the diff recipe)', args: ['-b', 'base.qcow2', '-F', 'qcow2'] },
    { label: 'safe, onto a shorter, different image', args: ['-b', 'small.qcow2', '-F', 'qcow2'] },
    { label: 'safe, -b "" (standalone)', args: ['-b', ''] },
  ];
  for (const c of cases) {
    it(c.label, () => {
      const { m, q } = twin(recipe);
      const before = contentSha(m, 'sub/diff.qcow2');
      // run from the parent directory: the new name is relative to the image's directory
      const r = qimg(['rebase', ...c.args, 'sub/diff.qcow2'], { cwd: m });
      expect(r, r.stderr).toMatchObject({ status: 0, stdout: '', stderr: '' });
      must(qemuImg(['rebase', ...c.args, 'sub/diff.qcow2'], q), 'qemu-img rebase');
      expect(contentSha(m, 'sub/diff.qcow2')).toBe(before);
      sameImage(m, q, 'sub/diff.qcow2');
      const mi = info(m, 'sub/diff.qcow2');
      if (c.args[1] === '') expect(mi['backing-filename']).toBeUndefined();
      else expect(mi).toMatchObject({ 'backing-filename': c.args[1], 'backing-filename-format': 'qcow2' });
    });
  }

  it('safe, past the end of a shorter old backing file (zeros written as zeros); a standalone image gets a backing file', () => {
    const { m, q } = twin((dir) => {
      create(dir, 'old.qcow2', '1M');
      io(dir, 'old.qcow2', ['write -P 0x01 0 1M']);
      create(dir, 'new.qcow2', '4M');
      io(dir, 'new.qcow2', ['write -P 0x02 0 4M', 'write -P 0x01 0 512k', 'write -z 3M 64k']);
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'old.qcow2', '-F', 'qcow2', 'img.qcow2', '4M'], dir), 'create img');
      io(dir, 'img.qcow2', ['write -P 0x03 2M 4k']);
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'solo.qcow2', '4M'], dir), 'create solo');
      io(dir, 'solo.qcow2', ['write -P 0x03 2M 4k']);
    });
    for (const image of ['img.qcow2', 'solo.qcow2']) {
      const before = contentSha(m, image);
      must(qimg(['rebase', '-b', 'new.qcow2', '-F', 'qcow2', image], { cwd: m }), `qimg rebase ${image}`);
      must(qemuImg(['rebase', '-b', 'new.qcow2', '-F', 'qcow2', image], q), `qemu-img rebase ${image}`);
      expect(contentSha(m, image)).toBe(before);
      sameImage(m, q, image);
    }
  });

  it('-u rewrites only the header (the old backing file need not exist)', () => {
    const { m, q } = twin(recipe);
    for (const d of [m, q]) rmSync(join(d, 'sub', 'modified.qcow2'));
    const r = qimg(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/diff.qcow2'], { cwd: m });
    expect(r, r.stderr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    must(qemuImg(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/diff.qcow2'], q), 'qemu-img rebase -u');
    sameImage(m, q, 'sub/diff.qcow2');
    // the diff's own clusters are untouched
    expect(layout(m, 'sub/diff.qcow2').filter((l) => l.includes('depth=0 present=true'))).toEqual(
      layout(q, 'sub/diff.qcow2').filter((l) => l.includes('depth=0 present=true')),
    );
    // then -u to nothing
    must(qimg(['rebase', '-u', '-b', '', 'sub/diff.qcow2'], { cwd: m }), 'qimg rebase -u -b ""');
    must(qemuImg(['rebase', '-u', '-b', '', 'sub/diff.qcow2'], q), 'qemu-img rebase -u -b ""');
    sameImage(m, q, 'sub/diff.qcow2');
  });

  it('a missing -F is refused as qemu-img refuses it, nothing written', () => {
    const { m, q } = twin(recipe);
    const before = sha256File(join(m, 'sub', 'diff.qcow2'));
    for (const extra of [[], ['-u']]) {
      const r = qimg(['rebase', ...extra, '-b', 'base.qcow2', 'sub/diff.qcow2'], { cwd: m });
      const qr = qemuImg(['rebase', ...extra, '-b', 'base.qcow2', 'sub/diff.qcow2'], q);
      expect(qr.status).toBe(1);
      expect(r.status).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr.replace(/^qimg: sub\/diff\.qcow2: /, 'qemu-img: ')).toBe(qr.stderr);
      expect(qr.stderr).toBe("qemu-img: Could not change the backing file to 'base.qcow2': backing format must be specified\n");
    }
    expect(sha256File(join(m, 'sub', 'diff.qcow2'))).toBe(before);
  });

  it('-c stores the copied clusters compressed; content as qemu-img rebase without -c', () => {
    // qemu-img 7.2 has no rebase -c (8.2+): the oracle is the uncompressed result.
    const { m, q } = twin(recipe);
    const before = contentSha(m, 'sub/diff.qcow2');
    const r = qimg(['rebase', '-c', '-b', 'small.qcow2', '-F', 'qcow2', 'sub/diff.qcow2'], { cwd: m });
    expect(r, r.stderr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    must(qemuImg(['rebase', '-b', 'small.qcow2', '-F', 'qcow2', 'sub/diff.qcow2'], q), 'qemu-img rebase');
    expect(contentSha(m, 'sub/diff.qcow2')).toBe(before);
    const cmp = qemuImg(['compare', join(m, 'sub', 'diff.qcow2'), join(q, 'sub', 'diff.qcow2')]);
    expect(cmp.status, cmp.stdout).toBe(0);
    clean(m, 'sub/diff.qcow2', 'rebase -c');
    const check = JSON.parse(must(qemuImg(['check', '--output=json', 'sub/diff.qcow2'], m), 'check').stdout) as Record<string, number>;
    expect(check['compressed-clusters']).toBeGreaterThan(0);
    expect(info(m, 'sub/diff.qcow2')).toMatchObject({ 'backing-filename': 'small.qcow2', 'backing-filename-format': 'qcow2' });
    // qemu-io can overwrite compressed clusters
    io(join(m, 'sub'), 'diff.qcow2', ['write -P 0x77 1M 128k']);
    clean(m, 'sub/diff.qcow2', 'write over compressed');
  });
});
