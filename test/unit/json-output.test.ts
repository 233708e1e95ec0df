/**
 * qemu-img's output shapes: pretty JSON (indents, empty containers, string escapes,
 * QDict member order), the info/snapshot/map JSON objects, and the human texts
 * (info dump, snapshot table, map rows). qemu-img is the oracle where an image
 * shows the case (empty bitmap flag lists, odd file names).
 */
import { describe, expect, it, afterAll } from 'vitest';
import { closeSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Extent, ImageInfo, SnapshotInfo } from '../../src/core/block-image.js';
import { infoJson, mapEntryJson, prettyJson, qdictHash, qdictOrder, quoteJson, snapshotJson } from '../../src/cli/output/json.js';
import { MAP_HUMAN_HEADER, infoHuman, mapHumanRow, snapshotTable } from '../../src/cli/output/human.js';
import { FIXTURES_DIR } from '../helpers/fixtures.js';
import { ok, qemuAvailable, qemuImg, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();

describe('prettyJson', () => {
  it('prints scalars and nested containers with 4-space indents', () => {
    expect(prettyJson(5)).toBe('5');
    expect(prettyJson(true)).toBe('true');
    expect(prettyJson('x')).toBe('"x"');
    expect(prettyJson({ a: 1, b: [1, 2], c: { d: false } })).toBe(
      '{\n    "a": 1,\n    "b": [\n        1,\n        2\n    ],\n    "c": {\n        "d": false\n    }\n}',
    );
  });

  it('prints empty lists and dicts over two lines, closing at the parent indent', () => {
    expect(prettyJson([])).toBe('[\n]');
    expect(prettyJson({})).toBe('{\n}');
    expect(prettyJson({ flags: [], x: {} })).toBe('{\n    "flags": [\n    ],\n    "x": {\n    }\n}');
    expect(prettyJson([{ a: [] }])).toBe('[\n    {\n        "a": [\n        ]\n    }\n]');
  });

  it('leaves out undefined members', () => {
    expect(prettyJson({ a: undefined, b: 1 })).toBe('{\n    "b": 1\n}');
    expect(prettyJson({ a: undefined })).toBe('{\n}');
  });

  it('escapes strings as qemu (\\uXXXX upper case for control, DEL and non-ASCII)', () => {
    expect(quoteJson('plain/path.qcow2')).toBe('"plain/path.qcow2"');
    expect(quoteJson('a"b\\c')).toBe('"a\\"b\\\\c"');
    expect(quoteJson('\b\f\n\r\t')).toBe('"\\b\\f\\n\\r\\t"');
    expect(quoteJson('\u0001\u001f\u007f')).toBe('"\\u0001\\u001F\\u007F"');
    expect(quoteJson('é')).toBe('"\\u00E9"');
    expect(quoteJson('€')).toBe('"\\u20AC"');
    expect(quoteJson('😀')).toBe('"\\uD83D\\uDE00"');
    expect(quoteJson('\ud800x')).toBe('"\\uFFFDx"');
    expect(prettyJson({ 'k\u00e9y': 'v' })).toBe('{\n    "k\\u00E9y": "v"\n}');
  });
});

describe('QDict member order', () => {
  it('tdb_hash buckets give the orders qemu 7.2 prints', () => {
    const order = (keys: string[]) => Object.keys(qdictOrder(Object.fromEntries(keys.map((k) => [k, 0]))));
    // ImageInfo members in QAPI schema order -> observed output order
    expect(
      order([
        'filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'encrypted', 'compressed',
        'backing-filename', 'full-backing-filename', 'backing-filename-format', 'snapshots', 'backing-image', 'format-specific',
      ]),
    ).toEqual([
      'backing-image', 'compressed', 'backing-filename-format', 'snapshots', 'virtual-size', 'filename', 'cluster-size', 'format',
      'actual-size', 'format-specific', 'full-backing-filename', 'encrypted', 'backing-filename', 'dirty-flag',
    ]);
    expect(order(['id', 'name', 'vm-state-size', 'date-sec', 'date-nsec', 'vm-clock-sec', 'vm-clock-nsec', 'icount'])).toEqual([
      'icount', 'vm-clock-nsec', 'name', 'date-sec', 'date-nsec', 'vm-clock-sec', 'id', 'vm-state-size',
    ]);
    expect(
      order(['compat', 'data-file', 'data-file-raw', 'extended-l2', 'lazy-refcounts', 'corrupt', 'refcount-bits', 'encrypt', 'bitmaps', 'compression-type']),
    ).toEqual(['compat', 'compression-type', 'lazy-refcounts', 'bitmaps', 'refcount-bits', 'data-file', 'encrypt', 'data-file-raw', 'corrupt', 'extended-l2']);
    expect(order(['name', 'granularity', 'flags'])).toEqual(['flags', 'name', 'granularity']);
    expect(order(['data', 'type'])).toEqual(['type', 'data']);
  });

  it('within a bucket the later-inserted key comes first', () => {
    // find two short keys that share a bucket
    const seen = new Map<number, string>();
    let pair: [string, string] | undefined;
    for (let i = 0; !pair && i < 100000; i++) {
      const k = `k${i}`;
      const b = qdictHash(k) % 512;
      const other = seen.get(b);
      if (other) pair = [other, k];
      else seen.set(b, k);
    }
    expect(pair).toBeDefined();
    const [a, b] = pair!;
    expect(Object.keys(qdictOrder({ [a]: 1, [b]: 2 }))).toEqual([b, a]);
    expect(Object.keys(qdictOrder({ [b]: 1, [a]: 2 }))).toEqual([a, b]);
  });

  it('orders nested dicts, including inside lists, and matches a LUKS capture', () => {
    const expected = JSON.parse(readFileSync(join(FIXTURES_DIR, 'expected', 'encrypted-luks.info.json'), 'utf8'));
    const encrypt = expected['format-specific'].data.encrypt as Record<string, unknown>;
    // scramble the member order, then let qdictOrder restore it
    const scramble = (v: unknown): unknown =>
      Array.isArray(v)
        ? v.map(scramble)
        : typeof v === 'object' && v !== null
          ? Object.fromEntries(Object.entries(v).reverse().map(([k, x]) => [k, scramble(x)]))
          : v;
    expect(prettyJson(qdictOrder(scramble(encrypt)))).toBe(prettyJson(encrypt));
  });
});

const SNAP: SnapshotInfo = { id: '1', name: 'snap1', vmStateSize: 0, dateSec: 1795354565, dateNsec: 560688000, vmClockSec: 0, vmClockNsec: 0, icount: 0 };

describe('infoJson / snapshotJson / mapEntryJson', () => {
  it('raw image: qemu\'s members and order', () => {
    const info: ImageInfo = { filename: 'a.raw', format: 'raw', virtualSize: 1048576, actualSize: 4096, dirtyFlag: false };
    expect(prettyJson(infoJson(info))).toBe(
      '{\n    "virtual-size": 1048576,\n    "filename": "a.raw",\n    "format": "raw",\n    "actual-size": 4096,\n    "dirty-flag": false\n}',
    );
  });

  it('every member: the order of a QDict of them', () => {
    const info: ImageInfo = {
      filename: 'ov.qcow2',
      format: 'qcow2',
      virtualSize: 1073741824,
      actualSize: 200704,
      clusterSize: 65536,
      dirtyFlag: false,
      encrypted: true,
      backingFilename: 'base.qcow2',
      fullBackingFilename: 'dir/base.qcow2',
      backingFilenameFormat: 'qcow2',
      snapshots: [SNAP],
      formatSpecific: { type: 'qcow2', data: { compat: '1.1', 'refcount-bits': 16, 'compression-type': 'zlib' } },
    };
    const o = infoJson(info);
    expect(Object.keys(o)).toEqual([
      'backing-filename-format', 'snapshots', 'virtual-size', 'filename', 'cluster-size', 'format', 'actual-size', 'format-specific',
      'full-backing-filename', 'encrypted', 'backing-filename', 'dirty-flag',
    ]);
    expect(Object.keys(o)).toEqual(Object.keys(qdictOrder(o)));
    // format-specific data is put in QDict order whatever order the driver used
    expect(Object.keys((o['format-specific'] as { data: object }).data)).toEqual(['compat', 'compression-type', 'refcount-bits']);
  });

  it('leaves out empty snapshot lists and absent members', () => {
    const o = infoJson({ filename: 'x', format: 'qcow2', virtualSize: 512, snapshots: [] });
    expect(Object.keys(o)).toEqual(['virtual-size', 'filename', 'format']);
  });

  it('snapshot members in qemu order; no icount when unknown', () => {
    expect(Object.keys(snapshotJson(SNAP))).toEqual(['icount', 'vm-clock-nsec', 'name', 'date-sec', 'date-nsec', 'vm-clock-sec', 'id', 'vm-state-size']);
    const { icount: _i, ...noIcount } = SNAP;
    expect(Object.keys(snapshotJson(noIcount))).not.toContain('icount');
    expect(prettyJson([snapshotJson(SNAP)])).toBe(
      '[\n    {\n        "icount": 0,\n        "vm-clock-nsec": 0,\n        "name": "snap1",\n        "date-sec": 1795354565,\n' +
        '        "date-nsec": 560688000,\n        "vm-clock-sec": 0,\n        "id": "1",\n        "vm-state-size": 0\n    }\n]',
    );
  });

  it('map entries: hand-printed one-line objects', () => {
    const e: Extent = { offset: 0, length: 65536, kind: 'data', depth: 1, present: true, data: true, zero: false, compressed: false, hostOffset: 720896 };
    expect(mapEntryJson(e)).toBe('{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 720896}');
    const u: Extent = { offset: 131072, length: 917504, kind: 'unallocated', depth: 1, present: false, data: false, zero: true, compressed: false };
    expect(mapEntryJson(u)).toBe('{ "start": 131072, "length": 917504, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false}');
  });
});

describe('human output', () => {
  it('infoHuman: the reference qcow2 dump', () => {
    const info: ImageInfo = {
      filename: 'base.qcow2',
      format: 'qcow2',
      virtualSize: 1073741824,
      actualSize: 462848,
      clusterSize: 65536,
      dirtyFlag: false,
      formatSpecific: {
        type: 'qcow2',
        data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false },
      },
    };
    expect(infoHuman(info)).toBe(
      'image: base.qcow2\nfile format: qcow2\nvirtual size: 1 GiB (1073741824 bytes)\ndisk size: 452 KiB\ncluster_size: 65536\n' +
        'Format specific information:\n    compat: 1.1\n    compression type: zlib\n    lazy refcounts: false\n    refcount bits: 16\n' +
        '    corrupt: false\n    extended l2: false\n',
    );
  });

  it('infoHuman: optional lines in qemu\'s order', () => {
    const base: ImageInfo = { filename: 'ov.qcow2', format: 'qcow2', virtualSize: 1536, clusterSize: 512 };
    expect(infoHuman(base)).toBe(
      'image: ov.qcow2\nfile format: qcow2\nvirtual size: 1.5 KiB (1536 bytes)\ndisk size: unavailable\ncluster_size: 512\n',
    );
    const full = infoHuman({
      ...base,
      actualSize: 0,
      encrypted: true,
      dirtyFlag: true,
      backingFilename: 'sub/../base.qcow2',
      fullBackingFilename: 'dir/sub/../base.qcow2',
      backingFilenameFormat: 'qcow2',
    });
    expect(full.split('\n')).toEqual([
      'image: ov.qcow2',
      'file format: qcow2',
      'virtual size: 1.5 KiB (1536 bytes)',
      'disk size: 0 B',
      'encrypted: yes',
      'cluster_size: 512',
      'cleanly shut down: no',
      'backing file: sub/../base.qcow2 (actual path: dir/sub/../base.qcow2)',
      'backing file format: qcow2',
      '',
    ]);
    expect(infoHuman({ ...base, backingFilename: 'b.qcow2', fullBackingFilename: 'b.qcow2' })).toContain('backing file: b.qcow2\n');
    expect(infoHuman({ ...base, backingFilename: 'b.qcow2' })).toContain('backing file: b.qcow2 (cannot determine actual path)\n');
  });

  it('infoHuman: nested lists and dicts, empty lists, QDict order', () => {
    const text = infoHuman({
      filename: 'b.qcow2',
      format: 'qcow2',
      virtualSize: 512,
      formatSpecific: {
        type: 'qcow2',
        data: {
          compat: '1.1',
          bitmaps: [
            { name: 'b0', granularity: 65536, flags: [] },
            { name: 'b1', granularity: 131072, flags: ['auto'] },
          ],
        },
      },
    });
    expect(text.slice(text.indexOf('Format specific information:'))).toBe(
      'Format specific information:\n    compat: 1.1\n    bitmaps:\n        [0]:\n            flags:\n            name: b0\n' +
        '            granularity: 65536\n        [1]:\n            flags:\n                [0]: auto\n            name: b1\n' +
        '            granularity: 131072\n',
    );
  });

  it('snapshotTable: 7.2 columns, long names pushing columns, empty icount', () => {
    const d = new Date(2026, 10, 22, 13, 36, 5); // local time, as qemu prints it
    const dateSec = Math.floor(d.getTime() / 1000);
    const text = snapshotTable([
      { ...SNAP, dateSec },
      { id: '2', name: 'second snap', vmStateSize: 1536, dateSec, dateNsec: 0, vmClockSec: 3725, vmClockNsec: 500_000_000 },
      { id: '10', name: 'x'.repeat(20), vmStateSize: 0, dateSec, dateNsec: 0, vmClockSec: 360000, vmClockNsec: 999_999_999, icount: 12345 },
    ]);
    expect(text.split('\n')).toEqual([
      'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT',
      '1         snap1                 0 B 2026-11-22 13:36:05 00:00:00.000          0',
      '2         second snap       1.5 KiB 2026-11-22 13:36:05 01:02:05.500           ',
      // fixed widths, no separators: a 13-character clock touches the date as in C
      `10        ${'x'.repeat(20)}      0 B 2026-11-22 13:36:05100:00:00.999      12345`,
      '',
    ]);
  });

  it('map rows: %#-16x columns, 0 without 0x', () => {
    expect(MAP_HUMAN_HEADER).toBe('Offset          Length          Mapped to       File\n');
    expect(mapHumanRow(0, 0x10000, 0xb0000, 'base.qcow2')).toBe('0               0x10000         0xb0000         base.qcow2\n');
    expect(mapHumanRow(0x200000, 0x1000, 0, 'x')).toBe('0x200000        0x1000          0               x\n');
    expect(mapHumanRow(2 ** 40, 2 ** 33, 2 ** 45, 'f')).toBe('0x10000000000   0x200000000     0x200000000000  f\n');
  });
});

describe.skipIf(!enabled)('against qemu-img', () => {
  const tmp = tempDir('qimg-json-');
  afterAll(() => tmp.cleanup());

  it('info of a qcow2 with a disabled bitmap (empty flags list), JSON and human', () => {
    const img = join(tmp.path, 'bm.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']));
    ok(qemuImg(['bitmap', '--add', '--disable', img, 'b0']));
    ok(qemuImg(['bitmap', '--add', '-g', '128k', img, 'b1']));
    for (const args of [['info', '--output=json', 'bm.qcow2'], ['info', 'bm.qcow2']]) {
      const q = ok(qemuImg(args, tmp.path));
      const m = qimg(args, { cwd: tmp.path });
      expect(m.stderr).toBe('');
      expect(m.stdout).toBe(q.stdout);
    }
  });

  it('info of files whose names need escaping', () => {
    for (const name of ['é\u007f\u0001\t"\\😀.raw', 'with space,comma.raw']) {
      const f = join(tmp.path, name);
      const fd = openSync(f, 'w');
      ftruncateSync(fd, 65536);
      closeSync(fd);
      for (const args of [['info', '--output=json', '-f', 'raw', name], ['info', '-f', 'raw', name]]) {
        const q = ok(qemuImg(args, tmp.path));
        const m = qimg(args, { cwd: tmp.path });
        expect(m.stdout).toBe(q.stdout);
      }
    }
  });
});
