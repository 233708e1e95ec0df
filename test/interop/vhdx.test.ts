/**
 * VHDX interop with qemu-img/qemu-io 7.2 as the oracle: qemu's images read by qimg
 * (data, info, map), qimg's images checked and read by qemu-img (and vhdiinfo), writes
 * in both directions, the create option matrix, log replay (a dirty log made here as
 * the spec describes it), check, a real Hyper-V image, and differencing images built
 * here over a qemu-made parent.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { closeSync, copyFileSync, existsSync, fstatSync, ftruncateSync, openSync, readFileSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, run, tempDir, type RunResult } from '../helpers/qemu.js';
import { buildLogEntry } from '../../src/formats/vhdx/log.js';
import {
  BAT_GUID,
  FILE_PARAMETERS_GUID,
  FILE_PARAMS_HAS_PARENT,
  LOGICAL_SECTOR_SIZE_GUID,
  METADATA_GUID,
  MiB,
  PAGE83_DATA_GUID,
  PARENT_LOCATOR_GUID,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_NOT_PRESENT,
  PAYLOAD_BLOCK_PARTIALLY_PRESENT,
  PAYLOAD_BLOCK_UNDEFINED,
  PAYLOAD_BLOCK_ZERO,
  PHYSICAL_SECTOR_SIZE_GUID,
  SB_BLOCK_PRESENT,
  VIRTUAL_DISK_SIZE_GUID,
  ZERO_GUID,
  bitmapBatIndex,
  geometry,
  guidToString,
  newGuid,
  parseHeader,
  parseRegionTable,
  payloadBatIndex,
  serializeHeader,
  serializeMetadataTable,
  serializeRegionTable,
  setBatEntry,
  type VhdxHeader,
} from '../../src/formats/vhdx/format.js';
import { serializeParentLocator } from '../../src/formats/vhdx/parent.js';
import { openImage } from '../../src/core/open.js';
import { registerFormats } from '../../src/formats/index.js';

const enabled = qemuAvailable();
const hasVhdiinfo = spawnSync('vhdiinfo', ['-V']).status === 0;
if (!hasVhdiinfo && process.env.CI === 'true') throw new Error('vhdiinfo (libvhdi-utils) is required under CI=true');
const REALWORLD = '/work/shared/realworld/config2_base.vhdx.xz';

const tmp = tempDir('qimg-vhdx-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (name: string) => join(d, name);

function q(args: string[]): RunResult {
  return qimg(args, { cwd: d });
}
function qemu(args: string[]): RunResult {
  return qemuImg(args, d);
}
/** qemu-img's text with its program name as qimg prints it. */
const asQimg = (s: string) => s.replace(/qemu-img: /g, 'qimg: ');
const oneLine = (s: string) => s.replace(/\n(?=.)/g, ' ');
function mapRanges(text: string) {
  return (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
}
function sameRaw(image: string, fmt = 'vhdx'): void {
  ok(qemu(['convert', '-f', fmt, '-O', 'raw', image, `${image}.qemu.raw`]), 'qemu-img convert');
  ok(q(['convert', '-f', fmt, '-O', 'raw', image, `${image}.qimg.raw`]), 'qimg convert');
  expect(readFileSync(P(`${image}.qimg.raw`)).equals(readFileSync(P(`${image}.qemu.raw`))), `${image}: raw data`).toBe(true);
}
function sameInfo(image: string): void {
  const a = ok(qemu(['info', '--output=json', image]));
  const b = ok(q(['info', '--output=json', image]));
  const strip = (t: string) => {
    const o = JSON.parse(t) as Record<string, unknown>;
    delete o['actual-size'];
    return o;
  };
  expect(strip(b.stdout)).toEqual(strip(a.stdout));
  const h = (t: string) => t.replace(/^disk size: .*$/m, '');
  expect(h(ok(q(['info', image])).stdout)).toBe(h(ok(qemu(['info', image])).stdout));
}
function sameMap(image: string): void {
  expect(mapRanges(ok(q(['map', '--output=json', image])).stdout)).toEqual(mapRanges(ok(qemu(['map', '--output=json', image])).stdout));
  // qemu's vhdx driver reports no offsets: the human map stops with qemu's error
  const a = qemu(['map', image]);
  const b = q(['map', image]);
  expect(b.status).toBe(a.status);
  expect(b.stdout).toBe(a.stdout);
  // (qimg's CLI names the image in front of the message)
  expect(b.stderr.replace(`qimg: ${image}: `, 'qimg: ')).toBe(asQimg(a.stderr));
}

// ------------------------------------------------------------ image surgery (spec)

function readAt(file: string, pos: number, len: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, pos);
    return b;
  } finally {
    closeSync(fd);
  }
}
function headersOf(file: string): { h1: VhdxHeader; h2: VhdxHeader; cur: VhdxHeader; curAt: number; otherAt: number } {
  const h1 = parseHeader(readAt(file, 64 * 1024, 4096))!;
  const h2 = parseHeader(readAt(file, 128 * 1024, 4096))!;
  const first = h1.sequenceNumber > h2.sequenceNumber;
  return { h1, h2, cur: first ? h1 : h2, curAt: first ? 64 * 1024 : 128 * 1024, otherAt: first ? 128 * 1024 : 64 * 1024 };
}
function batRegion(file: string) {
  return parseRegionTable(readAt(file, 192 * 1024, 65536))!.find((r) => r.guid.equals(BAT_GUID))!;
}

/**
 * Leaves a valid, unreplayed log entry in `file` (as a crash between the log write and
 * the BAT update would): a new 8 MiB block of `pattern` at the end of the file, and a
 * log entry whose BAT sector points payload block `block` at it.
 */
function makeDirtyLog(file: string, block: number, pattern: number, blockSize = 8 * MiB): void {
  const { cur, otherAt } = headersOf(file);
  const bat = batRegion(file);
  const fd = openSync(file, 'r+');
  try {
    const size = fstatSync(fd).size;
    const at = Math.ceil(size / MiB) * MiB;
    ftruncateSync(fd, at + blockSize);
    writeSync(fd, Buffer.alloc(blockSize, pattern), 0, blockSize, at);
    const sector = Buffer.alloc(4096);
    readSync(fd, sector, 0, 4096, bat.fileOffset);
    setBatEntry(sector, block, PAYLOAD_BLOCK_FULLY_PRESENT, at);
    const guid = newGuid();
    const entry = buildLogEntry({ guid, sequenceNumber: 7n, tail: 0, flushedFileOffset: at + blockSize, lastFileOffset: at + blockSize, writes: [{ fileOffset: bat.fileOffset, data: sector }] });
    writeSync(fd, entry, 0, entry.length, cur.logOffset);
    writeSync(fd, serializeHeader({ ...cur, sequenceNumber: cur.sequenceNumber + 1n, logGuid: guid }), 0, 4096, otherAt);
  } finally {
    closeSync(fd);
  }
}

interface ChildBlock {
  state: number;
  /** content of a present block (FULLY) or of its present sectors (PARTIALLY) */
  fill?: number;
  /** PARTIALLY_PRESENT: the present 512-byte sectors within the block */
  sectors?: number[];
}

/**
 * Builds a differencing VHDX (1 MiB blocks) over `parent` as the spec lays it out:
 * HasParent, a parent locator (VHDX type) with parent_linkage = the parent's
 * DataWriteGuid, a sector bitmap block for chunk 0.
 */
function makeChild(child: string, parent: string, blocks: ChildBlock[], locator: Array<[string, string]> | 'default', linkage?: Buffer): void {
  const parentHdr = headersOf(P(parent)).cur;
  const vsize = JSON.parse(ok(qemu(['info', '--output=json', parent])).stdout)['virtual-size'] as number;
  const blockSize = MiB;
  const g = geometry(vsize, blockSize, 512, true);
  const batOffset = 2 * MiB;
  const batLength = Math.ceil((g.batEntries * 8) / MiB) * MiB;
  const mdOffset = batOffset + batLength;
  let end = mdOffset + MiB;
  const bat = Buffer.alloc(batLength);
  const data: Array<[number, Buffer]> = [];
  const bitmap = Buffer.alloc(MiB);
  blocks.forEach((b, i) => {
    let off = 0;
    if (b.state === PAYLOAD_BLOCK_FULLY_PRESENT || b.state === PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
      off = end;
      end += blockSize;
      data.push([off, Buffer.alloc(blockSize, b.fill ?? 0)]);
    }
    for (const s of b.sectors ?? []) {
      const bit = (i * blockSize) / 512 + s;
      bitmap[bit >> 3] |= 1 << (bit & 7);
    }
    setBatEntry(bat, payloadBatIndex(g, i), b.state, off);
  });
  setBatEntry(bat, bitmapBatIndex(g, 0), SB_BLOCK_PRESENT, end);
  data.push([end, bitmap]);
  end += MiB;
  const loc =
    locator === 'default'
      ? ([
          ['parent_linkage', guidToString(linkage ?? parentHdr.dataWriteGuid)],
          ['relative_path', `.\\${parent}`],
          ['absolute_win32_path', `C:\\VMs\\${parent}`],
        ] as Array<[string, string]>)
      : locator;
  const locItem = serializeParentLocator(loc);
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    return b;
  };
  const u64 = (v: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    return b;
  };
  const items: Array<[Buffer, Buffer, number]> = [
    [FILE_PARAMETERS_GUID, Buffer.concat([u32(blockSize), u32(FILE_PARAMS_HAS_PARENT)]), 4],
    [VIRTUAL_DISK_SIZE_GUID, u64(vsize), 6],
    [PAGE83_DATA_GUID, newGuid(), 6],
    [LOGICAL_SECTOR_SIZE_GUID, u32(512), 6],
    [PHYSICAL_SECTOR_SIZE_GUID, u32(4096), 6],
    [PARENT_LOCATOR_GUID, locItem, 6],
  ];
  let off = 64 * 1024;
  const table = serializeMetadataTable(
    items.map(([itemId, b, flags]) => {
      const e = { itemId, offset: off, length: b.length, flags };
      off += b.length;
      return e;
    }),
  );
  const img = Buffer.alloc(end);
  img.write('vhdxfile', 0, 'latin1');
  const hdr: VhdxHeader = {
    sequenceNumber: 10n,
    fileWriteGuid: newGuid(),
    dataWriteGuid: newGuid(),
    logGuid: ZERO_GUID,
    logVersion: 0,
    version: 1,
    logLength: MiB,
    logOffset: MiB,
  };
  serializeHeader(hdr).copy(img, 64 * 1024);
  serializeHeader({ ...hdr, sequenceNumber: 11n }).copy(img, 128 * 1024);
  const rt = serializeRegionTable([
    { guid: BAT_GUID, fileOffset: batOffset, length: batLength, required: true },
    { guid: METADATA_GUID, fileOffset: mdOffset, length: MiB, required: true },
  ]);
  rt.copy(img, 192 * 1024);
  rt.copy(img, 256 * 1024);
  bat.copy(img, batOffset);
  table.copy(img, mdOffset);
  Buffer.concat(items.map(([, b]) => b)).copy(img, mdOffset + 64 * 1024);
  for (const [o, b] of data) b.copy(img, o);
  writeFileSync(P(child), img);
}

beforeAll(() => {
  registerFormats();
});

describe.skipIf(!enabled)('vhdx: qemu makes, qimg reads', () => {
  const variants: Array<[string, string[], string]> = [
    ['dyn', [], '64M'],
    ['dyn-1m', ['-o', 'block_size=1M,log_size=2M'], '40M'],
    ['fixed-alloc', ['-o', 'subformat=fixed,block_state_zero=off'], '24M'],
    ['odd', ['-o', 'block_size=32M'], '100000K'],
  ];
  beforeAll(() => {
    for (const [name, opts, size] of variants) {
      ok(qemu(['create', '-q', '-f', 'vhdx', ...opts, `${name}.vhdx`, size]));
      ok(qemuIo(['-c', 'write -P 0x5a 0 12k', '-c', 'write -P 0xa5 9M 1500k', '-c', 'write -z 20M 1M', '-c', 'write -P 0x01 23M 4k', `${name}.vhdx`], d));
    }
  });
  for (const [name] of variants) {
    it(`${name}: data, info and map as qemu-img`, () => {
      sameRaw(`${name}.vhdx`);
      sameInfo(`${name}.vhdx`);
      sameMap(`${name}.vhdx`);
      const c = q(['check', `${name}.vhdx`]);
      expect(c.status).toBe(0);
      expect(c.stdout).toBe(ok(qemu(['check', `${name}.vhdx`])).stdout);
    });
  }

  it('probes vhdx by its signature', () => {
    expect(ok(q(['info', 'dyn.vhdx'])).stdout).toContain('file format: vhdx');
  });

  it.skipIf(!existsSync(REALWORLD))('a Hyper-V image (config2_base.vhdx): data, info, map, check as qemu-img', () => {
    const r = spawnSync('sh', ['-c', `xz -dc '${REALWORLD}' > '${P('hyperv.vhdx')}'`]);
    expect(r.status).toBe(0);
    sameRaw('hyperv.vhdx');
    sameInfo('hyperv.vhdx');
    sameMap('hyperv.vhdx');
    expect(ok(q(['info', 'hyperv.vhdx'])).stdout).toContain('cluster_size: 33554432');
    expect(ok(q(['check', 'hyperv.vhdx'])).stdout).toBe('No errors were found on the image.\n');
  });
});

describe.skipIf(!enabled)('vhdx: create as qemu-img', () => {
  it('-o help is identical', () => {
    const a = ok(qemu(['create', '-f', 'vhdx', '-o', 'help']));
    const b = ok(q(['create', '-f', 'vhdx', '-o', 'help']));
    expect(b.stdout).toBe(a.stdout);
  });

  const matrix: Array<[string[], string]> = [
    [[], '100M'],
    [['-o', 'subformat=fixed'], '10M'],
    [['-o', 'block_state_zero=off'], '10M'],
    [['-o', 'block_state_zero=yes,subformat=fixed'], '3M'],
    [['-o', 'block_size=1M,log_size=2M'], '10M'],
    [['-o', 'block_size=1.5M'], '10M'],
    [['-o', 'block_size=512M'], '10M'],
    [['-o', 'block_size=100k'], '10M'],
    [['-o', 'log_size=1000'], '10M'],
    [[], '0'],
    [[], '2G'],
    [[], '64T'],
    // refused
    [['-o', 'block_size=3M'], '10M'],
    [['-o', 'log_size=0'], '10M'],
    [['-o', 'log_size=5G'], '10M'],
    [['-o', 'subformat=foo'], '10M'],
    [[], '65T'],
  ];
  for (const [opts, size] of matrix) {
    it(`create ${opts.join(' ')} ${size}`, () => {
      const a = qemu(['create', '-f', 'vhdx', ...opts, 'qemu-made.vhdx', size]);
      const b = q(['create', '-f', 'vhdx', ...opts, 'qimg-made.vhdx', size]);
      expect(b.status).toBe(a.status);
      expect(b.stdout).toBe(a.stdout.replace(/qemu-made/g, 'qimg-made'));
      expect(b.stderr).toBe(oneLine(asQimg(a.stderr.replace(/qemu-made/g, 'qimg-made'))));
      if (a.status !== 0) return;
      expect(ok(qemu(['check', 'qimg-made.vhdx'])).stdout).toBe('No errors were found on the image.\n');
      const info = (f: string) => {
        const o = JSON.parse(ok(qemu(['info', '--output=json', f])).stdout) as Record<string, unknown>;
        return [o['virtual-size'], o['cluster-size'], o['format']];
      };
      if (size === '64T' || size === '1000') expect(info('qimg-made.vhdx')).toEqual(info('qemu-made.vhdx'));
      else expect(ok(qemu(['compare', 'qemu-made.vhdx', 'qimg-made.vhdx'])).stdout).toBe('Images are identical.\n');
      // the same layout as qemu's (header section, log, BAT, metadata, data offset)
      {
        const sizeOf = (f: string) => statSync(P(f)).size;
        expect(sizeOf('qimg-made.vhdx')).toBe(sizeOf('qemu-made.vhdx'));
      }
      if (hasVhdiinfo && size !== '0') {
        const v = run('vhdiinfo', [P('qimg-made.vhdx')]);
        expect(v.status, v.stderr).toBe(0);
        expect(v.stdout).toMatch(/Format\s+: VHDX/);
        expect(v.stdout).toMatch(opts.join(' ').includes('fixed') ? /Disk type\s+: Fixed/ : /Disk type\s+: Dynamic/);
      }
    });
  }
});

describe.skipIf(!enabled)('vhdx: writes in both directions', () => {
  beforeAll(() => {
    const src = Buffer.alloc(40 * MiB);
    for (let i = 0; i < 30 * MiB; i += 4096) src.fill((i >> 12) & 0xff, i, i + 4096);
    src.fill(0x3c, 35 * MiB, 36 * MiB);
    writeFileSync(P('src.raw'), src);
  });

  for (const sub of ['dynamic', 'fixed']) {
    it(`qimg convert -O vhdx (${sub}): qemu-img check clean, compare identical, vhdiinfo reads it`, () => {
      ok(q(['convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=${sub}`, 'src.raw', `w-${sub}.vhdx`]));
      expect(ok(qemu(['check', `w-${sub}.vhdx`])).stdout).toBe('No errors were found on the image.\n');
      expect(ok(qemu(['compare', '-f', 'raw', '-F', 'vhdx', 'src.raw', `w-${sub}.vhdx`])).stdout).toBe('Images are identical.\n');
      sameInfo(`w-${sub}.vhdx`);
      // the log is left empty (GUID zero) after the BAT updates went through it
      const { h1, h2 } = headersOf(P(`w-${sub}.vhdx`));
      expect(h1.logGuid.equals(ZERO_GUID) && h2.logGuid.equals(ZERO_GUID)).toBe(true);
      if (hasVhdiinfo) expect(run('vhdiinfo', [P(`w-${sub}.vhdx`)]).status).toBe(0);
    });
  }

  it('qemu-io writes into a qimg image, qimg reads them back', () => {
    ok(q(['convert', '-f', 'raw', '-O', 'vhdx', 'src.raw', 'w-io.vhdx']));
    ok(qemuIo(['-c', 'write -P 0x77 33M 3M', '-c', 'write -P 0x11 1000k 8k', '-c', 'write -z 8M 1M', 'w-io.vhdx'], d));
    sameRaw('w-io.vhdx');
  });

  for (const opts of ['subformat=dynamic', 'block_state_zero=off', 'subformat=fixed', 'subformat=fixed,block_state_zero=off']) {
    it(`qimg writes into a qemu image (${opts}): qemu reads it back, headers updated`, () => {
      const f = `into-${opts.replace(/[=,]/g, '-')}.vhdx`;
      ok(qemu(['create', '-q', '-f', 'vhdx', '-o', opts, f, '40M']));
      const before = headersOf(P(f));
      ok(q(['convert', '-n', '-f', 'raw', '-O', 'vhdx', 'src.raw', f]));
      expect(ok(qemu(['check', f])).stdout).toBe('No errors were found on the image.\n');
      expect(ok(qemu(['compare', '-f', 'raw', '-F', 'vhdx', 'src.raw', f])).stdout).toBe('Images are identical.\n');
      const after = headersOf(P(f));
      // a new sequence number, FileWriteGuid and DataWriteGuid once written (the spec)
      expect(after.cur.sequenceNumber > before.cur.sequenceNumber).toBe(true);
      expect(after.cur.fileWriteGuid.equals(before.cur.fileWriteGuid)).toBe(false);
      expect(after.cur.dataWriteGuid.equals(before.cur.dataWriteGuid)).toBe(false);
      expect(after.cur.logGuid.equals(ZERO_GUID)).toBe(true);
    });
  }

  it('a crash before the BAT commit leaves the old image (data written, BAT not pointing at it)', async () => {
    ok(qemu(['create', '-q', '-f', 'vhdx', 'crash.vhdx', '24M']));
    ok(qemuIo(['-c', 'write -P 0x42 0 64k', 'crash.vhdx'], d));
    const img = await openImage(P('crash.vhdx'), { writable: true, format: 'vhdx' });
    await img.write(9 * MiB, Buffer.alloc(MiB, 0x99));
    // the process dies here: the file closes without the flush that commits the BAT
    await (img as unknown as { file: { close(): Promise<void> } }).file.close();
    expect(ok(qemu(['check', 'crash.vhdx'])).stdout).toBe('No errors were found on the image.\n');
    sameRaw('crash.vhdx');
    const raw = readFileSync(P('crash.vhdx.qimg.raw'));
    expect(raw[0]).toBe(0x42);
    expect(raw[9 * MiB]).toBe(0);
  });

  it('a crash after the log entry: replayed on the next writable open', async () => {
    ok(qemu(['create', '-q', '-f', 'vhdx', 'crash2.vhdx', '24M']));
    const img = (await openImage(P('crash2.vhdx'), { writable: true, format: 'vhdx' })) as unknown as {
      write(o: number, b: Buffer): Promise<void>;
      bat: Buffer;
      meta: { bat: { fileOffset: number } };
      logTransaction(w: Array<{ fileOffset: number; data: Buffer }>, stop: boolean): Promise<void>;
      file: { flush(): Promise<void>; close(): Promise<void> };
    };
    await img.write(9 * MiB, Buffer.alloc(MiB, 0x99));
    await img.file.flush();
    await img.logTransaction([{ fileOffset: img.meta.bat.fileOffset, data: Buffer.from(img.bat.subarray(0, 4096)) }], true);
    await img.file.close();
    expect(qemu(['info', 'crash2.vhdx']).stderr).toContain('contains a log that needs to be replayed');
    copyFileSync(P('crash2.vhdx'), P('crash2-qemu.vhdx'));
    // qimg's writable open replays it (as qemu-io's would)
    const again = await openImage(P('crash2.vhdx'), { writable: true, format: 'vhdx' });
    await again.close();
    expect(ok(qemu(['check', 'crash2.vhdx'])).stdout).toBe('No errors were found on the image.\n');
    ok(qemuIo(['-c', 'read -P 0x99 9M 1M', 'crash2-qemu.vhdx'], d));
    sameRaw('crash2.vhdx');
    expect(readFileSync(P('crash2.vhdx.qimg.raw'))[9 * MiB]).toBe(0x99);
  });
});

describe.skipIf(!enabled)('vhdx: log replay and check', () => {
  beforeAll(() => {
    ok(qemu(['create', '-q', '-f', 'vhdx', 'dirty.vhdx', '40M']));
    ok(qemuIo(['-c', 'write -P 0x33 0 1M', 'dirty.vhdx'], d));
    makeDirtyLog(P('dirty.vhdx'), 1, 0x77);
  });

  it('read-only opens refuse a dirty log with qemu-img\'s message', () => {
    for (const cmd of [['info'], ['map', '--output=json'], ['convert', '-O', 'raw'], ['check']]) {
      const args = [...cmd, 'dirty.vhdx', ...(cmd[0] === 'convert' ? ['x.raw'] : [])];
      const a = qemu(args);
      const b = q(args);
      expect(b.status).toBe(a.status);
      expect(b.status).toBe(1);
      expect(b.stderr).toBe(oneLine(asQimg(a.stderr)).replace(/\n$/, '') + '\n');
      expect(b.stderr).toContain("qemu-img check -r all 'dirty.vhdx'");
    }
  });

  for (const fix of ['all', 'leaks']) {
    it(`check -r ${fix} replays the log as qemu-img does`, () => {
      copyFileSync(P('dirty.vhdx'), P(`dq-${fix}.vhdx`));
      copyFileSync(P('dirty.vhdx'), P(`dm-${fix}.vhdx`));
      const a = qemu(['check', '-r', fix, `dq-${fix}.vhdx`]);
      const b = q(['check', '-r', fix, `dm-${fix}.vhdx`]);
      expect(b.status).toBe(a.status);
      expect(b.stdout).toBe(a.stdout);
      expect(b.stdout).toContain('1 corruptions');
      ok(qemu(['convert', '-O', 'raw', `dq-${fix}.vhdx`, `dq-${fix}.raw`]));
      ok(q(['convert', '-O', 'raw', `dm-${fix}.vhdx`, `dm-${fix}.raw`]));
      const raw = readFileSync(P(`dm-${fix}.raw`));
      expect(raw.equals(readFileSync(P(`dq-${fix}.raw`)))).toBe(true);
      expect(raw[8 * MiB]).toBe(0x77);
      expect(raw[0]).toBe(0x33);
      expect(ok(qemu(['check', `dm-${fix}.vhdx`])).stdout).toBe('No errors were found on the image.\n');
    });
  }

  it('check --output=json after a replay', () => {
    copyFileSync(P('dirty.vhdx'), P('dj-q.vhdx'));
    copyFileSync(P('dirty.vhdx'), P('dj-m.vhdx'));
    const a = qemu(['check', '-r', 'all', '--output=json', 'dj-q.vhdx']);
    const b = q(['check', '-r', 'all', '--output=json', 'dj-m.vhdx']);
    expect(b.status).toBe(a.status);
    expect(JSON.parse(b.stdout)).toEqual({ ...JSON.parse(a.stdout), filename: 'dj-m.vhdx' });
  });

  it('bad BAT entries (truncated image): check and open as qemu-img', () => {
    ok(qemu(['create', '-q', '-f', 'vhdx', 'trunc.vhdx', '24M']));
    ok(qemuIo(['-c', 'write -P 1 0 1M', '-c', 'write -P 2 9M 1M', 'trunc.vhdx'], d));
    const fd = openSync(P('trunc.vhdx'), 'r+');
    ftruncateSync(fd, 20 * MiB);
    closeSync(fd);
    for (const args of [['check'], ['check', '--output=json']]) {
      const a = qemu([...args, 'trunc.vhdx']);
      const b = q([...args, 'trunc.vhdx']);
      expect(b.status).toBe(2);
      expect(b.status).toBe(a.status);
      expect(b.stdout).toBe(a.stdout);
      expect(b.stderr).toBe(asQimg(a.stderr));
    }
    const a = qemu(['info', 'trunc.vhdx']);
    const b = q(['info', 'trunc.vhdx']);
    expect(b.status).toBe(1);
    expect(a.status).toBe(1);
    // qemu prints the BAT message and then "Invalid argument"; qimg one line with the BAT message
    expect(a.stderr).toContain(b.stderr.replace(/^qimg: trunc.vhdx: /, '').trim());
  });
});

describe.skipIf(!enabled)('vhdx: differencing images (qimg only; qemu 7.2 refuses them)', () => {
  beforeAll(() => {
    ok(qemu(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', 'parent.vhdx', '8M']));
    ok(qemuIo(['-c', 'write -P 0x10 0 8M', 'parent.vhdx'], d));
    makeChild('child.avhdx', 'parent.vhdx', [
      { state: PAYLOAD_BLOCK_FULLY_PRESENT, fill: 0xc0 },
      { state: PAYLOAD_BLOCK_PARTIALLY_PRESENT, fill: 0xc1, sectors: [0, 1, 2, 7, 100, 2047] },
      { state: PAYLOAD_BLOCK_ZERO },
      { state: PAYLOAD_BLOCK_NOT_PRESENT },
      { state: PAYLOAD_BLOCK_UNDEFINED },
    ], 'default');
  });

  function expected(): Buffer {
    const e = Buffer.alloc(8 * MiB, 0x10);
    e.fill(0xc0, 0, MiB);
    for (const s of [0, 1, 2, 7, 100, 2047]) e.fill(0xc1, MiB + s * 512, MiB + (s + 1) * 512);
    e.fill(0, 2 * MiB, 3 * MiB);
    return e;
  }

  it('reads the merge of child and parent (sector bitmap, parent for absent blocks)', () => {
    expect(qemu(['info', 'child.avhdx']).status).toBe(1);
    ok(q(['convert', '-O', 'raw', 'child.avhdx', 'child.raw']));
    expect(readFileSync(P('child.raw')).equals(expected())).toBe(true);
  });

  it('info shows the parent as backing file; map shows which layer holds what', () => {
    const j = JSON.parse(ok(q(['info', '--output=json', 'child.avhdx'])).stdout);
    expect(j['backing-filename']).toBe('parent.vhdx');
    expect(j['full-backing-filename']).toBe('parent.vhdx');
    expect(j['backing-filename-format']).toBe('vhdx');
    expect(j['cluster-size']).toBe(MiB);
    expect(ok(q(['info', 'child.avhdx'])).stdout).toContain('backing file: parent.vhdx');
    const m = mapRanges(ok(q(['map', '--output=json', 'child.avhdx'])).stdout);
    // block 0 (full) and the first present sectors of block 1 are contiguous in the file
    expect(m[0]).toMatchObject({ start: 0, length: MiB + 512 * 3, depth: 0, data: true });
    expect(m[1]).toMatchObject({ start: MiB + 512 * 3, depth: 1, data: true });
    expect(m.find((r) => r.start === 2 * MiB)).toMatchObject({ length: MiB, depth: 0, zero: true, data: false });
    expect(m.find((r) => r.start === 3 * MiB)).toMatchObject({ depth: 1, data: true });
  });

  it('finds the parent by absolute_win32_path (file name beside the child) without relative_path', () => {
    const link = guidToString(headersOf(P('parent.vhdx')).cur.dataWriteGuid);
    makeChild('child-abs.avhdx', 'parent.vhdx', [{ state: PAYLOAD_BLOCK_FULLY_PRESENT, fill: 0xc0 }], [
      ['parent_linkage', link],
      ['absolute_win32_path', 'D:\\Hyper-V\\Virtual Hard Disks\\parent.vhdx'],
    ]);
    ok(q(['convert', '-O', 'raw', 'child-abs.avhdx', 'child-abs.raw']));
    const r = readFileSync(P('child-abs.raw'));
    expect(r[0]).toBe(0xc0);
    expect(r[MiB]).toBe(0x10);
  });

  it('refuses a parent whose DataWriteGuid is not the parent_linkage', () => {
    makeChild('child-bad.avhdx', 'parent.vhdx', [{ state: PAYLOAD_BLOCK_FULLY_PRESENT, fill: 1 }], 'default', newGuid());
    const r = q(['convert', '-O', 'raw', 'child-bad.avhdx', 'bad.raw']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: child-bad.avhdx: VHDX parent 'parent.vhdx' does not match the parent linkage/);
    // info does not open the parent
    expect(ok(q(['info', 'child-bad.avhdx'])).stdout).toContain('backing file: parent.vhdx');
  });

  it('refuses writes into a differencing image', () => {
    copyFileSync(P('child.avhdx'), P('child-w.avhdx'));
    const r = q(['convert', '-n', '-f', 'raw', '-O', 'vhdx', 'child.raw', 'child-w.avhdx']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Writing to differencing VHDX images is not supported');
  });
});
