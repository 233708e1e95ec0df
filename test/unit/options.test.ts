/**
 * `-o` option strings (QemuOpts): splitting with ",," escapes, accumulation, help
 * detection, flags, value types and messages, compared with qemu-img where it
 * prints them (`qemu-img create -f qcow2 -o ...`, `-o help`).
 */
import { describe, expect, it, afterAll } from 'vitest';
import { join } from 'node:path';
import {
  FILE_PROTOCOL_OPTIONS,
  formatOptionHelp,
  hasHelpOption,
  isValidOptionList,
  parseOptions,
  splitOptionString,
  type OptionSpec,
} from '../../src/core/options.js';
import { QimgError } from '../../src/core/errors.js';
import { qcow2CreateOptions } from '../../src/formats/qcow2/options.js';
import { rawCreateOptions } from '../../src/formats/raw/driver.js';
import { qemuAvailable, qemuImg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();

const SCHEMA: OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates' },
  { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits' },
  { name: 'compression_type', type: 'string', help: 'Compression method', choices: ['zlib', 'zstd'] },
];

function errorOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(QimgError);
    return (e as Error).message;
  }
  throw new Error('did not throw');
}

describe('splitOptionString', () => {
  it('splits on single commas and reads ",," as a comma inside values', () => {
    expect(splitOptionString('a=1,b=2')).toEqual([
      ['a', '1'],
      ['b', '2'],
    ]);
    expect(splitOptionString('backing_file=a,,b.qcow2,size=1M')).toEqual([
      ['backing_file', 'a,b.qcow2'],
      ['size', '1M'],
    ]);
    expect(splitOptionString('x=,,,,')).toEqual([['x', ',,']]);
    expect(splitOptionString('x=1,,,y=2')).toEqual([
      ['x', '1,'],
      ['y', '2'],
    ]);
    expect(splitOptionString('x=a=b')).toEqual([['x', 'a=b']]);
    expect(splitOptionString('x=')).toEqual([['x', '']]);
  });

  it('gives flags (no "=") an undefined value; names do not take ",," escapes', () => {
    expect(splitOptionString('lazy_refcounts,size=1')).toEqual([
      ['lazy_refcounts', undefined],
      ['size', '1'],
    ]);
    // QemuOpts: a name ends at the first ',' or '='
    expect(splitOptionString('a,,b=1')[0]).toEqual(['a', undefined]);
    expect(splitOptionString('=5')).toEqual([['', '5']]);
  });
});

describe('isValidOptionList / hasHelpOption', () => {
  it('refuses empty lists, a leading comma and an odd number of trailing commas', () => {
    for (const s of ['', ',', ',size=1M', 'size=1M,', 'size=1M,,,', ',,']) expect(isValidOptionList(s), s).toBe(false);
    for (const s of ['size=1M', 'size=1M,,', 'a,b', 'x=a,,b']) expect(isValidOptionList(s), s).toBe(true);
  });
  it('finds "help" or "?" as a whole item', () => {
    expect(hasHelpOption('help')).toBe(true);
    expect(hasHelpOption('?')).toBe(true);
    expect(hasHelpOption('size=1M,help')).toBe(true);
    expect(hasHelpOption('?,size=1M')).toBe(true);
    expect(hasHelpOption('help=1')).toBe(false);
    expect(hasHelpOption('helpme')).toBe(false);
    expect(hasHelpOption('backing_file=help')).toBe(false);
    expect(hasHelpOption('backing_file=x,,help')).toBe(false); // ",," keeps "help" inside the value
  });
});

describe('parseOptions', () => {
  it('accumulates several -o strings, later values winning', () => {
    const r = parseOptions(['size=1M,lazy_refcounts=on', 'size=2M', 'compression_type=zstd'], SCHEMA);
    expect(r.help).toBe(false);
    expect(r.values.get('size')).toBe(2n * 1024n * 1024n);
    expect(r.values.get('lazy_refcounts')).toBe(true);
    expect(r.values.get('compression_type')).toBe('zstd');
    expect(r.raw.get('size')).toBe('2M');
    expect([...r.values.keys()]).toEqual(['size', 'lazy_refcounts', 'compression_type']);
  });

  it('keeps escaped commas in values', () => {
    const r = parseOptions(['backing_file=a,,b.qcow2'], SCHEMA);
    expect(r.values.get('backing_file')).toBe('a,b.qcow2');
  });

  it('detects help in any string, before checking anything else', () => {
    expect(parseOptions(['help'], SCHEMA).help).toBe(true);
    expect(parseOptions(['?'], SCHEMA).help).toBe(true);
    expect(parseOptions(['size=1M', 'bogus=1,help'], SCHEMA).help).toBe(true);
    expect(parseOptions([], SCHEMA)).toMatchObject({ help: false, warnings: [] });
  });

  it('refuses an invalid option list with qemu-img\'s message', () => {
    expect(errorOf(() => parseOptions(['size=1M', ',x'], SCHEMA))).toBe('Invalid option list: ,x');
    expect(errorOf(() => parseOptions(['size=1M,'], SCHEMA))).toBe('Invalid option list: size=1M,');
    expect(errorOf(() => parseOptions([''], SCHEMA))).toBe('Invalid option list: ');
  });

  it('names unknown parameters', () => {
    expect(errorOf(() => parseOptions(['bogus'], SCHEMA))).toBe("Invalid parameter 'bogus'");
    expect(errorOf(() => parseOptions(['size=1M,bogus=2'], SCHEMA))).toBe("Invalid parameter 'bogus'");
    expect(errorOf(() => parseOptions(['=5'], SCHEMA))).toBe("Invalid parameter ''");
  });

  it('reads bool words and flags', () => {
    for (const w of ['on', 'yes', 'true', 'y']) expect(parseOptions([`lazy_refcounts=${w}`], SCHEMA).values.get('lazy_refcounts'), w).toBe(true);
    for (const w of ['off', 'no', 'false', 'n']) expect(parseOptions([`lazy_refcounts=${w}`], SCHEMA).values.get('lazy_refcounts'), w).toBe(false);
    expect(parseOptions(['lazy_refcounts'], SCHEMA).values.get('lazy_refcounts')).toBe(true);
    expect(parseOptions(['nolazy_refcounts'], SCHEMA).values.get('lazy_refcounts')).toBe(false);
    for (const w of ['ON', 'maybe', '', '1']) {
      expect(errorOf(() => parseOptions([`lazy_refcounts=${w}`], SCHEMA))).toBe("Parameter 'lazy_refcounts' expects 'on' or 'off'");
    }
  });

  it('reads sizes with qemu_strtosz and QemuOpts messages', () => {
    expect(parseOptions(['size=1.5k'], SCHEMA).values.get('size')).toBe(1536n);
    expect(parseOptions(['size=0x1000'], SCHEMA).values.get('size')).toBe(4096n);
    const hex = parseOptions(['size=0x10k'], SCHEMA);
    expect(hex.values.get('size')).toBe(16384n);
    expect(hex.warnings).toEqual(['Using a multiplier suffix on hex numbers is deprecated: 0x10k']);
    // below 2^64 is fine for QemuOpts (create checks its own limit later)
    expect(parseOptions(['size=15E'], SCHEMA).values.get('size')).toBe(15n << 60n);
    for (const v of ['1kb', 'abc', '', '-1', '1.5']) {
      expect(errorOf(() => parseOptions([`size=${v}`], SCHEMA))).toBe("Parameter 'size' expects a non-negative number below 2^64");
    }
    expect(errorOf(() => parseOptions(['size'], SCHEMA))).toBe("Parameter 'size' expects a non-negative number below 2^64");
    expect(errorOf(() => parseOptions(['size=16E'], SCHEMA))).toBe("Value '16E' is out of range for parameter 'size'");
  });

  it('reads numbers as strtoull with base 0', () => {
    expect(parseOptions(['refcount_bits=16'], SCHEMA).values.get('refcount_bits')).toBe(16);
    expect(parseOptions(['refcount_bits=0x10'], SCHEMA).values.get('refcount_bits')).toBe(16);
    expect(parseOptions(['refcount_bits=010'], SCHEMA).values.get('refcount_bits')).toBe(8);
    expect(parseOptions(['refcount_bits=+16'], SCHEMA).values.get('refcount_bits')).toBe(16);
    expect(parseOptions(['refcount_bits= 16'], SCHEMA).values.get('refcount_bits')).toBe(16);
    expect(errorOf(() => parseOptions(['refcount_bits=16k'], SCHEMA))).toBe("Parameter 'refcount_bits' expects a number");
    expect(errorOf(() => parseOptions(['refcount_bits'], SCHEMA))).toBe("Parameter 'refcount_bits' expects a number");
    expect(errorOf(() => parseOptions(['refcount_bits=99999999999999999999'], SCHEMA))).toBe(
      "Value '99999999999999999999' is too large for parameter 'refcount_bits'",
    );
  });

  it('checks choices of string options', () => {
    expect(parseOptions(['compression_type=zlib'], SCHEMA).values.get('compression_type')).toBe('zlib');
    expect(errorOf(() => parseOptions(['compression_type=lz4'], SCHEMA))).toBe("Parameter 'compression_type' does not accept value 'lz4'");
    // free strings take anything, even empty
    expect(parseOptions(['backing_file='], SCHEMA).values.get('backing_file')).toBe('');
  });
});

describe('formatOptionHelp', () => {
  it('pads "  name=<type>" to 24 columns and sorts bytewise', () => {
    const text = formatOptionHelp('raw', rawCreateOptions);
    expect(text).toBe(
      'Supported raw options:\n  size=<size>            - Virtual disk size\n\n' +
        'The protocol level may support further options.\nSpecify the target filename to include those options.\n',
    );
    const withFile = formatOptionHelp('raw', rawCreateOptions, 'x.raw');
    expect(withFile.split('\n')[0]).toBe('Supported options:');
    expect(withFile).toContain('  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n');
    expect(withFile).toContain('  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n');
    expect(FILE_PROTOCOL_OPTIONS.map((o) => o.name).sort()).toEqual(['extent_size_hint', 'nocow', 'preallocation', 'size']);
  });
});

describe.skipIf(!enabled)('vs qemu-img create -f qcow2 -o ...', () => {
  const tmp = tempDir('qimg-opts-');
  afterAll(() => tmp.cleanup());
  const target = join(tmp.path, 't.qcow2');

  /** qemu's first error line without the "qemu-img: [file: ]" prefix, or null on success. */
  function qemuError(opts: string[]): string | null {
    const args = ['create', '-f', 'qcow2'];
    for (const o of opts) args.push('-o', o);
    const r = qemuImg([...args, target, '1M']);
    if (r.status === 0) return null;
    const line = r.stderr.split('\n').find((l) => l.startsWith('qemu-img: ') && !l.startsWith('qemu-img: warning'));
    return (line ?? '').replace(/^qemu-img: /, '').replace(`${target}: `, '');
  }

  const cases: string[][] = [
    ['bogus=1'],
    ['size=1kb'],
    ['size=16E'],
    ['size=99999999999999999999'],
    ['cluster_size=abc'],
    ['cluster_size='],
    ['lazy_refcounts=maybe'],
    ['lazy_refcounts=ON'],
    ['lazy_refcounts='],
    ['lazy_refcounts=y'],
    ['lazy_refcounts'],
    ['nolazy_refcounts'],
    ['refcount_bits=0x10'],
    ['refcount_bits=010'],
    ['refcount_bits=16k'],
    ['refcount_bits=99999999999999999999'],
    ['refcount_bits'],
    [',size=1M'],
    ['cluster_size=64k,'],
    [',,'],
    ['cluster_size=64k', ',x'],
    ['=5'],
    ['a,,b=1'],
    ['cluster_size=64k,,,lazy_refcounts=on'],
    ['help=1'],
    ['cluster_size=64k', 'cluster_size=128k'],
    ['compression_type=zstd,lazy_refcounts=on,extended_l2=off'],
  ];
  for (const c of cases) {
    it(`-o ${c.map((s) => JSON.stringify(s)).join(' -o ')}`, () => {
      const q = qemuError(c);
      let mine: string | null = null;
      try {
        parseOptions(c, qcow2CreateOptions);
      } catch (e) {
        mine = (e as Error).message;
      }
      expect(mine).toBe(q);
    });
  }

  it('-o help (raw, with and without a file name) prints the same list', () => {
    const q = qemuImg(['create', '-f', 'raw', '-o', 'help']);
    expect(q.status).toBe(0);
    expect(formatOptionHelp('raw', rawCreateOptions)).toBe(q.stdout);
    const qf = qemuImg(['create', '-f', 'raw', '-o', '?', join(tmp.path, 'x.raw')]);
    expect(qf.status).toBe(0);
    expect(formatOptionHelp('raw', rawCreateOptions, 'x.raw')).toBe(qf.stdout);
  });

  it('-o help (qcow2) lists qimg\'s options as qemu does, encrypt.* and encryption included', () => {
    const q = qemuImg(['create', '-f', 'qcow2', '-o', 'help']);
    expect(formatOptionHelp('qcow2', qcow2CreateOptions)).toBe(q.stdout);
  });
});
