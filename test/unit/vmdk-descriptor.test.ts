/** The descriptor parser's qemu-compatible leniency and strictness (sscanf-like extent lines, CIDs, probing). */
import { describe, expect, it } from 'vitest';
import { buildDescriptor, parentHint, parseExtentLines, probeVmdk, readCid, replaceCid } from '../../src/formats/vmdk/descriptor.js';

describe('vmdk descriptor', () => {
  it('probes sparse magics and text descriptors as qemu', () => {
    expect(probeVmdk(Buffer.from('KDMV\x01\0\0\0', 'latin1'))).toBe(100);
    expect(probeVmdk(Buffer.from('COWD\x01\0\0\0', 'latin1'))).toBe(100);
    expect(probeVmdk(Buffer.from('# Disk DescriptorFile\nversion=1\nCID=1\n'))).toBe(100);
    expect(probeVmdk(Buffer.from('# c\r\n   \r\nversion=3\r\n'))).toBe(100);
    expect(probeVmdk(Buffer.from('# Disk DescriptorFile\nversion=4\n'))).toBe(0);
    expect(probeVmdk(Buffer.from('x version=1\n'))).toBe(0);
  });

  it('reads extent lines like sscanf, skipping what qemu skips', () => {
    const desc = 'RW 100 SPARSE "a.vmdk"\nRDONLY 5 FLAT "b" 0\nRW 0 FLAT "c" 0\nRW 7 ZERO "d"\n  RW   8   FLAT   "e f.vmdk"   16\nddb.adapterType = "ide"\nRW 9 VMFS "g"\n';
    expect(parseExtentLines(desc, 'x')).toEqual([
      { access: 'RW', sectors: 100, type: 'SPARSE', fname: 'a.vmdk', flatOffset: -1 },
      { access: 'RW', sectors: 8, type: 'FLAT', fname: 'e f.vmdk', flatOffset: 16 },
      { access: 'RW', sectors: 9, type: 'VMFS', fname: 'g', flatOffset: 0 },
    ]);
    expect(() => parseExtentLines('RW 10 FLAT "x"\n', 'f')).toThrow('Invalid extent line: RW 10 FLAT "x"');
    expect(() => parseExtentLines('RW 10 VMFS "x" 4\n', 'f')).toThrow('Invalid extent line');
    expect(() => parseExtentLines('RW 10 SPARSE "x" 4\n', 'f')).toThrow('Invalid extent line');
    expect(() => parseExtentLines('RW 10 FLAT "x" -1\n', 'f')).toThrow('Invalid extent line');
  });

  it('CIDs, parent hints and the CID rewrite', () => {
    const d = buildDescriptor({ cid: 0xdeadbeef, parentCid: 0xffffffff, createType: 'monolithicSparse', parentFileNameHint: 'base.vmdk', extentLines: ['RW 8 SPARSE "t.vmdk"\n'], hwVersion: '4', cylinders: 0, heads: 16, adapterType: 'ide', toolsVersion: '2147483647' });
    expect(readCid(d, false)).toBe(0xdeadbeef);
    expect(readCid(d, true)).toBe(0xffffffff);
    expect(parentHint(d)).toBe('base.vmdk');
    expect(parentHint('parentFileNameHint="open')).toBeNull();
    const r = replaceCid(d, 0x1234)!;
    expect(readCid(r, false)).toBe(0x1234);
    expect(readCid(r, true)).toBe(0xffffffff);
    expect(r.split('\n').slice(0, 4)).toEqual(['# Disk DescriptorFile', 'version=1', 'CID=1234', 'parentCID=ffffffff']);
  });
});
