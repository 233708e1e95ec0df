/**
 * `-o key=val,...` option strings against a driver's schema, as qemu's QemuOpts:
 * a comma inside a value is written ",,", repeated -o accumulate (later values win),
 * "help" or "?" asks for the list, a name without "=" is a flag ("on", or "off" with
 * a "no" prefix). Values are checked and converted by the option's type with
 * QemuOpts' messages.
 */
import { QimgError } from './errors.js';
import { parseSizeString } from './size.js';

export type OptionType = 'string' | 'size' | 'bool' | 'number';

export interface OptionSpec {
  name: string;
  type: OptionType;
  help: string;
  /** allowed values for string options */
  choices?: readonly string[];
  default?: string;
  /**
   * the option belongs to the file protocol rather than the format (qemu lists it
   * only when `-o help` is given a target file name)
   */
  protocol?: boolean;
}

export type OptionValue = string | bigint | boolean | number;

export interface ParsedOptions {
  /** true when the user asked for the option list */
  help: boolean;
  values: Map<string, OptionValue>;
  /** raw text as the user gave it, for messages like "Formatting ..." */
  raw: Map<string, string>;
  /** warnings qemu would print (hex sizes with a suffix) */
  warnings: string[];
}

/**
 * qemu-img's is_valid_option_list(): not empty, no leading comma, and an even
 * number of trailing commas (",," is an escaped comma).
 */
export function isValidOptionList(text: string): boolean {
  if (text === '' || text[0] === ',') return false;
  let i = text.length;
  while (i > 0 && text[i - 1] === ',') i--;
  return (text.length - i) % 2 === 0;
}

/** get_opt_value(): up to the next single comma, ",," read as ","; returns the end. */
function readValue(text: string, pos: number): { value: string; end: number } {
  let value = '';
  let i = pos;
  for (;;) {
    const c = text.indexOf(',', i);
    if (c < 0) return { value: value + text.slice(i), end: text.length };
    if (text[c + 1] !== ',') return { value: value + text.slice(i, c), end: c };
    value += text.slice(i, c + 1);
    i = c + 2;
  }
}

/**
 * Splits an option string into name/value pairs as QemuOpts does: a name ends at
 * "=" or ","; after "=", the value runs to the next single comma with ",," read as
 * ","; a name without "=" is a flag and gets `undefined` (the caller maps it).
 */
export function splitOptionString(text: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let p = 0;
  while (p < text.length) {
    let len = 0;
    while (p + len < text.length && text[p + len] !== '=' && text[p + len] !== ',') len++;
    const name = text.slice(p, p + len);
    if (text[p + len] === '=') {
      const v = readValue(text, p + len + 1);
      out.push([name, v.value]);
      p = v.end;
    } else {
      out.push([name, undefined]);
      p += len;
    }
    if (text[p] === ',') p++;
  }
  return out;
}

/** has_help_option(): some comma-separated item is exactly "help" or "?". */
export function hasHelpOption(text: string): boolean {
  let p = 0;
  while (p < text.length) {
    const v = readValue(text, p);
    if (v.value === 'help' || v.value === '?') return true;
    p = v.end < text.length ? v.end + 1 : v.end;
  }
  return false;
}

const TRUE_WORDS = new Set(['on', 'yes', 'true', 'y']);
const FALSE_WORDS = new Set(['off', 'no', 'false', 'n']);

/**
 * Parses accumulated -o strings (each may hold several options) against a schema.
 * Each string must be a valid option list; when any of them asks for help, nothing
 * else is checked (qemu-img prints the list and exits 0).
 */
export function parseOptions(strings: readonly string[], schema: readonly OptionSpec[]): ParsedOptions {
  const values = new Map<string, OptionValue>();
  const raw = new Map<string, string>();
  const warnings: string[] = [];
  for (const s of strings) {
    if (!isValidOptionList(s)) throw new QimgError(`Invalid option list: ${s}`);
  }
  if (strings.some(hasHelpOption)) return { help: true, values, raw, warnings };
  for (const s of strings) {
    for (const [key, val] of splitOptionString(s)) {
      let name = key;
      let value = val;
      if (value === undefined) {
        // a flag: "name" is name=on, "noname" is name=off
        if (name.startsWith('no')) {
          name = name.slice(2);
          value = 'off';
        } else {
          value = 'on';
        }
      }
      const spec = schema.find((o) => o.name === name);
      if (!spec) throw new QimgError(`Invalid parameter '${name}'`);
      values.set(name, convertValue(spec, value, warnings));
      raw.set(name, value);
    }
  }
  return { help: false, values, raw, warnings };
}

/** strtoull with base 0 (as qemu_strtou64(..., 0)): null when malformed. */
function parseU64Base0(text: string): { value: bigint; range: boolean } | null {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return null;
  const [, sign, digits] = m;
  let v: bigint;
  if (/^0[xX]/.test(digits)) v = BigInt(digits);
  else if (digits.startsWith('0')) v = digits.length > 1 ? BigInt('0o' + digits.slice(1)) : 0n;
  else v = BigInt(digits);
  if (v > (1n << 64n) - 1n) return { value: v, range: true };
  // strtoull negates in unsigned arithmetic
  if (sign === '-' && v !== 0n) v = (1n << 64n) - v;
  return { value: v, range: false };
}

function convertValue(spec: OptionSpec, val: string, warnings: string[]): OptionValue {
  switch (spec.type) {
    case 'bool':
      if (TRUE_WORDS.has(val)) return true;
      if (FALSE_WORDS.has(val)) return false;
      throw new QimgError(`Parameter '${spec.name}' expects 'on' or 'off'`);
    case 'size': {
      const r = parseSizeString(val);
      if (!r.ok && r.range) throw new QimgError(`Value '${val}' is out of range for parameter '${spec.name}'`);
      if (!r.ok) throw new QimgError(`Parameter '${spec.name}' expects a non-negative number below 2^64`);
      if (r.warning) warnings.push(r.warning);
      return r.value;
    }
    case 'number': {
      const r = parseU64Base0(val);
      if (!r) throw new QimgError(`Parameter '${spec.name}' expects a number`);
      if (r.range) throw new QimgError(`Value '${val}' is too large for parameter '${spec.name}'`);
      return Number(r.value);
    }
    default:
      if (spec.choices && !spec.choices.includes(val)) {
        throw new QimgError(`Parameter '${spec.name}' does not accept value '${val}'`);
      }
      return val;
  }
}

/** The create options of qemu's file protocol, listed by `-o help` with a file name. */
export const FILE_PROTOCOL_OPTIONS: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size', protocol: true },
  {
    name: 'preallocation',
    type: 'string',
    help: 'Preallocation mode (allowed values: off, falloc, full)',
    choices: ['off', 'falloc', 'full'],
    protocol: true,
  },
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)', protocol: true },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable', protocol: true },
];

/** An option the schema took over from the file protocol (not listed without a file name). */
function isProtocolOption(o: OptionSpec): boolean {
  if (o.protocol) return true;
  if (o.name === 'size') return false;
  return FILE_PROTOCOL_OPTIONS.some((p) => p.name === o.name && p.help === o.help);
}

/**
 * The text `-o help` prints (qemu_opts_print_help): "  name=<type>" padded to 24
 * columns, " - help", lines sorted bytewise. Without a target file name only the
 * format's own options are listed, with qemu's note about the protocol level; with
 * one, the format's options merged with the file protocol's.
 */
export function formatOptionHelp(format: string, schema: readonly OptionSpec[], filename?: string): string {
  const typeName: Record<OptionType, string> = { string: 'str', size: 'size', bool: 'bool (on/off)', number: 'num' };
  let list: OptionSpec[];
  if (filename === undefined) {
    list = schema.filter((o) => !isProtocolOption(o));
  } else {
    list = [...schema];
    for (const p of FILE_PROTOCOL_OPTIONS) if (!list.some((o) => o.name === p.name)) list.push(p);
  }
  const lines = list.map((o) => `  ${o.name}=<${typeName[o.type]}>`.padEnd(24) + ` - ${o.help}`);
  lines.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  if (filename === undefined) {
    return (
      `Supported ${format} options:\n${lines.map((l) => l + '\n').join('')}\n` +
      'The protocol level may support further options.\nSpecify the target filename to include those options.\n'
    );
  }
  return `Supported options:\n${lines.map((l) => l + '\n').join('')}`;
}

/** `amend -o help`: qemu-img's "Amend options for 'FMT':" list. */
export function formatAmendHelp(format: string, schema: readonly OptionSpec[]): string {
  const typeName: Record<OptionType, string> = { string: 'str', size: 'size', bool: 'bool (on/off)', number: 'num' };
  const lines = schema.map((o) => `  ${o.name}=<${typeName[o.type]}>`.padEnd(24) + ` - ${o.help}`);
  lines.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return `Amend options for '${format}':\n${lines.map((l) => l + '\n').join('')}`;
}
