/**
 * Units behind the option surface: getopt's reading of digit "options" (with its
 * permutation of non-options), the escaping of control characters in error lines,
 * exact integers past 2^53, and the native calls behind convert -C and huge files.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { closeSync, openSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { Command } from 'commander';
import { digitOptionArgument, optionTable } from '../../src/cli/getopt.js';
import { escapeControl } from '../../src/cli/errors.js';
import { intString, writeSizeU64 } from '../../src/core/units.js';
import { native } from '../../src/io/native.js';
import { truncateFile } from '../../src/io/file.js';
import { prettyJson } from '../../src/cli/output/json.js';
import { tempDir } from '../helpers/qemu.js';

const tmp = tempDir('qimg-opts-unit-');
afterAll(() => tmp.cleanup());

describe('digitOptionArgument: what qemu-img 7.2 names in "unrecognized option"', () => {
  const cmd = new Command('create').option('-f, --format <fmt>').option('-q, --quiet').option('-o, --options <o>').option('--object <def>');
  const table = optionTable(cmd);
  const at = (...args: string[]) => digitOptionArgument(['create', ...args], table);

  it('the argument itself when the digit ends it', () => {
    expect(at('x.qcow2', '-1')).toBe('-1');
    expect(at('-f', 'qcow2', 'x.qcow2', '-1')).toBe('-1');
    expect(at('-q1', 'x.raw')).toBe('-q1');
    expect(at('x.raw', '1M', '-9')).toBe('-9');
  });

  it('the argument before it, in getopt\'s permuted order, when characters follow', () => {
    expect(at('x.raw', '-1k')).toBe('x.raw');
    expect(at('-1k', 'x.raw')).toBe('create');
    expect(at('-q', '-1k', 'x.raw')).toBe('-q');
    // x.raw was moved behind -q before -1k was read
    expect(at('x.raw', '-q', '-1k')).toBe('x.raw');
    expect(at('-f', 'raw', '-1.5', 'x.raw')).toBe('raw');
  });

  it('option values, "--" and other unknown options end the search', () => {
    expect(at('-f', '-1', 'x.raw')).toBeUndefined();
    expect(at('-f-1', 'x.raw')).toBeUndefined();
    expect(at('--object', '-1', 'x.raw')).toBeUndefined();
    expect(at('--format=-1', 'x.raw')).toBeUndefined();
    expect(at('x.raw', '--', '-1')).toBeUndefined();
    expect(at('-Z', '-1')).toBeUndefined();
    expect(at('--bogus', '-1')).toBeUndefined();
    expect(at('--format')).toBeUndefined();
    expect(at('x.raw', '1M')).toBeUndefined();
  });
});

describe('escapeControl', () => {
  it('backslash escapes for control characters, a space for a newline, the rest as it is', () => {
    expect(escapeControl('a\rb\x1b[31mc\x07\t\x7f\u009b')).toBe('a\\rb\\x1b[31mc\\x07\\t\\x7f\\u009b');
    expect(escapeControl('two\nlines')).toBe('two lines');
    expect(escapeControl("qimg: Could not open 'dir\\file é €': No such file")).toBe("qimg: Could not open 'dir\\file é €': No such file");
  });
});

describe('integers past 2^53', () => {
  it('print with every digit', () => {
    expect(intString(2 ** 61)).toBe('2305843009213693952');
    expect(intString(9007199254741504)).toBe('9007199254741504');
    expect(intString(12345)).toBe('12345');
    expect(prettyJson({ 'virtual-size': 2 ** 61, n: -9223372036854775808n })).toBe('{\n    "virtual-size": 2305843009213693952,\n    "n": -9223372036854775808\n}');
  });

  it('disk sizes are written exactly, and only exact ones', () => {
    const b = Buffer.alloc(8);
    writeSizeU64(b, 0, 2 ** 61);
    expect(b.readBigUInt64BE(0)).toBe(1n << 61n);
    writeSizeU64(b, 0, 9007199254741504);
    expect(b.readBigUInt64BE(0)).toBe(9007199254741504n);
    expect(() => writeSizeU64(b, 0, 2 ** 53 + 2)).toThrow(RangeError);
    expect(() => writeSizeU64(b, 0, 2 ** 62)).toThrow(RangeError);
  });
});

describe.runIf(native() !== null)('native calls', () => {
  it('copyFileRange copies inside the kernel and reports the end of the input', async () => {
    const src = join(tmp.path, 'src');
    const dst = join(tmp.path, 'dst');
    const data = Buffer.alloc(3 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    writeFileSync(src, data);
    writeFileSync(dst, Buffer.alloc(4 << 20));
    const a = openSync(src, 'r');
    const b = openSync(dst, 'r+');
    try {
      const lib = native()!;
      expect(await lib.copyFileRange(a, 4096, b, 8192, 1 << 20)).toBe(1 << 20);
      expect(await lib.copyFileRange(a, 3 << 20, b, 0, 4096)).toBe(0); // at the end of the input
      expect(await lib.copyFileRange(-1, 0, b, 0, 4096)).toBe(-1); // refused
    } finally {
      closeSync(a);
      closeSync(b);
    }
    const out = readFileSync(dst);
    expect(out.subarray(8192, 8192 + (1 << 20)).equals(data.subarray(4096, 4096 + (1 << 20)))).toBe(true);
    expect(out.subarray(0, 8192).equals(Buffer.alloc(8192))).toBe(true);
  });

  it('truncateFile takes lengths past 2^53, with the file system\'s answer', async () => {
    const f = join(tmp.path, 'big');
    const h = await open(f, 'w');
    try {
      await truncateFile(h, 1 << 20);
      expect(statSync(f).size).toBe(1 << 20);
      const huge = (1n << 53n) + 512n;
      const r = await truncateFile(h, huge).then(
        () => 'ok',
        (err: NodeJS.ErrnoException) => err.code,
      );
      if (r === 'ok') expect(statSync(f, { bigint: true }).size).toBe(huge);
      else expect(r).toBe('EFBIG');
      expect(await truncateFile(h, 1n << 63n).catch((err: NodeJS.ErrnoException) => err.code)).toBe('EINVAL');
    } finally {
      await h.close();
    }
  });
});
