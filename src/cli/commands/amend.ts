/** `qimg amend [--object OBJDEF] [--image-opts] [-f fmt] [-p] [-q] [-t cache] -o options FILE` */
import type { Command } from 'commander';
import { findDriver } from '../../core/driver.js';
import { formatAmendHelp, hasHelpOption } from '../../core/options.js';
import { openImage } from '../../core/open.js';
import { amendImage } from '../../ops/amend.js';
import { addImageOptsOption, addObjectOption, checkCacheMode, collect, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerAmend(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('amend')
    .description('change format options of an existing image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-o, --options <options>', 'options to change (-o help lists them)', collect, [] as string[])
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'quiet mode')
    .option('-t, --cache <mode>', 'cache mode: none, writeback, writethrough, directsync, unsafe (accepted, checked)')
    .option('--force', 'let key slot changes overwrite an active slot or erase the last one (LUKS)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: AmendCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          // with -f, `-o help` lists the format's amend options without opening anything (as qemu-img)
          const named = opts.format !== undefined && !opts.imageOpts ? findDriver(opts.format) : undefined;
          if (named && opts.options.some(hasHelpOption)) return void (await writeOut(formatAmendHelp(named.name, named.amendOptions ?? named.createOptions)));
          // (without -o, qemu-img's "Must specify options (-o)" comes first)
          if (opts.options.length > 0) checkCacheMode(opts.cache, 'cache');
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: true, opensBacking: true, secrets });
          const progress = opts.progress && !opts.quiet;
          if (progress) await writeOut('    (0.00/100%)\r');
          const r = await amendImage(spec.path, spec.format, opts.options, { secrets, imageOptions: spec.imageOptions, force: opts.force });
          if (progress && r !== 'help') await writeOut('    (100.00/100%)\r\n');
          if (r === 'help') {
            const probed = await imageFormat(spec.path, spec.format);
            const d = findDriver(probed)!;
            await writeOut(formatAmendHelp(d.name, d.amendOptions ?? d.createOptions));
          }
        }),
      ),
    );
}

interface AmendCliOptions {
  format?: string;
  options: string[];
  progress?: boolean;
  quiet?: boolean;
  force?: boolean;
  cache?: string;
  object: string[];
  imageOpts?: boolean;
}

/** The format of an image (probed when not given), for the help list. */
async function imageFormat(path: string, format: string | undefined): Promise<string> {
  if (format) return format;
  const img = await openImage(path, { metadataOnly: true, forceShare: true });
  try {
    return img.format;
  } finally {
    await img.close();
  }
}
