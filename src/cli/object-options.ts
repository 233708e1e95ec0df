/**
 * `--object OBJDEF` as qemu-img 7.2 takes it: qemu's keyval syntax (`secret,id=s0,data=x`,
 * the first element naming `qom-type`, `,,` for a comma inside a value), then QAPI's
 * checks in qemu's order and with its messages. Only `secret` objects are created (into
 * a SecretStore, as Buffers): data= or file=, format=raw|base64, and keyid=/iv= for a
 * value encrypted with AES-256-CBC under another secret (crypto/secret_common.c).
 *
 * Messages never echo a secret: qemu quotes the "parameter" after an unescaped comma in
 * `data=` (a piece of the secret, in truth); qimg masks it.
 */
import { crypto } from '../core/lazy-builtins.js';
import { readFileSync } from 'node:fs';
import { QimgError, describeSystemError } from '../core/errors.js';
import type { SecretStore } from '../core/secrets.js';
import { qdictHash } from './output/json.js';

/** A refused --object (exit 1, no file name; the message may be two lines, as qemu's). */
export class ObjectError extends QimgError {
  constructor(message: string) {
    super(message, { file: '' });
  }
}

export type KvValue = string | KvDict;
export type KvDict = Map<string, KvValue>;

export interface Keyval {
  dict: KvDict;
  /** a bare `help` or `?` element */
  help: boolean;
  /** top-level keys whose element came right after a `data=` (likely part of the secret) */
  suspect: Set<string>;
}

/** What a masked piece of a command line reads as in messages. */
const MASK = '***';

/** qapi-util.c parse_qapi_name(): the length of the QAPI name at the start of `s`, or -1. */
function qapiNameLength(s: string): number {
  let p = 0;
  if (s[p] === '_') {
    // downstream extension prefix __RFQDN_
    p++;
    if (s[p] !== '_') return -1;
    while (++p < s.length && /[A-Za-z0-9.-]/.test(s[p]));
    if (s[p] !== '_') return -1;
    p++;
  }
  if (!/[A-Za-z]/.test(s[p] ?? '')) return -1;
  while (++p < s.length && /[A-Za-z0-9_-]/.test(s[p]));
  return p;
}

/**
 * util/keyval.c keyval_parse(): `key=value,...` into a tree (dotted keys nest; the
 * last of repeated keys wins); with `impliedKey`, a first element without `=` is its
 * value. Throws qemu's messages.
 */
export function parseKeyval(params: string, impliedKey?: string): Keyval {
  const dict: KvDict = new Map();
  const suspect = new Set<string>();
  let help = false;
  let s = 0;
  let implied = impliedKey;
  let afterData = false;
  while (s < params.length) {
    const rest = params.slice(s);
    const shown = (text: string) => (afterData ? MASK : text);
    let len = rest.search(/[=,]/);
    if (len < 0) len = rest.length;
    let key = rest;
    let keyEnd = len;
    let impliedValue: string | undefined;
    if (len > 0 && rest[len] !== '=') {
      const word = rest.slice(0, len);
      if (word === 'help' || word === '?') {
        help = true;
        s += len + (rest[len] === ',' ? 1 : 0);
        afterData = false;
        implied = undefined;
        continue;
      }
      if (implied !== undefined) {
        impliedValue = word;
        key = implied;
        keyEnd = implied.length;
      }
    }
    // key fragments: QAPI names, or (not first) decimal indexes
    const fragments: string[] = [];
    let f = 0;
    for (;;) {
      const frag = key.slice(f, keyEnd);
      let flen: number;
      if (f !== 0 && /^[0-9]/.test(frag)) flen = /^[0-9]+/.exec(frag)![0].length;
      else flen = Math.max(qapiNameLength(frag), 0);
      if (flen === 0 || (f + flen < keyEnd && key[f + flen] !== '.')) {
        throw new ObjectError(`Invalid parameter '${shown(key.slice(0, keyEnd))}'`);
      }
      if (flen >= 128) {
        const whole = f === 0 && f + flen === keyEnd;
        throw new ObjectError(`Parameter${whole ? '' : ' fragment'} '${shown(key.slice(f, f + flen))}' is too long`);
      }
      fragments.push(key.slice(f, f + flen));
      f += flen;
      if (key[f] !== '.') break;
      f++;
    }
    let value: string;
    if (impliedValue !== undefined) {
      value = impliedValue;
      s += len + (rest[len] === ',' ? 1 : 0);
    } else {
      if (key[f] !== '=') throw new ObjectError(`Expected '=' after parameter '${shown(key.slice(0, f))}'`);
      let p = f + 1;
      value = '';
      while (p < rest.length) {
        if (rest[p] === ',') {
          if (rest[p + 1] !== ',') {
            p++;
            break;
          }
          p++;
        }
        value += rest[p++];
      }
      s += p;
    }
    putKeyval(dict, fragments, value);
    if (afterData) suspect.add(fragments[0]);
    afterData = fragments.length === 1 && fragments[0] === 'data';
    implied = undefined;
  }
  return { dict, help, suspect };
}

function putKeyval(dict: KvDict, fragments: string[], value: string): void {
  let cur = dict;
  for (let i = 0; i < fragments.length - 1; i++) {
    const next = cur.get(fragments[i]);
    if (typeof next === 'string') throw new ObjectError(`Parameters '${fragments.slice(0, i + 1).join('.')}.*' used inconsistently`);
    if (next) cur = next;
    else {
      const d: KvDict = new Map();
      cur.set(fragments[i], d);
      cur = d;
    }
  }
  const last = fragments[fragments.length - 1];
  if (cur.get(last) instanceof Map) throw new ObjectError(`Parameters '${fragments.join('.')}.*' used inconsistently`);
  cur.set(last, value);
}

/** Every value of qemu 7.2's ObjectType with the members its QAPI schema requires (in order). */
const OBJECT_TYPES: Record<string, string[]> = {
  'authz-list': [],
  'authz-listfile': ['filename'],
  'authz-pam': ['service'],
  'authz-simple': ['identity'],
  'can-bus': [],
  'can-host-socketcan': ['if', 'canbus'],
  'colo-compare': ['primary_in', 'secondary_in', 'outdev', 'iothread'],
  'cryptodev-backend': [],
  'cryptodev-backend-builtin': [],
  'cryptodev-backend-lkcf': [],
  'cryptodev-vhost-user': ['chardev'],
  'dbus-vmstate': ['addr'],
  'filter-buffer': ['netdev', 'interval'],
  'filter-dump': ['netdev', 'file'],
  'filter-mirror': ['netdev', 'outdev'],
  'filter-redirector': ['netdev'],
  'filter-replay': ['netdev'],
  'filter-rewriter': ['netdev'],
  'input-barrier': ['name'],
  'input-linux': ['evdev'],
  iothread: [],
  'main-loop': [],
  'memory-backend-epc': ['size'],
  'memory-backend-file': ['size', 'mem-path'],
  'memory-backend-memfd': ['size'],
  'memory-backend-ram': ['size'],
  'pef-guest': [],
  'pr-manager-helper': ['path'],
  qtest: ['chardev'],
  'rng-builtin': [],
  'rng-egd': ['chardev'],
  'rng-random': [],
  secret: [],
  secret_keyring: ['serial'],
  'sev-guest': ['reduced-phys-bits'],
  'thread-context': [],
  's390-pv-guest': [],
  'throttle-group': [],
  'tls-creds-anon': [],
  'tls-creds-psk': [],
  'tls-creds-x509': [],
  'tls-cipher-suites': [],
  'x-remote-object': ['fd', 'devid'],
  'x-vfio-user-server': ['socket', 'device'],
};

/** The types qemu-img 7.2 can create; the others are "invalid object type" there. */
const QEMU_IMG_TYPES = new Set([
  'authz-list',
  'authz-simple',
  'main-loop',
  'pr-manager-helper',
  'secret',
  'secret_keyring',
  'thread-context',
  'throttle-group',
  'tls-cipher-suites',
  'tls-creds-anon',
  'tls-creds-psk',
  'tls-creds-x509',
]);

/** The secret object's members in QAPI visiting order (SecretCommonProperties, then SecretProperties). */
const SECRET_MEMBERS = ['loaded', 'format', 'keyid', 'iv', 'data', 'file'];

export const OBJECT_LIST_HELP = 'List of user creatable objects:\n  secret\n';
export const SECRET_HELP = 'secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n  iv=<string>\n  keyid=<string>\n';

/**
 * The help text an OBJDEF asks for (`help`, `secret,help`, an unknown type with
 * `help`), or undefined when it is not a help request qimg answers. Parse errors are
 * left for addObject to report.
 */
export function objectHelp(def: string): string | undefined {
  let kv: Keyval;
  try {
    kv = parseKeyval(def, 'qom-type');
  } catch {
    return undefined;
  }
  if (!kv.help) return undefined;
  const type = kv.dict.get('qom-type');
  if (type === 'secret') return SECRET_HELP;
  // qemu prints a creatable type's own options; qimg refuses those types (addObject)
  if (typeof type === 'string' && QEMU_IMG_TYPES.has(type)) return undefined;
  return OBJECT_LIST_HELP;
}

/** "Parameter 'id' expects an identifier" (qemu's id_wellformed). */
function checkId(id: string): void {
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) {
    throw new ObjectError("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
  }
}

/** A string member (or an error naming it when it was given with sub-keys). */
function stringMember(dict: KvDict, key: string): string | undefined {
  const v = dict.get(key);
  if (v instanceof Map) throw new ObjectError(`Parameters '${key}.*' are unexpected`);
  return v;
}

/**
 * Creates the object one --object describes, in qemu's order of checks: syntax,
 * type, id, members, id syntax, whether qemu-img (and qimg) can create the type,
 * duplicate id, then the secret's value. Help requests are answered by objectHelp.
 */
export function addObject(store: SecretStore, def: string): void {
  const kv = parseKeyval(def, 'qom-type');
  const { dict } = kv;
  const masked = (key: string) => (kv.suspect.has(key) ? MASK : key);
  if (kv.help) {
    // a help request objectHelp did not answer: a type qimg cannot create
    const type = dict.get('qom-type');
    throw new ObjectError(`object type '${typeof type === 'string' ? type : ''}' is not supported by qimg (only 'secret' is)`);
  }
  const type = stringMember(dict, 'qom-type');
  if (type === undefined) throw new ObjectError("Parameter 'qom-type' is missing");
  const required = OBJECT_TYPES[type];
  if (!required) throw new ObjectError(`Parameter 'qom-type' does not accept value '${type}'`);
  const id = stringMember(dict, 'id');
  if (id === undefined) throw new ObjectError("Parameter 'id' is missing");
  if (type !== 'secret') {
    for (const m of required) if (!dict.has(m)) throw new ObjectError(`Parameter '${m}' is missing`);
    checkId(id);
    if (!QEMU_IMG_TYPES.has(type)) throw new ObjectError(`invalid object type: ${type}`);
    throw new ObjectError(`object type '${type}' is not supported by qimg (only 'secret' is)`);
  }
  const members = new Map<string, string | undefined>();
  for (const m of SECRET_MEMBERS) members.set(m, stringMember(dict, m));
  const loaded = members.get('loaded');
  if (loaded !== undefined && !['on', 'yes', 'true', 'y', 'off', 'no', 'false', 'n'].includes(loaded)) {
    throw new ObjectError("Parameter 'loaded' expects 'on' or 'off'");
  }
  const format = members.get('format');
  if (format !== undefined && format !== 'raw' && format !== 'base64') {
    throw new ObjectError(`Parameter 'format' does not accept value '${format}'`);
  }
  // unexpected members: qemu names the first in its QDict's (hash) order
  const unexpected = [...dict.keys()]
    .map((k, i) => ({ k, i }))
    .filter(({ k }) => k !== 'qom-type' && k !== 'id' && !SECRET_MEMBERS.includes(k))
    .sort((a, b) => qdictHash(a.k) % 512 - qdictHash(b.k) % 512 || b.i - a.i);
  if (unexpected.length > 0) throw new ObjectError(`Parameter '${masked(unexpected[0].k)}' is unexpected`);
  checkId(id);
  if (loaded !== undefined) throw new ObjectError("Property 'secret.loaded' is not writable");
  if (store.has(id)) throw new ObjectError(`attempt to add duplicate property '${id}' to object (type 'container')`);
  store.add(id, loadSecret(store, members));
}

/** qcrypto_secret_complete(): the raw value from data= or file=, then decrypted or decoded. */
function loadSecret(store: SecretStore, m: Map<string, string | undefined>): Buffer {
  const data = m.get('data');
  const file = m.get('file');
  let input: Buffer;
  if (file !== undefined) {
    if (data !== undefined) throw new ObjectError("'file' and 'data' are mutually exclusive");
    input = readSecretFile(file);
  } else if (data !== undefined) {
    input = Buffer.from(data, 'utf8');
  } else {
    throw new ObjectError("Either 'file' or 'data' must be provided");
  }
  const base64 = m.get('format') === 'base64';
  const keyid = m.get('keyid');
  // the raw value is the secret itself; otherwise it is zeroed once decrypted or decoded
  if (keyid === undefined && !base64) return input;
  try {
    return keyid !== undefined ? decryptSecret(store, keyid, m.get('iv'), input, base64) : decodeBase64Buffer(input);
  } finally {
    input.fill(0);
  }
}

/** g_file_get_contents() with glib's messages, as qemu reports them. */
function readSecretFile(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const what = code === 'EISDIR' || code === 'EIO' ? 'Error reading file' : 'Failed to open file';
    throw new ObjectError(`Unable to read ${path}: ${what} \u201c${path}\u201d: ${describeSystemError(err)}`);
  }
}

/** qemu's qbase64_decode() validity checks, then glib's decoder; reads and writes Buffers only. */
export function decodeBase64Buffer(input: Buffer): Buffer {
  if (input.includes(0)) throw new ObjectError('Base64 data contains embedded NUL characters');
  for (const c of input) {
    if (base64Rank(c) < 0 && c !== 0x3d && c !== 0x0a) throw new ObjectError('Base64 data contains invalid characters');
  }
  return glibBase64Decode(input);
}

function base64Rank(c: number): number {
  if (c >= 0x41 && c <= 0x5a) return c - 0x41;
  if (c >= 0x61 && c <= 0x7a) return c - 0x61 + 26;
  if (c >= 0x30 && c <= 0x39) return c - 0x30 + 52;
  if (c === 0x2b) return 62;
  if (c === 0x2f) return 63;
  return -1;
}

/**
 * g_base64_decode(): characters outside the alphabet are skipped, '=' counts as a zero
 * digit, bytes come out per complete quartet (a trailing partial one is dropped).
 */
function glibBase64Decode(input: Buffer): Buffer {
  const out = Buffer.alloc(Math.floor((input.length * 3) / 4) + 3);
  let n = 0;
  let v = 0;
  let i = 0;
  let last0 = 0;
  let last1: number;
  for (const c of input) {
    const rank = c === 0x3d ? 0 : base64Rank(c);
    if (rank < 0) continue;
    last1 = last0;
    last0 = c;
    v = ((v << 6) | rank) & 0xffffff;
    if (++i === 4) {
      out[n++] = v >> 16;
      if (last1 !== 0x3d) out[n++] = (v >> 8) & 0xff;
      if (last0 !== 0x3d) out[n++] = v & 0xff;
      i = 0;
    }
  }
  const result = Buffer.from(out.subarray(0, n));
  out.fill(0);
  return result;
}

/** qcrypto_secret_decrypt(): AES-256-CBC under secret `keyid`, qemu's padding check. */
function decryptSecret(store: SecretStore, keyid: string, ivText: string | undefined, input: Buffer, base64: boolean): Buffer {
  if (!store.has(keyid)) throw new ObjectError(`No secret with id '${keyid}'`);
  const key = store.get(keyid);
  let iv: Buffer | undefined;
  let ciphertext: Buffer | undefined;
  let plain: Buffer | undefined;
  try {
    if (key.length !== 32) throw new ObjectError('Key should be 32 bytes in length');
    if (ivText === undefined) throw new ObjectError('IV is required to decrypt secret');
    iv = decodeBase64Buffer(Buffer.from(ivText, 'latin1'));
    if (iv.length !== 16) throw new ObjectError(`IV should be 16 bytes in length not ${iv.length}`);
    ciphertext = base64 ? decodeBase64Buffer(input) : Buffer.from(input);
    // qemu reads the byte before an empty plaintext; an empty secret is the sane answer
    if (ciphertext.length === 0) return Buffer.alloc(0);
    if (ciphertext.length % 16 !== 0) throw new ObjectError(`Length ${ciphertext.length} must be a multiple of block size 16`);
    const decipher = crypto().createDecipheriv('aes-256-cbc', key, iv).setAutoPadding(false);
    plain = Buffer.concat([decipher.update(ciphertext), decipher.final()]);
    const pad = plain[plain.length - 1];
    if (pad > 16 || pad > plain.length) throw new ObjectError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
    return Buffer.from(plain.subarray(0, plain.length - pad));
  } finally {
    key.fill(0);
    iv?.fill(0);
    ciphertext?.fill(0);
    plain?.fill(0);
  }
}

/** `text` with the value of every `data=` element (an object's secret) masked. */
export function maskSecretData(text: string): string {
  return text.replace(/(^|[,=])data=(?:[^,]|,,)*/g, `$1data=${MASK}`);
}

/**
 * Runs every --object in order into `store` (a later keyid= can name an earlier
 * secret); the first refusal throws an ObjectError.
 */
export function addObjects(store: SecretStore, defs: readonly string[]): void {
  for (const def of defs) addObject(store, def);
}
