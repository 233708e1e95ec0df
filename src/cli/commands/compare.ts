/** `qimg compare [--object OBJDEF] [--image-opts] [-f fmt] [-F fmt] [-s] [-p] [-q] [-U] A B` */
import type { Command } from 'commander';
import type { BlockImage } from '../../core/block-image.js';
import { compareImages } from '../../ops/compare.js';
import { formatError, printError, writeErrorLines } from '../errors.js';
import { createProgress, progressMode } from '../output/progress.js';
import { ObjectError } from '../object-options.js';
import { CACHE_MODES, addImageOptsOption, addObjectOption, reportObjectError, withObjects, writeOut } from './common.js';
import { openResolved, resolveImage } from './image-opts.js';
import { programName } from '../../core/program-name.js';

export function registerCompare(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('compare')
    .description('compare the contents of two images')
    .option('-f, --a-format <fmt>', 'format of the first image')
    .option('-F, --b-format <fmt>', 'format of the second image')
    .option('-s, --strict', 'strict mode: allocation and image size must match too')
    .option('-T, --cache <mode>', 'source cache mode: none, writeback, writethrough, directsync, unsafe (accepted, checked)')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open even if the images are in use');
  addObjectOption(cmd);
  addImageOptsOption(cmd, 'each FILENAME')
    .argument('<filename1>')
    .argument('<filename2>')
    .action((f1: string, f2: string, opts: CompareCliOptions) =>
      run(undefined, () => withObjects(opts.object, async (secrets) => {
        if (opts.cache !== undefined && !CACHE_MODES.includes(opts.cache)) {
          writeErrorLines(`${programName()}: Invalid source cache option: ${opts.cache}`);
          return 2;
        }
        const images: BlockImage[] = [];
        try {
          for (const [name, format] of [
            [f1, opts.aFormat],
            [f2, opts.bFormat],
          ] as const) {
            try {
              const spec = await resolveImage(name, { imageOpts: !!opts.imageOpts, format, forceShare: opts.forceShare, opensBacking: true, secrets });
              images.push(await openResolved(spec, { secrets }));
            } catch (err) {
              // Could not open an image: exit 2, as qemu-img.
              if (err instanceof ObjectError) return reportObjectError(err, 2);
              printError(formatError(err, opts.imageOpts ? undefined : name).line);
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
          if (result.error) writeErrorLines(`${programName()}: ${result.error}`);
          if (!opts.quiet) await writeOut(result.lines.map((l) => l + '\n').join(''));
          if (plain) {
            if (result.code === 0) progress.finish();
            else await writeOut('\n');
          }
          return result.code;
        } finally {
          for (const img of images) await img.close();
        }
      }, 2)),
    );
}

interface CompareCliOptions {
  aFormat?: string;
  cache?: string;
  bFormat?: string;
  strict?: boolean;
  progress?: boolean;
  progressJson?: boolean;
  quiet?: boolean;
  forceShare?: boolean;
  object: string[];
  imageOpts?: boolean;
}
