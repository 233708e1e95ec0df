/**
 * Internal snapshots against qemu-img 7.2 as the oracle, in both directions: qemu-img
 * lists, applies and deletes what qimg created and qimg lists (byte-equal `-l` and
 * `info` JSON), applies and deletes what qemu-img created. After every step `qemu-img
 * check` must be clean (exit 0: no corruption, no leak) and applied snapshots must give
 * back exactly the content they were taken of. A seeded create/write/apply/delete
 * sequence (qimg for snapshot operations, qemu-io for writes) is checked against an
 * in-memory model; narrow refcounts, extended L2 and compressed clusters are covered.
 *
 * Reproduce a sequence failure: QIMG_SNAPSHOT_SEED=<seed> npx vitest run test/interop/snapshot.test.ts
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';
import { Prng, seedFrom } from '../helpers/prng.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-snapshot-');
afterAll(() => tmp.cleanup());

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

/** qemu-io commands in one process; any failure fails the test. */
function io(dir: string, image: string, cmds: string[]): void {
  const r = qemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), image], dir);
  if (r.status !== 0 || /error|fail/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
}

function create(dir: string, name: string, size: string, opts = ''): void {
  must(qemuImg(['create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), name, size], dir), `create ${name}`);
}

/** `qemu-img check`: exit 0 (no corruption, no leak). */
function clean(dir: string, image: string, what = ''): void {
  const r = qemuImg(['check', image], dir);
  expect(r.status, `${what}: qemu-img check ${image}:\n${r.stdout}${r.stderr}`).toBe(0);
  expect(r.stdout).toContain('No errors were found on the image.');
}

/** The guest content (or a snapshot's, `-l`) as qemu-img reads it. */
function content(dir: string, image: string, snapshot?: string): Buffer {
  const out = join(dir, 'content.raw');
  must(qemuImg(['convert', ...(snapshot !== undefined ? ['-l', snapshot] : []), '-O', 'raw', image, out], dir), `convert ${image} ${snapshot ?? ''}`);
  const b = readFileSync(out);
  rmSync(out);
  return b;
}

function contentSha(dir: string, image: string, snapshot?: string): string {
  const out = join(dir, 'content.raw');
  must(qemuImg(['convert', ...(snapshot !== undefined ? ['-l', snapshot] : []), '-O', 'raw', image, out], dir), `convert ${image}`);
  const h = sha256File(out);
  rmSync(out);
  return h;
}

interface SnapJson {
  id: string;
  name: string;
  [k: string]: unknown;
}

function infoSnapshots(dir: string, image: string): SnapJson[] {
  const r = must(qemuImg(['info', '--output=json', image], dir), 'info');
  return (JSON.parse(r.stdout) as { snapshots?: SnapJson[] }).snapshots ?? [];
}

/** `snapshot -l` and the snapshots of `info --output=json` are the same from both tools. */
function sameListing(dir: string, image: string): void {
  const q = must(qemuImg(['snapshot', '-l', image], dir), 'qemu-img snapshot -l');
  const m = qimg(['snapshot', '-l', image], { cwd: dir });
  expect(m.status, m.stderr).toBe(0);
  expect(m.stderr).toBe('');
  expect(m.stdout).toBe(q.stdout);
  const qi = JSON.parse(must(qemuImg(['info', '--output=json', image], dir), 'info').stdout) as { snapshots?: unknown };
  const mi = JSON.parse(must(qimg(['info', '--output=json', image], { cwd: dir }), 'qimg info').stdout) as { snapshots?: unknown };
  expect(mi.snapshots).toEqual(qi.snapshots);
}

function snap(tool: 'qimg' | 'qemu', dir: string, args: string[]): RunResult {
  return tool === 'qimg' ? qimg(['snapshot', ...args], { cwd: dir }) : qemuImg(['snapshot', ...args], dir);
}

/** Header fields of the snapshot table. */
function snapshotTable(file: string): { offset: number; count: number } {
  const d = readFileSync(file);
  return { count: d.readUInt32BE(60), offset: Number(d.readBigUInt64BE(64)) };
}

/**
 * Gives the first snapshot of the table what a VM snapshot (savevm) would carry:
 * date, VM clock, a VM state size and an icount. qemu-img itself only stores zeros.
 */
function makeVmLike(file: string): void {
  const d = readFileSync(file);
  const { offset, count } = snapshotTable(file);
  expect(count).toBeGreaterThan(0);
  const extraSize = d.readUInt32BE(offset + 36);
  expect(extraSize).toBeGreaterThanOrEqual(24);
  d.writeUInt32BE(1_600_000_000, offset + 16); // 2020-09-13
  d.writeUInt32BE(123_456_000, offset + 20);
  d.writeBigUInt64BE(3_723_004_000_000n, offset + 24); // 01:02:03.004
  d.writeUInt32BE(5_000_000, offset + 32);
  d.writeBigUInt64BE(5_000_000n, offset + 40); // vm_state_size (64-bit)
  d.writeBigInt64BE(987_654_321n, offset + 56); // icount
  writeFileSync(file, d);
}

describe.skipIf(!enabled)('snapshot interop with qemu-img', () => {
  it('qemu-img lists, applies and deletes snapshots qimg created', () => {
    const dir = newDir();
    create(dir, 'a.qcow2', '4M');
    io(dir, 'a.qcow2', ['write -P 0x11 0 1M', 'write -P 0x12 3M 4k']);
    const c1 = contentSha(dir, 'a.qcow2');
    expect(qimg(['snapshot', '-c', 'one', 'a.qcow2'], { cwd: dir })).toMatchObject({ status: 0, stdout: '', stderr: '' });
    clean(dir, 'a.qcow2', 'create one');
    io(dir, 'a.qcow2', ['write -P 0x21 512k 1M', 'write -z 3M 64k']);
    const c2 = contentSha(dir, 'a.qcow2');
    must(qimg(['snapshot', '-c', 'two', 'a.qcow2'], { cwd: dir }), 'create two');
    clean(dir, 'a.qcow2', 'create two');
    io(dir, 'a.qcow2', ['write -P 0x31 0 4M']);
    const c3 = contentSha(dir, 'a.qcow2');
    sameListing(dir, 'a.qcow2');
    expect(infoSnapshots(dir, 'a.qcow2').map((s) => [s.id, s.name])).toEqual([['1', 'one'], ['2', 'two']]);
    // convert -l reads qimg's snapshots, by name and by id
    expect(contentSha(dir, 'a.qcow2', 'one')).toBe(c1);
    expect(contentSha(dir, 'a.qcow2', 'snapshot.id=2')).toBe(c2);
    expect(contentSha(dir, 'a.qcow2')).toBe(c3);
    must(qemuImg(['snapshot', '-a', 'one', 'a.qcow2'], dir), 'qemu apply one');
    expect(contentSha(dir, 'a.qcow2')).toBe(c1);
    clean(dir, 'a.qcow2', 'qemu apply one');
    must(qemuImg(['snapshot', '-a', '2', 'a.qcow2'], dir), 'qemu apply id 2');
    expect(contentSha(dir, 'a.qcow2')).toBe(c2);
    clean(dir, 'a.qcow2', 'qemu apply 2');
    must(qemuImg(['snapshot', '-d', 'one', 'a.qcow2'], dir), 'qemu delete one');
    clean(dir, 'a.qcow2', 'qemu delete one');
    sameListing(dir, 'a.qcow2');
    expect(contentSha(dir, 'a.qcow2')).toBe(c2);
    must(qemuImg(['snapshot', '-d', 'two', 'a.qcow2'], dir), 'qemu delete two');
    clean(dir, 'a.qcow2', 'qemu delete two');
    expect(contentSha(dir, 'a.qcow2')).toBe(c2);
    // qemu-io can still write where the snapshots shared clusters
    io(dir, 'a.qcow2', ['write -P 0x41 0 2M']);
    clean(dir, 'a.qcow2', 'write after deletes');
  });

  it('qimg lists, applies and deletes snapshots qemu-img created', () => {
    const dir = newDir();
    create(dir, 'a.qcow2', '4M', 'cluster_size=4k');
    io(dir, 'a.qcow2', ['write -P 0x11 0 1M', 'write -P 0x12 3M 4k']);
    const c1 = contentSha(dir, 'a.qcow2');
    must(qemuImg(['snapshot', '-c', 'one', 'a.qcow2'], dir), 'qemu create one');
    io(dir, 'a.qcow2', ['write -P 0x21 512k 1M', 'write -z 3M 64k']);
    const c2 = contentSha(dir, 'a.qcow2');
    must(qemuImg(['snapshot', '-c', 'two', 'a.qcow2'], dir), 'qemu create two');
    io(dir, 'a.qcow2', ['write -P 0x31 100k 3M']);
    const c3 = contentSha(dir, 'a.qcow2');
    sameListing(dir, 'a.qcow2');
    must(qimg(['snapshot', '-c', 'three', 'a.qcow2'], { cwd: dir }), 'qimg create three');
    clean(dir, 'a.qcow2', 'qimg create three');
    sameListing(dir, 'a.qcow2');
    expect(qimg(['snapshot', '-a', 'one', 'a.qcow2'], { cwd: dir })).toMatchObject({ status: 0, stdout: '', stderr: '' });
    expect(contentSha(dir, 'a.qcow2')).toBe(c1);
    clean(dir, 'a.qcow2', 'qimg apply one');
    must(qimg(['snapshot', '-a', '2', 'a.qcow2'], { cwd: dir }), 'qimg apply id 2');
    expect(contentSha(dir, 'a.qcow2')).toBe(c2);
    clean(dir, 'a.qcow2', 'qimg apply 2');
    expect(qimg(['snapshot', '-d', 'two', 'a.qcow2'], { cwd: dir })).toMatchObject({ status: 0, stdout: '', stderr: '' });
    clean(dir, 'a.qcow2', 'qimg delete two');
    expect(contentSha(dir, 'a.qcow2')).toBe(c2);
    sameListing(dir, 'a.qcow2');
    must(qimg(['snapshot', '-a', 'three', 'a.qcow2'], { cwd: dir }), 'qimg apply three');
    expect(contentSha(dir, 'a.qcow2')).toBe(c3);
    must(qimg(['snapshot', '-d', 'one', 'a.qcow2'], { cwd: dir }), 'qimg delete one');
    must(qimg(['snapshot', '-d', 'three', 'a.qcow2'], { cwd: dir }), 'qimg delete three');
    clean(dir, 'a.qcow2', 'qimg delete all');
    expect(contentSha(dir, 'a.qcow2')).toBe(c3);
    expect(infoSnapshots(dir, 'a.qcow2')).toEqual([]);
    // nothing left shared: every allocated data cluster is writable in place again (COPIED)
    const check = JSON.parse(must(qemuImg(['check', '--output=json', 'a.qcow2'], dir), 'check').stdout) as Record<string, number>;
    expect(check['allocated-clusters']).toBeGreaterThan(0);
  });

  it('ids and names behave as in qemu-img (duplicates, id = highest + 1, apply by id first, delete by name)', () => {
    const dir = newDir();
    create(dir, 'base.qcow2', '1M', 'cluster_size=4k');
    const contents: Record<string, string> = {};
    // The same sequence on two copies, one driven by each tool.
    for (const tool of ['qimg', 'qemu'] as const) {
      const img = `${tool}.qcow2`;
      copyFileSync(join(dir, 'base.qcow2'), join(dir, img));
      const step = (args: string[]) => must(snap(tool, dir, [...args, img]), `${tool} snapshot ${args.join(' ')}`);
      const fill = (p: number) => io(dir, img, [`write -P ${p} 0 64k`]);
      fill(1);
      step(['-c', 'x']); // id 1, content 1
      fill(2);
      step(['-c', 'y']); // id 2, content 2
      fill(3);
      step(['-c', 'x']); // id 3 (duplicate name), content 3
      fill(4);
      step(['-c', '1']); // id 4, named like id 1, content 4
      step(['-d', '1']); // deletes by name: id 4 goes
      step(['-c', 'z']); // id 4 again (highest is 3)
      step(['-d', 'x']); // the first 'x' (id 1)
      step(['-c', 'w']); // id 5
      fill(5);
      step(['-c', '2']); // id 6, named like id 2, content 5
      fill(6);
      step(['-a', '2']); // by id first: id 2 (content 2), not the one named '2'
      contents[`${tool}-a2`] = contentSha(dir, img);
      step(['-a', 'x']); // the remaining 'x' (id 3)
      contents[`${tool}-ax`] = contentSha(dir, img);
      step(['-a', '6']);
      contents[`${tool}-a6`] = contentSha(dir, img);
      clean(dir, img, tool);
    }
    const qi = infoSnapshots(dir, 'qemu.qcow2').map((s) => [s.id, s.name]);
    expect(qi).toEqual([['2', 'y'], ['3', 'x'], ['4', 'z'], ['5', 'w'], ['6', '2']]);
    expect(infoSnapshots(dir, 'qimg.qcow2').map((s) => [s.id, s.name])).toEqual(qi);
    expect(contents['qimg-a2']).toBe(contents['qemu-a2']);
    expect(contents['qimg-ax']).toBe(contents['qemu-ax']);
    expect(contents['qimg-a6']).toBe(contents['qemu-a6']);
    expect(contents['qimg-a2']).not.toBe(contents['qimg-a6']);
    expect(qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', 'qimg.qcow2', 'qemu.qcow2'], dir).status).toBe(0);
    // each snapshot reads the same from both images
    for (const [id] of qi) expect(contentSha(dir, 'qimg.qcow2', `snapshot.id=${id}`)).toBe(contentSha(dir, 'qemu.qcow2', `snapshot.id=${id}`));

    // delete by id is "snapshot not found" (7.2 matches names only); the file is untouched
    for (const tool of ['qimg', 'qemu'] as const) {
      const img = `${tool}.qcow2`;
      const before = sha256File(join(dir, img));
      const r = snap(tool, dir, ['-d', '5', img]);
      expect(r.status).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^(qemu-img|qimg): (qimg\.qcow2: )?Could not delete snapshot '5': snapshot not found\n$/);
      expect(sha256File(join(dir, img))).toBe(before);
    }
    // apply of something absent: the same message as qemu-img
    const before = sha256File(join(dir, 'qimg.qcow2'));
    const q = qemuImg(['snapshot', '-a', 'nope', 'qemu.qcow2'], dir);
    const m = qimg(['snapshot', '-a', 'nope', 'qimg.qcow2'], { cwd: dir });
    expect(m.status).toBe(q.status);
    expect(m.stderr).toBe(q.stderr.replace(/^qemu-img: /, 'qimg: qimg.qcow2: '));
    expect(sha256File(join(dir, 'qimg.qcow2'))).toBe(before);
  });

  it('odd names (long, spaces, UTF-8, empty) are stored and listed as qemu-img does', () => {
    const dir = newDir();
    create(dir, 'n.qcow2', '1M');
    const names = ['a snapshot name longer than sixteen', 'ünïcødé', '', 'x'];
    for (const [i, name] of names.entries()) must(snap(i % 2 ? 'qemu' : 'qimg', dir, ['-c', name, 'n.qcow2']), `create '${name}'`);
    clean(dir, 'n.qcow2', 'names');
    sameListing(dir, 'n.qcow2');
    expect(infoSnapshots(dir, 'n.qcow2').map((s) => s.name)).toEqual(names);
    must(qimg(['snapshot', '-d', 'ünïcødé', 'n.qcow2'], { cwd: dir }), 'delete');
    must(qemuImg(['snapshot', '-d', 'a snapshot name longer than sixteen', 'n.qcow2'], dir), 'delete');
    sameListing(dir, 'n.qcow2');
    clean(dir, 'n.qcow2', 'names deleted');
  });

  it('VM snapshots keep their date, VM clock, VM state size and icount while qimg creates and deletes others', () => {
    const dir = newDir();
    create(dir, 'a.qcow2', '2M');
    io(dir, 'a.qcow2', ['write -P 7 0 256k']);
    must(qemuImg(['snapshot', '-c', 'vm1', 'a.qcow2'], dir), 'qemu create vm1');
    makeVmLike(join(dir, 'a.qcow2'));
    clean(dir, 'a.qcow2', 'patched');
    must(qemuImg(['snapshot', '-c', 'disk', 'a.qcow2'], dir), 'qemu create disk');
    const before = infoSnapshots(dir, 'a.qcow2');
    expect(before[0]).toMatchObject({ 'date-sec': 1_600_000_000, 'date-nsec': 123_456_000, 'vm-clock-sec': 3723, 'vm-clock-nsec': 4_000_000, 'vm-state-size': 5_000_000, icount: 987_654_321 });
    const line = (text: string, name: string) => text.split('\n').find((l) => l.includes(` ${name} `));
    const listBefore = must(qemuImg(['snapshot', '-l', 'a.qcow2'], dir), 'list').stdout;
    sameListing(dir, 'a.qcow2');
    must(qimg(['snapshot', '-c', 'm1', 'a.qcow2'], { cwd: dir }), 'qimg create m1');
    io(dir, 'a.qcow2', ['write -P 8 0 1M']);
    must(qimg(['snapshot', '-c', 'm2', 'a.qcow2'], { cwd: dir }), 'qimg create m2');
    must(qimg(['snapshot', '-d', 'm1', 'a.qcow2'], { cwd: dir }), 'qimg delete m1');
    must(qimg(['snapshot', '-a', 'vm1', 'a.qcow2'], { cwd: dir }), 'qimg apply vm1');
    must(qimg(['snapshot', '-d', 'disk', 'a.qcow2'], { cwd: dir }), 'qimg delete disk');
    clean(dir, 'a.qcow2', 'after qimg');
    const after = infoSnapshots(dir, 'a.qcow2');
    expect(after.map((s) => s.name)).toEqual(['vm1', 'm2']);
    expect(after[0]).toEqual(before[0]);
    const listAfter = must(qemuImg(['snapshot', '-l', 'a.qcow2'], dir), 'list').stdout;
    expect(line(listAfter, 'vm1')).toBe(line(listBefore, 'vm1'));
    expect(line(listAfter, 'vm1')).toMatch(/4\.77 MiB 2020-09-1\d \d\d:\d\d:\d\d 01:02:03\.004 {2}987654321$/);
    sameListing(dir, 'a.qcow2');
    // qimg's own entries carry what qemu-img stores: no VM state, clock 0, icount 0, current size
    expect(after[1]).toMatchObject({ 'vm-state-size': 0, 'vm-clock-sec': 0, 'vm-clock-nsec': 0, icount: 0 });
    expect(Math.abs((after[1]['date-sec'] as number) - Date.now() / 1000)).toBeLessThan(600);
  });

  // ---------------------------------------------------------------- seeded sequence vs a model

  interface ModelSnap {
    id: number;
    name: string;
    data: Buffer;
  }

  const BASE_SEED = seedFrom('QIMG_SNAPSHOT_SEED', 7201);
  const configs = [
    { label: '64k clusters', opts: '', size: 1 << 20, cs: 65536 },
    { label: '4k clusters', opts: 'cluster_size=4k', size: 1 << 20, cs: 4096 },
    { label: '512-byte clusters', opts: 'cluster_size=512', size: 192 << 10, cs: 512 },
    { label: 'extended L2', opts: 'extended_l2=on,cluster_size=32k', size: 1 << 20, cs: 32768 },
    { label: 'compat=0.10', opts: 'compat=0.10,cluster_size=16k', size: 1 << 20, cs: 16384 },
  ];
  const STEPS = 30;
  const NAMES = ['a', 'b', 'c', 'd', '1', '2'];

  configs.forEach((cfg, ci) => {
    const seed = (BASE_SEED + ci * 1000) >>> 0;
    it(`seeded create/write/apply/delete sequence matches a model (${cfg.label}, seed ${seed})`, () => {
      const dir = newDir();
      const rng = new Prng(seed);
      create(dir, 'img.qcow2', String(cfg.size), cfg.opts);
      let current = Buffer.alloc(cfg.size);
      const snaps: ModelSnap[] = [];
      const log: string[] = [];
      const where = () => `seed ${seed}, steps:\n  ${log.join('\n  ')}`;
      const verifyCurrent = () => {
        const got = content(dir, 'img.qcow2');
        expect(got.equals(current), `content differs from the model; ${where()}`).toBe(true);
      };
      const verifyList = () => {
        expect(infoSnapshots(dir, 'img.qcow2').map((s) => `${s.id}:${s.name}`), where()).toEqual(snaps.map((s) => `${s.id}:${s.name}`));
      };
      for (let step = 0; step < STEPS; step++) {
        const kind = rng.weighted(
          snaps.length >= 6 ? { write: 3, create: 0, apply: 2, delete: 5, missing: 1 } : { write: 4, create: 3, apply: snaps.length ? 2 : 0, delete: snaps.length ? 2 : 0, missing: 1 },
        );
        if (kind === 'write') {
          const cmds: string[] = [];
          for (let k = rng.int(1, 3); k > 0; k--) {
            const what = rng.weighted({ pattern: 6, zero: 2, discard: 1 });
            if (what === 'discard') {
              const clusters = cfg.size / cfg.cs;
              const first = rng.int(0, clusters - 1);
              const n = rng.int(1, Math.min(clusters - first, 8));
              cmds.push(`discard ${first * cfg.cs} ${n * cfg.cs}`);
              current.fill(0, first * cfg.cs, (first + n) * cfg.cs);
            } else {
              const off = rng.int(0, cfg.size / 512 - 1) * 512;
              const len = Math.min(cfg.size - off, rng.int(1, rng.pick([8, 64, 512])) * 512);
              const p = rng.int(1, 255);
              cmds.push(what === 'zero' ? `write -z ${off} ${len}` : `write -P ${p} ${off} ${len}`);
              current.fill(what === 'zero' ? 0 : p, off, off + len);
            }
          }
          log.push(`qemu-io ${cmds.join('; ')}`);
          io(dir, 'img.qcow2', cmds);
        } else if (kind === 'create') {
          const name = rng.pick(NAMES);
          const id = snaps.reduce((m, s) => Math.max(m, s.id), 0) + 1;
          log.push(`snapshot -c ${name} (id ${id})`);
          expect(qimg(['snapshot', '-c', name, 'img.qcow2'], { cwd: dir }), where()).toMatchObject({ status: 0, stderr: '' });
          snaps.push({ id, name, data: Buffer.from(current) });
          verifyList();
        } else if (kind === 'apply') {
          const target = rng.pick(snaps);
          // by id or by name; a key that is another snapshot's id means that one (ids first)
          const key = rng.chance(0.5) ? String(target.id) : target.name;
          const chosen = snaps.find((s) => String(s.id) === key) ?? snaps.find((s) => s.name === key)!;
          log.push(`snapshot -a ${key} (id ${chosen.id})`);
          expect(qimg(['snapshot', '-a', key, 'img.qcow2'], { cwd: dir }), where()).toMatchObject({ status: 0, stderr: '' });
          current = Buffer.from(chosen.data);
        } else if (kind === 'delete') {
          const name = rng.pick(snaps).name;
          const index = snaps.findIndex((s) => s.name === name);
          log.push(`snapshot -d ${name} (id ${snaps[index].id})`);
          expect(qimg(['snapshot', '-d', name, 'img.qcow2'], { cwd: dir }), where()).toMatchObject({ status: 0, stderr: '' });
          snaps.splice(index, 1);
          verifyList();
        } else {
          // absent names and ids: refused, nothing written
          const key = rng.chance(0.5) ? 'absent' : String(rng.int(1, 9));
          const byName = snaps.some((s) => s.name === key);
          const action = rng.chance(0.5) ? '-d' : '-a';
          const found = action === '-d' ? byName : byName || snaps.some((s) => String(s.id) === key);
          if (found) continue;
          log.push(`snapshot ${action} ${key} (absent)`);
          const before = sha256File(join(dir, 'img.qcow2'));
          const r = qimg(['snapshot', action, key, 'img.qcow2'], { cwd: dir });
          expect(r.status, where()).toBe(1);
          expect(r.stderr.split('\n').length, r.stderr).toBe(2);
          expect(sha256File(join(dir, 'img.qcow2')), where()).toBe(before);
          continue;
        }
        clean(dir, 'img.qcow2', where());
        if (kind !== 'write' || step === STEPS - 1) verifyCurrent();
      }
      verifyCurrent();
      sameListing(dir, 'img.qcow2');
      for (const s of snaps) {
        const got = content(dir, 'img.qcow2', `snapshot.id=${s.id}`);
        expect(got.equals(s.data), `snapshot ${s.id} (${s.name}) differs from the model; ${where()}`).toBe(true);
      }
      // qemu-img can take over: apply and delete everything qimg left
      for (const s of [...snaps]) {
        must(qemuImg(['snapshot', '-a', String(s.id), 'img.qcow2'], dir), `qemu apply ${s.id}`);
        expect(content(dir, 'img.qcow2').equals(s.data), `qemu-img apply ${s.id}; ${where()}`).toBe(true);
        must(qemuImg(['snapshot', '-d', s.name, 'img.qcow2'], dir), `qemu delete ${s.name}`);
      }
      clean(dir, 'img.qcow2', `after qemu-img deleted all; ${where()}`);
    });
  });

  // ---------------------------------------------------------------- narrow refcounts

  it('refcount_bits=1: snapshot -c fails cleanly and leaves the image unchanged', () => {
    const dir = newDir();
    create(dir, 'r1.qcow2', '2M', 'refcount_bits=1');
    io(dir, 'r1.qcow2', ['write -P 3 0 512k']);
    const before = sha256File(join(dir, 'r1.qcow2'));
    const r = qimg(['snapshot', '-c', 's1', 'r1.qcow2'], { cwd: dir });
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^qimg: (r1\.qcow2: )?Could not create snapshot 's1': [^\n]+\n$/);
    expect(sha256File(join(dir, 'r1.qcow2'))).toBe(before);
    clean(dir, 'r1.qcow2', 'refcount_bits=1');
    expect(qemuImg(['snapshot', '-c', 's1', 'r1.qcow2'], dir).status).toBe(1); // qemu-img cannot either
    expect(qimg(['snapshot', '-l', 'r1.qcow2'], { cwd: dir }).stdout).toBe('');
  });

  it('refcount_bits=2: as many snapshots as the refcounts hold, then a clean failure', () => {
    const dir = newDir();
    create(dir, 'r2.qcow2', '2M', 'refcount_bits=2,cluster_size=4k');
    io(dir, 'r2.qcow2', ['write -P 3 0 512k']);
    const c0 = contentSha(dir, 'r2.qcow2');
    copyFileSync(join(dir, 'r2.qcow2'), join(dir, 'q2.qcow2'));
    let made = 0;
    for (; made < 5; made++) {
      const before = sha256File(join(dir, 'r2.qcow2'));
      const r = qimg(['snapshot', '-c', `s${made}`, 'r2.qcow2'], { cwd: dir });
      if (r.status !== 0) {
        expect(r.status).toBe(1);
        expect(r.stderr.split('\n')).toHaveLength(2);
        expect(sha256File(join(dir, 'r2.qcow2'))).toBe(before);
        break;
      }
      clean(dir, 'r2.qcow2', `snapshot ${made}`);
    }
    // refcount 3 at most: the active tree and two snapshots; qemu-img stops at the same point
    expect(made).toBe(2);
    let qmade = 0;
    while (qmade < 5 && qemuImg(['snapshot', '-c', `s${qmade}`, 'q2.qcow2'], dir).status === 0) qmade++;
    expect(made).toBe(qmade);
    clean(dir, 'r2.qcow2', 'after failure');
    // deleting one makes room again
    must(qimg(['snapshot', '-d', 's0', 'r2.qcow2'], { cwd: dir }), 'delete s0');
    must(qimg(['snapshot', '-c', 'again', 'r2.qcow2'], { cwd: dir }), 'create again');
    clean(dir, 'r2.qcow2', 'again');
    io(dir, 'r2.qcow2', ['write -P 9 0 1M']);
    must(qimg(['snapshot', '-a', 'again', 'r2.qcow2'], { cwd: dir }), 'apply again');
    expect(contentSha(dir, 'r2.qcow2')).toBe(c0);
    clean(dir, 'r2.qcow2', 'applied');
  });

  // ---------------------------------------------------------------- special cluster kinds

  it('extended L2 images: subcluster allocations and zero subclusters survive create/apply/delete', () => {
    const dir = newDir();
    create(dir, 'x.qcow2', '4M', 'extended_l2=on,cluster_size=64k');
    io(dir, 'x.qcow2', ['write -P 1 0 4k', 'write -P 2 100k 8k', 'write -z 1M 64k', 'write -P 3 2M 64k', 'write -z 2M 2k']);
    const c0 = content(dir, 'x.qcow2');
    must(qimg(['snapshot', '-c', 's1', 'x.qcow2'], { cwd: dir }), 'create s1');
    clean(dir, 'x.qcow2', 's1');
    io(dir, 'x.qcow2', ['write -P 4 2k 4k', 'write -P 5 1M 4k', 'write -z 100k 4k', 'write -P 6 2M 1k']);
    const c1 = content(dir, 'x.qcow2');
    must(qimg(['snapshot', '-c', 's2', 'x.qcow2'], { cwd: dir }), 'create s2');
    must(qimg(['snapshot', '-a', 's1', 'x.qcow2'], { cwd: dir }), 'apply s1');
    expect(content(dir, 'x.qcow2').equals(c0)).toBe(true);
    clean(dir, 'x.qcow2', 'apply s1');
    must(qimg(['snapshot', '-d', 's1', 'x.qcow2'], { cwd: dir }), 'delete s1');
    clean(dir, 'x.qcow2', 'delete s1');
    expect(content(dir, 'x.qcow2', 's2').equals(c1)).toBe(true);
    must(qemuImg(['snapshot', '-a', 's2', 'x.qcow2'], dir), 'qemu apply s2');
    expect(content(dir, 'x.qcow2').equals(c1)).toBe(true);
    sameListing(dir, 'x.qcow2');
  });

  it('compressed clusters (shared host clusters) are counted right through create/apply/delete', () => {
    const dir = newDir();
    create(dir, 'src.qcow2', '2M');
    io(dir, 'src.qcow2', ['write -P 1 0 64k', 'write -P 2 64k 128k', 'write -P 3 1M 1M']);
    must(qemuImg(['convert', '-c', '-O', 'qcow2', 'src.qcow2', 'c.qcow2'], dir), 'convert -c');
    const c0 = contentSha(dir, 'c.qcow2');
    must(qimg(['snapshot', '-c', 's1', 'c.qcow2'], { cwd: dir }), 'create s1');
    clean(dir, 'c.qcow2', 'create s1');
    io(dir, 'c.qcow2', ['write -P 5 0 64k', 'write -P 6 1M 4k']);
    must(qemuImg(['snapshot', '-c', 's2', 'c.qcow2'], dir), 'qemu create s2');
    const c2 = contentSha(dir, 'c.qcow2');
    must(qimg(['snapshot', '-a', 's1', 'c.qcow2'], { cwd: dir }), 'apply s1');
    expect(contentSha(dir, 'c.qcow2')).toBe(c0);
    clean(dir, 'c.qcow2', 'apply s1');
    must(qimg(['snapshot', '-d', 's1', 'c.qcow2'], { cwd: dir }), 'delete s1');
    clean(dir, 'c.qcow2', 'delete s1');
    must(qimg(['snapshot', '-d', 's2', 'c.qcow2'], { cwd: dir }), 'delete s2');
    clean(dir, 'c.qcow2', 'delete s2');
    expect(contentSha(dir, 'c.qcow2')).toBe(c0);
    const check = JSON.parse(must(qemuImg(['check', '--output=json', 'c.qcow2'], dir), 'check').stdout) as Record<string, number>;
    expect(check['compressed-clusters']).toBeGreaterThan(0);
    void c2;
  });

  it('apply is refused while the image has persistent bitmaps (enabled or not), as qemu-img refuses it', () => {
    const dir = newDir();
    create(dir, 'b.qcow2', '1M');
    must(qemuImg(['snapshot', '-c', 's1', 'b.qcow2'], dir), 'snapshot');
    must(qemuImg(['bitmap', '--add', 'b.qcow2', 'b0'], dir), 'bitmap --add');
    for (const disable of [false, true]) {
      if (disable) must(qemuImg(['bitmap', '--disable', 'b.qcow2', 'b0'], dir), 'bitmap --disable');
      for (const key of ['s1', 'nope']) {
        // (qemu-img's failed read-write open itself rewrites the bitmap metadata)
        const q = qemuImg(['snapshot', '-a', key, 'b.qcow2'], dir);
        const before = sha256File(join(dir, 'b.qcow2'));
        const m = qimg(['snapshot', '-a', key, 'b.qcow2'], { cwd: dir });
        expect(q.stderr).toBe(`qemu-img: Could not apply snapshot '${key}': Device has active dirty bitmaps\n`);
        expect(m.status).toBe(1);
        expect(m.stderr).toBe(q.stderr.replace(/^qemu-img: /, 'qimg: b.qcow2: '));
        expect(sha256File(join(dir, 'b.qcow2'))).toBe(before);
      }
    }
    clean(dir, 'b.qcow2', 'bitmaps');
  });

  // ---------------------------------------------------------------- command line

  it('-l with no snapshots prints nothing; Cannot mix; raw images are refused', () => {
    const dir = newDir();
    create(dir, 'e.qcow2', '1M');
    expect(qimg(['snapshot', '-l', 'e.qcow2'], { cwd: dir })).toMatchObject({ status: 0, stdout: '', stderr: '' });
    expect(qemuImg(['snapshot', '-l', 'e.qcow2'], dir)).toMatchObject({ status: 0, stdout: '' });

    const before = sha256File(join(dir, 'e.qcow2'));
    const m = qimg(['snapshot', '-l', '-c', 'x', 'e.qcow2'], { cwd: dir });
    const q = qemuImg(['snapshot', '-l', '-c', 'x', 'e.qcow2'], dir);
    expect(q.status).toBe(1);
    expect(m.status).toBe(1);
    expect(m.stdout).toBe('');
    expect(m.stderr.split('\n')[0]).toBe(q.stderr.split('\n')[0].replace(/^qemu-img: /, 'qimg: '));
    expect(m.stderr.split('\n')[0]).toBe("qimg: Cannot mix '-l', '-a', '-c', '-d'");
    expect(qimg(['snapshot', '-a', 'x', '-d', 'y', 'e.qcow2'], { cwd: dir }).status).toBe(1);
    expect(sha256File(join(dir, 'e.qcow2'))).toBe(before);

    must(qemuImg(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir), 'create raw');
    const rawBefore = sha256File(join(dir, 'r.raw'));
    for (const action of ['-c', '-a', '-d']) {
      const r = qimg(['snapshot', '-f', 'raw', action, 'x', 'r.raw'], { cwd: dir });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^qimg: [^\n]*Operation not supported\n$/);
      expect(qemuImg(['snapshot', action, 'x', 'r.raw'], dir).status).toBe(1);
    }
    expect(sha256File(join(dir, 'r.raw'))).toBe(rawBefore);
    expect(qimg(['snapshot', '-l', '-f', 'raw', 'r.raw'], { cwd: dir })).toMatchObject({ status: 0, stdout: '' });
  });
});
