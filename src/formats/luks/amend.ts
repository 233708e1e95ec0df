/**
 * `qemu-img amend` of a luks image: add a key slot (state=active, new-secret, keyslot,
 * iter-time) or erase slots (state=inactive, keyslot or old-secret). As QEMU does, the
 * image is opened (and unlocked with key-secret) before the options are read; the
 * refusals are QEMU's, printed without a file name as qemu-img prints them.
 */
import type { AmendContext } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import { openImage } from '../../core/open.js';
import { hasHelpOption, parseOptions, type ParsedOptions } from '../../core/options.js';
import { amendLuks1 } from '../../crypto/luks1.js';
import { defaultCalibrator } from '../../crypto/pbkdf.js';
import { calibratorFor } from './create.js';
import { LuksImage } from './image.js';
import { requireSecret } from '../../core/secrets.js';
import { asQimg, LUKS_MAX_PBKDF_ITERATIONS, luksAmendOptions, luksCreateOptions, parseU64 } from './options.js';

/** Like qemu's amend option parsing: a creation-only option gets its own note. */
function parseAmend(optionStrings: string[]): ParsedOptions {
  try {
    return parseOptions(optionStrings, luksAmendOptions);
  } catch (err) {
    const m = err instanceof QimgError ? /^Invalid parameter '(.*)'$/.exec(err.message) : null;
    if (m && luksCreateOptions.some((o) => o.name === m[1])) {
      throw new QimgError(`Invalid parameter '${m[1]}' (this option is only supported for image creation)`, { file: '' });
    }
    throw err instanceof QimgError ? new QimgError(err.message, { file: '' }) : err;
  }
}

/**
 * A keyslot as amendLuks1 takes it, from the option's text: QemuOpts reads -1 as
 * 2^64-1 (which a double cannot hold) and QAPI's int makes it -1 again; values beyond
 * 32 bits become -1, out of range as they are.
 */
function keyslotOf(text: string): number {
  const v = BigInt.asIntN(64, parseU64(text));
  return v >= -(2n ** 31n) && v < 2n ** 31n ? Number(v) : -1;
}

export async function amendLuksImage(filename: string, optionStrings: string[], ctx: AmendContext): Promise<'help' | void> {
  if (optionStrings.some(hasHelpOption)) return 'help';
  const img = await openImage(filename, { format: 'luks', writable: true, secrets: ctx.secrets, imageOptions: ctx.imageOptions });
  const secrets: Buffer[] = [];
  const secret = (id: string | undefined) => {
    if (id === undefined) return undefined;
    const b = requireSecret(ctx.secrets, id, 'key-secret');
    secrets.push(b);
    return b;
  };
  try {
    if (!(img instanceof LuksImage)) throw new QimgError(`'${filename}' is not a luks image`);
    const parsed = parseAmend(optionStrings);
    const o = parsed.values;
    const raw = (k: string) => parsed.raw.get(k) as string;
    const state = o.get('state') as string | undefined;
    if (state === undefined) throw new QimgError("Parameter 'state' is missing");
    if (state !== 'active' && state !== 'inactive') throw new QimgError(`Parameter 'state' does not accept value '${state}'`);
    const iterTime = o.has('iter-time') ? parseU64(raw('iter-time')) : undefined;
    const file = img.file;
    await amendLuks1(
      (offset, length) => file.readBytes(offset, length),
      (offset, buf) => file.write(buf, offset),
      {
        state,
        keyslot: o.has('keyslot') ? keyslotOf(raw('keyslot')) : undefined,
        newSecret: secret(o.get('new-secret') as string | undefined),
        oldSecret: secret(o.get('old-secret') as string | undefined),
        keySecret: secret(ctx.imageOptions?.['key-secret']),
        // beyond 2^53 only the overflow refusal (calibratorFor) can come of it
        iterTime: iterTime === undefined ? undefined : Number(iterTime > BigInt(Number.MAX_SAFE_INTEGER) ? BigInt(Number.MAX_SAFE_INTEGER) : iterTime),
        calibrate: calibratorFor(iterTime ?? 2000n, defaultCalibrator),
        force: ctx.force,
        fileName: filename,
        maxIterations: LUKS_MAX_PBKDF_ITERATIONS,
      },
    );
    await img.flush();
  } catch (err) {
    const e = asQimg(err);
    // qemu-img prints amend's refusals without the file name
    throw e instanceof QimgError && e.file === undefined ? new QimgError(e.message, { file: '', cause: err }) : e;
  } finally {
    for (const b of secrets) b.fill(0);
    await img.close();
  }
}
