/**
 * Size strings (qemu_strtosz) and size_to_str, with qemu as the oracle:
 * - `qemu-img measure --size X -O raw` prints the parsed size rounded up to 512 as
 *   "fully allocated size" and prints cvtnum's messages for bad strings;
 * - `qemu-io` on a null-co image prints the exact parsed value of a `read OFFSET 1`;
 * - `qemu-img info` prints size_to_str of a raw image's virtual size;
 * - awk's printf("%0.3g") is glibc's, for formatG3.
 */
import { describe, expect, it, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import {
  INT64_MAX,
  cvtnum,
  formatG3,
  parseImageSize,
  parseOffsetArg,
  parseSizeString,
  roundToSectors,
  sizeToStr,
} from '../../src/core/size.js';
import { QimgError } from '../../src/core/errors.js';
import { qemuAvailable, qemuImg, run, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();

const K = 1024n;
const M = K * K;
const G = M * K;
const T = G * K;
const P = T * K;
const E = P * K;

/** Inputs compared with qemu-img measure (any string qemu-img gets as one argv). */
const MEASURE_INPUTS: string[] = [
  // every suffix, both cases
  ...['b', 'k', 'm', 'g', 't', 'p', 'e'].flatMap((s) => [`1${s}`, `1${s.toUpperCase()}`, `3${s}`]),
  '0', '1', '100', '511', '512', '513', '1000', '1023', '1024',
  // fractions
  '1.5k', '1.5K', '0.5G', '1.0001k', '1.5m', '1.5e', '7.99E', '0.1E', '0.3E', '4.5E', '5.k', '1.k', '1.', '1.0', '1.0b', '1.b',
  '0.0005k', '0.0004k', '0.001k', '0.0001k', '0.00048828125k', '1.999999999999999999999k', '0.99999999999999999999k',
  '0.99999999999999999999E', '1.00000000000000000001k', '0.00000000000000000001E',
  // fractions that are rejected
  '1.5', '1.5b', '0.5', '.5', '.5k', '0.1b', '1..5k', '1.5e3', '1.5e3k', '.e5', '1.nank', '1.infk', '1.7976931348623157e308k',
  '1.5x', '1,5k', '1.0x10k', '0x1.5k', '0x1.',
  // hex
  '0x1000', '0X10', '0x10b', '0x10k', '0x10K', '0x10p', '0x1b', '0x1e', '0xE', '0x10E', '00x10', '0x', '0xk', '0x 10', '+0x10',
  '0xfffffffffffffffff', '0xfffffffffffffffffk', '0x8000000000000000', '0x7fffffffffffffff',
  // leading zeros, signs, spaces
  '010', '+5k', ' 5k', '  +5k', '\t5k', ' 0x10', '+', '++1', '-0', '-1', ' -1', '-0x10', '-99999999999999999999', '5k ', '5 k',
  '1.5 k', '5k\n', '', ' ',
  // rejected suffixes
  'kb', '1kb', '1KiB', '1e3', '1kk', 'k', 'b', '1x', '1q',
  // range
  '9223372036854775807', '9223372036854775808', '8E', '16E', '7E', '18446744073709551615', '18446744073709551616',
  '99999999999999999999', '99999999999999999999k', '18446744073709551615k', '16383P', '8191P', '8192P',
  // strtod underflow quirk: QEMU skips one character after the digits
  `1.${'0'.repeat(400)}1k`, `1.${'0'.repeat(310)}1k`, `1.${'0'.repeat(305)}1k`, `1.${'0'.repeat(400)}1kk`, `1.${'0'.repeat(400)}1km`,
];

type Oracle = { kind: 'ok'; rounded: bigint; warning?: string } | { kind: 'invalid' } | { kind: 'range' };

const INVALID_LINES =
  'qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n';
const RANGE_LINE = 'qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.\n';

function measure(input: string): Oracle {
  const r = qemuImg(['measure', '--size', input, '-O', 'raw']);
  if (r.status === 0) {
    const m = /fully allocated size: (\d+)/.exec(r.stdout);
    if (!m) throw new Error(`unexpected measure output for ${JSON.stringify(input)}: ${r.stdout}`);
    const w = /^qemu-img: warning: (.*)$/m.exec(r.stderr);
    return { kind: 'ok', rounded: BigInt(m[1]), warning: w?.[1] };
  }
  if (r.stderr === INVALID_LINES) return { kind: 'invalid' };
  if (r.stderr === RANGE_LINE) return { kind: 'range' };
  throw new Error(`unexpected measure failure for ${JSON.stringify(input)}: ${r.stderr}`);
}

describe('parseSizeString: exact values', () => {
  const cases: Array<[string, bigint]> = [
    ['0', 0n],
    ['1', 1n],
    ['1b', 1n],
    ['1B', 1n],
    ['1k', K],
    ['1K', K],
    ['2m', 2n * M],
    ['2M', 2n * M],
    ['3g', 3n * G],
    ['4T', 4n * T],
    ['5p', 5n * P],
    ['7e', 7n * E],
    ['1.5k', 1536n],
    ['0.5G', 512n * M],
    ['1.0001k', 1024n], // 1024.1024 rounds to 1024
    ['0.0005k', 1n], // 0.512 rounds half up to 1
    ['0.0004k', 0n],
    ['1.0b', 1n], // a zero fraction is fine even without a scale
    ['1.', 1n],
    ['1.k', 1024n],
    ['5.k', 5120n],
    ['0x1000', 4096n],
    ['0x10k', 16384n],
    ['0x1e', 30n], // 'e' is a hex digit here, not a suffix
    ['010', 10n],
    ['+5k', 5120n],
    ['  +5k', 5120n],
    ['\t5k', 5120n],
    ['9223372036854775807', INT64_MAX],
    ['0.1E', 115292150460684704n], // QEMU goes through a double: not floor(0.1 * 2^60)
    ['0.3E', 345876451382054080n],
    ['0.99999999999999999999k', 0n], // the fraction rounds to 1.0, whose fixed-point conversion wraps on x86-64
    [`1.${'0'.repeat(400)}1kk`, 1024n], // strtod underflow: QEMU skips one character past the digits
  ];
  for (const [input, value] of cases) {
    it(`${JSON.stringify(input)} = ${value}`, () => {
      const r = parseSizeString(input);
      expect(r).toMatchObject({ ok: true, value });
    });
  }

  it('warns (with the input) for a suffix on a hex number only', () => {
    expect(parseSizeString('0x10k')).toEqual({ ok: true, value: 16384n, warning: 'Using a multiplier suffix on hex numbers is deprecated: 0x10k' });
    expect(parseSizeString('0x10M')).toEqual({ ok: true, value: 16n * M, warning: 'Using a multiplier suffix on hex numbers is deprecated: 0x10M' });
    // 'b' and 'e' are hex digits, not suffixes, after 0x
    expect(parseSizeString('0x10b')).toEqual({ ok: true, value: 0x10bn, warning: undefined });
    expect(parseSizeString('0x10E')).toEqual({ ok: true, value: 0x10en, warning: undefined });
    expect(parseSizeString('0x10').ok && parseSizeString('0x10')).toEqual({ ok: true, value: 16n, warning: undefined });
    expect(parseSizeString('16k')).toEqual({ ok: true, value: 16384n, warning: undefined });
  });

  it('rejects malformed strings (not a range error)', () => {
    for (const s of ['1.5', '1.5b', 'kb', '1kb', '1KiB', '1e3', '1kk', '-1', '-0', '', ' ', '.5k', '0x', '0x1.5k', '5k ', '1.5e3k', '99999999999999999999k']) {
      expect(parseSizeString(s), JSON.stringify(s)).toEqual({ ok: false, range: false });
    }
  });

  it('reports values beyond 2^64 - 1 as range errors', () => {
    for (const s of ['18446744073709551616', '16E', '0xfffffffffffffffff', '18446744073709551615k', '-99999999999999999999']) {
      expect(parseSizeString(s), s).toEqual({ ok: false, range: true });
    }
    // 8E fits in 64 bits: parseSizeString accepts it, cvtnum refuses it
    expect(parseSizeString('8E')).toEqual({ ok: true, value: 8n * E, warning: undefined });
  });

  it('honours a default suffix', () => {
    expect(parseSizeString('4', 'k')).toMatchObject({ ok: true, value: 4096n });
    expect(parseSizeString('1.5', 'M')).toMatchObject({ ok: true, value: 3n * (M / 2n) });
    expect(parseSizeString('4b', 'k')).toMatchObject({ ok: true, value: 4n });
  });
});

describe('cvtnum / parseImageSize / parseOffsetArg messages', () => {
  const msg = (f: () => unknown): string => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(QimgError);
      return (e as Error).message;
    }
    throw new Error('did not throw');
  };
  it('uses qemu-img texts', () => {
    expect(msg(() => parseImageSize('1kb'))).toBe(
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
    expect(msg(() => parseImageSize('8E'))).toBe('Invalid image size specified. Must be between 0 and 9223372036854775807.');
    expect(msg(() => parseImageSize('9223372036854775808'))).toBe('Invalid image size specified. Must be between 0 and 9223372036854775807.');
    expect(msg(() => parseOffsetArg('1.2', 'start offset'))).toMatch(/^Invalid start offset specified\. You may use k, M, G/);
    expect(msg(() => cvtnum('max length', '16E'))).toBe('Invalid max length specified. Must be between 0 and 9223372036854775807.');
  });
  it('returns values and passes warnings on', () => {
    const warnings: string[] = [];
    expect(parseImageSize('0x10k', (w) => warnings.push(w))).toBe(16384n);
    expect(warnings).toEqual(['Using a multiplier suffix on hex numbers is deprecated: 0x10k']);
    expect(parseImageSize('9223372036854775807')).toBe(INT64_MAX);
    expect(parseOffsetArg('64k', 'start offset')).toBe(65536);
    // accepted by qemu, beyond 2^53: clamped past the end of any image
    expect(parseOffsetArg('4E', 'start offset')).toBe(Number.MAX_SAFE_INTEGER);
  });
});

describe('roundToSectors', () => {
  it('rounds up to 512', () => {
    expect(roundToSectors(0n)).toBe(0n);
    expect(roundToSectors(1n)).toBe(512n);
    expect(roundToSectors(512n)).toBe(512n);
    expect(roundToSectors(513n)).toBe(1024n);
    expect(roundToSectors(1000n)).toBe(1024n);
    expect(roundToSectors(INT64_MAX)).toBe(1n << 63n);
  });
});

describe.skipIf(!enabled)('parseSizeString vs qemu-img measure --size', () => {
  it('agrees on every input of the table', () => {
    const mismatches: string[] = [];
    for (const input of MEASURE_INPUTS) {
      const q = measure(input);
      const r = parseSizeString(input);
      let mine: Oracle;
      if (!r.ok) mine = r.range ? { kind: 'range' } : { kind: 'invalid' };
      else if (r.value > INT64_MAX) mine = { kind: 'range' };
      else mine = { kind: 'ok', rounded: roundToSectors(r.value), warning: r.warning };
      if (JSON.stringify(mine, (_k, v) => (typeof v === 'bigint' ? v.toString() : v)) !== JSON.stringify(q, (_k, v) => (typeof v === 'bigint' ? v.toString() : v))) {
        mismatches.push(`${JSON.stringify(input).slice(0, 40)}: qemu ${JSON.stringify(q, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
      }
    }
    expect(mismatches).toEqual([]);
  });

  it('parseImageSize messages are qemu-img\'s two lines joined', () => {
    for (const input of ['1kb', '8E']) {
      const r = qemuImg(['measure', '--size', input, '-O', 'raw']);
      const expected = r.stderr
        .trimEnd()
        .split('\n')
        .map((l) => l.replace(/^qemu-img: /, ''))
        .join(' ');
      expect(() => parseImageSize(input)).toThrow(expected);
    }
  });
});

describe.skipIf(!enabled)('parseSizeString vs qemu-io exact values', () => {
  it('agrees to the byte (values below 2^62)', () => {
    // qemu-io's read command parses its offset with qemu_strtosz; a null-co image of
    // 2^62 bytes accepts any offset below that. Whitespace cannot go through qemu-io,
    // and a leading '-' would be taken as an option of its read command.
    const inputs = MEASURE_INPUTS.filter((s) => s !== '' && !/\s/.test(s) && !s.startsWith('-'));
    const args = ['--image-opts', 'driver=null-co,size=4611686018427387904'];
    for (const s of inputs) args.push('-c', `read ${s} 1`);
    const r = run('qemu-io', args);
    // one line per command: the result line, or a parse error
    const lines = (r.stdout + '\n' + r.stderr).split('\n').filter((l) => /^read \d+\/1 bytes at offset|^Parsing error|^read failed|offset .* out of range|^qemu-io: (?!warning)/.test(l));
    const results = lines.filter((l) => !l.startsWith('qemu-io: warning'));
    expect(results.length).toBe(inputs.length);
    const mismatches: string[] = [];
    inputs.forEach((input, i) => {
      const line = results[i];
      const m = /^read 1\/1 bytes at offset (\d+)$/.exec(line);
      const r2 = parseSizeString(input);
      if (m) {
        if (!r2.ok || r2.value !== BigInt(m[1])) mismatches.push(`${JSON.stringify(input).slice(0, 40)}: qemu ${m[1]}, qimg ${JSON.stringify(r2, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
      } else if (/argument too large/.test(line)) {
        if (r2.ok && r2.value <= INT64_MAX) mismatches.push(`${input}: qemu too large, qimg ${r2.value}`);
      } else if (/non-numeric argument/.test(line)) {
        if (r2.ok || r2.range) mismatches.push(`${input}: qemu invalid, qimg ${JSON.stringify(r2, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
      } else {
        // in range for qemu_strtosz but beyond the 2^62 null-co image: only check that we parse it
        if (!r2.ok || r2.value < 1n << 62n) mismatches.push(`${input}: qemu said '${line}', qimg ${JSON.stringify(r2, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`);
      }
    });
    expect(mismatches).toEqual([]);
  });
});

describe('formatG3 (printf %0.3g)', () => {
  it('rounds half to even on the exact value and strips zeros', () => {
    expect(formatG3(0)).toBe('0');
    expect(formatG3(1)).toBe('1');
    expect(formatG3(1.5)).toBe('1.5');
    expect(formatG3(100.5)).toBe('100');
    expect(formatG3(101.5)).toBe('102');
    expect(formatG3(10.25)).toBe('10.2');
    expect(formatG3(10.75)).toBe('10.8');
    expect(formatG3(999.5)).toBe('1e+03');
    expect(formatG3(999.4)).toBe('999');
    expect(formatG3(0.9765625)).toBe('0.977');
    expect(formatG3(0.0001234)).toBe('0.000123');
    expect(formatG3(0.00001234)).toBe('1.23e-05');
    expect(formatG3(1234567)).toBe('1.23e+06');
  });

  it('matches glibc printf (through awk) on many values', () => {
    const values: number[] = [];
    for (let n = 1; n < 4096; n += 7) values.push(n / 1024, n / 4, n / 2, n * 0.25 + 0.125, n);
    for (let n = 999 * 1024; n < 1001 * 1024; n += 128) values.push(n / 1024);
    for (const d of [3, 7, 10, 1000, 12345]) values.push(1 / d, 1e6 / d, 999.9999 / d);
    const awk = spawnSync('awk', ['{ printf "%0.3g\\n", $1 }'], {
      input: values.map((v) => v.toPrecision(17)).join('\n') + '\n',
      encoding: 'utf8',
    });
    if (awk.status !== 0) return; // no awk: the table above still runs
    const expected = awk.stdout.trimEnd().split('\n');
    const mine = values.map(formatG3);
    const bad = values.map((v, i) => [v, expected[i], mine[i]]).filter(([, a, b]) => a !== b);
    expect(bad).toEqual([]);
  });
});

describe('sizeToStr', () => {
  it('picks units as size_to_str', () => {
    expect(sizeToStr(0)).toBe('0 B');
    expect(sizeToStr(512)).toBe('512 B');
    expect(sizeToStr(999)).toBe('999 B');
    expect(sizeToStr(1000)).toBe('0.977 KiB');
    expect(sizeToStr(1536)).toBe('1.5 KiB');
    expect(sizeToStr(999 * 1024)).toBe('999 KiB');
    expect(sizeToStr(1000 * 1024)).toBe('0.977 MiB');
    expect(sizeToStr(1023488)).toBe('1e+03 KiB');
    expect(sizeToStr(10 * 1024 ** 3)).toBe('10 GiB');
    expect(sizeToStr(2 ** 53)).toBe('8 PiB');
    expect(sizeToStr(Number.MAX_SAFE_INTEGER)).toBe('8 PiB');
  });
});

describe.skipIf(!enabled)('sizeToStr vs qemu-img info "virtual size"', () => {
  const tmp = tempDir('qimg-size-');
  afterAll(() => tmp.cleanup());
  const sizes = [
    0, 512, 1000, 1023, 1024, 1536, 999 * 1024, 1000 * 1024, 1024 * 1024 - 512, 1024 * 1024, 102912, 10747904, 1023488, 1047552,
    1000 * 1024 * 1024 - 512, 10 * 1024 ** 3, 1024 ** 4 + 1, 1000 * 1024 ** 3, 15 * 1024 ** 4, // ext4 files stop at 16 TiB
  ];
  it('prints the same text', () => {
    const mismatches: string[] = [];
    sizes.forEach((size, i) => {
      const f = join(tmp.path, `s${i}.raw`);
      const fd = openSync(f, 'w');
      ftruncateSync(fd, size);
      closeSync(fd);
      const r = qemuImg(['info', '-f', 'raw', f]);
      expect(r.status).toBe(0);
      const m = /^virtual size: (.*) \((\d+) bytes\)$/m.exec(r.stdout);
      if (!m) throw new Error(r.stdout);
      const n = Number(m[2]);
      if (sizeToStr(n) !== m[1]) mismatches.push(`${n}: qemu '${m[1]}', qimg '${sizeToStr(n)}'`);
    });
    expect(mismatches).toEqual([]);
  });
});
