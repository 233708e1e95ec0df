/** `qimg map [--object OBJDEF] [--image-opts] [-f fmt] [--output=human|json] [--start-offset N] [--max-length N] [-U] FILE` */
import type { Command } from 'commander';
import { QimgError } from '../../core/errors.js';
import { cvtnum } from '../../core/size.js';
import { mapImageExact } from '../../ops/map.js';
import { mapEntryJson } from '../output/json.js';
import { MAP_HUMAN_HEADER, mapHumanRow } from '../output/human.js';
import { addImageOptsOption, addObjectOption, parseOutputFormat, withObjects, writeOut } from './common.js';
import { openResolved, resolveImage } from './image-opts.js';
import { UsageError, warn } from '../errors.js';

export function registerMap(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('map')
    .description('show the allocation of every range of an image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-s, --start-offset <offset>', 'first byte to map')
    .option('-l, --max-length <length>', 'bytes to map')
    .option('-U, --force-share', 'open even if the image is in use (read-only)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: { format?: string; output?: string; startOffset?: string; maxLength?: string; forceShare?: boolean; object: string[]; imageOpts?: boolean }) =>
      run(opts.imageOpts ? undefined : filename, () => withObjects(opts.object, async (secrets) => {
        const output = parseOutputFormat(opts.output);
        // exact (bigint): images and these arguments reach past 2^53
        const offsetArg = (text: string, what: string): bigint => {
          try {
            return cvtnum(what, text, warn);
          } catch (err) {
            throw err instanceof QimgError ? new UsageError(err.message) : err;
          }
        };
        const start = opts.startOffset !== undefined ? offsetArg(opts.startOffset, 'start offset') : 0n;
        const maxLength = opts.maxLength !== undefined ? offsetArg(opts.maxLength, 'max length') : undefined;
        const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, forceShare: opts.forceShare, opensBacking: true, secrets });
        const img = await openResolved(spec, { secrets });
        try {
          if (output === 'json') {
            const parts: string[] = [];
            for await (const e of mapImageExact(img, start, maxLength)) parts.push(mapEntryJson(e));
            // qemu-img always prints its last (here: initial, empty) entry
            if (parts.length === 0) {
              parts.push(
                mapEntryJson({ offset: start, length: 0, depth: 0, present: false, zero: false, data: false, compressed: false }),
              );
            }
            await writeOut(`[${parts.join(',\n')}]\n`);
            return;
          }
          let out = MAP_HUMAN_HEADER;
          for await (const e of mapImageExact(img, start, maxLength)) {
            if (e.data && e.hostOffset === undefined) {
              await writeOut(out);
              throw new QimgError('File contains external, encrypted or compressed clusters.');
            }
            if (e.data && !e.zero) out += mapHumanRow(e.offset, e.length, e.hostOffset ?? 0n, e.file ?? '');
            if (out.length > 65536) {
              await writeOut(out);
              out = '';
            }
          }
          await writeOut(out);
        } finally {
          await img.close();
        }
      })),
    );
}
