/** `qimg commit [--object OBJDEF] [--image-opts] [-f fmt] [-b base] [-d] [-p] [-q] [-t cache] [-r rate] FILE` */
import type { Command } from 'commander';
import { commitImage } from '../../ops/commit.js';
import { createProgress, progressMode } from '../output/progress.js';
import { cvtnum } from '../../core/size.js';
import { UsageError, warn } from '../errors.js';
import { addImageOptsOption, addObjectOption, checkCacheMode, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerCommit(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('commit')
    .description('write the changes of an overlay into its backing file')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-b, --base <file>', 'commit down to this image of the backing chain (implies -d)')
    .option('-d, --drop', 'do not empty the image afterwards')
    .option('-t, --cache <mode>', 'cache mode: none, writeback, writethrough, directsync, unsafe (accepted, checked)')
    .option('-r, --rate-limit <rate>', 'copy at most RATE bytes of data per second (size suffixes allowed; 0 = no limit)')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: CommitCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          let rateLimit: number | undefined;
          try {
            if (opts.rateLimit !== undefined) rateLimit = Number(cvtnum('rate limit', opts.rateLimit, warn));
          } catch (err) {
            throw err instanceof Error ? new UsageError(err.message) : err;
          }
          checkCacheMode(opts.cache, 'cache');
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: true, secrets });
          const progress = createProgress(progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet }));
          await commitImage(spec.path, {
            format: spec.format,
            base: opts.base,
            drop: opts.drop,
            rateLimit,
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
  cache?: string;
  rateLimit?: string;
  base?: string;
  drop?: boolean;
  progress?: boolean;
  progressJson?: boolean;
  quiet?: boolean;
  object: string[];
  imageOpts?: boolean;
}
