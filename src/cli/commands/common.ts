/** Option parsing shared by subcommands: --output, -o lists, --object and --image-opts. */
import { writeSync } from 'node:fs';
import type { Command } from 'commander';
import { SecretStore } from '../../core/secrets.js';
import { programName } from '../../core/program-name.js';
import { UsageError, escapeLines, printError } from '../errors.js';
import { ObjectError, addObjects, objectHelp } from '../object-options.js';
import { splitTlsObjects } from '../tls-objects.js';

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

/** qemu's cache mode names (-t, -T). */
export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/**
 * qemu-img's -t/-T check: one of the cache mode names, else its message (`what`: "cache"
 * for -t, "source cache" for -T). qimg accepts every mode; reads and writes go through
 * the page cache whatever it is, and modes other than unsafe flush where qemu-img does.
 */
export function checkCacheMode(mode: string | undefined, what: 'cache' | 'source cache'): void {
  if (mode !== undefined && !CACHE_MODES.includes(mode)) throw new UsageError(`Invalid ${what} option: ${mode}`);
}

/** commander accumulator for repeatable options such as -o. */
export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/**
 * `--object OBJDEF`, repeatable. A help request (`--object help`, `secret,help`) is
 * answered while the options are parsed and ends the program, as qemu-img does; the
 * objects themselves are created by withObjects when the command runs.
 */
export function addObjectOption(cmd: Command): Command {
  return cmd.option(
    '--object <objectdef>',
    'define an object: secret,id=ID,data=VALUE|file=PATH[,format=raw|base64][,keyid=ID,iv=BASE64] (--object help lists the types)',
    (value: string, previous: string[]) => {
      const help = objectHelp(value);
      if (help !== undefined) {
        writeSync(1, help);
        process.exit(0);
      }
      return [...previous, value];
    },
    [] as string[],
  );
}

/** `--image-opts`: FILENAME is an option string. */
export function addImageOptsOption(cmd: Command, what = 'FILENAME'): Command {
  return cmd.option('--image-opts', `${what} is an option string: driver=FMT,file.filename=PATH[,encrypt.key-secret=ID|key-secret=ID,...]`);
}

/**
 * Runs a command body with the secrets its --object options define. The store is
 * destroyed (every value zeroed) when the body ends, whatever way it ends. A refused
 * object exits with `objectErrorCode` (qemu-img's compare uses 2).
 */
export async function withObjects(
  defs: readonly string[] | undefined,
  body: (secrets: SecretStore) => Promise<number | void>,
  objectErrorCode = 1,
): Promise<number | void> {
  const secrets = new SecretStore();
  try {
    try {
      const { tlsSpecs, others } = splitTlsObjects(defs);
      addObjects(secrets, others);
      for (const spec of tlsSpecs.values()) {
        if (secrets.has(spec.id)) throw new ObjectError(`attempt to add duplicate property '${spec.id}' to object (type 'container')`);
        secrets.addTlsCreds(spec);
      }
    } catch (err) {
      if (err instanceof ObjectError) return reportObjectError(err, objectErrorCode);
      throw err;
    }
    return await body(secrets);
  } catch (err) {
    if (err instanceof ObjectError) return reportObjectError(err);
    throw err;
  } finally {
    secrets.destroy();
  }
}

/** qemu's message as it prints it: the first line with the program name, a hint line as is. */
export function reportObjectError(err: ObjectError, exitCode = err.exitCode): number {
  const [first, ...more] = err.message.split('\n');
  printError(escapeLines([`${programName()}: ${first}`, ...more].join('\n')));
  return exitCode;
}
