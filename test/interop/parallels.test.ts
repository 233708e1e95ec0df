/**
 * parallels against qemu-img 7.2 as the oracle: qemu's images read byte-identically
 * (info/map/convert), qimg's images pass qemu-img check and compare, qemu-io writes
 * into qimg's images and qimg writes into qemu's, the create option matrix, the
 * in_use flag, and check / check -r on damaged images.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, openSync, readFileSync, statSync, writeFileSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-parallels-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (n: string) => join(d, n);
const Q = (args: string[]) => qimg(args, { cwd: d });
const R = (args: string[]) => qemuImg(args, d);

/** qemu-img's output with its program name as qimg prints it. */
const asQimg = (s: string) => s.replace(/qemu-img: /g, 'qimg: ');
const mapRanges = (t: string) => (JSON.parse(t) as Array<Record<string, unknown>>).map(({ compressed: _c, ...r }) => r);

function patchLE32(file: string, off: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  const fd = openSync(file, 'r+');
  writeSync(fd, b, 0, 4, off);
  closeSync(fd);
}

function truncateFile(file: string, len: number): void {
  const fd = openSync(file, 'r+');
  ftruncateSync(fd, len);
  closeSync(fd);
}

function sameRead(name: string): void {
  ok(R(['convert', '-O', 'raw', name, `${name}.qemu.raw`]));
  ok(Q(['convert', '-O', 'raw', name, `${name}.qimg.raw`]));
  expect(readFileSync(P(`${name}.qimg.raw`)).equals(readFileSync(P(`${name}.qemu.raw`)))).toBe(true);
}

function sameInfoMap(name: string): void {
  for (const out of ['json', 'human']) {
    const q = R(['info', `--output=${out}`, name]);
    const m = Q(['info', `--output=${out}`, name]);
    expect(m.status).toBe(q.status);
    // disk size may differ with allocation; everything else is qemu's
    const strip = (s: string) => s.replace(/"actual-size": \d+/, '').replace(/disk size: .*/, '');
    expect(strip(m.stdout)).toBe(strip(q.stdout));
  }
  const qj = R(['map', '--output=json', name]);
  const mj = Q(['map', '--output=json', name]);
  expect(mapRanges(mj.stdout)).toEqual(mapRanges(qj.stdout));
  expect(Q(['map', name]).stdout).toBe(R(['map', name]).stdout);
}

function sameCheck(name: string, extra: string[] = []): { q: RunResult; m: RunResult } {
  const a = `${name}.a`;
  const b = `${name}.b`;
  copyFileSync(P(name), P(a));
  copyFileSync(P(name), P(b));
  const qj = R(['check', '--output=json', ...extra, a]);
  const mj = Q(['check', '--output=json', ...extra, b]);
  expect(mj.stdout.replaceAll(b, a)).toBe(qj.stdout);
  expect(mj.status).toBe(qj.status);
  copyFileSync(P(name), P(a));
  copyFileSync(P(name), P(b));
  const q = R(['check', ...extra, a]);
  const m = Q(['check', ...extra, b]);
  expect(m.status).toBe(q.status);
  expect(m.stdout.replaceAll(b, a)).toBe(q.stdout);
  expect(asQimg(q.stderr)).toBe(m.stderr);
  return { q, m };
}

beforeAll(() => {
  if (!enabled) return;
  // a source with data, zero runs and a partial last cluster
  const src = Buffer.alloc(10 * 1024 * 1024 + 512 * 3);
  for (let i = 0; i < 3 * 1024 * 1024; i += 4096) src.writeUInt32LE((i * 2654435761) >>> 0, i);
  src.fill(0xab, 6 * 1024 * 1024, 6 * 1024 * 1024 + 200 * 1024);
  src.fill(0x77, src.length - 700);
  writeFileSync(P('src.raw'), src);
  ok(R(['create', '-q', '-f', 'parallels', 'qemu.prl', '20M']));
  ok(qemuIo(['-c', 'write -P 0xab 1M 100k', '-c', 'write -P 0xcd 5000k 8k', '-c', 'write -P 0x12 19M 1M', 'qemu.prl'], d));
  ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', 'qemu64k.prl', '5M']));
  ok(qemuIo(['-c', 'write -P 0x31 0 65k', '-c', 'write -P 0x32 4M 1k', 'qemu64k.prl'], d));
});

describe.skipIf(!enabled)('parallels: qemu-made images read by qimg', () => {
  for (const name of ['qemu.prl', 'qemu64k.prl']) {
    it(`${name}: convert -O raw byte-identical, info and map as qemu-img`, () => {
      sameRead(name);
      sameInfoMap(name);
      expect(Q(['check', name]).stdout).toBe(R(['check', name]).stdout);
    });
  }

  it('probes as parallels with both magics (WithoutFreeSpace: BAT in sectors)', () => {
    // an old-style image: same layout, BAT entries in sectors
    ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=4k', 'old.prl', '1M']));
    ok(qemuIo(['-c', 'write -P 0x44 8k 4k', '-c', 'write -P 0x45 100k 6k', 'old.prl'], d));
    const buf = readFileSync(P('old.prl'));
    buf.write('WithoutFreeSpace', 0, 'latin1');
    const tracks = buf.readUInt32LE(28);
    for (let i = 0; i < buf.readUInt32LE(32); i++) {
      const e = buf.readUInt32LE(64 + 4 * i);
      if (e) buf.writeUInt32LE(e * tracks, 64 + 4 * i);
    }
    writeFileSync(P('old.prl'), buf);
    expect(JSON.parse(Q(['info', '--output=json', 'old.prl']).stdout).format).toBe('parallels');
    sameRead('old.prl');
    sameInfoMap('old.prl');
  });
});

describe.skipIf(!enabled)('parallels: qimg-made images checked by qemu-img', () => {
  for (const cs of ['512', '4k', '64k', '1M', '2M']) {
    it(`convert -O parallels -o cluster_size=${cs}: byte-identical to qemu-img's, check clean, compare identical`, () => {
      ok(Q(['convert', '-O', 'parallels', '-o', `cluster_size=${cs}`, 'src.raw', `m${cs}.prl`]));
      ok(R(['convert', '-O', 'parallels', '-o', `cluster_size=${cs}`, 'src.raw', `q${cs}.prl`]));
      expect(readFileSync(P(`m${cs}.prl`)).equals(readFileSync(P(`q${cs}.prl`)))).toBe(true);
      const c = R(['check', `m${cs}.prl`]);
      expect(c.status).toBe(0);
      expect(c.stdout).toContain('No errors were found on the image.');
      expect(R(['compare', 'src.raw', `m${cs}.prl`]).stdout).toBe('Images are identical.\n');
    });
  }

  it('qemu-io writes into a qimg image; qimg reads them back', () => {
    ok(Q(['create', '-q', '-f', 'parallels', 'mine.prl', '8M']));
    ok(qemuIo(['-c', 'write -P 0x5a 3M 4k', '-c', 'write -P 0x11 100k 1k', '-c', 'write -P 0x22 7M 1M', 'mine.prl'], d));
    sameRead('mine.prl');
    sameInfoMap('mine.prl');
    expect(R(['check', 'mine.prl']).status).toBe(0);
  });

  it('qimg writes into a qemu image (convert -n); qemu reads them back, in_use cleared, file trimmed', () => {
    ok(R(['create', '-q', '-f', 'parallels', 'target.prl', `${readFileSync(P('src.raw')).length}`]));
    ok(qemuIo(['-c', 'write -P 0x99 9M 4k', 'target.prl'], d));
    ok(Q(['convert', '-n', '-O', 'parallels', 'src.raw', 'target.prl']));
    expect(R(['compare', 'src.raw', 'target.prl']).stdout).toBe('Images are identical.\n');
    const c = R(['check', 'target.prl']);
    expect(c.status, c.stderr).toBe(0);
    expect(readFileSync(P('target.prl')).readUInt32LE(44)).toBe(0);
    expect(c.stdout).toContain(`Image end offset: ${statSync(P('target.prl')).size}`);
  });

  it('partial-cluster writes keep the rest of a new cluster zero', () => {
    ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', 'part.prl', '1M']));
    // garbage after the data area (leaked space) must not show through a new cluster
    const fd = openSync(P('part.prl'), 'r+');
    writeSync(fd, Buffer.alloc(256 * 1024, 0xee), 0, 256 * 1024, statSync(P('part.prl')).size);
    closeSync(fd);
    writeFileSync(P('small.raw'), Buffer.concat([Buffer.alloc(70 * 1024), Buffer.alloc(1024, 0x42), Buffer.alloc(1024 * 1024 - 71 * 1024)]));
    ok(Q(['convert', '-n', '-O', 'parallels', 'small.raw', 'part.prl']));
    expect(R(['compare', 'small.raw', 'part.prl']).stdout).toBe('Images are identical.\n');
    sameRead('part.prl');
  });
});

describe.skipIf(!enabled)('parallels: create options vs qemu-img', () => {
  const cases: Array<[string[], string]> = [
    [[], '10M'],
    [['-o', 'cluster_size=0'], '10M'],
    [['-o', 'cluster_size=511'], '10M'],
    [['-o', 'cluster_size=513'], '10M'],
    [['-o', 'cluster_size=1k'], '1000'],
    [['-o', 'cluster_size=2G'], '10M'],
    [['-o', 'cluster_size=1T'], '10M'],
    [['-o', 'cluster_size=512'], '2T'],
    [['-o', 'cluster_size=512'], '3T'],
    [['-o', 'cluster_size=512k'], '0'],
    [['-o', 'cluster_size=abc'], '1M'],
    [['-o', 'size=3M,cluster_size=256k'], ''],
    [['-o', 'preallocation=full'], '1M'],
    [['-o', 'preallocation=metadata'], '1M'],
    [['-o', 'preallocation=bogus'], '1M'],
    [['-o', 'extent_size_hint=1M,preallocation=falloc,nocow=on'], '1M'],
    [['-b', 'qemu.prl', '-F', 'parallels'], '1M'],
  ];
  for (const [opts, size] of cases) {
    it(`create ${[...opts, size].join(' ')}`, () => {
      const sizeArg = size ? [size] : [];
      const q = R(['create', '-f', 'parallels', ...opts, 'cq.prl', ...sizeArg]);
      const m = Q(['create', '-f', 'parallels', ...opts, 'cm.prl', ...sizeArg]);
      expect(m.status).toBe(q.status);
      expect(m.stdout.replaceAll('cm.prl', 'cq.prl')).toBe(q.stdout);
      // (qemu adds its size-suffix help lines after a bad size; qimg prints the first line)
      expect(m.stderr.replaceAll('cm.prl', 'cq.prl')).toBe(asQimg(q.stderr).split('\n')[0] + (q.stderr ? '\n' : ''));
      if (q.status === 0) expect(readFileSync(P('cm.prl')).equals(readFileSync(P('cq.prl')))).toBe(true);
    });
  }

  it('-o help lists qemu-img options', () => {
    expect(Q(['create', '-f', 'parallels', '-o', 'help']).stdout).toBe(R(['create', '-f', 'parallels', '-o', 'help']).stdout);
  });
});

describe.skipIf(!enabled)('parallels: in_use flag and check', () => {
  beforeAll(() => {
    if (!enabled) return;
    ok(R(['create', '-q', '-f', 'parallels', 'base.prl', '10M']));
    ok(qemuIo(['-c', 'write -P 0xab 1M 100k', '-c', 'write -P 0xcd 5000k 8k', 'base.prl'], d));
  });

  it('an unclean image reads, refuses read-write opens, and check reports it', () => {
    copyFileSync(P('base.prl'), P('unclean.prl'));
    patchLE32(P('unclean.prl'), 44, 0x746f6e59);
    sameRead('unclean.prl');
    const q = R(['convert', '-n', '-O', 'parallels', 'src.raw', 'unclean.prl']);
    const m = Q(['convert', '-n', '-O', 'parallels', 'src.raw', 'unclean.prl']);
    expect(q.status).toBe(1);
    expect(m.status).toBe(1);
    expect(m.stderr).toContain('parallels: Image was not closed correctly; cannot be opened read/write');
    sameCheck('unclean.prl');
    sameCheck('unclean.prl', ['-r', 'all']);
    expect(readFileSync(P('unclean.prl.b')).readUInt32LE(44)).toBe(0);
    expect(Q(['check', 'unclean.prl.b']).status).toBe(0);
  });

  it('a cluster outside the image: corruption, repaired by -r all', () => {
    copyFileSync(P('base.prl'), P('outside.prl'));
    truncateFile(P('outside.prl'), 4 * 1024 * 1024);
    patchLE32(P('outside.prl'), 64 + 8 * 4, 16);
    const { q } = sameCheck('outside.prl');
    expect(q.status).toBe(2);
    sameCheck('outside.prl', ['-r', 'all']);
    // qemu 7.2 then grows the file to its open-time data end (fixed in qemu 8.0:
    // "parallels: Out of image offset in BAT leads to image inflation"); qimg does not
    expect(R(['check', 'outside.prl.b']).status).toBe(0);
    expect(statSync(P('outside.prl.b')).size).toBe(3 * 1024 * 1024);
  });

  it('an entry exactly at the end of the file is not outside (qemu 7.2: off > size)', () => {
    copyFileSync(P('base.prl'), P('atend.prl'));
    patchLE32(P('atend.prl'), 64 + 9 * 4, 3);
    sameCheck('atend.prl');
  });

  it('leaked space at the end: leaks, repaired by -r leaks', () => {
    copyFileSync(P('base.prl'), P('leak.prl'));
    truncateFile(P('leak.prl'), 7 * 1024 * 1024 + 1000);
    const { q } = sameCheck('leak.prl');
    expect(q.status).toBe(3);
    sameCheck('leak.prl', ['-r', 'leaks']);
    expect(statSync(P('leak.prl.b')).size).toBe(statSync(P('leak.prl.a')).size);
  });

  it('fragmented clusters are counted as qemu counts them', () => {
    ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', 'frag.prl', '2M']));
    ok(qemuIo(['-c', 'write -P 1 128k 64k', '-c', 'write -P 2 0 64k', '-c', 'write -P 3 64k 64k', '-c', 'write -P 4 1M 256k', 'frag.prl'], d));
    sameCheck('frag.prl');
  });

  it('a fresh image with small clusters (BAT larger than one cluster)', () => {
    ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=512', 'small.prl', '10M']));
    sameCheck('small.prl');
  });
});

describe.skipIf(!enabled)('parallels: format extension (read-only opens validate it as qemu)', () => {
  /** An image whose ext_off points at a format extension cluster with `features`. */
  function withExtension(name: string, features: Buffer, opts: { badSum?: boolean; magic?: bigint } = {}): void {
    ok(R(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', name, '4M']));
    ok(qemuIo(['-c', 'write -P 0x61 0 64k', name], d));
    const img = readFileSync(P(name));
    const cs = 64 * 1024;
    const ext = Buffer.alloc(cs);
    ext.writeBigUInt64LE(opts.magic ?? 0xab234cef23dcea87n, 0);
    features.copy(ext, 24);
    const md5 = createHash('md5').update(ext.subarray(24)).digest();
    (opts.badSum ? Buffer.alloc(16, 1) : md5).copy(ext, 8);
    const out = Buffer.concat([img, ext]);
    out.writeBigUInt64LE(BigInt(img.length / 512), 56);
    writeFileSync(P(name), out);
  }

  function bitmapFeature(sectors: number, granularitySectors: number, l1: bigint[]): Buffer {
    const data = Buffer.alloc(32 + 8 * l1.length);
    data.writeBigUInt64LE(BigInt(sectors), 0);
    data.fill(0x5c, 8, 24);
    data.writeUInt32LE(granularitySectors, 24);
    data.writeUInt32LE(l1.length, 28);
    l1.forEach((e, i) => data.writeBigUInt64LE(e, 32 + 8 * i));
    const h = Buffer.alloc(24);
    h.writeBigUInt64LE(0x20385fae252cb34an, 0);
    h.writeUInt32LE(data.length, 16);
    return Buffer.concat([h, data, Buffer.alloc((8 - (data.length % 8)) % 8)]);
  }

  const cases: Array<{ name: string; features: Buffer; badSum?: boolean; magic?: bigint }> = [
    { name: 'ext-empty', features: Buffer.alloc(0) },
    { name: 'ext-bitmap', features: bitmapFeature(8192, 128, [1n]) },
    { name: 'ext-badsum', features: Buffer.alloc(0), badSum: true },
    { name: 'ext-badmagic', features: Buffer.alloc(0), magic: 0x1234n },
    { name: 'ext-unknown', features: Buffer.from('0100000000000000000000000000000000000000', 'hex') },
    { name: 'ext-flags', features: Buffer.from('010000000000000001', 'hex') },
    { name: 'ext-bitmap-size', features: bitmapFeature(8000, 128, [0n]) },
    { name: 'ext-bitmap-l1', features: bitmapFeature(8192, 128, [0n, 0n]) },
  ];
  for (const c of cases) {
    it(`${c.name}: same success/failure as qemu-img`, () => {
      withExtension(`${c.name}.prl`, c.features, c);
      const q = R(['convert', '-O', 'raw', `${c.name}.prl`, `${c.name}.q.raw`]);
      const m = Q(['convert', '-O', 'raw', `${c.name}.prl`, `${c.name}.m.raw`]);
      expect(m.status, m.stderr + q.stderr).toBe(q.status);
      if (q.status === 0) sameRead(`${c.name}.prl`);
      else {
        expect(m.stderr).toMatch(/^qimg: [^\n]+\n$/);
        // qemu: "Could not open 'X': <message>"; qimg: "X: <message>"
        const msg = q.stderr.replace(/^.*?: Could not open '[^']*': /, '').trim();
        expect(m.stderr).toContain(msg);
      }
      expect(existsSync(P(`${c.name}.m.raw`))).toBe(q.status === 0);
    });
  }
});
