/**
 * The `-o` options of qemu's standalone "luks" format (create, measure, amend): the
 * lists `qemu-img create -f luks -o help` and `qemu-img amend -f luks -o help` print,
 * the Formatting line, and the key secret lookup. Nothing here loads node:crypto (the
 * driver's static part; see spec.ts for the algorithm checks).
 */
import { QimgError } from '../../core/errors.js';
import type { OptionSpec, ParsedOptions } from '../../core/options.js';

export const luksCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'key-secret', type: 'string', help: 'ID of the secret that provides the keyslot passphrase' },
  { name: 'cipher-alg', type: 'string', help: 'Name of encryption cipher algorithm' },
  { name: 'cipher-mode', type: 'string', help: 'Name of encryption cipher mode' },
  { name: 'ivgen-alg', type: 'string', help: 'Name of IV generator algorithm' },
  { name: 'ivgen-hash-alg', type: 'string', help: 'Name of IV generator hash algorithm' },
  { name: 'hash-alg', type: 'string', help: 'Name of encryption hash algorithm' },
  { name: 'iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
  // The file protocol's (listed with a file name; qemu-img passes them to the file)
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)', protocol: true },
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)', protocol: true },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable', protocol: true },
];

/** qemu's amend_opts for luks (`qemu-img amend -f luks -o help`). */
export const luksAmendOptions: readonly OptionSpec[] = [
  { name: 'state', type: 'string', help: 'Select new state of affected keyslots (active/inactive)' },
  { name: 'keyslot', type: 'number', help: 'Select a single keyslot to modify explicitly' },
  { name: 'old-secret', type: 'string', help: 'Select all keyslots that match this password' },
  { name: 'new-secret', type: 'string', help: 'New secret to set in the matching keyslots. Empty string to erase' },
  { name: 'iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
];

/** The PBKDF2 iteration limit (shared with qcow2's LUKS): see src/crypto/luks1.ts. */
export { LUKS_MAX_PBKDF_ITERATIONS } from '../qcow2/luks.js';

/** "size=N key-secret=.. cipher-alg=.. ... iter-time=N", then the protocol options given, in qemu-img's order. */
export function describeLuksCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`];
  for (const k of ['key-secret', 'cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg']) {
    if (o.raw.has(k)) parts.push(`${k}=${o.raw.get(k)}`);
  }
  // numbers as qemu prints them, signed (iter-time=0x10 prints 16, -1 stays -1)
  if (o.values.has('iter-time')) parts.push(`iter-time=${u64Text(o.raw.get('iter-time')!)}`);
  if (o.raw.has('nocow')) parts.push(`nocow=${o.raw.get('nocow')}`);
  if (o.raw.has('preallocation')) parts.push(`preallocation=${o.raw.get('preallocation')}`);
  if (o.values.has('extent_size_hint')) parts.push(`extent_size_hint=${o.values.get('extent_size_hint')}`);
  return parts.join(' ');
}

/** A plain Error from src/crypto becomes a QimgError with its message; system errors stay. */
export function asQimg(err: unknown): unknown {
  if (err instanceof QimgError || !(err instanceof Error) || (err as NodeJS.ErrnoException).code !== undefined) return err;
  return new QimgError(err.message, { cause: err });
}

/** QemuOpts' number syntax (strtoull, base 0) as an unsigned 64-bit value. */
export function parseU64(text: string): bigint {
  const m = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return 0n;
  const digits = m[2];
  let v = /^0[xX]/.test(digits) ? BigInt(digits) : digits.length > 1 && digits.startsWith('0') ? BigInt('0o' + digits.slice(1)) : BigInt(digits);
  if (m[1] === '-') v = -v;
  return BigInt.asUintN(64, v);
}

function u64Text(text: string): string {
  return String(BigInt.asIntN(64, parseU64(text)));
}
