/**
 * Standard input and output as byte streams for `convert ... -`: one forward pass,
 * no seeks, no reads back. Both use positionless read(2)/write(2) on the inherited
 * descriptors through libuv's threadpool, so a pipe, a file or a socket behind them
 * all work; a descriptor left non-blocking (EAGAIN) is waited on, and a reader that
 * went away (EPIPE) ends the output with one clear error.
 */
import { fstatSync, read, write } from 'node:fs';
import { isatty } from 'node:tty';
import { QimgError, describeSystemError } from '../core/errors.js';

/** The name standard input and output go by on the command line. */
export const STDIO_NAME = '-';

/** A byte stream read once, from its start to its end. */
export interface SequentialInput {
  readonly name: string;
  /** bytes consumed so far */
  readonly position: number;
  /** the total length when known in advance (a regular file behind the descriptor) */
  readonly knownSize: number | undefined;
  /** Fills `buf` from the stream; returns fewer bytes only at the end of the stream. */
  readFully(buf: Buffer): Promise<number>;
  /** Consumes and drops `n` bytes; returns how many there were before the end. */
  skip(n: number): Promise<number>;
}

/** A byte stream written once, in order. */
export interface SequentialOutput {
  readonly name: string;
  /** bytes written so far */
  readonly position: number;
  write(data: Buffer): Promise<void>;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function readOnce(fd: number, buf: Buffer, off: number, len: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buf, off, len, null, (err, n) => (err ? reject(err) : resolve(n))));
}

function writeOnce(fd: number, buf: Buffer, off: number, len: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buf, off, len, null, (err, n) => (err ? reject(err) : resolve(n))));
}

/** Retries a call that failed with EAGAIN (a non-blocking descriptor), backing off up to 50 ms. */
async function retryAgain<T>(call: () => Promise<T>): Promise<T> {
  for (let wait = 1; ; wait = Math.min(wait * 2, 50)) {
    try {
      return await call();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      await sleep(wait);
    }
  }
}

function regularFileSize(fd: number): number | undefined {
  try {
    const st = fstatSync(fd);
    return st.isFile() ? st.size : undefined;
  } catch {
    return undefined;
  }
}

export class DescriptorInput implements SequentialInput {
  position = 0;
  readonly knownSize: number | undefined;
  private scratch: Buffer | null = null;
  constructor(
    private readonly fd: number,
    readonly name: string,
  ) {
    // a file redirected in (`< disk.raw`) tells its length up front; a pipe does not
    this.knownSize = regularFileSize(fd);
  }

  async readFully(buf: Buffer): Promise<number> {
    let got = 0;
    while (got < buf.length) {
      let n: number;
      try {
        n = await retryAgain(() => readOnce(this.fd, buf, got, buf.length - got));
      } catch (err) {
        throw new QimgError(`error reading standard input: ${describeSystemError(err)}`, { file: this.name, cause: err });
      }
      if (n === 0) break;
      got += n;
    }
    this.position += got;
    return got;
  }

  async skip(n: number): Promise<number> {
    this.scratch ??= Buffer.allocUnsafe(256 * 1024);
    let done = 0;
    while (done < n) {
      const want = Math.min(this.scratch.length, n - done);
      const got = await this.readFully(this.scratch.subarray(0, want));
      done += got;
      if (got < want) break;
    }
    return done;
  }
}

export class DescriptorOutput implements SequentialOutput {
  position = 0;
  constructor(
    private readonly fd: number,
    readonly name: string,
  ) {}

  async write(data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      try {
        done += await retryAgain(() => writeOnce(this.fd, data, done, data.length - done));
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        const why = e.code === 'EPIPE' ? 'the reader of standard output went away (broken pipe)' : describeSystemError(err);
        throw new QimgError(`error writing to standard output: ${why}`, { file: this.name, cause: err });
      }
    }
    this.position += data.length;
  }
}

/** Standard input as a forward-only stream. */
export function standardInput(): SequentialInput {
  return new DescriptorInput(0, STDIO_NAME);
}

/** Standard output as a forward-only stream. */
export function standardOutput(): SequentialOutput {
  return new DescriptorOutput(1, STDIO_NAME);
}

/** Whether standard output is a terminal (an image is never written there). */
export function stdoutIsTerminal(): boolean {
  // isatty, not process.stdout: creating that stream would make a pipe non-blocking
  return isatty(1);
}

/** Whether standard input is a terminal (no image comes from there). */
export function stdinIsTerminal(): boolean {
  return isatty(0);
}
