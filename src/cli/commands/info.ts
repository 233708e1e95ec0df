/** `qimg info [--object OBJDEF] [--image-opts] [-f fmt] [--output=human|json] [--backing-chain] [-U] FILE` */
import type { Command } from 'commander';
import { chainInfo, imageInfo } from '../../ops/info.js';
import { infoJson, prettyJson } from '../output/json.js';
import { infoHuman } from '../output/human.js';
import { tablesOn } from '../output/tables.js';
import { addImageOptsOption, addObjectOption, parseOutputFormat, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

interface InfoCliOptions {
  format?: string;
  output?: string;
  backingChain?: boolean;
  forceShare?: boolean;
  object: string[];
  imageOpts?: boolean;
}

export function registerInfo(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('info')
    .description('show information about an image (and its backing chain)')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('--backing-chain', 'show every image of the backing chain')
    .option('-U, --force-share', 'open even if the image is in use (read-only)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: InfoCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () =>
        withObjects(opts.object, async (secrets) => {
          const output = parseOutputFormat(opts.output);
          // info opens no backing file, so `backing.` options are refused as qemu-img refuses them
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, secrets });
          const extras = { secrets, imageOptions: spec.imageOptions };
          if (opts.backingChain) {
            const infos = await chainInfo(spec.path, spec.format, spec.forceShare, extras);
            infos[0] = { ...infos[0], filename: spec.displayName, format: spec.displayFormat ?? infos[0].format };
            if (output === 'json') await writeOut(prettyJson(infos.map(infoJson)) + '\n');
            else await writeOut(infos.map((i) => infoHuman(i, { tables: tablesOn() })).join('\n'));
            return;
          }
          const found = await imageInfo(spec.path, spec.format, spec.forceShare, extras);
          const info = { ...found, filename: spec.displayName, format: spec.displayFormat ?? found.format };
          await writeOut(output === 'json' ? prettyJson(infoJson(info)) + '\n' : infoHuman(info, { tables: tablesOn() }));
        }),
      ),
    );
}
