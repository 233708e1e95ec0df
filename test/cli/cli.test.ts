/**
 * The built CLI (bin/qimg.js) end to end: global options and usage errors, error
 * lines without stack traces, map range clipping, convert (concatenation, -S,
 * failures that must not leave an output file), forced and probed formats.
 * qemu-img is the oracle wherever it has the same feature.
 */
import { describe, expect, it, afterAll } from 'vitest';
import { chmodSync, closeSync, symlinkSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { IMAGES_DIR } from '../helpers/fixtures.js';
import { QIMG, ROOT, ok, qemuAvailable, qemuImg, qemuIo, qimg, run, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-cli-');
afterAll(() => tmp.cleanup());

const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const TRY = "Try 'qimg --help' for more information\n";

/** No JavaScript stack trace or internal error text leaked to the user. */
function expectClean(r: RunResult): void {
  expect(r.stderr).not.toMatch(/^\s+at /m);
  expect(r.stderr).not.toMatch(/TypeError|ReferenceError|RangeError|node:internal|\.js:\d+/);
}

/** The error line of a failed run: exactly one "qimg: " line, optionally followed by the Try hint. */
function errorLine(r: RunResult): string {
  expect(r.status).toBe(1);
  expectClean(r);
  const text = r.stderr.endsWith(TRY) ? r.stderr.slice(0, -TRY.length) : r.stderr;
  expect(text).toMatch(/^qimg: [^\n]+\n$/);
  return text.slice(0, -1);
}

/** qemu-img's stderr reworded for qimg ("qemu-img" -> "qimg"). */
const asQimg = (s: string) => s.replace(/qemu-img/g, 'qimg');

function makeFile(name: string, size: number, writes: Array<[number, number]> = []): string {
  const path = join(tmp.path, name);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  for (const [off, len] of writes) {
    const b = Buffer.alloc(len);
    for (let i = 0; i < len; i++) b[i] = ((off + i) % 253) + 1;
    writeSync(fd, b, 0, len, off);
  }
  closeSync(fd);
  return path;
}

describe('global options and usage errors', () => {
  it('run through a link named qemu-img, messages carry that name (as a script expects)', () => {
    const link = join(tmp.path, 'links', 'qemu-img');
    mkdirSync(join(tmp.path, 'links'), { recursive: true });
    symlinkSync(QIMG, link);
    const viaLink = (args: string[]) => run(process.execPath, [link, ...args]);
    const missing = join(tmp.path, 'no-such-image');
    const r = viaLink(['info', missing]);
    expect(r.status).toBe(1);
    expect(r.stderr).toBe(`qemu-img: Could not open '${missing}': No such file or directory\n`);
    expect(viaLink(['info', '--bogus', missing]).stderr).toBe("qemu-img: unrecognized option '--bogus'\nTry 'qemu-img --help' for more information\n");
    expect(viaLink([]).stderr).toBe("qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n");
    // under its own name it stays qimg
    expect(qimg(['info', missing]).stderr).toBe(`qimg: Could not open '${missing}': No such file or directory\n`);
  });

  it('--help exits 0 and lists the commands', () => {
    for (const flag of ['--help', '-h']) {
      const r = qimg([flag]);
      expect(r.status).toBe(0);
      expect(r.stderr).toBe('');
      for (const cmd of ['info', 'map', 'convert']) expect(r.stdout).toMatch(new RegExp(`^\\s+${cmd}\\b`, 'm'));
    }
    const sub = qimg(['info', '--help']);
    expect(sub.status).toBe(0);
    expect(sub.stdout).toContain('--output');
  });

  it('--version / -V print the package version and exit 0', () => {
    for (const flag of ['--version', '-V']) {
      const r = qimg([flag]);
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(`qimg version ${VERSION}\n`);
    }
  });

  it('no arguments: "Not enough arguments", exit 1', () => {
    const r = qimg([]);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(`qimg: Not enough arguments\n${TRY}`);
  });

  it('unknown command: one error line as qemu-img, exit 1', () => {
    const r = qimg(['frobnicate', 'x']);
    expect(errorLine(r)).toBe('qimg: Command not found: frobnicate');
    expect(r.stdout).toBe('');
    // no "did you mean" suggestions or help dumps
    expect(qimg(['inf', 'x']).stderr).toBe(`qimg: Command not found: inf\n${TRY}`);
  });

  it('unknown options: qemu-img\'s "unrecognized option", exit 1', () => {
    expect(errorLine(qimg(['--bogus']))).toBe("qimg: unrecognized option '--bogus'");
    expect(errorLine(qimg(['info', '--bogus', 'x.qcow2']))).toBe("qimg: unrecognized option '--bogus'");
    expect(errorLine(qimg(['map', '-x', 'x.qcow2']))).toBe("qimg: unrecognized option '-x'");
    expect(errorLine(qimg(['convert', '--frob', 'a', 'b']))).toBe("qimg: unrecognized option '--frob'");
  });

  it('missing and extra arguments', () => {
    expect(errorLine(qimg(['info']))).toBe('qimg: Expecting one image file name');
    expect(errorLine(qimg(['info', 'a', 'b']))).toBe('qimg: Expecting one image file name');
    expect(errorLine(qimg(['map']))).toBe('qimg: Expecting one image file name');
    expect(errorLine(qimg(['convert']))).toBe('qimg: Must specify image file name');
    expect(errorLine(qimg(['convert', 'a.raw']))).toBe('qimg: Must specify image file name');
    expect(errorLine(qimg(['info', '-f']))).toBe("qimg: missing argument for option '-f'");
    expect(errorLine(qimg(['info', '--output']))).toBe("qimg: missing argument for option '--output'");
  });

  it.skipIf(!enabled)('long options may be abbreviated as with getopt_long', () => {
    const f = makeFile('abbrev.raw', 1 << 20, [[0, 65536]]);
    for (const args of [
      ['info', '--out=json', f],
      ['map', '--start=4096', '--max=8192', '--outp', 'json', f],
      ['map', '--start-off=0', f],
    ]) {
      const q = ok(qemuImg(args));
      const m = qimg(args);
      expect(m.stderr).toBe('');
      expect(m.stdout.replace(/, "compressed": (true|false)/g, '')).toBe(q.stdout.replace(f, f));
    }
    // after "--" nothing is an option
    expect(errorLine(qimg(['info', '--', '--out=json']))).toMatch(/Could not open '--out=json'/);
  });

  it.skipIf(!enabled)('usage errors read as qemu-img\'s', () => {
    const cases = [['info'], ['info', '--bogus', 'x'], ['frobnicate'], ['convert'], ['info', '-f']];
    for (const args of cases) {
      const q = qemuImg(args);
      const m = qimg(args);
      expect(m.status, args.join(' ')).toBe(q.status);
      expect(m.stderr, args.join(' ')).toBe(asQimg(q.stderr));
    }
  });
});

describe('errors on files', () => {
  it('info of a missing file: one line, exit 1, no stack trace', () => {
    const missing = join(tmp.path, 'does-not-exist.qcow2');
    for (const args of [['info', missing], ['info', '--output=json', missing], ['map', missing], ['convert', missing, join(tmp.path, 'o.raw')]]) {
      const r = qimg(args);
      expect(errorLine(r)).toMatch(/^qimg: .*No such file or directory$/);
      expect(errorLine(r)).toContain(missing);
      expect(r.stdout).toBe('');
    }
    expect(existsSync(join(tmp.path, 'o.raw'))).toBe(false);
  });

  it('info of a directory: one line', () => {
    expect(errorLine(qimg(['info', tmp.path]))).toMatch(/Is a directory/);
  });

  it('--output=xml: qemu-img\'s message, exit 1, checked before the file is opened', () => {
    for (const cmd of ['info', 'map']) {
      const r = qimg([cmd, '--output=xml', join(tmp.path, 'nope.qcow2')]);
      expect(r.stderr).toBe('qimg: --output must be used with human or json as argument.\n');
      expect(r.status).toBe(1);
      expect(r.stdout).toBe('');
    }
  });

  it.skipIf(!enabled)('--output=xml matches qemu-img', () => {
    const q = qemuImg(['info', '--output=xml', 'x']);
    expect(qimg(['info', '--output=xml', 'x']).stderr).toBe(asQimg(q.stderr));
  });

  it('unknown -f format', () => {
    const f = makeFile('fmt.raw', 4096);
    expect(errorLine(qimg(['info', '-f', 'vmdk9', f]))).toMatch(/Unknown driver 'vmdk9'/);
  });
});

describe.skipIf(!enabled)('map --start-offset / --max-length', () => {
  const file = 'chain/top.qcow2'; // 1 MiB overlay over a chain of two
  const ranges: string[][] = [
    [],
    ['--start-offset=65536'],
    ['--start-offset=100000', '--max-length=200000'],
    ['--max-length=1'],
    ['-s', '1000', '-l', '70000'],
    ['--start-offset=0x10000', '--max-length=64k'],
    ['--start-offset=1048575'],
    ['--start-offset=1048576'], // at the end: qemu prints one empty entry in JSON
    ['--start-offset=99999999'],
    ['--start-offset=4096', '--max-length=0'],
    ['--max-length=9223372036854775807'],
    ['--start-offset=1.5k'],
  ];
  /** qemu 7.2 has no "compressed" member (8.2+ has). */
  const strip = (s: string) => s.replace(/, "compressed": (true|false)/g, '');
  for (const range of ranges) {
    for (const output of ['human', 'json']) {
      it(`${output} ${range.join(' ') || '(whole image)'}`, () => {
        const args = ['map', `--output=${output}`, ...range, file];
        const q = qemuImg(args, IMAGES_DIR);
        const m = qimg(args, { cwd: IMAGES_DIR });
        expect(m.stderr).toBe(asQimg(q.stderr));
        expect(m.status).toBe(q.status);
        expect(strip(m.stdout)).toBe(q.stdout);
      });
    }
  }

  it('bad offsets: cvtnum messages', () => {
    for (const [opt, what] of [
      ['--start-offset', 'start offset'],
      ['--max-length', 'max length'],
    ]) {
      for (const bad of ['abc', '-1', '1.2']) {
        const q = qemuImg(['map', `${opt}=${bad}`, file], IMAGES_DIR);
        const m = qimg(['map', `${opt}=${bad}`, file], { cwd: IMAGES_DIR });
        expect(m.status).toBe(1);
        expect(q.status).toBe(1);
        // qemu splits this message over two lines; qimg keeps one
        expect(m.stderr).toBe(`${asQimg(q.stderr).trimEnd().replace(/\nqimg: /, ' ')}\n`);
        expect(m.stderr).toContain(`Invalid ${what} specified.`);
      }
      const q = qemuImg(['map', `${opt}=16E`, file], IMAGES_DIR);
      expect(qimg(['map', `${opt}=16E`, file], { cwd: IMAGES_DIR }).stderr).toBe(asQimg(q.stderr));
    }
  });
});

describe.skipIf(!enabled)('convert', () => {
  it('several sources are concatenated, like qemu-img', () => {
    const sources = ['raw-holes.raw', 'cluster-64k.qcow2', 'chain/top.qcow2', 'odd-size.qcow2'];
    const q = join(tmp.path, 'cat.qemu.raw');
    const m = join(tmp.path, 'cat.qimg.raw');
    ok(qemuImg(['convert', '-O', 'raw', ...sources, q], IMAGES_DIR));
    const r = qimg(['convert', '-O', 'raw', ...sources, m], { cwd: IMAGES_DIR });
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('');
    expect(r.status).toBe(0);
    expect(statSync(m).size).toBe(statSync(q).size);
    expect(sha256File(m)).toBe(sha256File(q));
    // and sparse: no more allocated than qemu-img's
    expect(statSync(m).blocks).toBeLessThanOrEqual(statSync(q).blocks + 16);
  });

  it('-S 0 gives a fully allocated file with the same bytes', () => {
    const src = 'cluster-64k.qcow2';
    const sparse = join(tmp.path, 's4k.raw');
    const full = join(tmp.path, 's0.raw');
    const qfull = join(tmp.path, 's0.qemu.raw');
    ok(qimg(['convert', '-O', 'raw', src, sparse], { cwd: IMAGES_DIR }), 'qimg convert');
    ok(qimg(['convert', '-S', '0', '-O', 'raw', src, full], { cwd: IMAGES_DIR }), 'qimg convert -S 0');
    ok(qemuImg(['convert', '-S', '0', '-O', 'raw', src, qfull], IMAGES_DIR));
    expect(sha256File(full)).toBe(sha256File(sparse));
    expect(sha256File(full)).toBe(sha256File(qfull));
    const st = statSync(full);
    expect(st.blocks * 512).toBeGreaterThanOrEqual(st.size);
    expect(st.blocks).toBe(statSync(qfull).blocks);
    expect(statSync(sparse).blocks * 512).toBeLessThan(st.size);
  });

  it('-S values: qemu-img\'s checks and messages', () => {
    const src = makeFile('small.raw', 65536, [[0, 512]]);
    for (const s of ['1000', '17M', '16M1', 'abc', '-1', '1.0b', '99999999999999999999', '0x10k', '1.5k', '512', '16M', '0']) {
      const out = join(tmp.path, `S-${s}.raw`);
      const q = qemuImg(['convert', '-S', s, '-O', 'raw', src, out]);
      const m = qimg(['convert', '-S', s, '-O', 'raw', src, out]);
      expectClean(m);
      expect(m.status, s).toBe(q.status);
      // qemu prints cvtnum's message over two lines; qimg on one
      expect(m.stderr, s).toBe(asQimg(q.stderr).replace(/ for\nqimg: kilobytes/, ' for kilobytes'));
    }
  });

  it('an output path that cannot be created fails cleanly and leaves nothing', () => {
    const src = makeFile('src1.raw', 65536, [[0, 4096]]);
    const notDir = makeFile('plain-file', 10);
    const targets = [join(notDir, 'out.raw'), join(tmp.path, 'no', 'such', 'dir', 'out.raw')];
    if (process.getuid && process.getuid() !== 0) {
      const ro = join(tmp.path, 'ro');
      mkdirSync(ro);
      chmodSync(ro, 0o555);
      targets.push(join(ro, 'out.raw'));
    }
    for (const t of targets) {
      const r = qimg(['convert', '-O', 'raw', src, t]);
      expect(errorLine(r)).toContain(t);
      expect(existsSync(t)).toBe(false);
    }
    // a directory as the output stays a directory
    const d = join(tmp.path, 'outdir');
    mkdirSync(d);
    const r = qimg(['convert', '-O', 'raw', src, d]);
    errorLine(r);
    expect(statSync(d).isDirectory()).toBe(true);
  });

  it('a source with a missing backing file: exit 1, no output file', () => {
    const out = join(tmp.path, 'mb.raw');
    const q = qemuImg(['convert', '-O', 'raw', 'missing-backing.qcow2', out], IMAGES_DIR);
    expect(q.status).toBe(1);
    const r = qimg(['convert', '-O', 'raw', 'missing-backing.qcow2', out], { cwd: IMAGES_DIR });
    expect(errorLine(r)).toMatch(/backing file.*No such file or directory/);
    expect(existsSync(out)).toBe(false);
    // also when it is not the first source
    const r2 = qimg(['convert', '-O', 'raw', 'raw-holes.raw', 'missing-backing.qcow2', out], { cwd: IMAGES_DIR });
    errorLine(r2);
    expect(existsSync(out)).toBe(false);
    // sources are opened before the output is touched: an existing file stays as it was (as with qemu-img)
    writeFileSync(out, 'old');
    errorLine(qimg(['convert', '-O', 'raw', 'missing-backing.qcow2', out], { cwd: IMAGES_DIR }));
    expect(readFileSync(out, 'utf8')).toBe('old');
    expect(qemuImg(['convert', '-O', 'raw', 'missing-backing.qcow2', out], IMAGES_DIR).status).toBe(1);
    expect(readFileSync(out, 'utf8')).toBe('old');
  });

  it('a failure in the middle of the copy removes the partial output', () => {
    // a qcow2 whose second data cluster has a corrupt (unaligned) L2 entry: opening
    // works, reading fails after the first source and part of this one were written
    const img = join(tmp.path, 'corrupt-l2.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', img, '4M']));
    ok(qemuIo(['-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 2M 64k', img]));
    const buf = readFileSync(img);
    const l1 = Number(buf.readBigUInt64BE(40));
    const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const index = (2 * 1024 * 1024) / 65536;
    const entry = buf.readBigUInt64BE(l2 + index * 8);
    expect(entry & 0x00fffffffffffe00n).not.toBe(0n);
    buf.writeBigUInt64BE(entry + 0x200n, l2 + index * 8);
    writeFileSync(img, buf);
    const big = makeFile('first.raw', 8 * 1024 * 1024, [[0, 1 << 20]]);
    const out = join(tmp.path, 'partial.raw');
    const r = qimg(['convert', '-O', 'raw', big, img, out]);
    expect(errorLine(r)).toMatch(/unaligned/);
    expect(existsSync(out)).toBe(false);
    // qemu-img also refuses to read it
    expect(qemuImg(['convert', '-O', 'raw', img, join(tmp.path, 'q-partial.raw')]).status).toBe(1);
  });
});

describe.skipIf(!enabled)('formats: forced and probed', () => {
  it('-f raw on a qcow2 file shows it as raw, like qemu-img', () => {
    for (const output of ['human', 'json']) {
      const args = ['info', '-f', 'raw', `--output=${output}`, 'cluster-64k.qcow2'];
      const q = ok(qemuImg(args, IMAGES_DIR));
      const m = qimg(args, { cwd: IMAGES_DIR });
      expect(m.stderr).toBe('');
      expect(m.stdout).toBe(q.stdout);
    }
    const q = ok(qemuImg(['map', '--output=json', '-f', 'raw', 'cluster-64k.qcow2'], IMAGES_DIR));
    const m = qimg(['map', '--output=json', '-f', 'raw', 'cluster-64k.qcow2'], { cwd: IMAGES_DIR });
    expect(JSON.parse(m.stdout).map(({ compressed: _c, ...e }: Record<string, unknown>) => e)).toEqual(JSON.parse(q.stdout));
    // converting it as raw copies the file itself
    const out = join(tmp.path, 'forced-raw.raw');
    ok(qimg(['convert', '-f', 'raw', '-O', 'raw', 'cluster-64k.qcow2', out], { cwd: IMAGES_DIR }));
    expect(sha256File(out)).toBe(sha256File(join(IMAGES_DIR, 'cluster-64k.qcow2')));
  });

  /** A file with the qcow2 magic and the given version, then zeros. */
  function magicFile(version: number): string {
    const f = join(tmp.path, `magic-v${version}.img`);
    const b = Buffer.alloc(65536);
    b.writeUInt32BE(0x514649fb, 0);
    b.writeUInt32BE(version, 4);
    writeFileSync(f, b);
    return f;
  }

  it('qcow2 magic with version 0 probes as raw (as qemu-img)', () => {
    const f = magicFile(0);
    for (const output of ['human', 'json']) {
      const q = ok(qemuImg(['info', `--output=${output}`, f]));
      const m = qimg(['info', `--output=${output}`, f]);
      expect(m.stdout).toBe(q.stdout);
    }
    expect(qimg(['info', f]).stdout).toContain('file format: raw\n');
  });

  it('qcow2 magic with version 1 goes to the qcow (v1) driver, never to raw', () => {
    // qemu hands version 1 to its qcow driver, which fails on this all-zero header
    const f = magicFile(1);
    const q = qemuImg(['info', f]);
    expect(q.status).toBe(1);
    const r = qimg(['info', f]);
    expect(r.status).toBe(1);
    const qemuReason = q.stderr.trim().replace(/^qemu-img: Could not open '[^']*': /, '');
    expect(errorLine(r)).toBe(`qimg: ${f}: ${qemuReason}`);
    expect(r.stdout).not.toContain('file format: raw');
    // forcing raw still works
    expect(ok(qimg(['info', '-f', 'raw', f])).stdout).toContain('file format: raw\n');
  });
});
