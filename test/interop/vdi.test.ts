/**
 * VDI against qemu-img/qemu-io 7.2 as the oracle, both directions: qemu's images
 * (the committed fixtures and fresh ones) read by qimg exactly as qemu-img reads
 * them (info, map, raw data, check); qimg's images (create, convert) checked clean
 * by qemu-img, identical in compare and laid out as qemu-img lays them out; writes
 * by qemu-io into qimg's images and by qimg (convert -n, commit) into qemu's; the
 * create option matrix and check on damaged images with qemu-img's texts and codes.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { ROOT, ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';
import { runAsync, runQimg } from '../hostile/mutate.js';
import { openImage } from '../../src/index.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-vdi-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (name: string) => join(d, name);
const FIXTURES = join(ROOT, 'fixtures', 'foreign', 'vdi');

interface Fixture {
  name: string;
  file: string;
  format: string;
  notes: string;
}
const manifest = JSON.parse(readFileSync(join(FIXTURES, 'manifest.json'), 'utf8')) as Fixture[];

/** The fixture unpacked into the temp dir; returns its file name there. */
function unpack(f: Fixture): string {
  const name = f.file.replace(/\.gz$/, '');
  const data = readFileSync(join(FIXTURES, f.file));
  writeFileSync(P(name), f.file.endsWith('.gz') ? gunzipSync(data) : data);
  return name;
}

const Q = (args: string[]) => ok(qemuImg(args, d), `qemu-img ${args.join(' ')}`);
const I = (args: string[]) => ok(qimg(args, { cwd: d }), `qimg ${args.join(' ')}`);
/** qemu-img's stderr with qimg's program name. */
const asQimg = (text: string) => text.replace(/^qemu-img: /gm, 'qimg: ');
/** qemu 7.2 prints no "compressed" member in map --output=json. */
const mapJson = (text: string) => (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);

/** qimg and qemu-img with the same arguments, at the same time. */
async function both(args: string[]): Promise<{ i: RunResult; q: RunResult }> {
  const [i, q] = await Promise.all([runQimg(args, d), runAsync('qemu-img', args, d)]);
  return { i, q };
}

/** sha256 of the guest data as qimg's library reads it (in-process: no spawn). */
async function qimgDataSha(file: string): Promise<string> {
  const img = await openImage(P(file));
  try {
    const hash = createHash('sha256');
    const buf = Buffer.alloc(4 * 1024 * 1024);
    for (let pos = 0; pos < img.virtualSize; pos += buf.length) {
      const part = buf.subarray(0, Math.min(buf.length, img.virtualSize - pos));
      await img.read(pos, part);
      hash.update(part);
    }
    return hash.digest('hex');
  } finally {
    await img.close();
  }
}

/** info and map (JSON; human too with `human`) and the data, as qemu-img reads them. */
async function expectSameRead(file: string, human = false): Promise<void> {
  const cmds = [['info', '--output=json', file], ['map', '--output=json', file]];
  if (human) cmds.push(['info', file], ['map', file]);
  const runs = await Promise.all(cmds.map(both));
  runs.forEach(({ i, q }, k) => {
    const what = `${cmds[k].join(' ')}: ${i.stderr}`;
    expect(i.status, what).toBe(0);
    expect(q.status, what).toBe(0);
    if (cmds[k][0] === 'map' && k === 1) expect(mapJson(i.stdout), what).toEqual(mapJson(q.stdout));
    else expect(i.stdout, what).toBe(q.stdout);
  });
  Q(['convert', '-O', 'raw', file, 'read-qemu.raw']);
  expect(await qimgDataSha(file), `data of ${file}`).toBe(sha256File(P('read-qemu.raw')));
}

/** Same map (JSON, host offsets included) as the twin qemu-img made. */
function expectSameLayout(mine: string, twin: string): void {
  expect(mapJson(Q(['map', '--output=json', mine]).stdout)).toEqual(mapJson(Q(['map', '--output=json', twin]).stdout));
}


/** Header bytes without the two random UUIDs (image, last snapshot). */
function headerSansUuids(file: string): Buffer {
  const h = readFileSync(P(file)).subarray(0, 512);
  return Buffer.concat([h.subarray(0, 0x188), h.subarray(0x1a8)]);
}

beforeAll(() => {
  if (!enabled) return;
  // incompressible-ish source: 1.5 MiB of a pattern, a hole, 12 KiB far out, then a hole
  Q(['create', '-q', '-f', 'raw', 'src.raw', '9M']);
  ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x5a 0 1536k', '-c', 'write -P 0xc3 6144000 12k', '-c', 'write -P 0x01 8M 512', 'src.raw'], d));
});

describe.skipIf(!enabled)('vdi: qemu-img images read by qimg', () => {
  it('every fixture: info, map and data as qemu-img', async () => {
    for (const f of manifest) await expectSameRead(unpack(f), f.name === 'vdi-dynamic' || f.name === 'vdi-static');
  });

  it('probes VDI by its signature; a changed signature is raw', () => {
    const name = unpack(manifest.find((f) => f.name === 'vdi-dynamic')!);
    expect(JSON.parse(I(['info', '--output=json', name]).stdout).format).toBe('vdi');
    copyFileSync(P(name), P('nosig.vdi'));
    const b = readFileSync(P('nosig.vdi'));
    b.writeUInt32LE(0x12345678, 0x40);
    writeFileSync(P('nosig.vdi'), b);
    expect(JSON.parse(I(['info', '--output=json', 'nosig.vdi']).stdout).format).toBe('raw');
    const r = qimg(['info', '-f', 'vdi', 'nosig.vdi'], { cwd: d });
    expect(r.status).toBe(1);
    expect(r.stderr).toBe('qimg: nosig.vdi: Image not in VDI format (bad signature 12345678)\n');
    expect(qemuImg(['info', '-f', 'vdi', 'nosig.vdi'], d).stderr).toBe("qemu-img: Could not open 'nosig.vdi': Image not in VDI format (bad signature 12345678)\n");
  });

  it('check on damaged images: qemu-img messages, counts and exit codes; -r is refused as qemu-img does', async () => {
    const files = manifest.filter((x) => x.name.startsWith('vdi-check-') || x.name === 'vdi-dynamic').map(unpack);
    const cmds = files.flatMap((f) => [['check', f], ['check', '--output=json', f]]);
    const runs = await Promise.all(cmds.map(both));
    // -r takes the write lock: one tool at a time, after the read-only checks
    for (const c of [['check', '-r', 'leaks', 'dynamic.vdi'], ['check', '-r', 'all', 'check-count.vdi']]) {
      cmds.push(c);
      runs.push({ i: await runQimg(c, d), q: await runAsync('qemu-img', c, d) });
    }
    runs.forEach(({ i, q }, k) => {
      expect([i.status, i.stdout, i.stderr], cmds[k].join(' ')).toEqual([q.status, q.stdout, asQimg(q.stderr)]);
    });
    expect(runs.map((r) => r.q.status)).toEqual([0, 0, 2, 2, 2, 2, 2, 2, 63, 63]);
  });
});

describe.skipIf(!enabled)('vdi: create as qemu-img', () => {
  const matrix: Array<{ opts: string[]; size?: string }> = [
    { opts: [], size: '5M' },
    { opts: [], size: '1000' },
    { opts: [], size: '0' },
    { opts: [], size: '1.5M' },
    { opts: ['-o', 'static=on'], size: '3M' },
    { opts: ['-o', 'static=yes'], size: '1M' },
    { opts: ['-o', 'static'], size: '1M' },
    { opts: ['-o', 'nostatic'], size: '1M' },
    { opts: ['-o', 'static=on'], size: '0' },
    { opts: ['-o', 'size=2M'] },
    { opts: ['-o', 'size=2M,static=off'] },
    { opts: ['-o', 'extent_size_hint=1M,static=on'], size: '1M' },
    { opts: ['-o', 'preallocation=off'], size: '1M' },
    { opts: ['-o', 'preallocation=full'], size: '1M' },
    { opts: [], size: '1T' },
    // refused
    { opts: ['-o', 'static=foo'], size: '1M' },
    { opts: ['-o', 'preallocation=metadata'], size: '1M' },
    { opts: ['-o', 'preallocation=foo'], size: '1M' },
    { opts: ['-o', 'cluster_size=2M'], size: '1M' },
    { opts: ['-o', 'size=2M'], size: '3M' },
    { opts: ['-b', 'x.qcow2'], size: '1M' },
    { opts: [], size: '536870785M' },
  ];
  it('the option matrix, valid and refused', async () => {
    const args = (m: (typeof matrix)[number], file: string) => ['create', '-f', 'vdi', ...m.opts, file, ...(m.size !== undefined ? [m.size] : [])];
    for (let k = 0; k < matrix.length; k++) {
      const m = matrix[k];
      const [r, q] = await Promise.all([runQimg(args(m, `i${k}.vdi`), d), runAsync('qemu-img', args(m, `q${k}.vdi`), d)]);
      const what = args(m, 'X').join(' ');
      expect(r.status, what).toBe(q.status);
      expect(r.stdout, what).toBe(q.stdout.replace(`'q${k}.vdi'`, `'i${k}.vdi'`));
      expect(r.stderr, what).toBe(asQimg(q.stderr).replace(`q${k}.vdi`, `i${k}.vdi`));
      if (q.status !== 0) continue;
      expect(headerSansUuids(`i${k}.vdi`), what).toEqual(headerSansUuids(`q${k}.vdi`));
      const [a, b] = [readFileSync(P(`i${k}.vdi`)), readFileSync(P(`q${k}.vdi`))];
      expect(a.length, what).toBe(b.length);
      expect(a.subarray(512).equals(b.subarray(512)), what).toBe(true);
      const uuid = a.subarray(0x188, 0x198);
      // a random (version 4, RFC 4122 variant) UUID, stored with its first fields little endian
      expect(uuid.readUInt16LE(6) >> 12, what).toBe(4);
      expect(uuid[8] >> 6, what).toBe(2);
      expect(a.subarray(0x198, 0x1a8).equals(uuid), what).toBe(false);
    }
  });

  it('what vdi cannot do is refused as qemu-img refuses it (resize, rebase, measure)', async () => {
    Q(['create', '-q', '-f', 'vdi', 'nr-i.vdi', '4M']);
    Q(['create', '-q', '-f', 'vdi', 'nr-q.vdi', '4M']);
    const cmds = [
      ['resize', 'F', '+1M'],
      ['resize', '--shrink', 'F', '2M'],
      ['rebase', '-u', '-b', 'x.qcow2', '-F', 'qcow2', 'F'],
      ['rebase', '-b', '', 'F'],
      ['measure', '-O', 'vdi', 'F'],
    ];
    for (const c of cmds) {
      const [i, q] = await Promise.all([runQimg(c.map((a) => (a === 'F' ? 'nr-i.vdi' : a)), d), runAsync('qemu-img', c.map((a) => (a === 'F' ? 'nr-q.vdi' : a)), d)]);
      expect([i.status, i.stdout, i.stderr], c.join(' ')).toEqual([q.status, q.stdout, asQimg(q.stderr).replace(/nr-q/g, 'nr-i')]);
      expect(q.status, c.join(' ')).toBe(1);
    }
  });

  it('-o help lists what qemu-img lists', () => {
    expect(I(['create', '-f', 'vdi', '-o', 'help']).stdout).toBe(Q(['create', '-f', 'vdi', '-o', 'help']).stdout);
  });
});

describe.skipIf(!enabled)('vdi: qimg images in qemu-img', () => {
  for (const [label, extra] of [
    ['dynamic', []],
    ['dynamic -S 0', ['-S', '0']],
    ['dynamic -S 64k', ['-S', '64k']],
    ['static', ['-o', 'static=on']],
  ] as const) {
    it(`convert raw -> vdi (${label}): check clean, identical, same layout as qemu-img's`, () => {
      I(['convert', ...extra, '-O', 'vdi', 'src.raw', 'c-qimg.vdi']);
      Q(['convert', ...extra, '-O', 'vdi', 'src.raw', 'c-qemu.vdi']);
      expect(Q(['check', 'c-qimg.vdi']).stdout).toBe('No errors were found on the image.\n');
      expect(Q(['compare', 'src.raw', 'c-qimg.vdi']).stdout).toBe('Images are identical.\n');
      expectSameLayout('c-qimg.vdi', 'c-qemu.vdi');
      expect(headerSansUuids('c-qimg.vdi')).toEqual(headerSansUuids('c-qemu.vdi'));
    });
  }

  it('convert vdi <-> qcow2 both ways, as qemu-img', () => {
    Q(['convert', '-O', 'qcow2', 'src.raw', 'src.qcow2']);
    I(['convert', '-f', 'qcow2', '-O', 'vdi', 'src.qcow2', 'from-qcow2.vdi']);
    Q(['convert', '-f', 'qcow2', '-O', 'vdi', 'src.qcow2', 'from-qcow2-q.vdi']);
    expect(Q(['compare', 'src.raw', 'from-qcow2.vdi']).status).toBe(0);
    expectSameLayout('from-qcow2.vdi', 'from-qcow2-q.vdi');
    I(['convert', '-O', 'qcow2', 'from-qcow2.vdi', 'back-i.qcow2']);
    Q(['convert', '-O', 'qcow2', 'from-qcow2.vdi', 'back-q.qcow2']);
    expect(Q(['compare', 'back-i.qcow2', 'src.raw']).status).toBe(0);
    expect(mapJson(Q(['map', '--output=json', 'back-i.qcow2']).stdout).map(({ offset: _o, ...r }) => r)).toEqual(
      mapJson(Q(['map', '--output=json', 'back-q.qcow2']).stdout).map(({ offset: _o, ...r }) => r),
    );
  });

  it('convert from vdi (zero-filled block, static source) to vdi, qcow2 and raw with -S, -n, --target-is-zero: the layout qemu-img makes', async () => {
    Q(['convert', '-O', 'vdi', 'src.raw', 'sz.vdi']);
    ok(qemuIo(['-c', 'write -z 7M 64k', 'sz.vdi'], d)); // allocates block 7 with zeros, as qemu does
    Q(['create', '-q', '-f', 'vdi', '-o', 'static=on', 'ss.vdi', '9M']);
    Q(['convert', '-n', '-O', 'vdi', 'src.raw', 'ss.vdi']); // zeros written: the whole file is data
    const runs: Array<[string, string, string[]]> = [];
    for (const source of ['sz.vdi', 'ss.vdi']) {
      for (const fmt of ['vdi', 'qcow2', 'raw']) {
        for (const flags of [['-S', '3M'], ['-n'], ['-n', '--target-is-zero']]) runs.push([source, fmt, flags]);
      }
    }
    let k = 0;
    for (const [source, fmt, flags] of runs) {
      const [a, b] = [`x${k}-i.${fmt}`, `x${k}-q.${fmt}`];
      k++;
      if (flags[0] === '-n') for (const t of [a, b]) Q(['create', '-q', '-f', fmt, t, '9M']);
      const [i, q] = await Promise.all([runQimg(['convert', ...flags, '-O', fmt, source, a], d), runAsync('qemu-img', ['convert', ...flags, '-O', fmt, source, b], d)]);
      const what = `convert ${flags.join(' ')} ${source} -> ${fmt}: ${i.stderr}${q.stderr}`;
      expect([i.status, q.status], what).toEqual([0, 0]);
      expect(Q(['compare', '-f', fmt, '-F', fmt, a, b]).status, what).toBe(0);
      expect(mapJson(Q(['map', '-f', fmt, '--output=json', a]).stdout), what).toEqual(mapJson(Q(['map', '-f', fmt, '--output=json', b]).stdout));
    }
  });

  it('qemu-io writes into an image qimg made; qimg reads what qemu reads', async () => {
    I(['create', '-q', '-f', 'vdi', 'w.vdi', '5M']);
    ok(qemuIo(['-c', 'write -P 0x5a 100k 300k', '-c', 'write -P 0x6b 3M 1M', '-c', 'write -z 4M 4k', 'w.vdi'], d));
    expect(Q(['check', 'w.vdi']).status).toBe(0);
    await expectSameRead('w.vdi');
    I(['create', '-q', '-f', 'vdi', '-o', 'static=on', 'ws.vdi', '3M']);
    ok(qemuIo(['-c', 'write -P 0x77 1536k 4k', 'ws.vdi'], d));
    await expectSameRead('ws.vdi');
  });

  for (const [label, extra] of [
    ['-n', []],
    ['-n -S 0', ['-S', '0']],
    ['-n --target-is-zero', ['--target-is-zero']],
    ['-n --target-is-zero -S 0', ['--target-is-zero', '-S', '0']],
  ] as const) {
    it(`convert ${label} into a vdi qemu wrote: the same blocks as qemu-img's`, () => {
      Q(['create', '-q', '-f', 'vdi', 'n-i.vdi', '9M']);
      // --target-is-zero promises zeros: only an empty target keeps that promise
      if (!label.includes('target-is-zero')) ok(qemuIo(['-c', 'write -P 0x22 2M 1500k', 'n-i.vdi'], d));
      copyFileSync(P('n-i.vdi'), P('n-q.vdi'));
      I(['convert', '-n', ...extra, '-O', 'vdi', 'src.raw', 'n-i.vdi']);
      Q(['convert', '-n', ...extra, '-O', 'vdi', 'src.raw', 'n-q.vdi']);
      expect(Q(['check', 'n-i.vdi']).status).toBe(0);
      expect(Q(['compare', 'n-i.vdi', 'n-q.vdi']).status).toBe(0);
      expectSameLayout('n-i.vdi', 'n-q.vdi');
      expect(readFileSync(P('n-i.vdi')).subarray(0x180, 0x188)).toEqual(readFileSync(P('n-q.vdi')).subarray(0x180, 0x188));
    });
  }

  it('commit from a qcow2 overlay into a vdi base, as qemu-img commit', () => {
    for (const s of ['i', 'q']) {
      Q(['create', '-q', '-f', 'vdi', `base-${s}.vdi`, '6M']);
      ok(qemuIo(['-c', 'write -P 0x22 0 1500k', `base-${s}.vdi`], d));
      Q(['create', '-q', '-f', 'qcow2', '-b', `base-${s}.vdi`, '-F', 'vdi', `top-${s}.qcow2`]);
      ok(qemuIo(['-c', 'write -P 0x33 1M 8k', '-c', 'write -z 0 64k', '-c', 'write -P 0x44 5M 4k', `top-${s}.qcow2`], d));
    }
    expect(I(['commit', 'top-i.qcow2']).stdout).toBe('Image committed.\n');
    Q(['commit', 'top-q.qcow2']);
    expect(Q(['check', 'base-i.vdi']).status).toBe(0);
    expect(Q(['compare', 'base-i.vdi', 'base-q.vdi']).status).toBe(0);
    expectSameLayout('base-i.vdi', 'base-q.vdi');
  });

  it('a data area laid over the block map is refused for writes, not corrupted', () => {
    Q(['create', '-q', '-f', 'vdi', 'lap.vdi', '4M']);
    const b = readFileSync(P('lap.vdi'));
    b.writeUInt32LE(0x200, 0x158); // offset_data = offset_bmap
    writeFileSync(P('lap.vdi'), b);
    const before = sha256File(P('lap.vdi'));
    Q(['create', '-q', '-f', 'raw', 'one.raw', '4M']);
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 1 0 4k', 'one.raw'], d));
    const r = qimg(['convert', '-n', '-O', 'vdi', 'one.raw', 'lap.vdi'], { cwd: d });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: lap\.vdi: cannot allocate a block: the data area \(offset 0x200\) overlaps the header or the block map\n$/);
    expect(sha256File(P('lap.vdi'))).toBe(before);
  });
});
