/**
 * Colour and tables on a terminal, qemu-img's bytes everywhere else: errors, warnings
 * and `check` findings get colour only where their stream is a terminal (or
 * FORCE_COLOR says so), never with NO_COLOR; piped, they are exactly qemu-img's
 * (modulo the program name). An OVA's disks are a table on a terminal only. The
 * terminal is a pseudo-terminal made by util-linux `script`.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG, ok, plainEnv, qemuAvailable, qemuImg, qemuIo, qimg, run, tempDir, type RunResult } from '../helpers/qemu.js';
import { checkFindingKind } from '../../src/cli/output/style.js';
import { FIXTURES_DIR } from '../helpers/fixtures.js';
import { ovaDisksTable } from '../../src/cli/output/tables.js';

const enabled = qemuAvailable();
const hasScript = spawnSync('script', ['--version']).status === 0;
const tmp = tempDir('qimg-style-');
afterAll(() => tmp.cleanup());

const ESC = '\x1b';
const SGR = new RegExp(`${ESC}\\[[0-9;]*m`, 'g');
const strip = (s: string) => s.replace(SGR, '');
const hasSgr = (s: string) => new RegExp(`${ESC}\\[[0-9;]*m`).test(s);
const RED = '\x1b[31m';
const YELLOW = '\x1b[33m';
const GREEN = '\x1b[32m';

/** The tests' environment with colour settings of their own (undefined: unset). */
function envWith(vars: Record<string, string | undefined>): NodeJS.ProcessEnv {
  const env = plainEnv();
  delete env.NO_COLOR;
  env.TERM = 'xterm-256color';
  for (const [k, v] of Object.entries(vars)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

/** qemu-img's output as qimg prints it: the program name is qimg's. */
function asQimg(r: RunResult): RunResult {
  return { status: r.status, stdout: r.stdout.replace(/qemu-img/g, 'qimg'), stderr: r.stderr.replace(/qemu-img/g, 'qimg') };
}

const sq = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Runs qimg on a pseudo-terminal: stdout and stderr both on it, unless `redirect`
 * sends one of them to a file (`'2>'` or `'>'` and the file). Returns what the
 * terminal showed (CR LF as LF) and the exit code.
 */
function onTty(args: string[], env: NodeJS.ProcessEnv, redirect = ''): RunResult {
  const cmd = [process.execPath, QIMG, ...args].map(sq).join(' ') + (redirect ? ` ${redirect}` : '');
  const r = run('script', ['-qec', cmd, '/dev/null'], { cwd: tmp.path, env });
  return { status: r.status, stdout: r.stdout.replace(/\r\n/g, '\n'), stderr: r.stderr };
}

/** A 1 MiB qcow2 with 192 KiB of data (clusters: 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2, 5-7 data). */
function makeImage(name: string): string {
  const p = join(tmp.path, name);
  ok(qemuImg(['create', '-q', '-f', 'qcow2', p, '1M']));
  ok(qemuIo(['-c', 'write -P 1 0 192k', p]));
  return p;
}

/** Sets a 16-bit refcount in refcount block 0. */
function setRefcount(p: string, cluster: number, value: number): void {
  const d = readFileSync(p);
  const reftable = Number(d.readBigUInt64BE(48));
  const block0 = Number(d.readBigUInt64BE(reftable) & ~0x1ffn);
  d.writeUInt16BE(value, block0 + cluster * 2);
  writeFileSync(p, d);
}

describe('check findings are sorted by their first words', () => {
  it.each([
    ['ERROR cluster 5 refcount=0 reference=1', 'error'],
    ['ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x0 size 0x1', 'error'],
    ['ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0', 'error'],
    ["Can't get refcount for cluster 7: Input/output error", 'error'],
    ['qcow2: Image is corrupt: L2 table offset 0x1 unaligned (L1 index: 0); further non-fatal corruption events will be suppressed', 'error'],
    ['Leaked cluster 1 refcount=2 reference=1', 'leak'],
    ['Repairing cluster 1 refcount=2 reference=1', 'repair'],
    ['Rebuilding refcount structure', 'repair'],
    ['Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing', 'other'],
  ])('%s', (line, kind) => {
    expect(checkFindingKind(line)).toBe(kind);
  });
});

describe.skipIf(!enabled)('errors, warnings and check: qemu-img bytes when piped, colour when asked', () => {
  let leaky = '';
  let broken = '';

  beforeAll(() => {
    leaky = makeImage('leaky.qcow2');
    setRefcount(leaky, 1, 2); // the refcount table's cluster counted twice: a leak
    broken = makeImage('broken.qcow2');
    setRefcount(broken, 1, 2);
    setRefcount(broken, 6, 0); // a data cluster without its refcount: corruptions
  });

  /** An error qimg words exactly as qemu-img does. */
  const badFormat = () => ['create', '-f', 'bogus', join(tmp.path, 'never.img'), '1M'];

  it('an error line: piped (default and NO_COLOR) it is qemu-img\'s', () => {
    const q = asQimg(qemuImg(badFormat()));
    expect(q.status).toBe(1);
    expect(q.stderr).toMatch(/^qimg: .*Unknown file format 'bogus'\n$/);
    for (const env of [envWith({}), envWith({ NO_COLOR: '1' })]) {
      expect(qimg(badFormat(), { env })).toEqual(q);
    }
  });

  it('an error line with FORCE_COLOR=1: red, and only escape codes added', () => {
    const q = asQimg(qemuImg(badFormat()));
    const m = qimg(badFormat(), { env: envWith({ FORCE_COLOR: '1' }) });
    expect(m.status).toBe(1);
    expect(m.stderr.startsWith(RED)).toBe(true);
    expect(m.stderr.endsWith('\x1b[39m\n')).toBe(true);
    expect(strip(m.stderr)).toBe(q.stderr);
    // FORCE_COLOR=0 is no colour, as in chalk
    expect(qimg(badFormat(), { env: envWith({ FORCE_COLOR: '0' }) })).toEqual(q);
  });

  it('a usage error: the message in colour, the hint line as it is', () => {
    const q = asQimg(qemuImg(['info']));
    expect(qimg(['info'], { env: envWith({}) })).toEqual(q);
    const m = qimg(['info'], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(m.status).toBe(q.status);
    expect(strip(m.stderr)).toBe(q.stderr);
    const [first, hint] = m.stderr.split('\n');
    expect(first).toContain(RED);
    expect(hint).toBe("Try 'qimg --help' for more information");
  });

  it('a warning: qemu-img\'s line piped, yellow with FORCE_COLOR=1', () => {
    const src = join(tmp.path, 'w.raw');
    writeFileSync(src, Buffer.alloc(64 * 1024, 1));
    const q = asQimg(qemuImg(['convert', '-S', '0x1k', '-O', 'raw', src, join(tmp.path, 'wq.raw')]));
    expect(q.stderr).toMatch(/^qimg: warning: /);
    const m = qimg(['convert', '-S', '0x1k', '-O', 'raw', src, join(tmp.path, 'wm.raw')], { env: envWith({}) });
    expect(m).toEqual(q);
    const c = qimg(['convert', '-S', '0x1k', '-O', 'raw', src, join(tmp.path, 'wc.raw')], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(c.stderr.startsWith(YELLOW)).toBe(true);
    expect(strip(c.stderr)).toBe(q.stderr);
  });

  it('a warning from a format driver (dmg chunks it cannot read) goes the same way', () => {
    const dmg = join(FIXTURES_DIR, 'foreign', 'dmg', 'bzip2.dmg');
    const plain = qimg(['info', dmg], { env: envWith({}) });
    expect(plain.status).toBe(0);
    expect(plain.stderr).toMatch(/^qimg: warning: bzip2 compressed chunks are not supported, accessing them will result in I\/O errors\n$/);
    const c = qimg(['info', dmg], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(c.stderr.startsWith(YELLOW)).toBe(true);
    expect(strip(c.stderr)).toBe(plain.stderr);
    expect(c.stdout).toBe(plain.stdout);
  });

  it('check of a leaky image: piped, every byte is qemu-img\'s', () => {
    const q = qemuImg(['check', leaky]);
    expect(q.status).toBe(3);
    expect(q.stderr).toBe('Leaked cluster 1 refcount=2 reference=1\n');
    for (const env of [envWith({}), envWith({ NO_COLOR: '1' }), envWith({ NO_COLOR: '1', TERM: 'dumb' })]) {
      expect(qimg(['check', leaky], { env })).toEqual(q);
    }
  });

  it('check with FORCE_COLOR=1: findings and summary in colour, text unchanged', () => {
    const q = qemuImg(['check', leaky]);
    const m = qimg(['check', leaky], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(m.status).toBe(q.status);
    expect(m.stderr).toBe(`${YELLOW}Leaked cluster 1 refcount=2 reference=1\x1b[39m\n`);
    expect(m.stdout).toContain(YELLOW);
    expect(strip(m.stdout)).toBe(q.stdout);
    expect(strip(m.stderr)).toBe(q.stderr);
    // statistics stay plain
    expect(m.stdout).toMatch(/^Image end offset: \d+$/m);
  });

  it('check of a corrupted image: ERROR lines red, leaks yellow, the bytes qemu-img\'s', () => {
    const q = qemuImg(['check', broken]);
    expect(q.status).toBe(2);
    expect(qimg(['check', broken], { env: envWith({}) })).toEqual(q);
    const m = qimg(['check', broken], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(m.status).toBe(2);
    expect(strip(m.stderr)).toBe(q.stderr);
    expect(strip(m.stdout)).toBe(q.stdout);
    for (const line of m.stderr.trimEnd().split('\n')) {
      const plain = strip(line);
      if (plain.startsWith('ERROR')) expect(line.startsWith(RED)).toBe(true);
      else if (plain.startsWith('Leaked')) expect(line.startsWith(YELLOW)).toBe(true);
    }
    expect(m.stdout).toMatch(new RegExp(`${ESC}\\[31m\\d+ errors were found on the image\\.`));
  });

  it('check -r leaks with FORCE_COLOR=1: repairs green; piped the same text as qemu-img', () => {
    const qCopy = join(tmp.path, 'leaky-q.qcow2');
    const mCopy = join(tmp.path, 'leaky-m.qcow2');
    const pCopy = join(tmp.path, 'leaky-p.qcow2');
    for (const c of [qCopy, mCopy, pCopy]) writeFileSync(c, readFileSync(leaky));
    const q = qemuImg(['check', '-r', 'leaks', qCopy]);
    expect(q.status).toBe(0);
    expect(qimg(['check', '-r', 'leaks', pCopy], { env: envWith({}) })).toEqual(q);
    const m = qimg(['check', '-r', 'leaks', mCopy], { env: envWith({ FORCE_COLOR: '1' }) });
    expect(m.status).toBe(0);
    expect(m.stderr).toContain(`${GREEN}Repairing cluster 1 refcount=2 reference=1\x1b[39m\n`);
    expect(m.stdout).toContain(GREEN);
    expect(strip(m.stderr)).toBe(q.stderr);
    expect(strip(m.stdout)).toBe(q.stdout);
  });
});

describe.skipIf(!enabled || !hasScript)('on a terminal', () => {
  let leaky = '';
  const missing = () => join(tmp.path, 'no-such-image.qcow2');

  beforeAll(() => {
    leaky = makeImage('tty-leaky.qcow2');
    setRefcount(leaky, 1, 2);
  });

  it('colour by default; none with NO_COLOR, with TERM=dumb or FORCE_COLOR=0', () => {
    const plain = `qimg: Could not open '${missing()}': No such file or directory\n`;
    const coloured = onTty(['info', missing()], envWith({}));
    expect(coloured.status).toBe(1);
    expect(coloured.stdout.startsWith(RED)).toBe(true);
    expect(strip(coloured.stdout)).toBe(plain);
    for (const env of [envWith({ NO_COLOR: '1' }), envWith({ TERM: 'dumb' }), envWith({ FORCE_COLOR: '0' })]) {
      expect(onTty(['info', missing()], env).stdout).toBe(plain);
    }
    // NO_COLOR set but empty means nothing (no-color.org); FORCE_COLOR beats NO_COLOR, as in Node
    expect(hasSgr(onTty(['info', missing()], envWith({ NO_COLOR: '' })).stdout)).toBe(true);
    expect(hasSgr(onTty(['info', missing()], envWith({ NO_COLOR: '1', FORCE_COLOR: '1' })).stdout)).toBe(true);
  });

  it('each stream decides for itself: stderr to a file is plain while stdout is a terminal', () => {
    const errFile = join(tmp.path, 'err.txt');
    const r = onTty(['info', missing()], envWith({}), `2>${sq(errFile)}`);
    expect(r.stdout).toBe('');
    expect(readFileSync(errFile, 'utf8')).toBe(`qimg: Could not open '${missing()}': No such file or directory\n`);
  });

  it('check: findings coloured on the terminal, the summary plain in a file', () => {
    const q = qemuImg(['check', leaky]);
    const outFile = join(tmp.path, 'out.txt');
    const r = onTty(['check', leaky], envWith({}), `>${sq(outFile)}`);
    expect(r.status).toBe(3);
    expect(readFileSync(outFile, 'utf8')).toBe(q.stdout);
    expect(r.stdout).toBe(`${YELLOW}Leaked cluster 1 refcount=2 reference=1\x1b[39m\n`);
    // and the other way round: the summary coloured, the findings plain in a file
    const errFile = join(tmp.path, 'check-err.txt');
    const r2 = onTty(['check', leaky], envWith({}), `2>${sq(errFile)}`);
    expect(readFileSync(errFile, 'utf8')).toBe(q.stderr);
    expect(hasSgr(r2.stdout)).toBe(true);
    expect(strip(r2.stdout)).toBe(q.stdout);
  });

  it('qemu-img\'s own texts keep their bytes on a terminal (info of a qcow2)', () => {
    const q = qemuImg(['info', leaky]);
    const r = onTty(['info', leaky], envWith({}));
    expect(r.stdout).toBe(q.stdout);
  });
});

describe('the OVA disk table', () => {
  it('shows format and compression columns only when the OVF names them', () => {
    const rows = (t: string) =>
      strip(t)
        .trimEnd()
        .split('\n')
        .filter((l) => l.includes('│'))
        .map((l) => l.split('│').slice(1, -1).map((c) => c.trim()));
    const bare = ovaDisksTable([{ 'disk-id': 'd1', file: 'a.img', 'virtual-size': 1048576, 'file-size': 512, selected: true }], 2);
    expect(bare.split('\n').every((l) => l === '' || l.startsWith('  '))).toBe(true);
    expect(rows(bare)).toEqual([
      ['', 'disk id', 'file', 'virtual size', 'file size'],
      ['*', 'd1', 'a.img', '1 MiB', '512 B'],
    ]);
    const full = ovaDisksTable(
      [
        { 'disk-id': 'd1', file: 'a.vmdk', format: 'vmdk', subformat: 'streamOptimized', 'virtual-size': 67108864, 'file-size': 70000, selected: false },
        { 'disk-id': 'd2', file: 'b.vmdk.gz', format: 'vmdk', 'virtual-size': 1073741824, compression: 'gzip', selected: true },
      ],
      0,
    );
    expect(rows(full)).toEqual([
      ['', 'disk id', 'file', 'format', 'virtual size', 'file size', 'compression'],
      ['', 'd1', 'a.vmdk', 'vmdk (streamOptimized)', '64 MiB', '68.4 KiB', ''],
      ['*', 'd2', 'b.vmdk.gz', 'vmdk', '1 GiB', '', 'gzip'],
    ]);
  });
});

describe.skipIf(!enabled || !hasScript)('OVA disks: a table on a terminal, lines when piped', () => {
  let ova = '';

  beforeAll(() => {
    const c = tmp.path;
    ok(qemuImg(['create', '-q', '-f', 'qcow2', join(c, 'disk1.qcow2'), '64M']));
    ok(qemuImg(['create', '-q', '-f', 'raw', join(c, 'disk2.img'), '8M']));
    writeFileSync(
      join(c, 'app.ovf'),
      `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk1.qcow2" ovf:id="file1"/>
    <File ovf:href="disk2.img" ovf:id="file2"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"/>
    <Disk ovf:capacity="8388608" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
  </DiskSection>
</Envelope>
`,
    );
    ok(run('tar', ['--format=ustar', '-cf', 'app.ova', 'app.ovf', 'disk1.qcow2', 'disk2.img'], { cwd: c }));
    ova = join(c, 'app.ova');
  });

  it('piped: the format-specific dump, no table', () => {
    const r = ok(qimg(['info', ova], { env: envWith({}) }));
    expect(r.stdout).toContain('    disks:\n        [0]:\n            disk id: vmdisk1\n');
    expect(r.stdout).toContain('            file: disk2.img\n');
    expect(r.stdout).not.toMatch(/[┌│└]/);
  });

  it('on a terminal: the disks as a table under qemu-style lines', () => {
    const r = onTty(['info', ova], envWith({ NO_COLOR: '1' }));
    expect(r.status).toBe(0);
    const lines = r.stdout.split('\n');
    expect(lines.slice(0, 2)).toEqual([`image: ${ova}`, 'file format: ova']);
    expect(r.stdout).toContain('Format specific information:\n    disk format: qcow2\n    disks:\n    ┌');
    const header = lines.find((l) => l.includes('disk id'))!;
    expect(header.split('│').map((s) => s.trim())).toEqual(['', '', 'disk id', 'file', 'virtual size', 'file size', '']);
    const row = (id: string) => lines.find((l) => l.includes(id))!.split('│').map((s) => s.trim());
    expect(row('vmdisk1')).toEqual(['', '*', 'vmdisk1', 'disk1.qcow2', '64 MiB', '192 KiB', '']);
    expect(row('vmdisk2')).toEqual(['', '', 'vmdisk2', 'disk2.img', '8 MiB', '8 MiB', '']);
    expect(hasSgr(r.stdout)).toBe(false);
    // with colour, the headings are bold; the text is the same
    const c = onTty(['info', ova], envWith({}));
    expect(c.stdout).toContain('\x1b[1mdisk id\x1b[22m');
    expect(strip(c.stdout)).toBe(r.stdout);
  });

  it('JSON is JSON on a terminal too', () => {
    const r = onTty(['info', '--output=json', ova], envWith({}));
    expect(JSON.parse(r.stdout).format).toBe('ova');
    expect(hasSgr(r.stdout)).toBe(false);
  });
});
