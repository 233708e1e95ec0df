/**
 * The standalone "luks" format driver (qemu's block/crypto.c "luks"): probe by the
 * LUKS1 magic and version, open, create, measure and amend. Everything that needs
 * node:crypto is loaded on first use, so other commands do not pay for it at start-up.
 */
import type { FormatDriver } from '../../core/driver.js';
import { describeLuksCreate, luksAmendOptions, luksCreateOptions } from './options.js';

const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);

/** qemu's block_crypto_probe_luks: the magic and version 1 score 100. */
export function probeLuks(head: Buffer): number {
  return head.length >= 8 && head.subarray(0, 6).equals(LUKS_MAGIC) && head.readUInt16BE(6) === 1 ? 100 : 0;
}

export const luksDriver: FormatDriver = {
  name: 'luks',
  probe: probeLuks,
  open: async (file, ctx) => (await import('./open.js')).openLuks(file, ctx),
  createOptions: luksCreateOptions,
  describeCreate: describeLuksCreate,
  create: async (path, size, options, ctx) => (await import('./create.js')).createLuksImage(path, size, options, ctx),
  measure: async (size, options, ctx) => (await import('./create.js')).measureLuks(size, options, ctx),
  supportsMeasure: true,
  amend: async (filename, options, ctx) => (await import('./amend.js')).amendLuksImage(filename, options, ctx),
  amendOptions: luksAmendOptions,
  noZeroInit: true,
};
