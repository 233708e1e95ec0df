/**
 * `--image-opts` / `--target-image-opts`: an image named by an option string
 * (`driver=qcow2,file.filename=x.qcow2,encrypt.key-secret=s0`) rather than a file name.
 * Parsed as qemu-img 7.2 parses it (QemuOpts: implied key `file`, `,,` escapes, the
 * last of repeated keys wins), then checked against what qimg supports, with qemu's
 * messages (`Could not open 'OPTS': Block format 'raw' does not support the option 'x'`).
 *
 * What qimg takes (anything else is refused as qemu refuses an unknown option):
 * - `driver` (the format; probed when absent), `file.filename`, `file.driver=file`
 *   (`host_device`/`host_cdrom` for block and character devices), `file.locking`
 *   (on/auto; off opens read-only images without locks, as -U; writers still lock);
 * - for every format: `force-share`, `read-only`, `node-name`, `cache.direct`,
 *   `cache.no-flush` (checked, not passed on);
 * - per format, passed to the driver in `imageOptions`: qcow2 and qcow
 *   `encrypt.key-secret`, `encrypt.format`; luks `key-secret`;
 * - `backing.KEY` for images with a backing file: KEY is checked against the backing
 *   file's format (recursively) and passed on (core strips the prefix for that layer).
 *   `backing.driver` and `backing.file.*` are refused: qimg opens backing files by the
 *   name and format their overlay records.
 */
import { statSync } from 'node:fs';
import { findDriver } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { BlockImage } from '../../core/block-image.js';
import { NBD_TLS_CREDS_OPTION, NBD_TLS_HOSTNAME_OPTION, openImage, type OpenOptions } from '../../core/open.js';
import { NBD_DEFAULT_PORT } from '../../io/nbd/protocol.js';
import { isNbdName } from '../../io/remote.js';
import type { ImageOptions, SecretStore } from '../../core/secrets.js';
import { UsageError, escapeControl, warn } from '../errors.js';
import { ObjectError } from '../object-options.js';
import { qdictOrder, quoteJson } from '../output/json.js';

/** An image argument resolved to what the open needs. */
export interface ImageSpec {
  /** the argument as given: a file name, or (--image-opts) the option string */
  arg: string;
  /** the image file */
  path: string;
  /** -f or driver= (probed when absent) */
  format?: string;
  /** options for the format drivers (see the module comment) */
  imageOptions?: ImageOptions;
  /** force-share=on, or file.locking=off on a read-only open */
  forceShare: boolean;
  /** --image-opts: messages name the image by the option string */
  imageOpts: boolean;
  /** the name `info` shows: the file name, or qemu's json:{...} when an option it keeps is set */
  displayName: string;
  /** the format `info` shows when it is not the driver's (`driver=nbd`: the export, read as raw) */
  displayFormat?: string;
}

export interface ResolveContext {
  /** --image-opts (or --target-image-opts) was given */
  imageOpts: boolean;
  /** -f (or -O for a convert target) */
  format?: string;
  /** -U */
  forceShare?: boolean;
  /** the command opens the image read-write */
  writable?: boolean;
  /** the command opens backing files (not `info`, not `rebase -u`) */
  opensBacking?: boolean;
  secrets?: SecretStore;
}

/** Format-level options qimg passes to each format's driver; the first list is what qemu shows in json: names. */
const FORMAT_OPTIONS: Record<string, { passed: string[]; strong: string[] }> = {
  qcow2: { passed: ['encrypt.key-secret', 'encrypt.format'], strong: ['encrypt.key-secret'] },
  qcow: { passed: ['encrypt.key-secret', 'encrypt.format'], strong: ['encrypt.key-secret'] },
  luks: { passed: ['key-secret'], strong: ['key-secret'] },
};

/** Block-layer options every format takes (checked, not passed on). */
const BOOL_OPTIONS = ['force-share', 'read-only', 'cache.direct', 'cache.no-flush'];
const GENERIC_OPTIONS = new Set([...BOOL_OPTIONS, 'node-name']);

const FILE_DRIVERS = ['file', 'host_device', 'host_cdrom'];
/** qemu's curl protocols qimg reads (`file.driver=https,file.url=...`). */
const CURL_DRIVERS = ['http', 'https'];
/** The `file.` options qimg takes (the protocol node's). */
const FILE_OPTIONS = ['filename', 'driver', 'locking'];

/** QemuOpts (util/qemu-option.c) parse of an option string: [name, value] in order. */
export function parseQemuOpts(text: string, impliedName = 'file', onWarning: (lines: string) => void = printWarning): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let p = 0;
  let first = true;
  while (p < text.length) {
    const rest = text.slice(p);
    let len = rest.search(/[=,]/);
    if (len < 0) len = rest.length;
    let name: string;
    let value: string;
    let end: number;
    if (rest[len] !== '=') {
      if (first) {
        name = impliedName;
        [value, end] = optValue(rest, 0);
      } else {
        // a bare name is a flag: "x" is x=on, "nox" x=off (deprecated, with a warning)
        const word = rest.slice(0, len);
        const no = word.startsWith('no');
        name = no ? word.slice(2) : word;
        value = no ? 'off' : 'on';
        end = len;
        if (no || !(word === 'help' || word === '?')) {
          onWarning(`short-form boolean option '${word}' deprecated\nPlease use ${name}=${value} instead`);
        }
      }
    } else {
      name = rest.slice(0, len);
      [value, end] = optValue(rest, len + 1);
    }
    out.push([name, value]);
    first = false;
    p += end + (rest[end] === ',' ? 1 : 0);
  }
  return out;
}

/** A QemuOpts value from `start`: up to a single comma, `,,` standing for one. */
function optValue(s: string, start: number): [string, number] {
  let value = '';
  let p = start;
  for (;;) {
    const comma = s.indexOf(',', p);
    const stop = comma < 0 ? s.length : comma;
    value += s.slice(p, stop);
    if (comma < 0 || s[comma + 1] !== ',') return [value, stop];
    value += ',';
    p = comma + 2;
  }
}

function printWarning(lines: string): void {
  const [first, ...more] = lines.split('\n');
  warn(first);
  for (const l of more) process.stderr.write(escapeControl(l) + '\n');
}

const BOOL_VALUES = ['on', 'yes', 'true', 'y', 'off', 'no', 'false', 'n'];
const isOn = (v: string | undefined) => v !== undefined && ['on', 'yes', 'true', 'y'].includes(v);

/**
 * The image an argument names: a plain file name (with -f), or an --image-opts option
 * string checked as qemu checks it, in qemu's order, and opened once for metadata
 * (as `info` does: no secrets needed) to learn the format and validate the options
 * against it and its backing chain. Errors are qemu's ("Could not open 'OPTS': ...").
 */
export async function resolveImage(arg: string, ctx: ResolveContext): Promise<ImageSpec> {
  // a `json:{...}` name on the command line is an option set too (never one read from an image)
  const json = !ctx.imageOpts && arg.startsWith('json:');
  if (!ctx.imageOpts && !json) return { arg, path: arg, format: ctx.format, forceShare: !!ctx.forceShare, imageOpts: false, displayName: arg };
  if (ctx.imageOpts && ctx.format !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive');
  const fail = (msg: string) => new QimgError(`Could not open '${arg}': ${msg}`, { file: '' });

  const opts = json ? jsonOptions(arg.slice('json:'.length), fail) : new Map<string, string>();
  if (json && ctx.format !== undefined) opts.set('driver', ctx.format); // (-f wins over the name's driver, as in qemu)
  if (!json) {
    for (const [k, v] of parseQemuOpts(arg)) {
      // QemuOpts takes "id" as the options' own id (validated), then the block layer refuses it
      if (k === 'id' && !/^[A-Za-z][A-Za-z0-9._-]*$/.test(v)) {
        throw new ObjectError("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
      }
      opts.set(k, v);
    }
  }

  // driver=nbd: the export itself is the image (its bytes raw), as qemu opens a protocol node
  const nbdNode = opts.get('driver') === 'nbd';
  if (nbdNode) nbdAsFileNode(opts);
  const hasFile = [...opts.keys()].some((k) => k.startsWith('file.'));
  const ref = opts.get('file');
  if (ref !== undefined) {
    // file=NAME names an existing block node, which qemu-img never has
    if (hasFile) throw fail('Cannot reference an existing block device with additional options or a new filename');
    throw fail(`Cannot find device='${ref}' nor node-name='${ref}'`);
  }
  const driverName = opts.get('driver');
  if (driverName === undefined && !hasFile) throw fail('Must specify either driver or file');
  const driver = driverName !== undefined ? findDriver(driverName) : undefined;
  if (driverName !== undefined && !driver) throw fail(`Unknown driver '${driverName}'`);
  const fileDriver = opts.get('file.driver');
  if (fileDriver !== undefined && !FILE_DRIVERS.includes(fileDriver) && !CURL_DRIVERS.includes(fileDriver) && fileDriver !== 'nbd') throw fail(`Unknown driver '${fileDriver}'`);
  const nbd = fileDriver === 'nbd' || (fileDriver === undefined && isNbdName(opts.get('file.filename') ?? ''));
  // an NBD export's TLS options go to the protocol client (core/open.ts), not to the format
  const protocolOptions: Record<string, string> = {};
  const path = nbd ? nbdName(opts, protocolOptions, fail) : fileDriver !== undefined && CURL_DRIVERS.includes(fileDriver) ? curlUrl(fileDriver, opts, fail) : opts.get('file.filename');
  if (path === undefined) {
    throw fail(fileDriver !== undefined ? `The '${fileDriver}' block driver requires a file name` : 'A block device must be specified for "file"');
  }
  if (path === '') throw fail(`The '${fileDriver ?? 'file'}' block driver requires a file name`);

  // values the block layer parses before opening anything
  const locking = opts.get('file.locking');
  if (locking !== undefined && !['on', 'off', 'auto'].includes(locking)) throw fail(`invalid parameter value: ${locking}`);
  for (const k of BOOL_OPTIONS) {
    const v = opts.get(k);
    if (v !== undefined && !BOOL_VALUES.includes(v)) throw fail(`Parameter '${k}' expects 'on' or 'off'`);
  }
  const nodeName = opts.get('node-name');
  if (nodeName !== undefined && !/^[A-Za-z][A-Za-z0-9._-]*$/.test(nodeName)) throw fail(`Invalid node-name: '${nodeName}'`);
  const forceShareOpt = opts.get('force-share');
  if (ctx.forceShare && forceShareOpt !== undefined && !isOn(forceShareOpt)) throw new UsageError('--force-share/-U conflicts with image options');
  if (fileDriver === 'host_device' || fileDriver === 'host_cdrom') {
    const st = statSafe(path);
    if (st && !st.isBlockDevice() && !st.isCharacterDevice()) throw fail(`'${fileDriver}' driver requires '${path}' to be either a character or block device`);
  }
  // the protocol node refuses its unknown options once the file is open (a missing file is reported first)
  const fileUnknown = [...opts.keys()].filter((k) => k.startsWith('file.') && !FILE_OPTIONS.includes(k.slice('file.'.length))).map((k) => k.slice('file.'.length));
  if (fileUnknown.length > 0 && statSafe(path)) {
    const first = Object.keys(qdictOrder(Object.fromEntries(fileUnknown.map((k) => [k, 1]))))[0];
    throw fail(`Block protocol '${fileDriver ?? 'file'}' doesn't support the option '${first}'`);
  }
  if (ctx.writable && isOn(opts.get('read-only'))) throw fail('Block node is read-only');
  if (ctx.writable && isOn(forceShareOpt)) throw fail('force-share=on can only be used with read-only images');
  const forceShare = !!ctx.forceShare || isOn(forceShareOpt) || (!ctx.writable && locking === 'off');

  // the options for the format (everything but driver, file.* and the generic ones)
  const formatKeys = [...opts.keys()].filter((k) => k !== 'driver' && !k.startsWith('file.') && !GENERIC_OPTIONS.has(k));
  const imageOptions: Record<string, string> = {};
  for (const k of formatKeys) imageOptions[k] = opts.get(k)!;

  // open once for metadata (the file, the format, the header), then the options against it
  const wantBacking = !!ctx.opensBacking && formatKeys.some((k) => k.startsWith('backing.'));
  let layer: Layer;
  try {
    layer = await openLayer(path, driver?.name, ctx.secrets, { ...imageOptions, ...protocolOptions }, wantBacking);
  } catch (err) {
    throw fail(err instanceof Error ? err.message : String(err));
  }
  try {
    await checkLayerOptions(layer, imageOptions, !!ctx.opensBacking, ctx.secrets);
  } catch (err) {
    if (err instanceof LayerOptionError) throw fail(err.message);
    throw err;
  }
  return {
    arg,
    path,
    format: layer.format,
    imageOptions: withProtocolOptions(passedOptions(imageOptions), protocolOptions),
    forceShare,
    imageOpts: true,
    displayName: displayName(path, layer.format, imageOptions),
    ...(nbdNode ? { displayFormat: 'nbd' } : {}),
  };
}

/**
 * Opens a resolved image (the CLI's own opens: map, compare, measure); with
 * --image-opts a failure is qemu's "Could not open 'OPTS': ...".
 */
export async function openResolved(spec: ImageSpec, extra: Omit<OpenOptions, 'format' | 'imageOptions'> = {}): Promise<BlockImage> {
  try {
    return await openImage(spec.path, { format: spec.format, imageOptions: spec.imageOptions, ...extra, forceShare: spec.forceShare || extra.forceShare });
  } catch (err) {
    if (spec.imageOpts && err instanceof QimgError) throw new QimgError(`Could not open '${spec.arg}': ${err.message}`, { file: '', exitCode: err.exitCode, cause: err });
    throw err;
  }
}

/**
 * The URL of a curl protocol node, with qemu's messages for a missing or mismatched
 * one. The curl tuning options (readahead, timeout, sslverify, cookies, credentials)
 * are refused rather than ignored: qimg takes its own (QIMG_HTTP_TIMEOUT, the system
 * CAs).
 */
function curlUrl(driver: string, opts: Map<string, string>, fail: (message: string) => QimgError): string {
  const other = [...opts.keys()].find((k) => k.startsWith('file.') && k !== 'file.driver' && k !== 'file.url');
  const url = opts.get('file.url');
  if (url === undefined) throw fail("curl block driver requires an 'url' option");
  if (!url.toLowerCase().startsWith(`${driver}://`)) throw fail(`${driver} curl driver cannot handle the URL '${url}' (does not start with '${driver}://')`);
  if (other !== undefined) throw fail(`qimg does not support the option '${other.slice('file.'.length)}' of the '${driver}' driver`);
  return url;
}

/**
 * The options of a `json:{...}` name: nested objects flattened to dotted keys
 * (`{"file": {"filename": "x"}}` is `file.filename=x`), numbers as written, booleans
 * on/off. qemu's refusals of what is not an object.
 */
function jsonOptions(text: string, fail: (message: string) => QimgError): Map<string, string> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw fail(`Could not parse the JSON options: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw fail('Invalid JSON object given');
  const out = new Map<string, string>();
  const walk = (obj: Record<string, unknown>, prefix: string): void => {
    for (const [k, v] of Object.entries(obj)) {
      const key = prefix + k;
      if (typeof v === 'string') out.set(key, v);
      else if (typeof v === 'number') out.set(key, String(v));
      else if (typeof v === 'boolean') out.set(key, v ? 'on' : 'off');
      else if (typeof v === 'object' && v !== null && !Array.isArray(v)) walk(v as Record<string, unknown>, `${key}.`);
      else throw fail(`Invalid parameter type for '${key}', expected: string`);
    }
  };
  walk(parsed as Record<string, unknown>, '');
  return out;
}

/** `driver=nbd,KEY=...` as `driver=raw,file.driver=nbd,file.KEY=...` (the block layer's own options stay on top). */
function nbdAsFileNode(opts: Map<string, string>): void {
  const moved = [...opts.entries()].filter(([k]) => k !== 'driver' && !GENERIC_OPTIONS.has(k));
  for (const [k] of moved) opts.delete(k);
  opts.set('driver', 'raw');
  opts.set('file.driver', 'nbd');
  for (const [k, v] of moved) opts.set(`file.${k}`, v);
}

/** The options of qemu's nbd protocol node qimg takes (`server.*` or the legacy `host`/`port`/`path`, or a `filename` URL). */
const NBD_OPTIONS = ['driver', 'filename', 'server.type', 'server.host', 'server.port', 'server.path', 'host', 'port', 'path', 'export', 'tls-creds', 'tls-hostname'];

/**
 * The NBD name (see io/nbd/uri.ts) the `file.` options of an nbd node give: a
 * `filename` URL, or an address (`server.type=inet|unix` with `server.host`,
 * `server.port`, `server.path`; or the legacy `host`, `port`, `path`) and `export`.
 * The TLS options (`tls-creds`, `tls-hostname`) go into `protocol`. qemu's messages.
 */
function nbdName(opts: Map<string, string>, protocol: Record<string, string>, fail: (message: string) => QimgError): string {
  const nbd = new Map([...opts.entries()].filter(([k]) => k.startsWith('file.')).map(([k, v]) => [k.slice('file.'.length), v]));
  const other = [...nbd.keys()].find((k) => !NBD_OPTIONS.includes(k));
  if (other !== undefined) throw fail(`Block protocol 'nbd' doesn't support the option '${other}'`);
  for (const key of [NBD_TLS_CREDS_OPTION, NBD_TLS_HOSTNAME_OPTION]) {
    const v = opts.get(key);
    if (v !== undefined) protocol[key] = v;
  }
  const address = ['server.type', 'server.host', 'server.port', 'server.path', 'host', 'port', 'path', 'export'].filter((k) => nbd.has(k));
  const url = nbd.get('filename');
  if (url !== undefined) {
    if (address.length > 0) throw fail('No valid URL specified');
    return url;
  }
  const legacy = ['host', 'port', 'path'].some((k) => nbd.has(k));
  // (qemu names the members of server without their prefix in these messages)
  const modern = [...nbd.keys()].some((k) => k.startsWith('server.'));
  if (legacy && modern) throw fail("Cannot use 'server' and path/host/port at the same time");
  const type = modern ? nbd.get('server.type') : nbd.has('path') ? 'unix' : nbd.has('host') ? 'inet' : undefined;
  const host = nbd.get(modern ? 'server.host' : 'host');
  const port = nbd.get(modern ? 'server.port' : 'port');
  const socket = nbd.get(modern ? 'server.path' : 'path');
  if (type === undefined) throw fail(modern ? "Parameter 'server.type' is missing" : 'NBD server address missing');
  // the names qemu gives such a node (nbd_refresh_filename): no export, no path after the address
  const exportName = nbd.get('export') ?? '';
  const exportPath = exportName === '' ? '' : `/${encodeURIComponent(exportName)}`;
  if (type === 'unix') {
    if (!legacy && host !== undefined) throw fail("Parameter 'server.host' is unexpected");
    if (legacy && (host !== undefined || port !== undefined)) throw fail('path and host may not be used at the same time');
    if (socket === undefined || socket === '') throw fail("Parameter 'path' is missing");
    return `nbd+unix://${exportPath}?socket=${socket.replace(/[%&#]/g, encodeURIComponent)}`;
  }
  if (type !== 'inet') throw fail(`qimg does not support NBD server.type '${type}'`);
  if (socket !== undefined) throw fail(`Parameter '${modern ? 'server.path' : 'path'}' is unexpected`);
  if (host === undefined || host === '') throw fail("Parameter 'host' is missing");
  if (port !== undefined && !/^\d+$/.test(port)) throw fail(`error parsing address '${host}:${port}'`);
  return `nbd://${host.includes(':') ? `[${host}]` : encodeURIComponent(host)}:${port ?? NBD_DEFAULT_PORT}${exportPath}`;
}

/** The format's options with the protocol node's (an NBD export's TLS) beside them. */
function withProtocolOptions(options: ImageOptions | undefined, protocol: Record<string, string>): ImageOptions | undefined {
  if (Object.keys(protocol).length === 0) return options;
  return { ...options, ...protocol };
}

function statSafe(path: string) {
  try {
    return statSync(path);
  } catch {
    return undefined;
  }
}

/** One image of the chain as the checks need it. */
interface Layer {
  format: string;
  supportsBacking: boolean;
  /** the backing file's resolved name and recorded format (when asked for and present) */
  backing?: { name: string; format?: string };
}

async function openLayer(path: string, format: string | undefined, secrets: SecretStore | undefined, imageOptions: ImageOptions | undefined, wantBacking: boolean): Promise<Layer> {
  const img = await openImage(path, { format, metadataOnly: true, forceShare: true, secrets, imageOptions });
  try {
    const supportsBacking = !!findDriver(img.format)?.createOptions.some((o) => o.name === 'backing_file');
    if (!wantBacking) return { format: img.format, supportsBacking };
    const info = await img.info();
    const name = info.fullBackingFilename ?? info.backingFilename;
    return { format: img.format, supportsBacking: supportsBacking || name !== undefined, backing: name !== undefined ? { name, format: info.backingFilenameFormat } : undefined };
  } finally {
    await img.close();
  }
}

/** A refused option of one layer (the caller names the image). */
class LayerOptionError extends Error {}

/**
 * The options of one layer against its format, in qemu's order: the backing file's
 * options first (each level adding "Could not open backing file: "), then the first
 * of this layer's unknown options in QDict order.
 */
async function checkLayerOptions(layer: Layer, options: Record<string, string>, opensBacking: boolean, secrets?: SecretStore): Promise<void> {
  const allowed = FORMAT_OPTIONS[layer.format]?.passed ?? [];
  const backing: Record<string, string> = {};
  for (const [k, v] of Object.entries(options)) if (k.startsWith('backing.')) backing[k.slice('backing.'.length)] = v;
  if (opensBacking && Object.keys(backing).length > 0) await checkBackingOptions(layer, backing, secrets);
  const unknown = Object.keys(options).filter((k) => !allowed.includes(k) && !(opensBacking && k.startsWith('backing.')));
  if (unknown.length > 0) {
    const first = Object.keys(qdictOrder(Object.fromEntries(unknown.map((k) => [k, 1]))))[0];
    throw new LayerOptionError(`Block format '${layer.format}' does not support the option '${first}'`);
  }
}

async function checkBackingOptions(layer: Layer, options: Record<string, string>, secrets?: SecretStore): Promise<void> {
  if (!layer.supportsBacking) throw new LayerOptionError("Driver doesn't support backing files");
  const prefix = 'Could not open backing file: ';
  if (!layer.backing) throw new LayerOptionError(`${prefix}Must specify either driver or file`);
  const refused = Object.keys(options).find((k) => k === 'driver' || k === 'file' || k.startsWith('file.'));
  if (refused !== undefined) throw new LayerOptionError(`${prefix}qimg does not support the option '${refused}' for backing files`);
  const own = Object.fromEntries(Object.entries(options).filter(([k]) => !GENERIC_OPTIONS.has(k)));
  let below: Layer;
  try {
    below = await openLayer(layer.backing.name, layer.backing.format, secrets, undefined, Object.keys(own).some((k) => k.startsWith('backing.')));
  } catch {
    // the command's own open reports a backing file it cannot open
    return;
  }
  try {
    await checkLayerOptions(below, own, true, secrets);
  } catch (err) {
    if (err instanceof LayerOptionError) throw new LayerOptionError(prefix + err.message);
    throw err;
  }
}

/** The options the drivers get: the format's own and (recursively) the backing file's, generic ones dropped. */
function passedOptions(options: Record<string, string>): ImageOptions | undefined {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(options)) {
    let base = k;
    while (base.startsWith('backing.')) base = base.slice('backing.'.length);
    if (!GENERIC_OPTIONS.has(base)) out[k] = v;
  }
  return Object.keys(out).length ? out : undefined;
}

/**
 * qemu's name for an image opened with options: the file name, unless an option it
 * keeps ("strong": the key secrets) is set; then `json:{...}` of those options, the
 * driver and the file node, members in QDict (hash) order.
 */
export function displayName(path: string, format: string, options: Record<string, string>): string {
  const strong = FORMAT_OPTIONS[format]?.strong.filter((k) => options[k] !== undefined) ?? [];
  if (strong.length === 0) return path;
  const top: Record<string, unknown> = {};
  for (const k of strong) top[k] = options[k];
  top.driver = format;
  top.file = { driver: 'file', filename: path };
  return `json:${compactJson(qdictOrder(top))}`;
}

/** qemu's compact JSON (`{"a": "b", "c": {...}}`). */
function compactJson(value: unknown): string {
  if (typeof value === 'string') return quoteJson(value);
  if (typeof value === 'object' && value !== null) {
    return `{${Object.entries(value as Record<string, unknown>)
      .map(([k, v]) => `${quoteJson(k)}: ${compactJson(v)}`)
      .join(', ')}}`;
  }
  return JSON.stringify(value);
}
