/**
 * Every format into every other: qimg converts a source (made by qemu-io) to each
 * writable format and subformat, qemu-img checks and compares each result, and qimg then
 * converts each result into every other format, compared again by qemu-img. The other
 * direction too: each image qemu-img writes reads byte-identically in qimg.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, QIMG, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';
import { runAsync } from '../hostile/mutate.js';

const enabled = qemuAvailable();

interface Target {
  id: string;
  format: string;
  options: string[];
  /** qemu-img has a consistency check for it */
  check: boolean;
  /** `-f` is needed to read it (a fixed VHD probes as raw, as in qemu) */
  forceFormat?: boolean;
}

const TARGETS: Target[] = [
  { id: 'raw', format: 'raw', options: [], check: false },
  { id: 'qcow2', format: 'qcow2', options: [], check: true },
  { id: 'qcow2-v2', format: 'qcow2', options: ['-o', 'compat=0.10'], check: true },
  { id: 'vmdk', format: 'vmdk', options: [], check: true },
  { id: 'vmdk-stream', format: 'vmdk', options: ['-o', 'subformat=streamOptimized'], check: true },
  { id: 'vmdk-flat', format: 'vmdk', options: ['-o', 'subformat=monolithicFlat'], check: true },
  { id: 'vmdk-2g', format: 'vmdk', options: ['-o', 'subformat=twoGbMaxExtentSparse'], check: true },
  { id: 'vdi', format: 'vdi', options: [], check: true },
  { id: 'vdi-static', format: 'vdi', options: ['-o', 'static=on'], check: true },
  { id: 'vpc', format: 'vpc', options: [], check: false },
  { id: 'vpc-fixed', format: 'vpc', options: ['-o', 'subformat=fixed'], check: false, forceFormat: true },
  { id: 'vhdx', format: 'vhdx', options: [], check: true },
  { id: 'vhdx-fixed', format: 'vhdx', options: ['-o', 'subformat=fixed'], check: true },
  { id: 'qcow', format: 'qcow', options: [], check: false },
  { id: 'qed', format: 'qed', options: [], check: true },
  { id: 'parallels', format: 'parallels', options: [], check: true },
];

/** One of each format for the all-pairs run (all subformats are covered above). */
const PAIRS = ['raw', 'qcow2', 'vmdk', 'vmdk-stream', 'vdi', 'vpc', 'vhdx', 'qcow', 'qed', 'parallels'];

/** Data that every format keeps: patterns, a zeroed run, holes, an odd tail. */
const SIZE = 24 * 1024 * 1024;

describe.skipIf(!enabled)('convert between every pair of formats', () => {
  let dir: { path: string; cleanup: () => void };
  const c = () => dir.path;
  const out = (t: Target, tool: string) => `${tool}-${t.id}.${t.format}`;
  // VHD rounds sizes to its CHS geometry: compare the common prefix, as qemu-img compare does
  const compare = (a: string, fa: string, b: string, fb: string) => {
    const r = qemuImg(['compare', '-f', fa, '-F', fb, a, b], c());
    expect(r.stdout + r.stderr, `compare ${a} ${b}`).toContain('Images are identical.');
  };

  beforeAll(() => {
    dir = tempDir('qimg-matrix-');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', 'src.qcow2', String(SIZE)], c()));
    ok(
      qemuIo(
        [
          '-c', 'write -P 0x11 0 1M',
          '-c', 'write -P 0x22 3M 64k',
          '-c', 'write -P 0x33 5243392 4096', // not cluster-aligned
          '-c', 'write -z 8M 2M',
          '-c', 'write -P 0x44 12M 3M',
          '-c', `write -P 0x55 ${SIZE - 512} 512`,
          'src.qcow2',
        ],
        c(),
      ),
    );
    // one byte different from the source, for compare's mismatch
    ok(qemuImg(['convert', '-O', 'qcow2', 'src.qcow2', 'other.qcow2'], c()));
    ok(qemuIo(['-c', 'write -P 0x66 13M 1', 'other.qcow2'], c()));
  });
  afterAll(() => dir?.cleanup());

  it.each(TARGETS.map((t) => [t.id, t] as const))('qimg convert -O %s: qemu-img check and compare agree', (_id, t) => {
    ok(qimg(['convert', '-O', t.format, ...t.options, 'src.qcow2', out(t, 'qimg')], { cwd: c() }));
    if (t.check) {
      const r = qemuImg(['check', '-f', t.format, out(t, 'qimg')], c());
      expect(r.status, r.stdout + r.stderr).toBe(0);
    }
    compare('src.qcow2', 'qcow2', out(t, 'qimg'), t.format);
    const info = JSON.parse(ok(qemuImg(['info', '--output=json', '-f', t.format, out(t, 'qimg')], c())).stdout);
    expect(info.format).toBe(t.format);
    expect(info['virtual-size']).toBeGreaterThanOrEqual(SIZE);
  });

  it.each(TARGETS.map((t) => [t.id, t] as const))('qemu-img convert -O %s: qimg reads it byte-identically', (_id, t) => {
    ok(qemuImg(['convert', '-O', t.format, ...t.options, 'src.qcow2', out(t, 'qemu')], c()));
    const fmt = t.forceFormat ? ['-f', t.format] : [];
    const probed = JSON.parse(ok(qimg(['info', '--output=json', ...fmt, out(t, 'qemu')], { cwd: c() })).stdout);
    const expected = JSON.parse(ok(qemuImg(['info', '--output=json', ...fmt, out(t, 'qemu')], c())).stdout);
    expect(probed.format).toBe(expected.format);
    expect(probed['virtual-size']).toBe(expected['virtual-size']);
    ok(qimg(['convert', ...fmt, '-O', 'raw', out(t, 'qemu'), `${t.id}.qimg.raw`], { cwd: c() }));
    ok(qemuImg(['convert', ...fmt, '-O', 'raw', out(t, 'qemu'), `${t.id}.qemu.raw`], c()));
    expect(readFileSync(join(c(), `${t.id}.qimg.raw`)).equals(readFileSync(join(c(), `${t.id}.qemu.raw`)))).toBe(true);
  });

  it('every image qimg wrote converts into every other format', async () => {
    const failures: string[] = [];
    const pairTargets = TARGETS.filter((t) => PAIRS.includes(t.id));
    const pairs = pairTargets.flatMap((from) => pairTargets.filter((to) => to !== from).map((to) => [from, to] as const));
    const one = async ([from, to]: readonly [Target, Target]) => {
      const dest = `x-${from.id}-${to.id}.${to.format}`;
      const r = await runAsync(process.execPath, [QIMG, 'convert', '-f', from.format, '-O', to.format, ...to.options, out(from, 'qimg'), dest], c());
      if (r.status !== 0) return failures.push(`${from.id} -> ${to.id}: ${r.stderr.trim()}`);
      const cmp = await runAsync('qemu-img', ['compare', '-f', from.format, '-F', to.format, out(from, 'qimg'), dest], c());
      if (!cmp.stdout.includes('Images are identical.')) failures.push(`${from.id} -> ${to.id}: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`);
      if (to.check) {
        const k = await runAsync('qemu-img', ['check', '-f', to.format, dest], c());
        if (k.status !== 0) failures.push(`${from.id} -> ${to.id}: qemu-img check exit ${k.status}`);
      }
    };
    // two conversions at a time (two cores)
    for (let i = 0; i < pairs.length; i += 2) await Promise.all(pairs.slice(i, i + 2).map(one));
    expect(failures).toEqual([]);
    // qimg's own compare across formats agrees with qemu-img's, both ways
    for (const [a, b] of [['vmdk-stream', 'vhdx'], ['vpc', 'qed'], ['parallels', 'vdi'], ['qcow', 'vmdk']] as const) {
      const from = TARGETS.find((t) => t.id === a)!;
      const to = TARGETS.find((t) => t.id === b)!;
      const same = qimg(['compare', '-f', from.format, '-F', to.format, out(from, 'qimg'), `x-${a}-${b}.${to.format}`], { cwd: c() });
      expect(same.stdout, same.stderr).toBe('Images are identical.\n');
      const diff = qimg(['compare', '-f', from.format, '-F', 'qcow2', out(from, 'qimg'), 'other.qcow2'], { cwd: c() });
      expect(diff.status, diff.stderr).toBe(1);
      expect(diff.stdout).toMatch(/^Content mismatch at offset \d+!\n$/);
    }
  }, 600_000);
});
