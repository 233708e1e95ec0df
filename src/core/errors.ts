/**
 * One error type for everything qimg reports to a user. `file` names the image the
 * problem is about (printed as `qimg: FILE: message`), `exitCode` is what the CLI
 * returns (qemu-img's codes: 1 in general, command-specific ones set by the command).
 */
export class QimgError extends Error {
  readonly file?: string;
  exitCode: number;
  constructor(message: string, opts: { file?: string; exitCode?: number; cause?: unknown } = {}) {
    super(message, opts.cause !== undefined ? { cause: opts.cause } : undefined);
    this.name = 'QimgError';
    this.file = opts.file;
    this.exitCode = opts.exitCode ?? 1;
  }
}

/** An image is structurally invalid (hostile or damaged). */
export class CorruptImageError extends QimgError {
  constructor(file: string | undefined, message: string) {
    super(message, { file });
    this.name = 'CorruptImageError';
  }
}

/** A valid image uses something qimg does not support (yet). */
export class UnsupportedError extends QimgError {
  constructor(file: string | undefined, message: string) {
    super(message, { file });
    this.name = 'UnsupportedError';
  }
}

/** Turns a Node system error into one readable line. */
export function describeSystemError(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  if (e && typeof e === 'object' && typeof e.code === 'string') {
    const text: Record<string, string> = {
      ENOENT: 'No such file or directory',
      EACCES: 'Permission denied',
      EISDIR: 'Is a directory',
      ENOSPC: 'No space left on device',
      EINVAL: 'Invalid argument',
      EIO: 'Input/output error',
      EROFS: 'Read-only file system',
      EPERM: 'Operation not permitted',
      ENOTDIR: 'Not a directory',
      EFBIG: 'File too large',
      EMFILE: 'Too many open files',
      ELOOP: 'Too many levels of symbolic links',
    };
    return text[e.code] ?? e.message;
  }
  return err instanceof Error ? err.message : String(err);
}

/** Wraps a system error into a QimgError about `file` (keeps QimgErrors as they are). */
export function asQimgError(err: unknown, file?: string, prefix?: string): QimgError {
  if (err instanceof QimgError) return err;
  const msg = describeSystemError(err);
  return new QimgError(prefix ? `${prefix}: ${msg}` : msg, { file, cause: err });
}
