/** Option parsing shared by subcommands. */
import { UsageError } from '../errors.js';

export type OutputFormat = 'human' | 'json';

export function parseOutputFormat(value: string | undefined): OutputFormat {
  if (value === undefined || value === 'human') return 'human';
  if (value === 'json') return 'json';
  throw new UsageError('--output must be used with human or json as argument.');
}

/** Writes to stdout and waits until it drained (large outputs, piped consumers). */
export function writeOut(text: string): Promise<void> {
  return new Promise((resolve, reject) => {
    if (text.length === 0) return resolve();
    process.stdout.write(text, (err) => (err ? reject(err) : resolve()));
  });
}

/** commander accumulator for repeatable options such as -o. */
export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}
