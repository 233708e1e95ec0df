/** `qimg snapshot [-f fmt] [-q] [-U] -l | -c NAME | -a NAME | -d NAME FILE` */
import type { Command } from 'commander';
import { snapshotCommand, type SnapshotAction } from '../../ops/snapshot.js';
import { UsageError } from '../errors.js';
import { snapshotTable } from '../output/human.js';
import { writeOut } from './common.js';

export function registerSnapshot(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  program
    .command('snapshot')
    .description('list, create, apply or delete internal snapshots')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-l, --list', 'list the snapshots')
    .option('-c, --create <name>', 'create a snapshot')
    .option('-a, --apply <name>', 'revert the image to a snapshot (by id or name)')
    .option('-d, --delete <name>', 'delete a snapshot (by name)')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open even if the image is in use (list only)')
    .argument('<filename>')
    .action((filename: string, opts: { format?: string; list?: boolean; create?: string; apply?: string; delete?: string; forceShare?: boolean }) =>
      run(filename, async () => {
        const chosen = [opts.list ? 'l' : '', opts.create !== undefined ? 'c' : '', opts.apply !== undefined ? 'a' : '', opts.delete !== undefined ? 'd' : ''].filter(Boolean);
        if (chosen.length > 1) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
        // qemu-img 10 lists by default (7.2 did nothing): listing is the useful choice.
        let action: SnapshotAction = { kind: 'list' };
        if (opts.create !== undefined) action = { kind: 'create', name: opts.create };
        if (opts.apply !== undefined) action = { kind: 'apply', name: opts.apply };
        if (opts.delete !== undefined) action = { kind: 'delete', name: opts.delete };
        if (opts.forceShare && action.kind !== 'list') throw new UsageError('force-share=on can only be used with read-only images');
        const snaps = await snapshotCommand(filename, opts.format, action, !!opts.forceShare);
        if (action.kind === 'list' && snaps.length > 0) await writeOut('Snapshot list:\n' + snapshotTable(snaps));
      }),
    );
}
