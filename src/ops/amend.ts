/** `amend`: change format options of an existing image in place. */
import { QimgError } from '../core/errors.js';
import { openImage, type OpenOptions } from '../core/open.js';
import { parseOptions, type OptionSpec } from '../core/options.js';
import { findDriver, type FormatDriver } from '../core/driver.js';
import { amendQcow2Encryption, checkEncryptionAmend, hasEncryptionAmend } from '../formats/qcow2/encryption-amend.js';
import { amendQcow2, planAmend } from '../formats/qcow2/amend.js';
import type { Qcow2Image } from '../formats/qcow2/driver.js';

/** `extras`: --object secrets and --image-opts options for the image's opens. */
export async function amendImage(
  filename: string,
  format: string | undefined,
  optionStrings: string[],
  extras: Pick<OpenOptions, 'secrets' | 'imageOptions'> & { force?: boolean } = {},
): Promise<'help' | void> {
  if (optionStrings.length === 0) throw new QimgError('Must specify options (-o)');
  const probe = await openImage(filename, { format, metadataOnly: true, ...extras });
  const fmt = probe.format;
  await probe.close();
  const driver = findDriver(fmt)!;
  // a format with its own amend (luks) opens the image itself, with its key
  if (driver.amend) return driver.amend(filename, optionStrings, extras);
  const parsed = parseOptions(optionStrings, amendSchema(driver));
  if (parsed.help) return 'help';
  if (fmt !== 'qcow2') throw new QimgError(`Format driver '${fmt}' does not support option amendment`, { file: filename });
  // Validate against the image before opening it for writing.
  const img = (await openImage(filename, { format: 'qcow2', writable: true, noBacking: true, secrets: extras.secrets, imageOptions: extras.imageOptions })) as Qcow2Image;
  let plan;
  try {
    plan = planAmend(img, parsed.values);
    checkEncryptionAmend(img.header.cryptMethod, parsed.values);
    // key slots first: the LUKS header lives inside the image, which amendQcow2 then closes
    if (hasEncryptionAmend(parsed.values)) await amendQcow2Encryption(img, parsed.values, extras);
  } catch (err) {
    await img.close();
    throw err;
  }
  await amendQcow2(img, plan);
}

/** What `amend -o` parses: the create options plus those only amend has (qcow2's encrypt.keyslot, ...). */
export function amendSchema(driver: FormatDriver): OptionSpec[] {
  const schema = [...driver.createOptions];
  for (const o of driver.amendOptions ?? []) if (!schema.some((c) => c.name === o.name)) schema.push(o);
  return schema;
}
