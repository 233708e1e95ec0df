/** `qimg commit [--object OBJDEF] [--image-opts] [-f fmt] [-b base] [-d] [-p] [-q] [-t cache] FILE` */
import type { Command } from 'commander';
import { commitImage } from '../../ops/commit.js';
import { createProgress, progressMode } from '../output/progress.js';
import { addImageOptsOption, addObjectOption, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerCommit(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('commit')
    .description('write the changes of an overlay into its backing file')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-b, --base <file>', 'commit down to this image of the backing chain (implies -d)')
    .option('-d, --drop', 'do not empty the image afterwards')
    .option('-t, --cache <mode>', 'cache mode (accepted for compatibility)')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: CommitCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: true, secrets });
          const progress = createProgress(progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet }));
          await commitImage(spec.path, {
            format: spec.format,
            base: opts.base,
            drop: opts.drop,
            onProgress: (d, t) => progress.update(d, t),
            secrets,
            imageOptions: spec.imageOptions,
          });
          progress.finish();
          if (!opts.quiet) await writeOut('Image committed.\n');
        }),
      ),
    );
}

interface CommitCliOptions {
  format?: string;
  base?: string;
  drop?: boolean;
  progress?: boolean;
  progressJson?: boolean;
  quiet?: boolean;
  object: string[];
  imageOpts?: boolean;
}
