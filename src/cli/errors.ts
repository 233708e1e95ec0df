/** Turning any failure into qemu-img's shape: one line on stderr and an exit code. */
import { QimgError, describeSystemError } from '../core/errors.js';
import { programName } from '../core/program-name.js';
import { errorText, warningText } from './output/style.js';

export function formatError(err: unknown, fallbackFile?: string): { line: string; code: number } {
  if (err instanceof QimgError) {
    const file = err.file ?? (err instanceof UsageError ? undefined : fallbackFile);
    const me = programName();
    return { line: file && !err.message.includes(`'${file}'`) ? `${me}: ${file}: ${err.message}` : `${me}: ${err.message}`, code: err.exitCode };
  }
  const msg = describeSystemError(err);
  return { line: fallbackFile ? `${programName()}: ${fallbackFile}: ${msg}` : `${programName()}: ${msg}`, code: 1 };
}

export function reportError(err: unknown, fallbackFile?: string): number {
  const { line, code } = formatError(err, fallbackFile);
  printError(line.replace(/\n/g, ' '));
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
  process.stderr.write(warningText(`${programName()}: warning: ${message}`) + '\n');
}

/** Writes an error message (one line, or a line and its hints) to stderr, coloured on a terminal. */
export function printError(text: string): void {
  process.stderr.write(errorText(text) + '\n');
}
