/** The commander program: global options and one subcommand per module. */
import { Command, CommanderError } from 'commander';
import { registerAmend } from './commands/amend.js';
import { registerCompare } from './commands/compare.js';
import { registerConvert } from './commands/convert.js';
import { registerMeasure } from './commands/measure.js';
import { registerCommit } from './commands/commit.js';
import { registerRebase } from './commands/rebase.js';
import { registerResize } from './commands/resize.js';
import { registerSnapshot } from './commands/snapshot.js';
import { registerCreate } from './commands/create.js';
import { registerInfo } from './commands/info.js';
import { registerMap } from './commands/map.js';
import { registerCheck } from './commands/check.js';
import { registerBitmap } from './commands/bitmap.js';
import { registerDd } from './commands/dd.js';
import { registerBench } from './commands/bench.js';
import { registerServe } from './commands/serve.js';
import { escapeLines, reportError } from './errors.js';
import { errorText } from './output/style.js';
import { programName } from '../core/program-name.js';
import { maskSecretData } from './object-options.js';

export const VERSION = '0.1.0';

export interface RunResult {
  code: number;
}

export function buildProgram(result: RunResult): Command {
  const program = new Command();
  program
    .name(programName())
    .description('qimg: a disk image tool for raw and qcow2 images, a drop-in for qemu-img')
    .version(`qimg version ${VERSION}`, '-V, --version')
    .option('--untrusted', 'the images come from an untrusted source: refuse backing and data files outside their directory (or QIMG_UNTRUSTED=1)')
    .hook('preAction', (cmd) => {
      if (cmd.opts().untrusted) process.env.QIMG_UNTRUSTED = '1';
    })
    .exitOverride()
    .configureOutput({
      writeErr: (s) => process.stderr.write(s.startsWith('error: ') ? errorText(escapeLines(`${programName()}: ${qemuUsageMessage(s.slice(7))}`)) : escapeLines(s)),
    })
    .showSuggestionAfterError(false)
    .showHelpAfterError(`Try '${programName()} --help' for more information`)
    .allowExcessArguments(false);

  /** Runs one command body, mapping its failures to qemu-img's exit codes. */
  const run = async (file: string | undefined, fn: () => Promise<number | void>): Promise<void> => {
    try {
      const code = await fn();
      result.code = typeof code === 'number' ? code : 0;
    } catch (err) {
      result.code = reportError(err, file);
    }
  };

  registerAmend(program, run);
  registerCreate(program, run);
  registerInfo(program, run);
  registerMap(program, run);
  registerCheck(program, run);
  registerConvert(program, run);
  registerCompare(program, run);
  registerMeasure(program, run);
  registerCommit(program, run);
  registerRebase(program, run);
  registerResize(program, run);
  registerSnapshot(program, run);
  registerBitmap(program, run);
  registerDd(program, run);
  registerBench(program, run);
  registerServe(program, run);
  for (const cmd of program.commands) {
    cmd.exitOverride().configureOutput(program.configureOutput()).allowExcessArguments(false);
  }
  return program;
}

export function isCommanderError(err: unknown): err is CommanderError {
  return err instanceof CommanderError;
}

/** commander's usage messages reworded as qemu-img prints them. */
export function qemuUsageMessage(text: string): string {
  const line = text.replace(/\n$/, '');
  let m: RegExpExecArray | null;
  // a mistyped --object=secret,...,data=X must not print X
  if ((m = /^unknown option '(.*)'$/.exec(line))) return `unrecognized option '${maskSecretData(m[1])}'\n`;
  if ((m = /^unknown command '(.*)'$/.exec(line))) return `Command not found: ${m[1]}\n`;
  if (/^missing required argument '.*'$/.test(line) || /^too many arguments/.test(line)) return 'Expecting one image file name\n';
  if ((m = /^option '([^ ,']+)[^']*' argument missing$/.exec(line))) return `missing argument for option '${m[1]}'\n`;
  return text;
}
