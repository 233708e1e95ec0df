/** `qimg info [-f fmt] [--output=human|json] [--backing-chain] [-U] FILE` */
import type { Command } from 'commander';
import { chainInfo, imageInfo } from '../../ops/info.js';
import { infoJson, prettyJson } from '../output/json.js';
import { infoHuman } from '../output/human.js';
import { parseOutputFormat, writeOut } from './common.js';

export function registerInfo(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('info')
    .description('show information about an image (and its backing chain)')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('--backing-chain', 'show every image of the backing chain')
    .option('-U, --force-share', 'open even if the image is in use (read-only)')
    .argument('<filename>')
    .action((filename: string, opts: { format?: string; output?: string; backingChain?: boolean; forceShare?: boolean }) =>
      run(filename, async () => {
        const output = parseOutputFormat(opts.output);
        if (opts.backingChain) {
          const infos = await chainInfo(filename, opts.format, !!opts.forceShare);
          if (output === 'json') await writeOut(prettyJson(infos.map(infoJson)) + '\n');
          else await writeOut(infos.map(infoHuman).join('\n'));
          return;
        }
        const info = await imageInfo(filename, opts.format, !!opts.forceShare);
        await writeOut(output === 'json' ? prettyJson(infoJson(info)) + '\n' : infoHuman(info));
      }),
    );
}
