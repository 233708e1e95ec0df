/**
 * Size strings as qemu-img reads them (qemu_strtosz): a decimal or hex number with an
 * optional one-letter suffix b k M G T P E (case-insensitive, 1024-based). Fractions
 * are allowed only with a suffix above bytes. Results are bigints so that values up
 * to 2^64 are classified correctly before callers narrow them.
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

export type SizeParse = { ok: true; value: bigint; warning?: string } | { ok: false; range: boolean };

/** Parses a size string; `range` is true when it is well-formed but too large for 64 bits. */
export function parseSizeString(input: string, defaultSuffix = 'b'): SizeParse {
  const m = /^\s*\+?(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bkmgtpeBKMGTPE]?)$/.exec(input);
  if (!m) return { ok: false, range: false };
  const [, num, suffixRaw] = m;
  const suffix = (suffixRaw || defaultSuffix).toLowerCase();
  const mult = SUFFIXES[suffix];
  let value: bigint;
  let warning: string | undefined;
  if (/^0[xX]/.test(num)) {
    value = BigInt(num);
    if (suffixRaw && suffix !== 'b') warning = 'Using a multiplier suffix on hex numbers is deprecated';
    value *= mult;
  } else {
    const [intPart, frac = ''] = num.split('.');
    const hasFraction = num.includes('.');
    if (hasFraction && mult === 1n) return { ok: false, range: false };
    value = BigInt(intPart || '0') * mult;
    if (frac.length > 0) {
      // floor(0.frac * mult), computed exactly
      const scale = 10n ** BigInt(frac.length);
      value += (BigInt(frac) * mult) / scale;
    }
  }
  if (value > (1n << 64n) - 1n) return { ok: false, range: true };
  return { ok: true, value, warning };
}

export const INVALID_SIZE_MESSAGE =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
export const SIZE_RANGE_MESSAGE = 'Invalid image size specified. Must be between 0 and 9223372036854775807.';

/** An image size argument as `create`/`resize` take it: bytes, before rounding. */
export function parseImageSize(input: string): bigint {
  const r = parseSizeString(input);
  if (!r.ok) throw new QimgError(r.range ? SIZE_RANGE_MESSAGE : INVALID_SIZE_MESSAGE);
  if (r.value > INT64_MAX) throw new QimgError(SIZE_RANGE_MESSAGE);
  return r.value;
}

/** Rounds an image size up to whole 512-byte sectors, as qemu does for new images. */
export function roundToSectors(size: bigint): bigint {
  return ((size + 511n) / 512n) * 512n;
}

/** A non-size numeric option such as -S or --start-offset; `what` names it in errors. */
export function parseOffsetArg(input: string, what: string): number {
  const r = parseSizeString(input);
  if (!r.ok || r.value > BigInt(Number.MAX_SAFE_INTEGER)) throw new QimgError(`Invalid ${what} specified: '${input}'`);
  return Number(r.value);
}

/** qemu's size_to_str: base 1024, three significant digits, B/KiB/MiB/... */
export function sizeToStr(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = bytes;
  // qemu switches unit when the value reaches 1000 of the current unit (0.977 MiB for 1000 KiB).
  while (v >= 1000 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${formatG3(v)} ${units[i]}`;
}

/** printf("%0.3g") for the non-negative values sizeToStr produces. */
export function formatG3(v: number): string {
  if (v === 0) return '0';
  const exp = Math.floor(Math.log10(v));
  if (exp < -4 || exp >= 3) {
    // %g switches to exponent form; sizeToStr never gets here except for huge EiB values
    const s = v.toExponential(2).replace(/\.?0+e/, 'e');
    const [mant, e] = s.split('e');
    const en = Number(e);
    return `${mant}e${en < 0 ? '-' : '+'}${String(Math.abs(en)).padStart(2, '0')}`;
  }
  let s = v.toPrecision(3);
  if (s.includes('e')) s = Number(s).toString();
  if (s.includes('.')) s = s.replace(/0+$/, '').replace(/\.$/, '');
  return s;
}
