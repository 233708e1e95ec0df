/** `qimg amend [-f fmt] [-p] [-q] -o options FILE` */
import type { Command } from 'commander';
import { findDriver } from '../../core/driver.js';
import { formatOptionHelp } from '../../core/options.js';
import { amendImage } from '../../ops/amend.js';
import { collect, writeOut } from './common.js';

export function registerAmend(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('amend')
    .description('change format options of an existing image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-o, --options <options>', 'options to change (-o help lists them)', collect, [] as string[])
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'quiet mode')
    .option('--force', 'accepted for compatibility')
    .argument('<filename>')
    .action((filename: string, opts: { format?: string; options: string[]; progress?: boolean; quiet?: boolean }) =>
      run(filename, async () => {
        const progress = opts.progress && !opts.quiet;
        if (progress) await writeOut('    (0.00/100%)\r');
        const r = await amendImage(filename, opts.format, opts.options);
        if (progress && r !== 'help') await writeOut('    (100.00/100%)\r\n');
        if (r === 'help') {
          const d = findDriver(opts.format ?? 'qcow2')!;
          await writeOut(formatOptionHelp(d.name, d.createOptions));
        }
      }),
    );
}
