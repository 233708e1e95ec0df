/** CLI entry point (bin/qimg.js imports the bundle built from this file). */
import { registerFormats } from '../formats/index.js';
import { buildProgram, isCommanderError } from './program.js';

export async function main(argv: string[]): Promise<void> {
  registerFormats();
  const result = { code: 0 };
  const program = buildProgram(result);
  if (argv.length <= 2) {
    process.stderr.write("qimg: Not enough arguments\nTry 'qimg --help' for more information\n");
    process.exitCode = 1;
    return;
  }
  try {
    await program.parseAsync(argv);
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
