/**
 * `-o key=val,...` option strings against a driver's schema, as qemu's QemuOpts:
 * a comma inside a value is written ",,", repeated -o accumulate, "help" or "?"
 * asks for the list. Values are checked and converted by the option's type.
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
}

export type OptionValue = string | bigint | boolean | number;

export interface ParsedOptions {
  /** true when the user asked for the option list */
  help: boolean;
  values: Map<string, OptionValue>;
  /** raw text as the user gave it, for messages like "Formatting ..." */
  raw: Map<string, string>;
}

/** Splits an option string into key/value pairs, honouring ",," escapes. */
export function splitOptionString(text: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let cur = '';
  const items: string[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === ',') {
      if (text[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      items.push(cur);
      cur = '';
      continue;
    }
    cur += c;
  }
  items.push(cur);
  for (const item of items) {
    if (item === '') continue;
    const eq = item.indexOf('=');
    if (eq < 0) out.push([item, undefined]);
    else out.push([item.slice(0, eq), item.slice(eq + 1)]);
  }
  return out;
}

const TRUE_WORDS = new Set(['on', 'yes', 'true', 'y']);
const FALSE_WORDS = new Set(['off', 'no', 'false', 'n']);

/** Parses accumulated -o strings (each may hold several options) against a schema. */
export function parseOptions(strings: readonly string[], schema: readonly OptionSpec[]): ParsedOptions {
  const values = new Map<string, OptionValue>();
  const raw = new Map<string, string>();
  let help = false;
  for (const s of strings) {
    for (const [key, val] of splitOptionString(s)) {
      if ((key === 'help' || key === '?') && val === undefined) {
        help = true;
        continue;
      }
      const spec = schema.find((o) => o.name === key);
      if (!spec) throw new QimgError(`Invalid parameter '${key}'`);
      if (val === undefined && spec.type !== 'bool') throw new QimgError(`Parameter '${key}' expects a value`);
      values.set(key, convertValue(spec, val ?? 'on'));
      raw.set(key, val ?? 'on');
    }
  }
  return { help, values, raw };
}

function convertValue(spec: OptionSpec, val: string): OptionValue {
  switch (spec.type) {
    case 'bool':
      if (TRUE_WORDS.has(val)) return true;
      if (FALSE_WORDS.has(val)) return false;
      throw new QimgError(`Parameter '${spec.name}' expects 'on' or 'off'`);
    case 'size': {
      const r = parseSizeString(val);
      if (!r.ok) throw new QimgError(`Parameter '${spec.name}' expects a non-negative number below 2^64`);
      return r.value;
    }
    case 'number': {
      if (!/^\d+$/.test(val)) throw new QimgError(`Parameter '${spec.name}' expects a number`);
      return Number(val);
    }
    default:
      if (spec.choices && !spec.choices.includes(val)) {
        throw new QimgError(`Parameter '${spec.name}' does not accept value '${val}' (expected one of: ${spec.choices.join(', ')})`);
      }
      return val;
  }
}

/** The text `-o help` prints, in qemu-img's layout (options sorted by name). */
export function formatOptionHelp(format: string, schema: readonly OptionSpec[]): string {
  const lines = [`Supported ${format} options:`];
  const sorted = [...schema].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const typeName: Record<OptionType, string> = { string: 'str', size: 'size', bool: 'bool (on/off)', number: 'num' };
  for (const o of sorted) {
    lines.push(`  ${`${o.name}=<${typeName[o.type]}>`.padEnd(22)} - ${o.help}`);
  }
  lines.push('', 'The protocol level may support further options.', 'Specify the target filename to include those options.');
  return lines.join('\n') + '\n';
}
