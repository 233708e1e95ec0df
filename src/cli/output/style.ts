/**
 * Colour for human output, the one place that decides it. Each stream decides for
 * itself (stderr for errors, warnings and check findings; stdout for the check
 * summary): colour when the stream is a terminal (at chalk's level for TERM,
 * COLORTERM, ..., at least basic colours), unless NO_COLOR is set to something or
 * TERM is dumb; FORCE_COLOR
 * (as chalk reads it: 0/false off, 1-3/true on) overrides both, as in Node. Without
 * colour every function here returns its text unchanged, so piped output, as
 * scripts read it, stays qemu-img's byte for byte; with colour only escape codes are
 * added, never a character of text, and never around a line break.
 */
import { Chalk, supportsColor, supportsColorStderr, type ChalkInstance, type ColorInfo } from 'chalk';
import { isatty } from 'node:tty';
import { programName } from '../../core/program-name.js';

export type Stream = 'stdout' | 'stderr';

const instances: Partial<Record<Stream, ChalkInstance | null>> = {};

/** chalk's level for a stream, after the terminal and NO_COLOR rules above. */
function levelFor(stream: Stream): 0 | 1 | 2 | 3 {
  const detected: ColorInfo = stream === 'stdout' ? supportsColor : supportsColorStderr;
  const level = detected ? detected.level : 0;
  if ('FORCE_COLOR' in process.env) return level;
  // not a terminal: never colour (chalk would for Azure Pipelines' TF_BUILD)
  if (!isatty(stream === 'stdout' ? 1 : 2)) return 0;
  if (process.env.NO_COLOR) return 0;
  if (process.env.TERM === 'dumb') return 0;
  // a terminal all the same: chalk's guess from CI variables (none for an unknown CI)
  // is for piped logs, and this stream is not one
  return level === 0 ? 1 : level;
}

/** The chalk instance for a stream, or null when it gets no colour. */
function painter(stream: Stream): ChalkInstance | null {
  let c = instances[stream];
  if (c === undefined) {
    const level = levelFor(stream);
    c = instances[stream] = level === 0 ? null : new Chalk({ level });
  }
  return c;
}

/** Whether text written to `stream` is coloured. */
export function colours(stream: Stream): boolean {
  return painter(stream) !== null;
}

/** Applies `paint` to each line of `text` (line breaks stay outside the codes). */
function eachLine(text: string, paint: (line: string) => string): string {
  return text
    .split('\n')
    .map((l) => (l === '' ? l : paint(l)))
    .join('\n');
}

/**
 * An error message for stderr, one or more lines: the program-name prefix of the first
 * line in bold red, the rest of it red; further lines (hints) as they are.
 */
export function errorText(text: string): string {
  const c = painter('stderr');
  if (!c) return text;
  const nl = text.indexOf('\n');
  const first = nl < 0 ? text : text.slice(0, nl);
  const rest = nl < 0 ? '' : text.slice(nl);
  const prefix = `${programName()}: `;
  const head = first === '' ? '' : c.red(first.startsWith(prefix) ? c.bold(prefix) + first.slice(prefix.length) : first);
  return head + rest;
}

/** A warning for stderr (`qimg: warning: ...`): yellow, its prefix bold. */
export function warningText(text: string): string {
  const c = painter('stderr');
  if (!c) return text;
  const prefix = `${programName()}: warning: `;
  return eachLine(text, (l) => c.yellow(l.startsWith(prefix) ? c.bold(prefix) + l.slice(prefix.length) : l));
}

/** A table's column heading (stdout): bold. */
export function heading(text: string): string {
  const c = painter('stdout');
  return c ? c.bold(text) : text;
}

/** What a per-problem line of `check` reports, by its first word (qemu's wording). */
export function checkFindingKind(line: string): 'error' | 'leak' | 'repair' | 'other' {
  if (/^(ERROR|Can't |qcow2: Image is corrupt)/.test(line) || line.startsWith(`${programName()}: `)) return 'error';
  if (line.startsWith('Leaked ')) return 'leak';
  if (/^(Repairing|Rebuilding) /.test(line)) return 'repair';
  return 'other';
}

/** One per-problem line of `check` (stderr): errors red, leaks yellow, repairs green. */
export function checkFinding(line: string): string {
  const c = painter('stderr');
  if (!c) return line;
  switch (checkFindingKind(line)) {
    case 'error':
      return c.red(line);
    case 'leak':
      return c.yellow(line);
    case 'repair':
      return c.green(line);
    default:
      return line;
  }
}

/**
 * The human summary of `check` (stdout): the verdict lines in colour (clean and
 * repaired green, corruptions and internal errors red, leaks yellow) with their
 * explanations; statistics as they are.
 */
export function checkSummary(text: string): string {
  const c = painter('stdout');
  if (!c) return text;
  return eachLine(text, (l) => {
    if (l === 'No errors were found on the image.' || l === 'The following inconsistencies were found and repaired:') return c.bold.green(l);
    if (/^\d+ (errors were found on the image|internal errors have occurred during the check)\.$/.test(l)) return c.bold.red(l);
    if (l.startsWith('Data may be corrupted')) return c.red(l);
    if (/^\d+ leaked clusters were found on the image\.$/.test(l)) return c.bold.yellow(l);
    if (l.startsWith('This means waste of disk space')) return c.yellow(l);
    return l;
  });
}
