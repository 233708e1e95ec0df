/**
 * parallels: the Parallels expandable image format (qemu docs/interop/parallels.txt),
 * read and write as qemu 7.2 does.
 */
import type { FormatDriver } from '../../core/driver.js';
import { isParallelsMagic } from './header.js';
import { ParallelsImage } from './image.js';
import { createParallels, describeParallelsCreate, parallelsCreateOptions } from './create.js';

export const parallelsDriver: FormatDriver = {
  name: 'parallels',
  probe: (head) => (isParallelsMagic(head) ? 100 : 0),
  createOptions: parallelsCreateOptions,
  describeCreate: describeParallelsCreate,
  create: createParallels,
  check: async (filename, opts) => (await import('./check.js')).checkParallels(filename, opts),
  open: (file, ctx) => ParallelsImage.open(file, { writable: !!ctx.options.writable && file.writable }),
};
