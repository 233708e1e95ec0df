/**
 * Size strings as qemu-img reads them (qemu_strtosz): a decimal or hex number with an
 * optional one-letter suffix b k M G T P E (case-insensitive, 1024-based). Fractions
 * are allowed only with a suffix above bytes. Results are bigints so that values up
 * to 2^64 are classified correctly before callers narrow them.
 *
 * The algorithm follows QEMU's do_strtosz step by step (util/cutils.c), quirks
 * included, because the exact set of accepted strings and their values is what a
 * drop-in replacement has to match:
 * - the integer part is read by strtoull (leading C whitespace and '+' accepted,
 *   any '-' refused); "0x"/"0X" after a zero integer part re-reads it as hex, and a
 *   hex number may not have a fraction;
 * - a fraction is read by strtod into a double, turned into a 0.64 fixed-point
 *   number by truncation, multiplied exactly by the suffix and rounded half up; an
 *   exponent inside the fraction ("1.5e3") makes the whole string invalid;
 * - when strtod fails on the fraction (nothing after the dot, or underflow) QEMU
 *   skips one character after what strtod consumed and continues from there;
 * - a fraction of 1.0 after rounding (".99999999999999999999") overflows the
 *   fixed-point conversion and reads as 0, as QEMU on x86-64 does;
 * - an integer part out of 64-bit range, or a product beyond 2^64 - 1, is a range
 *   error unless characters follow, which makes it invalid instead.
 */
import { QimgError } from './errors.js';

const SUFFIXES: Record<string, bigint> = {
  b: 1n,
  k: 1n << 10n,
  m: 1n << 20n,
  g: 1n << 30n,
  t: 1n << 40n,
  p: 1n << 50n,
  e: 1n << 60n,
};

export const INT64_MAX = (1n << 63n) - 1n;
const U64_MAX = (1n << 64n) - 1n;
const TWO64 = 1n << 64n;
/** Smallest normal double: glibc's strtod reports ERANGE below it. */
const DBL_MIN = 2.2250738585072014e-308;

export type SizeParse = { ok: true; value: bigint; warning?: string } | { ok: false; range: boolean };

const isCSpace = (c: string | undefined): boolean => c === ' ' || c === '\t' || c === '\n' || c === '\v' || c === '\f' || c === '\r';
const isDigit = (c: string | undefined): boolean => c !== undefined && c >= '0' && c <= '9';
const isHexDigit = (c: string | undefined): boolean => c !== undefined && /^[0-9a-fA-F]$/.test(c);

/**
 * strtoull on `s` from 0 in `base` (10 or 16): where the number ends, its value, and
 * whether it overflowed. `end` is 0 (no conversion) when there are no digits.
 */
function strtoull(s: string, base: 10 | 16): { end: number; value: bigint; overflow: boolean; negative: boolean } {
  let i = 0;
  while (isCSpace(s[i])) i++;
  let negative = false;
  if (s[i] === '+' || s[i] === '-') {
    negative = s[i] === '-';
    i++;
  }
  if (base === 16 && s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && isHexDigit(s[i + 2])) i += 2;
  const digit = base === 10 ? isDigit : isHexDigit;
  const start = i;
  while (digit(s[i])) i++;
  if (i === start) return { end: 0, value: 0n, overflow: false, negative };
  const value = BigInt((base === 16 ? '0x' : '') + s.slice(start, i));
  return { end: i, value, overflow: value > U64_MAX, negative };
}

/**
 * strtod on a string that starts with '.': the characters consumed (0 = failure)
 * and the value. Only ".digits[e[+-]digits]" can be consumed from such a start.
 */
function strtodFraction(s: string): { len: number; value: number; hasExponent: boolean } {
  const m = /^\.([0-9]*)/.exec(s);
  if (!m || m[1].length === 0) return { len: 0, value: 0, hasExponent: false };
  let len = m[0].length;
  const exp = /^[eE][+-]?[0-9]+/.exec(s.slice(len));
  if (exp) len += exp[0].length;
  return { len, value: Number('0' + s.slice(0, len)), hasExponent: !!exp };
}

/** Parses a size string; `range` is true when it is well-formed but too large for 64 bits. */
export function parseSizeString(input: string, defaultSuffix = 'b'): SizeParse {
  const invalid: SizeParse = { ok: false, range: false };
  let hex = false;
  let valf = 0n;

  const dec = strtoull(input, 10);
  if (dec.end === 0) return invalid;
  let end = dec.end;
  // Errors found before the suffix: trailing characters turn them into "invalid".
  if (dec.overflow) return end < input.length ? invalid : { ok: false, range: true };
  if (input.slice(0, end).includes('-')) return invalid;
  let val = dec.value;

  if (val === 0n && (input[end] === 'x' || input[end] === 'X')) {
    const h = strtoull(input, 16);
    end = h.end;
    if (h.overflow) return end < input.length ? invalid : { ok: false, range: true };
    if (input[end] === '.') return invalid;
    val = h.value;
    hex = true;
  } else if (input[end] === '.') {
    const f = strtodFraction(input.slice(end));
    const underflow = f.value < DBL_MIN && /[1-9]/.test(input.slice(end, end + f.len).replace(/[eE].*/, ''));
    if (f.len === 0 || underflow || !Number.isFinite(f.value)) {
      // qemu_strtod_finite failed (EINVAL, or ERANGE on underflow/overflow): QEMU skips one character past
      // whatever strtod consumed (all the digits on underflow) and goes on.
      end += (f.len === 0 ? 0 : f.len) + 1;
    } else if (f.hasExponent) {
      return invalid;
    } else {
      end += f.len;
      // (uint64_t)(fraction * 0x1p64): exact scaling, truncation; 2^64 wraps to 0 on x86-64.
      const scaled = f.value * 2 ** 64;
      valf = scaled >= 2 ** 64 ? 0n : BigInt(Math.trunc(scaled));
    }
  }

  let warning: string | undefined;
  const c = input[end];
  let mul = c !== undefined ? SUFFIXES[c.toLowerCase()] : undefined;
  if (mul !== undefined) {
    if (hex) warning = `Using a multiplier suffix on hex numbers is deprecated: ${input}`;
    end++;
  } else {
    mul = SUFFIXES[defaultSuffix.toLowerCase()];
    if (mul === undefined) throw new Error(`bad default suffix '${defaultSuffix}'`);
  }
  if (end > input.length) end = input.length; // the skip above may step past the end
  const trailing = end < input.length;

  if (mul === 1n) {
    if (valf !== 0n) return invalid;
  } else {
    const frac = valf * mul;
    val = val * mul + (frac >> 64n) + ((frac & (TWO64 - 1n)) >> 63n);
    if (val > U64_MAX) return trailing ? invalid : { ok: false, range: true };
  }
  if (trailing) return invalid;
  return { ok: true, value: val, warning };
}

export const INVALID_SIZE_MESSAGE =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
export const SIZE_RANGE_MESSAGE = 'Invalid image size specified. Must be between 0 and 9223372036854775807.';

/**
 * qemu-img's cvtnum(): a size-like argument between 0 and INT64_MAX; `name` is used
 * in the messages ("image size", "start offset", "buffer size for sparse output").
 * `warn` receives the deprecation warning for hex numbers with a suffix.
 */
export function cvtnum(name: string, input: string, warn?: (message: string) => void): bigint {
  const r = parseSizeString(input);
  if (!r.ok && !r.range) {
    throw new QimgError(
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    );
  }
  if (!r.ok || r.value > INT64_MAX) throw new QimgError(`Invalid ${name} specified. Must be between 0 and ${INT64_MAX}.`);
  if (r.warning && warn) warn(r.warning);
  return r.value;
}

/** An image size argument as `create`/`resize` take it: bytes, before rounding. */
export function parseImageSize(input: string, warn?: (message: string) => void): bigint {
  return cvtnum('image size', input, warn);
}

/** Rounds an image size up to whole 512-byte sectors, as qemu does for new images. */
export function roundToSectors(size: bigint): bigint {
  return ((size + 511n) / 512n) * 512n;
}

/**
 * A non-size numeric option such as --start-offset, read as cvtnum does; `what`
 * names it in errors. Values beyond 2^53 (accepted by qemu up to INT64_MAX) are
 * clamped to Number.MAX_SAFE_INTEGER, which is past the end of any image.
 */
export function parseOffsetArg(input: string, what: string, warn?: (message: string) => void): number {
  const v = cvtnum(what, input, warn);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

/**
 * qemu's size_to_str: base 1024, "%0.3g" + B/KiB/MiB/...; the unit is chosen as QEMU
 * does, from frexp(val / (1000.0 / 1024.0)), so a value switches to the next unit
 * once it reaches 1000 of the current one (1000 KiB prints as 0.977 MiB), while
 * values just below that may still print as "1e+03 KiB" (999.5 KiB), as in qemu.
 */
export function sizeToStr(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  if (bytes > 0) {
    const d = bytes / (1000 / 1024);
    // frexp exponent e: 2^(e-1) <= d < 2^e
    let e = Math.floor(Math.log2(d)) + 1;
    while (2 ** (e - 1) > d) e--;
    while (2 ** e <= d) e++;
    i = Math.min(Math.trunc((e - 1) / 10), suffixes.length - 1);
  }
  return `${formatG3(bytes / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/**
 * printf("%0.3g") for non-negative finite doubles, with glibc's exact rounding
 * (round half to even on the exact binary value: 100.5 -> "100", 10.25 -> "10.2",
 * 999.5 -> "1e+03").
 */
export function formatG3(v: number): string {
  if (v === 0) return '0';
  if (!Number.isFinite(v) || v < 0) throw new RangeError(`formatG3: unsupported value ${v}`);
  const P = 3;
  // v = mant * 2^exp exactly
  const buf = new DataView(new ArrayBuffer(8));
  buf.setFloat64(0, v);
  const bits = buf.getBigUint64(0);
  const biased = Number((bits >> 52n) & 0x7ffn);
  const fracBits = bits & ((1n << 52n) - 1n);
  const mant = biased === 0 ? fracBits : fracBits | (1n << 52n);
  const exp = (biased === 0 ? 1 : biased) - 1075;

  /** round-half-even of v / 10^(E - P + 1), exactly */
  const digitsAt = (E: number): { n: bigint; floor: bigint } => {
    const k = E - P + 1;
    let num = mant;
    let den = 1n;
    if (exp >= 0) num <<= BigInt(exp);
    else den <<= BigInt(-exp);
    if (k >= 0) den *= 10n ** BigInt(k);
    else num *= 10n ** BigInt(-k);
    const floor = num / den;
    const rem2 = (num - floor * den) * 2n;
    let n = floor;
    if (rem2 > den || (rem2 === den && floor % 2n === 1n)) n++;
    return { n, floor };
  };

  let E = Math.floor(Math.log10(v));
  let r = digitsAt(E);
  // fix the estimate so that 10^(P-1) <= floor < 10^P
  while (r.floor >= 10n ** BigInt(P)) r = digitsAt(++E);
  while (r.floor < 10n ** BigInt(P - 1)) r = digitsAt(--E);
  let n = r.n;
  if (n === 10n ** BigInt(P)) {
    n /= 10n;
    E++;
  }
  const digits = n.toString(); // exactly P digits
  if (E < -4 || E >= P) {
    const mantissa = (digits[0] + '.' + digits.slice(1)).replace(/0+$/, '').replace(/\.$/, '');
    return `${mantissa}e${E < 0 ? '-' : '+'}${String(Math.abs(E)).padStart(2, '0')}`;
  }
  // fixed notation with P - 1 - E decimals
  let s: string;
  if (E >= 0) {
    s = digits.slice(0, E + 1) + '.' + digits.slice(E + 1);
  } else {
    s = '0.' + '0'.repeat(-E - 1) + digits;
  }
  if (s.includes('.')) s = s.replace(/0+$/, '').replace(/\.$/, '');
  return s;
}
