/**
 * `-` as a convert source: standard input, read in one forward pass. Only formats laid
 * out for that (raw, stream-optimized VMDK) can be read so; anything that needs to
 * seek (probing, qcow2, other VMDKs) is refused up front with one clear line.
 */
import type { BlockImage } from '../core/block-image.js';
import { findDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { STDIO_NAME, standardInput, stdinIsTerminal } from '../io/stdio.js';

export function isStdio(name: string): boolean {
  return name === STDIO_NAME;
}

/** Opens standard input as an image of `format` (which must be given). */
export async function openStdinSource(format: string | undefined): Promise<BlockImage> {
  const fail = (why: string) => new QimgError(why, { file: STDIO_NAME });
  if (format === undefined) {
    throw fail('probing the format of standard input needs random access; give it with -f raw or -f vmdk (stream-optimized)');
  }
  const driver = findDriver(format);
  if (!driver) throw fail(`Unknown driver '${format}'`);
  if (!driver.openSequential) {
    throw fail(`a ${driver.name} image needs random access; only raw and stream-optimized vmdk can be read from standard input`);
  }
  if (stdinIsTerminal()) throw fail('standard input is a terminal; pipe or redirect an image into it');
  return driver.openSequential(standardInput());
}
