/** `qimg snapshot [--object OBJDEF] [--image-opts] [-f fmt] [-q] [-U] -l | -c NAME | -a NAME | -d NAME FILE` */
import type { Command } from 'commander';
import { snapshotCommand, type SnapshotAction } from '../../ops/snapshot.js';
import { UsageError } from '../errors.js';
import { snapshotTable } from '../output/human.js';
import { addImageOptsOption, addObjectOption, withObjects, writeOut } from './common.js';
import { resolveImage } from './image-opts.js';

export function registerSnapshot(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('snapshot')
    .description('list, create, apply or delete internal snapshots')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-l, --list', 'list the snapshots')
    .option('-c, --create <name>', 'create a snapshot')
    .option('-a, --apply <name>', 'revert the image to a snapshot (by id or name)')
    .option('-d, --delete <name>', 'delete a snapshot (by name)')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open even if the image is in use (list only)');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('<filename>')
    .action((filename: string, opts: SnapshotCliOptions) =>
      run(opts.imageOpts ? undefined : filename, () => withObjects(opts.object, async (secrets) => {
        const chosen = [opts.list ? 'l' : '', opts.create !== undefined ? 'c' : '', opts.apply !== undefined ? 'a' : '', opts.delete !== undefined ? 'd' : ''].filter(Boolean);
        if (chosen.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
        // qemu-img 10 lists by default (7.2 did nothing): listing is the useful choice.
        let action: SnapshotAction = { kind: 'list' };
        if (opts.create !== undefined) action = { kind: 'create', name: opts.create };
        if (opts.apply !== undefined) action = { kind: 'apply', name: opts.apply };
        if (opts.delete !== undefined) action = { kind: 'delete', name: opts.delete };
        if (opts.forceShare && action.kind !== 'list') throw new UsageError('force-share=on can only be used with read-only images');
        const spec = await resolveImage(filename, {
          imageOpts: !!opts.imageOpts,
          format: opts.format,
          forceShare: opts.forceShare,
          writable: action.kind !== 'list',
          opensBacking: true,
          secrets,
        });
        const snaps = await snapshotCommand(spec.path, spec.format, action, spec.forceShare, { secrets, imageOptions: spec.imageOptions });
        if (action.kind === 'list' && snaps.length > 0) await writeOut('Snapshot list:\n' + snapshotTable(snaps));
      })),
    );
}

interface SnapshotCliOptions {
  format?: string;
  list?: boolean;
  create?: string;
  apply?: string;
  delete?: string;
  forceShare?: boolean;
  object: string[];
  imageOpts?: boolean;
}
