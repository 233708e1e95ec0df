/**
 * The vpc driver (VHD, Microsoft's Virtual PC / Hyper-V format), named as qemu names
 * it. Probing finds the footer copy of dynamic disks only: a fixed disk's footer is at
 * its end, so qemu (and qimg) probe it as raw and read it as VHD with -f vpc.
 */
import type { FormatDriver } from '../../core/driver.js';
import { createVpc, describeVpcCreate, vpcCreateOptions, vpcSpecFromOptions } from './create.js';
import { openVpc } from './open.js';
import { FOOTER_COOKIE } from './structs.js';

export const vpcDriver: FormatDriver = {
  name: 'vpc',
  probe: (head) => (head.length >= 8 && head.subarray(0, 8).toString('latin1') === FOOTER_COOKIE ? 100 : 0),
  open: openVpc,
  createOptions: vpcCreateOptions,
  describeCreate: describeVpcCreate,
  create: (path, size, options) => createVpc(path, vpcSpecFromOptions(size, options)),
};
