/**
 * The vhdx driver (Hyper-V VHDX, MS-VHDX v1.0): probing by the "vhdxfile" signature,
 * opening (with log replay when writable), differencing images through their parent
 * locator, create with qemu's options and check.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import type { OpenContext } from '../../core/open.js';
import { resolveRelative } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { CorruptImageError } from '../../core/errors.js';
import { FILE_SIGNATURE, ZERO_GUID, guidToString, newGuid } from './format.js';
import { VhdxImage, updateHeaders } from './image.js';
import { replaySequence } from './log.js';
import {
  activeLogLocation,
  checkBatEntries,
  checkSignature,
  currentHeader,
  isDifferencing,
  pendingLog,
  readBat,
  readHeaders,
  readMeta,
  readOnlyLogError,
} from './open.js';
import { chooseParent, parentCandidates } from './parent.js';
import { createVhdx, describeVhdxCreate, vhdxCreateOptions, vhdxSpecFromOptions } from './create.js';

export async function openVhdx(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const name = file.path;
  await checkSignature(file);
  const hs = await readHeaders(file);
  const session = newGuid();
  const seq = await pendingLog(file, currentHeader(hs));
  if (seq.length > 0) {
    if (file.writable) {
      await replaySequence(file, activeLogLocation(currentHeader(hs))!, seq, name);
      await updateHeaders(file, hs, session, { newDataWriteGuid: true, logGuid: ZERO_GUID });
    } else if (!ctx.options.check) {
      throw readOnlyLogError(name);
    }
  }
  const meta = await readMeta(file, hs);
  const bat = await readBat(file, meta);
  if (!ctx.options.check) {
    checkBatEntries(meta, bat, file.size, (msg) => {
      throw new CorruptImageError(name, msg);
    });
  }
  let backing: BlockImage | null = null;
  let backingName: string | undefined;
  if (isDifferencing(meta)) {
    const loc = meta.locator!;
    const candidates = parentCandidates(loc);
    backingName = chooseParent(candidates, (c) => resolveRelative(c, name));
    if (backingName === undefined) throw new CorruptImageError(name, 'VHDX parent locator names no parent file');
    if (!ctx.options.metadataOnly && !ctx.options.noBacking) {
      backing = await ctx.openBacking(backingName, 'vhdx', name);
      const linkOk =
        backing instanceof VhdxImage && (backing.dataWriteGuid.equals(loc.linkage) || (loc.linkage2 !== undefined && backing.dataWriteGuid.equals(loc.linkage2)));
      if (!linkOk) {
        const found = backing instanceof VhdxImage ? guidToString(backing.dataWriteGuid) : 'none';
        await backing.close();
        throw new CorruptImageError(
          name,
          `VHDX parent '${backingName}' does not match the parent linkage ${guidToString(loc.linkage)} (its data write GUID is ${found})`,
        );
      }
    }
  }
  return new VhdxImage(file, name, meta, bat, backing, backingName, session);
}

export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  probe: (head) => (head.length >= 8 && head.subarray(0, 8).toString('latin1') === FILE_SIGNATURE ? 100 : 0),
  open: openVhdx,
  createOptions: vhdxCreateOptions,
  describeCreate: describeVhdxCreate,
  create: (path, size, options) => createVhdx(path, vhdxSpecFromOptions(size, options)),
  check: async (filename, opts) => (await import('./check.js')).checkVhdx(filename, opts),
};

