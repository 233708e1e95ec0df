/**
 * The vmdk format driver: probing (sparse magics, text descriptors), opening (extents,
 * CIDs, the parent named by parentFileNameHint), create and check.
 */
import { createVmdkStream } from './stream-out.js';
import { openVmdkStream } from './stream-in.js';
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { checkVmdk } from './check.js';
import { DESC_AREA } from './constants.js';
import { createVmdk, describeVmdkCreate, vmdkCreateOptions } from './create.js';
import { descriptorText, parentHint, probeVmdk, readCid } from './descriptor.js';
import { VmdkImage } from './image.js';
import { openLayout } from './open.js';

async function openVmdk(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const layout = await openLayout(file, ctx);
  let backing: BlockImage | null = null;
  try {
    const invalid = () => new QimgError(`Could not open '${file.path}': Invalid argument`, { file: file.path });
    const text = descriptorText(await file.readBytes(layout.descOffset, DESC_AREA - 1));
    const hint = parentHint(text);
    if (hint === null) throw invalid();
    const cid = readCid(text, false);
    const parentCid = readCid(text, true);
    if (cid === undefined || parentCid === undefined) throw invalid();
    if (hint !== undefined && hint !== '' && !ctx.options.metadataOnly && !ctx.options.noBacking) {
      backing = await ctx.openBacking(hint, 'vmdk', file.path);
    }
    return new VmdkImage(file, file.path, layout, { cid, parentCid, parentHint: hint }, backing);
  } catch (err) {
    if (backing) await backing.close().catch(() => undefined);
    for (const f of layout.ownFiles) await f.close().catch(() => undefined);
    throw err;
  }
}

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  probe: (head) => probeVmdk(head),
  open: openVmdk,
  createOptions: vmdkCreateOptions,
  describeCreate: describeVmdkCreate,
  create: createVmdk,
  check: checkVmdk,
  supportsCompression: true,
  createStream: createVmdkStream,
  openSequential: openVmdkStream,
};
