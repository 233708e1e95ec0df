/** CLI entry point (bin/qimg.js imports the bundle built from this file). */
import { registerFormats } from '../formats/index.js';
import type { Command } from 'commander';
import { buildProgram, isCommanderError } from './program.js';
import { escapeControl, printError, reportError, warn } from './errors.js';
import { setWarningSink } from '../core/warnings.js';
import { digitOptionArgument, optionTable } from './getopt.js';
import { resizeArgv } from './commands/resize.js';
import { programName, setProgramName } from '../core/program-name.js';

export async function main(argv: string[]): Promise<void> {
  // Last resort: a failure nothing awaited still ends in one line, never a stack trace.
  process.on('unhandledRejection', (err) => {
    reportError(err);
    process.exit(1);
  });
  setProgramName(argv[1]);
  setWarningSink(warn);
  registerFormats();
  const result = { code: 0 };
  const program = buildProgram(result);
  if (argv.length <= 2) {
    printError(`${programName()}: Not enough arguments\nTry '${programName()} --help' for more information`);
    process.exitCode = 1;
    return;
  }
  const checked = qemuArgv(program, argv);
  if ('error' in checked) {
    process.stderr.write(escapeControl(`${programName()}: ${checked.error}`) + `\nTry '${programName()} --help' for more information\n`);
    process.exitCode = 1;
    return;
  }
  argv = checked.argv;
  try {
    await program.parseAsync(expandLongOptionPrefixes(program, rewriteProgressOption(argv)));
  } catch (err) {
    if (isCommanderError(err)) {
      // --help and --version exit 0; every usage error exits 1 like qemu-img.
      process.exitCode = err.exitCode === 0 ? 0 : 1;
      return;
    }
    throw err;
  }
  process.exitCode = result.code;
}

/**
 * getopt_long accepts any unambiguous prefix of a long option (`--out=json`,
 * `--start=0`); commander does not. Rewrites such prefixes to the full option name
 * for the subcommand being run; exact names, ambiguous prefixes and everything after
 * `--` are left alone.
 */
export function expandLongOptionPrefixes(program: Command, argv: string[]): string[] {
  const cmd = program.commands.find((c) => c.name() === argv[2] || c.aliases().includes(argv[2]));
  if (!cmd) return argv;
  const longs = [...cmd.options.map((o) => o.long), '--help'].filter((l): l is string => typeof l === 'string');
  const out = argv.slice(0, 3);
  for (let i = 3; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      out.push(...argv.slice(i));
      break;
    }
    const m = /^--([^=]+)(=.*)?$/s.exec(arg);
    if (m && !longs.includes(`--${m[1]}`)) {
      const matches = longs.filter((l) => l.startsWith(`--${m[1]}`));
      if (matches.length === 1) {
        out.push(matches[0] + (m[2] ?? ''));
        continue;
      }
    }
    out.push(arg);
  }
  return out;
}

/**
 * The command line as qemu-img's getopt reads it, where commander would read it
 * otherwise: resize's last argument is always the size, and an argument such as "-1"
 * is an (unknown) option, not a negative number (see getopt.ts).
 */
export function qemuArgv(program: Command, argv: string[]): { argv: string[] } | { error: string } {
  const name = argv[2];
  const cmd = program.commands.find((c) => c.name() === name || c.aliases().includes(name));
  if (!cmd) return { argv };
  let args = argv.slice(3);
  let options = args;
  if (cmd.name() === 'resize') {
    const r = resizeArgv(args);
    if ('error' in r) return { error: r.error };
    args = r.args;
    options = r.size !== undefined ? args.slice(0, -1) : args;
  }
  const bad = digitOptionArgument([name, ...options], optionTable(cmd));
  if (bad !== undefined) return { error: `unrecognized option '${bad}'` };
  return { argv: [...argv.slice(0, 3), ...args] };
}

/** `--progress=json` (machine progress) becomes the hidden --progress-json flag; `--progress=human` is -p. */
function rewriteProgressOption(argv: string[]): string[] {
  const end = argv.indexOf('--');
  return argv.map((a, i) => {
    if (end >= 0 && i > end) return a;
    if (a === '--progress=json') return '--progress-json';
    if (a === '--progress=human') return '-p';
    return a;
  });
}
