/** `qimg commit [-f fmt] [-b base] [-d] [-p] [-q] [-t cache] FILE` */
import type { Command } from 'commander';
import { commitImage } from '../../ops/commit.js';
import { createProgress, progressMode } from '../output/progress.js';
import { writeOut } from './common.js';

export function registerCommit(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('commit')
    .description('write the changes of an overlay into its backing file')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-b, --base <file>', 'commit down to this image of the backing chain (implies -d)')
    .option('-d, --drop', 'do not empty the image afterwards')
    .option('-t, --cache <mode>', 'cache mode (accepted for compatibility)')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode')
    .argument('<filename>')
    .action((filename: string, opts: { format?: string; base?: string; drop?: boolean; progress?: boolean; progressJson?: boolean; quiet?: boolean }) =>
      run(filename, async () => {
        const progress = createProgress(progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet }));
        await commitImage(filename, { format: opts.format, base: opts.base, drop: opts.drop, onProgress: (d, t) => progress.update(d, t) });
        progress.finish();
        if (!opts.quiet) await writeOut('Image committed.\n');
      }),
    );
}
