/**
 * Secrets given with `--object secret,id=ID,...` (qemu's "secret" object) and looked
 * up by id wherever an image names one (`encrypt.key-secret=ID`, luks `key-secret=ID`).
 *
 * Values live in Buffers, never strings, so they can be zeroed: `destroy()` wipes every
 * secret when the command is done. A secret's value never appears in a message.
 */
import type { TlsCredsSpec } from '../io/tls-creds.js';
import { QimgError } from './errors.js';

export class SecretStore {
  private readonly secrets = new Map<string, Buffer>();
  /** TLS credential objects (`tls-creds-psk`, `tls-creds-x509`) by id: where their keys are */
  private readonly tls = new Map<string, TlsCredsSpec>();

  /** Registers TLS credentials (their files are read when a connection uses them). */
  addTlsCreds(spec: TlsCredsSpec): void {
    if (this.tls.has(spec.id) || this.secrets.has(spec.id)) throw new QimgError(`attempt to add duplicate property '${spec.id}' to object (type 'container')`);
    this.tls.set(spec.id, spec);
  }

  /** The TLS credentials `id` names, or qemu's message for an unknown id. */
  tlsCreds(id: string): TlsCredsSpec {
    const spec = this.tls.get(id);
    if (!spec) throw new QimgError(`No TLS credentials with id '${id}'`);
    return spec;
  }

  /** Registers a secret (the CLI's --object parser); a second one with the same id is refused as qemu does. */
  add(id: string, value: Buffer): void {
    if (this.secrets.has(id) || this.tls.has(id)) throw new QimgError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    this.secrets.set(id, value);
  }

  has(id: string): boolean {
    return this.secrets.has(id);
  }

  /**
   * A copy of the secret's bytes (the caller zeroes it after use), or qemu's message
   * for an unknown id.
   */
  get(id: string): Buffer {
    const value = this.secrets.get(id);
    if (!value) throw new QimgError(`No secret with id '${id}'`);
    return Buffer.from(value);
  }

  /** Zeroes and forgets every secret. */
  destroy(): void {
    for (const v of this.secrets.values()) v.fill(0);
    this.secrets.clear();
  }
}

/**
 * Options for one image beyond its file name and format, as `--image-opts` gives them
 * (`driver=qcow2,file.filename=x.qcow2,encrypt.key-secret=sec0`): the keys other than
 * `driver` and `file.filename`, with the prefix for the backing file (`backing.`) kept.
 */
export type ImageOptions = Readonly<Record<string, string>>;

/** The options that apply to an image's backing file (`backing.X` becomes `X`). */
export function backingImageOptions(opts: ImageOptions | undefined): ImageOptions | undefined {
  if (!opts) return undefined;
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(opts)) if (k.startsWith('backing.')) out[k.slice('backing.'.length)] = v;
  return Object.keys(out).length ? out : undefined;
}

/**
 * The bytes of the secret that option `option` names (`id`), or QEMU's refusal: the
 * option missing ("Parameter 'key-secret' is required for cipher"), or no such secret.
 * A copy: the caller zeroes it.
 */
export function requireSecret(secrets: SecretStore | undefined, id: string | undefined, option: string): Buffer {
  if (id === undefined) throw new QimgError(`Parameter '${option}' is required for cipher`);
  if (!secrets) throw new QimgError(`No secret with id '${id}'`);
  return secrets.get(id);
}
