/** `qimg compare [-f fmt] [-F fmt] [-s] [-p] [-q] [-U] A B` */
import type { Command } from 'commander';
import type { BlockImage } from '../../core/block-image.js';
import { openImage } from '../../core/open.js';
import { compareImages } from '../../ops/compare.js';
import { formatError } from '../errors.js';
import { createProgress, progressMode } from '../output/progress.js';
import { writeOut } from './common.js';
import { programName } from '../../core/program-name.js';

export function registerCompare(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('compare')
    .description('compare the contents of two images')
    .option('-f, --a-format <fmt>', 'format of the first image')
    .option('-F, --b-format <fmt>', 'format of the second image')
    .option('-s, --strict', 'strict mode: allocation and image size must match too')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open even if the images are in use')
    .argument('<filename1>')
    .argument('<filename2>')
    .action((f1: string, f2: string, opts: { aFormat?: string; bFormat?: string; strict?: boolean; progress?: boolean; progressJson?: boolean; quiet?: boolean; forceShare?: boolean }) =>
      run(undefined, async () => {
        const images: BlockImage[] = [];
        try {
          for (const [name, format] of [
            [f1, opts.aFormat],
            [f2, opts.bFormat],
          ] as const) {
            try {
              images.push(await openImage(name, { format, forceShare: !!opts.forceShare }));
            } catch (err) {
              // Could not open an image: exit 2, as qemu-img.
              process.stderr.write(formatError(err, name).line + '\n');
              return 2;
            }
          }
          const mode = progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet });
          const progress = createProgress(mode);
          const result = await compareImages({ image: images[0], name: f1 }, { image: images[1], name: f2 }, { strict: opts.strict, onProgress: (d, t) => progress.update(d, t) });
          // qemu-img's plain progress (stdout, not a terminal) ends after the result
          // lines, with a bare newline, and does not jump to 100% when images differ.
          const plain = mode === 'auto' && !process.stderr.isTTY;
          if (!plain) progress.finish();
          if (result.error) process.stderr.write(`${programName()}: ${result.error}\n`);
          if (!opts.quiet) await writeOut(result.lines.map((l) => l + '\n').join(''));
          if (plain) {
            if (result.code === 0) progress.finish();
            else await writeOut('\n');
          }
          return result.code;
        } finally {
          for (const img of images) await img.close();
        }
      }),
    );
}
