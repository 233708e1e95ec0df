/** `qimg rebase [--object OBJDEF] [--image-opts] [-f fmt] [-u] -b BACKING|"" [-F fmt] [-p] [-q] [-c] FILE` */
import type { Command } from 'commander';
import { rebaseImage } from '../../ops/rebase.js';
import { UsageError } from '../errors.js';
import { createProgress, progressMode } from '../output/progress.js';
import { addImageOptsOption, addObjectOption, checkCacheMode, withObjects } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerRebase(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('rebase')
    .description("change an image's backing file")
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-b, --backing <file>', 'the new backing file ("" for none)')
    .option('-F, --backing-format <fmt>', 'format of the new backing file')
    .option('-B <fmt>', 'format of the new backing file (qemu-img 10 spelling)')
    .option('-u, --backing-unsafe', 'only rewrite the backing file name (no data is copied)')
    .option('-c, --compress', 'store copied clusters compressed')
    .option('-t, --cache <mode>', 'cache mode: none, writeback, writethrough, directsync, unsafe (accepted, checked)')
    .option('-T, --backing-cache <mode>', 'source (backing) cache mode, the same names (accepted, checked)')
    .option('-p, --progress', 'show progress')
    .option('--progress-json', 'progress as JSON lines')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'accepted for compatibility (rebase writes)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: RebaseCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          if (opts.backing === undefined) throw new UsageError('Must specify backing file (-b)');
          checkCacheMode(opts.cache, 'cache');
          checkCacheMode(opts.backingCache, 'source cache');
          // -u opens no backing file: `backing.` options are refused then, as qemu-img does
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: !opts.backingUnsafe, secrets });
          const progress = createProgress(progressMode({ progress: opts.progressJson ? 'json' : opts.progress, quiet: opts.quiet }));
          await rebaseImage(spec.path, {
            format: spec.format,
            backing: opts.backing,
            backingFormat: opts.backingFormat ?? opts.B,
            unsafe: opts.backingUnsafe,
            compress: opts.compress,
            onProgress: (d, t) => progress.update(d, t),
            secrets,
            imageOptions: spec.imageOptions,
          });
          progress.finish();
        }),
      ),
    );
}

interface RebaseCliOptions {
  format?: string;
  cache?: string;
  backingCache?: string;
  backing?: string;
  backingFormat?: string;
  B?: string;
  backingUnsafe?: boolean;
  compress?: boolean;
  progress?: boolean;
  progressJson?: boolean;
  quiet?: boolean;
  object: string[];
  imageOpts?: boolean;
}
