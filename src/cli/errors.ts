/** Turning any failure into qemu-img's shape: one line on stderr and an exit code. */
import { QimgError, describeSystemError } from '../core/errors.js';
import { programName } from '../core/program-name.js';
import { errorText, warningText } from './output/style.js';

/**
 * A message line made safe for a terminal: file names and strings read from images
 * may hold control characters (a carriage return that overwrites the line, escape
 * sequences that recolour or retitle the terminal). Newlines become spaces (one line
 * per message); every other C0 control character, DEL and the C1 controls are shown
 * as backslash escapes (`\r`, `\t`, `\x1b`, `\x7f`, `\u009b`). Printable text,
 * backslashes included, is left as it is, so ordinary messages stay qemu-img's.
 */
export function escapeControl(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\x00-\x1f\x7f-\x9f]/g, (c) => {
    switch (c) {
      case '\n':
        return ' ';
      case '\r':
        return '\\r';
      case '\t':
        return '\\t';
      default: {
        const code = c.charCodeAt(0);
        return code < 0x80 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
      }
    }
  });
}

/** escapeControl for text of several lines: each line escaped, the newlines kept. */
export function escapeLines(text: string): string {
  return text.split('\n').map(escapeControl).join('\n');
}

/** Writes message lines to stderr, each escaped (see escapeControl), coloured as an error on a terminal. */
export function writeErrorLines(...lines: string[]): void {
  process.stderr.write(errorText(lines.map(escapeControl).join('\n')) + '\n');
}

export function formatError(err: unknown, fallbackFile?: string): { line: string; code: number } {
  let line: string;
  let code = 1;
  if (err instanceof QimgError) {
    const file = err.file ?? (err instanceof UsageError ? undefined : fallbackFile);
    const me = programName();
    line = file && !err.message.includes(`'${file}'`) ? `${me}: ${file}: ${err.message}` : `${me}: ${err.message}`;
    code = err.exitCode;
  } else {
    const msg = describeSystemError(err);
    line = fallbackFile ? `${programName()}: ${fallbackFile}: ${msg}` : `${programName()}: ${msg}`;
  }
  return { line: escapeControl(line), code };
}

export function reportError(err: unknown, fallbackFile?: string): number {
  const { line, code } = formatError(err, fallbackFile);
  printError(line);
  if (process.env.QIMG_DEBUG === '1' && err instanceof Error && err.stack) process.stderr.write(err.stack + '\n');
  return code;
}

/** A failure of the command line itself (exit 1, as qemu-img). */
export class UsageError extends QimgError {
  constructor(message: string) {
    super(message, { exitCode: 1 });
  }
}

/** A warning line as qemu-img prints it ("qemu-img: warning: ..."), on stderr. */
export function warn(message: string): void {
  process.stderr.write(warningText(escapeControl(`${programName()}: warning: ${message}`)) + '\n');
}

/** Writes an error message (one line, or a line and its hints) to stderr, coloured on a terminal. */
export function printError(text: string): void {
  process.stderr.write(errorText(text) + '\n');
}
