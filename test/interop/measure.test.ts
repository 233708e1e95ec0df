/**
 * `qimg measure` against `qemu-img measure` as the oracle: stdout must be the same
 * bytes (human and JSON) for --size with the qcow2 create options that change the
 * result, for every readable fixture (also with -l), for a source with persistent
 * bitmaps, and every error must exit 1 with qemu-img's message.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { ok, qemuAvailable, qemuImg, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-measure-');
afterAll(() => tmp.cleanup());
const fixtures = loadManifest();

/** Runs both; stdout, stderr (tool name aside) and the exit code must be the same. */
function same(args: string[], cwd = IMAGES_DIR): void {
  const t = qemuImg(['measure', ...args], cwd);
  const m = qimg(['measure', ...args], { cwd });
  const what = args.join(' ');
  expect(m.stdout, what).toBe(t.stdout);
  // (qemu-img splits the size-suffix message over two lines; qimg keeps it on one)
  expect(m.stderr, what).toBe(t.stderr.replace(/^qemu-img: /gm, 'qimg: ').replace(/\nqimg: (kilobytes)/, ' $1'));
  expect(m.status, what).toBe(t.status);
}

describe.skipIf(!enabled)('measure --size', () => {
  const SIZES = ['0', '1', '512', '65536', '1000001', '1M', '1G', '10G', '3T'];
  it('-O raw (the default) and -O qcow2 for several sizes, human and JSON', () => {
    for (const [i, size] of SIZES.entries()) {
      same(['-O', 'qcow2', '--size', size, ...(i % 2 ? ['--output=json'] : [])]);
      if (i % 3 === 0) same(['--size', size]);
      if (i % 3 === 1) same(['-O', 'raw', '--output=json', '--size', size]);
    }
  });

  const OPTIONS = [
    'cluster_size=512',
    'cluster_size=1k',
    'cluster_size=4k',
    'cluster_size=16k',
    'cluster_size=64k',
    'cluster_size=2M',
    'refcount_bits=1',
    'refcount_bits=2',
    'refcount_bits=4',
    'refcount_bits=8',
    'refcount_bits=32',
    'refcount_bits=64',
    'cluster_size=512,refcount_bits=64',
    'cluster_size=2M,refcount_bits=1',
    'extended_l2=on',
    'extended_l2=on,cluster_size=16k',
    'extended_l2=on,cluster_size=2M',
    'preallocation=off',
    'preallocation=metadata',
    'preallocation=falloc',
    'preallocation=full',
    'preallocation=full,cluster_size=512',
    'preallocation=metadata,extended_l2=on,cluster_size=32k',
    'compat=0.10',
    'compat=1.1',
    'compat=0.10,cluster_size=4k,preallocation=full',
    // measure accepts what create would refuse with compat=0.10 (qcow2_measure reads fewer options)
    'compat=0.10,lazy_refcounts=on',
    'compat=0.10,extended_l2=on',
    'compat=0.10,compression_type=zstd',
    'lazy_refcounts=on,compression_type=zstd',
    'backing_file=x.qcow2,backing_fmt=qcow2,preallocation=full',
  ];
  it('-O qcow2 with -o options', () => {
    const sizes = ['1G', '10G', '1000001', '100M'];
    for (const [i, o] of OPTIONS.entries()) {
      same(['-O', 'qcow2', '-o', o, '--output=json', '--size', sizes[i % sizes.length]]);
    }
    // human output for a few, and -o given twice (accumulated)
    same(['-O', 'qcow2', '-o', 'cluster_size=512', '--size', '10G']);
    same(['-O', 'qcow2', '-o', 'preallocation=full', '--size', '1G']);
    same(['-O', 'qcow2', '-o', 'cluster_size=4k', '-o', 'refcount_bits=8', '--size', '7G']);
    same(['-O', 'raw', '-o', 'preallocation=full', '--size', '1000001']);
  });

  it('errors: bad sizes and options, as qemu-img', () => {
    const cases: string[][] = [
      ['--size', 'abc'],
      ['--size', '-1'],
      ['--size', '1.5'],
      ['--size', '9223372036854775808'],
      ['-O', 'qcow2', '--size', '9223372036854775807'],
      ['-O', 'qcow2', '-o', 'cluster_size=512', '--size', '1P'],
      ['-O', 'qcow2', '-o', 'cluster_size=3k', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'cluster_size=4M', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=8k', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k,compat=0.10', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'compat=2', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'compat=v3', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'refcount_bits=3', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'refcount_bits=128', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'preallocation=foo', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'bogus=1', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'lazy_refcounts=maybe', '--size', '1G'],
      ['-O', 'raw', '-o', 'cluster_size=4k', '--size', '1G'],
      ['-O', 'foo', '--size', '1G'],
      ['--output=xml', '--size', '1G'],
    ];
    for (const args of cases) same(args);
  });
});

describe.skipIf(!enabled)('measure FILE', () => {
  const readable = fixtures.filter((f) => f.readable);

  it('every readable fixture, -O qcow2 (JSON) and -O raw', () => {
    expect(readable.length).toBeGreaterThan(30);
    for (const [i, f] of readable.entries()) {
      const file = fixturePath(f);
      // JSON and human output alternately; -O raw (the virtual size) for every fourth
      same(['-O', 'qcow2', ...(i % 2 ? ['--output=json'] : []), file]);
      if (i % 4 === 0) same(['-O', 'raw', '--output=json', file]);
    }
  });

  it('fixtures with -o options and -f', () => {
    const pick = (n: string) => fixturePath(fixtures.find((f) => f.name === n)!);
    same(['-O', 'qcow2', '-o', 'cluster_size=4k', pick('compressed-zlib')]);
    same(['-O', 'qcow2', '-o', 'cluster_size=512', '--output=json', pick('unaligned')]);
    same(['-O', 'qcow2', '-o', 'cluster_size=2M', pick('chain-top')]);
    same(['-O', 'qcow2', '-o', 'extended_l2=on', pick('extl2-64k')]);
    same(['-O', 'qcow2', '-o', 'preallocation=full', pick('raw-holes')]);
    same(['-O', 'qcow2', '-o', 'compat=0.10', pick('bitmaps')]);
    same(['-O', 'qcow2', '-o', 'refcount_bits=1,cluster_size=1k', pick('cluster-2m')]);
    same(['-f', 'raw', '-O', 'qcow2', pick('unaligned')]);
    same(['-f', 'qcow2', '-O', 'qcow2', pick('datafile-raw')]);
  });

  it('-l: a snapshot by name, by id and snapshot.id=/snapshot.name=', () => {
    const file = fixturePath(fixtures.find((f) => f.name === 'snapshots')!);
    for (const [i, l] of ['s1', '2', 's2', 'snapshot.id=3', 'snapshot.name=s1', 'snapshot.id=4', 'snapshot.id=2,snapshot.name=s2'].entries()) {
      same(['-O', 'qcow2', ...(i % 2 ? ['--output=json'] : []), '-l', l, file]);
    }
    same(['-O', 'raw', '--output=json', '-l', 's1', file]);
    // errors: missing snapshot, a raw file, -l without a file
    same(['-O', 'qcow2', '-l', 'nope', file]);
    same(['-O', 'qcow2', '-l', 'snapshot.id=1,snapshot.name=s2', file]);
    same(['-l', 's1', fixturePath(fixtures.find((f) => f.name === 'raw-holes')!)]);
    same(['-O', 'qcow2', '-l', 's1', '--size', '1G']);
  });

  it('persistent bitmaps (qemu-img bitmap --add): the bitmaps line', () => {
    const dir = tmp.path;
    const img = join(dir, 'bm.qcow2');
    copyFileSync(join(IMAGES_DIR, fixturePath(fixtures.find((f) => f.name === 'unaligned')!)), img);
    same(['-O', 'qcow2', img], dir); // "bitmaps size: 0"
    ok(qemuImg(['bitmap', '--add', img, 'b1'], dir));
    ok(qemuImg(['bitmap', '--add', '-g', '64k', img, 'a-second-bitmap-with-a-longer-name'], dir));
    ok(qemuImg(['bitmap', '--add', '-g', '512', '--disable', img, 'fine'], dir));
    for (const extra of [[], ['--output=json'], ['-o', 'cluster_size=512'], ['-o', 'cluster_size=2M', '--output=json'], ['-o', 'compat=0.10'], ['-O', 'raw']]) {
      same(['-O', 'qcow2', ...extra, img], dir);
    }
    // a larger image: bitmaps that need more than one cluster
    const big = join(dir, 'big.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', big, '64G'], dir));
    ok(qemuImg(['bitmap', '--add', '-g', '512', big, 'b'], dir));
    same(['-O', 'qcow2', big], dir);
    same(['-O', 'qcow2', '-o', 'cluster_size=1k', '--output=json', big], dir);
    // the bitmaps fixture
    same(['-O', 'qcow2', fixturePath(fixtures.find((f) => f.name === 'bitmaps')!)]);
  });

  it('errors: --size with a filename, neither, missing file, -f without a file', () => {
    const file = fixturePath(fixtures.find((f) => f.name === 'unaligned')!);
    same(['--size', '1G', file]);
    same(['-O', 'qcow2', '--size', '1G', file]);
    same([]);
    same(['-O', 'qcow2']);
    same(['-f', 'qcow2', '--size', '1G']);
    // qemu-img doubles "Could not open 'X': " for a missing file; qimg prints it once
    const t = qemuImg(['measure', 'nope.qcow2'], IMAGES_DIR);
    const m = qimg(['measure', 'nope.qcow2'], { cwd: IMAGES_DIR });
    expect([m.status, t.status]).toEqual([1, 1]);
    expect(m.stdout + t.stdout).toBe('');
    expect(m.stderr).toBe("qimg: Could not open 'nope.qcow2': No such file or directory\n");
    expect(t.stderr).toBe("qemu-img: Could not open 'nope.qcow2': Could not open 'nope.qcow2': No such file or directory\n");
  });
});
