/** `amend`: change format options of an existing image in place. */
import { QimgError } from '../core/errors.js';
import { openImage } from '../core/open.js';
import { parseOptions } from '../core/options.js';
import { findDriver } from '../core/driver.js';
import { amendQcow2, planAmend } from '../formats/qcow2/amend.js';
import type { Qcow2Image } from '../formats/qcow2/driver.js';

export async function amendImage(filename: string, format: string | undefined, optionStrings: string[]): Promise<'help' | void> {
  if (optionStrings.length === 0) throw new QimgError('Must specify options (-o)');
  const probe = await openImage(filename, { format, metadataOnly: true });
  const fmt = probe.format;
  await probe.close();
  const driver = findDriver(fmt)!;
  const parsed = parseOptions(optionStrings, driver.createOptions);
  if (parsed.help) return 'help';
  if (fmt !== 'qcow2') throw new QimgError(`Format driver '${fmt}' does not support option amendment`, { file: filename });
  // Validate against the image before opening it for writing.
  const img = (await openImage(filename, { format: 'qcow2', writable: true, noBacking: true })) as Qcow2Image;
  let plan;
  try {
    plan = planAmend(img, parsed.values);
  } catch (err) {
    await img.close();
    throw err;
  }
  await amendQcow2(img, plan);
}
