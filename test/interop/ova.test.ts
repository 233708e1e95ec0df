/**
 * OVA appliances (beyond qemu-img): tar archives with an OVF descriptor and disks, read
 * in place. The disks are made by qemu-img and qemu-io; what qimg reads through the
 * archive must equal what qemu-img reads from the unpacked disk.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, run, sha256File, tempDir } from '../helpers/qemu.js';
import { expectCleanFailure, patch } from '../hostile/mutate.js';

const enabled = qemuAvailable();

function ovf(disks: Array<{ id: string; href: string; capacity: string; units?: string; format?: string; compression?: string }>): string {
  const files = disks.map((d, i) => `    <File ovf:href="${d.href}" ovf:id="file${i + 1}"${d.compression ? ` ovf:compression="${d.compression}"` : ''}/>`).join('\n');
  const entries = disks
    .map(
      (d, i) =>
        `    <Disk ovf:capacity="${d.capacity}"${d.units ? ` ovf:capacityAllocationUnits="${d.units}"` : ''} ovf:diskId="${d.id}" ovf:fileRef="file${i + 1}"${
          d.format ? ` ovf:format="${d.format}"` : ''
        }/>`,
    )
    .join('\n');
  return `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
${files}
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
${entries}
  </DiskSection>
  <VirtualSystem ovf:id="test"><Info>A test appliance</Info></VirtualSystem>
</Envelope>
`;
}

describe.skipIf(!enabled)('OVA appliances', () => {
  let dir: { path: string; cleanup: () => void };
  const p = (n: string) => join(dir.path, n);
  const tar = (args: string[]) => ok(run('tar', args, { cwd: dir.path }), `tar ${args.join(' ')}`);

  beforeAll(() => {
    dir = tempDir('qimg-ova-');
    const c = dir.path;
    ok(qemuImg(['create', '-q', '-f', 'qcow2', 'd1.qcow2', '64M'], c));
    ok(qemuIo(['-c', 'write -P 7 1M 2M', '-c', 'write -P 0x21 40M 64k', 'd1.qcow2'], c));
    ok(qemuImg(['create', '-q', '-f', 'raw', 'd2.img', '8M'], c));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 9 0 1M', '-c', 'write -P 3 7M 512', 'd2.img'], c));
    ok(qemuImg(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'd1.qcow2', 'd3.vmdk'], c));
    writeFileSync(
      p('app.ovf'),
      ovf([
        { id: 'vmdisk1', href: 'd1.qcow2', capacity: '64', units: 'byte * 2^20' },
        { id: 'vmdisk2', href: 'd2.img', capacity: '8388608' },
      ]),
    );
    tar(['--format=ustar', '-cf', 'app.ova', 'app.ovf', 'd1.qcow2', 'd2.img']);
    // a VMware-style appliance: one streamOptimized VMDK, pax headers and a long name
    const longName = `${'disk-with-a-rather-long-name-'.repeat(4)}1.vmdk`;
    ok(run('cp', ['d3.vmdk', longName], { cwd: c }));
    writeFileSync(
      p('vm.ovf'),
      ovf([{ id: 'vmdisk1', href: longName, capacity: '67108864', format: 'http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized' }]),
    );
    writeFileSync(p('vm.mf'), 'SHA256(vm.ovf)= 00\n');
    tar(['--format=pax', '-cf', 'vm.ova', 'vm.ovf', 'vm.mf', longName]);
    writeFileSync(p('longname'), longName);
    ok(qemuImg(['convert', '-O', 'raw', 'd1.qcow2', 'd1.raw'], c));
  });
  afterAll(() => dir?.cleanup());

  it('probes an OVA and lists its disks (human and JSON)', () => {
    const h = ok(qimg(['info', 'app.ova'], { cwd: dir.path })).stdout;
    expect(h).toContain('file format: ova\n');
    expect(h).toContain('virtual size: 64 MiB (67108864 bytes)\n');
    expect(h).toMatch(/disk id: vmdisk1/);
    expect(h).toMatch(/file: d2\.img/);
    const j = JSON.parse(ok(qimg(['info', '--output=json', 'app.ova'], { cwd: dir.path })).stdout);
    expect(j.format).toBe('ova');
    expect(j['virtual-size']).toBe(64 * 1024 * 1024);
    const disks = j['format-specific'].data.disks as Array<Record<string, unknown>>;
    expect(disks.map((d) => d.file)).toEqual(['d1.qcow2', 'd2.img']);
    expect(disks.map((d) => d['virtual-size'])).toEqual([64 * 1024 * 1024, 8 * 1024 * 1024]);
    expect(disks.map((d) => d.selected)).toEqual([true, false]);
    expect(j['format-specific'].data['disk-format']).toBe('qcow2');
  });

  it('converts the first disk by default and another by member name or disk id, without unpacking', () => {
    const c = dir.path;
    ok(qimg(['convert', '-O', 'raw', 'app.ova', 'o1.raw'], { cwd: c }));
    expect(sha256File(p('o1.raw'))).toBe(sha256File(p('d1.raw')));
    ok(qimg(['convert', '-O', 'qcow2', 'app.ova/d2.img', 'o2.qcow2'], { cwd: c }));
    expect(ok(qemuImg(['compare', 'o2.qcow2', 'd2.img'], c)).stdout).toContain('Images are identical.');
    ok(qimg(['convert', '-O', 'raw', 'app.ova/vmdisk2', 'o3.raw'], { cwd: c }));
    expect(readFileSync(p('o3.raw')).equals(readFileSync(p('d2.img')))).toBe(true);
    expect(ok(qimg(['compare', 'app.ova', 'd1.qcow2'], { cwd: c })).stdout).toBe('Images are identical.\n');
  });

  it('a streamOptimized VMDK in a pax archive with a long member name', () => {
    const c = dir.path;
    const j = JSON.parse(ok(qimg(['info', '--output=json', 'vm.ova'], { cwd: c })).stdout);
    expect(j['format-specific'].data['disk-format']).toBe('vmdk');
    expect(j['format-specific'].data.disks[0]).toMatchObject({ format: 'vmdk', subformat: 'streamOptimized', file: readFileSync(p('longname'), 'utf8') });
    ok(qimg(['convert', '-O', 'qcow2', 'vm.ova', 'vm.qcow2'], { cwd: c }));
    expect(ok(qemuImg(['compare', 'vm.qcow2', 'd1.qcow2'], c)).stdout).toContain('Images are identical.');
  });

  it('map reports data ranges at their offsets inside the archive', () => {
    const c = dir.path;
    const lines = ok(qimg(['map', '--output=json', 'app.ova'], { cwd: c })).stdout.trim().split('\n');
    const ranges = lines.map((l) => JSON.parse(l.replace(/^\[|,$|\]$/g, '')) as Record<string, number | boolean>);
    const data = ranges.filter((r) => r.data);
    expect(data.map((r) => [r.start, r.length])).toEqual([
      [1048576, 2097152],
      [41943040, 65536],
    ]);
    // the bytes at the reported archive offsets are the guest data
    const ova = readFileSync(p('app.ova'));
    expect(ova[data[0].offset as number]).toBe(7);
    expect(ova[data[1].offset as number]).toBe(0x21);
  });

  it('refuses writes, unknown disks and compressed members with one clear line', () => {
    const c = dir.path;
    expectCleanFailure(qimg(['info', 'app.ova/nope'], { cwd: c }), /the OVA has no disk 'nope' \(its disks: d1\.qcow2, d2\.img\)/);
    expectCleanFailure(qimg(['info', 'd1.raw/x'], { cwd: c }), /Not a directory/);
    const before = sha256File(p('app.ova'));
    expectCleanFailure(qimg(['convert', '-n', '-O', 'ova', 'd1.raw', 'app.ova'], { cwd: c }), /read-only/);
    expect(sha256File(p('app.ova'))).toBe(before);
    writeFileSync(p('gz.ovf'), ovf([{ id: 'g', href: 'd2.img', capacity: '8388608', compression: 'gzip' }]));
    tar(['--format=ustar', '-cf', 'gz.ova', 'gz.ovf', 'd2.img']);
    expectCleanFailure(qimg(['convert', '-O', 'raw', 'gz.ova', 'gz.raw'], { cwd: c }), /stored gzip-compressed in the OVA/);
    expect(existsSync(p('gz.raw'))).toBe(false);
  });

  it('hostile archives: bad header checksum, truncated member, missing member, bad capacity units', () => {
    const c = dir.path;
    ok(run('cp', ['app.ova', 'sum.ova'], { cwd: c }));
    const second = 512 + Math.ceil(readFileSync(p('app.ovf')).length / 512) * 512;
    patch(p('sum.ova'), second + 10, Buffer.from('X')); // a byte of the second member's name
    expectCleanFailure(qimg(['info', 'sum.ova'], { cwd: c }), /invalid tar header at offset/);
    const size = readFileSync(p('app.ova')).length;
    ok(run('cp', ['app.ova', 'cut.ova'], { cwd: c }));
    ok(run('truncate', ['-s', String(size - 20 * 512 - 4 * 1024 * 1024), 'cut.ova'], { cwd: c }));
    expectCleanFailure(qimg(['info', 'cut.ova'], { cwd: c }), /extends beyond the end of the archive|truncated tar archive/);
    writeFileSync(p('miss.ovf'), ovf([{ id: 'm', href: 'absent.vmdk', capacity: '1' }]));
    tar(['--format=ustar', '-cf', 'miss.ova', 'miss.ovf', 'd2.img']);
    expectCleanFailure(qimg(['info', 'miss.ova'], { cwd: c }), /no member 'absent\.vmdk'/);
    writeFileSync(p('units.ovf'), ovf([{ id: 'u', href: 'd2.img', capacity: '1', units: 'byte * 2^400' }]));
    tar(['--format=ustar', '-cf', 'units.ova', 'units.ovf', 'd2.img']);
    expectCleanFailure(qimg(['info', 'units.ova'], { cwd: c }), /capacity allocation units/);
  });
});
