/**
 * Opening images and backing chains: format from the caller, the image's header or
 * probing; relative backing names resolved against the naming image's directory;
 * loops and excessive depth refused (qemu-img can hang on a self-referencing chain).
 */
import { isAbsolute, resolve } from 'node:path';
import { realpathSync, statSync } from 'node:fs';
import type { BlockImage } from './block-image.js';
import { findDriver, probeDriver, type FormatDriver } from './driver.js';
import { QimgError } from './errors.js';
import { CacheBudget } from './cache-budget.js';
import { backingImageOptions, type ImageOptions, type SecretStore } from './secrets.js';
import { assertReferenceAllowed } from './open-policy.js';
import { ImageFile } from '../io/file.js';
import type { HostFile } from '../io/host.js';
import { isHttpName, isNbdName, isRemoteName, openRemote } from '../io/remote.js';
import type { NbdClientTls } from '../io/nbd/tls-client.js';
import { httpDirectoryOf } from '../io/http-url.js';

/** Longest backing chain qimg opens. */
export const MAX_CHAIN_DEPTH = 256;
/** Bytes read for format probing (as qemu). */
const PROBE_BYTES = 2048;

export interface OpenOptions {
  /** format of the image (-f); probed when absent */
  format?: string;
  /** open read-write */
  writable?: boolean;
  /**
   * open for metadata only (`info`): no backing file, no external data file, no
   * guest data reads, as qemu's "no I/O" opens
   */
  metadataOnly?: boolean;
  /** do not open the backing file (writes that never read through it: preallocation) */
  noBacking?: boolean;
  /** -U: take no image locks (read-only opens only) */
  forceShare?: boolean;
  /** take no locks on backing files (an operation that itself reopens one to write it) */
  shareBacking?: boolean;
  /** format of the backing file when the image does not record one */
  backingFormat?: string;
  /** format of an archive member opened by name (`-f` given with `x.ova/disk.vmdk`) */
  memberFormat?: string;
  /**
   * open for a consistency check (qemu's BDRV_O_CHECK): problems the format's check
   * reports (and may repair) do not fail the open
   */
  check?: boolean;
  /**
   * the metadata cache budget shared by every read-only layer of the chain; the
   * top-level open makes one when the caller gives none
   */
  cacheBudget?: CacheBudget;
  /** secrets from --object, for the images (and their backing files) that name one */
  secrets?: SecretStore;
  /**
   * --image-opts keys for this image beyond driver and file.filename (for example
   * `encrypt.key-secret`); `backing.`-prefixed keys go on to the backing file
   */
  imageOptions?: ImageOptions;
}

/** State shared by every image opened for one chain. */
export interface OpenContext {
  options: OpenOptions;
  /** real paths of the images above this one, top first */
  chain: string[];
  /**
   * a member of an archive image, from a name like `appliance.ova/disk2.vmdk` (the
   * archive is a regular file, so such a path cannot name anything else)
   */
  member?: string;
  /** the chain's metadata cache budget (see OpenOptions.cacheBudget) */
  cacheBudget?: CacheBudget;
  /** set once a dirty image has been repaired during this open */
  repairedDirty?: boolean;
  /** opens a backing (or other referenced) image in this chain */
  openBacking(name: string, format: string | undefined, from: string): Promise<BlockImage>;
  /**
   * opens an image stored inside this one's storage (an archive member: an OVA's
   * disk), probing its format when none is given; closing the image closes `host`
   */
  openNested(host: HostFile, format: string | undefined): Promise<BlockImage>;
}

/**
 * Resolves a file name stored in an image relative to that image's directory, the
 * way qemu combines them (so names in messages and `map` match qemu-img's).
 */
export function resolveRelative(name: string, imagePath: string): string {
  return joinBackingName(name, imagePath);
}

/**
 * What `info` prints as full-backing-filename: qemu joins the naming image's directory
 * and the name without normalising ("sub/../base.qcow2").
 */
export function joinBackingName(name: string, imagePath: string): string {
  // an absolute path stays a local path even under a URL, as in qemu; a URL stays itself
  if (isAbsolute(name) || isRemoteName(name)) return name;
  // an export's name has no directory others are relative to (see fullBackingName)
  if (isNbdName(imagePath)) return name;
  // under a URL: its path up to the last '/', never its query string (a signature)
  if (isHttpName(imagePath)) return httpDirectoryOf(imagePath) + name;
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

/**
 * full-backing-filename as `info` shows it: undefined when it cannot be known (a
 * relative name in an image on an NBD export: qemu's "cannot determine actual path").
 */
export function fullBackingName(name: string, imagePath: string): string | undefined {
  if (isNbdName(imagePath) && !isAbsolute(name) && !isRemoteName(name)) return undefined;
  return joinBackingName(name, imagePath);
}

export async function openImage(filename: string, options: OpenOptions = {}): Promise<BlockImage> {
  // `-` is standard input, which only convert reads (forward, in one pass)
  if (filename === '-') throw new QimgError("standard input ('-') can only be read by convert (with -f raw or -f vmdk)", { file: filename });
  return openInChain(filename, options.format, { ...options, cacheBudget: options.cacheBudget ?? new CacheBudget() }, []);
}

async function openInChain(
  filename: string,
  format: string | undefined,
  options: OpenOptions,
  chain: string[],
): Promise<BlockImage> {
  let real: string;
  try {
    real = isRemoteName(filename) ? filename : realpathSync(filename);
  } catch {
    real = resolve(filename);
  }
  if (chain.includes(real)) {
    throw new QimgError(`Backing file '${filename}' creates an infinite loop.`);
  }
  if (chain.length >= MAX_CHAIN_DEPTH) {
    throw new QimgError(`Backing chain is deeper than ${MAX_CHAIN_DEPTH} images`);
  }
  if (isRemoteName(filename)) return openRemoteInChain(filename, format, options, chain, real);
  const archived = splitArchivePath(filename);
  if (archived) {
    return openArchiveMember(archived.archive, archived.member, format, options, chain, real);
  }
  // open() of a FIFO without a writer never returns (qemu-img hangs there too), and
  // neither a FIFO nor a socket can be an image: refuse them before opening.
  const st = statOrUndefined(filename);
  if (st && (st.isFIFO() || st.isSocket())) {
    throw new QimgError(`Could not open '${filename}': not a regular file or block device`, { file: filename });
  }
  const writable = chain.length === 0 && !!options.writable;
  if (writable && options.forceShare) {
    throw new QimgError('force-share=on can only be used with read-only images', { file: filename });
  }
  // QEMU's locks: the image being written excludes other writers; every image read
  // excludes writers too, unless -U (or a backing file this operation reopens itself).
  const lock = options.forceShare || (chain.length > 0 && options.shareBacking) ? 'none' : writable ? 'write' : 'read';
  const file = await ImageFile.open(filename, { writable, lock });
  return openFormatOn(file, format, options, [...chain, real]);
}

/** An image on another host (NBD export, HTTP resource): no local locks or paths. */
async function openRemoteInChain(filename: string, format: string | undefined, options: OpenOptions, chain: string[], real: string): Promise<BlockImage> {
  const writable = chain.length === 0 && !!options.writable;
  const tls = remoteTls(options);
  const host = await openRemote(filename, { writable, ...(tls ? { tls } : {}) });
  return openFormatOn(host, format, options, [...chain, real]);
}

/** --image-opts keys of an NBD export's protocol node that qimg takes (qemu's names). */
export const NBD_TLS_CREDS_OPTION = 'file.tls-creds';
export const NBD_TLS_HOSTNAME_OPTION = 'file.tls-hostname';

/** The TLS an NBD export is opened with: `file.tls-creds=ID` (an --object) and `file.tls-hostname`. */
function remoteTls(options: OpenOptions): NbdClientTls | undefined {
  const id = options.imageOptions?.[NBD_TLS_CREDS_OPTION];
  if (id === undefined) return undefined;
  if (!options.secrets) throw new QimgError(`No TLS credentials with id '${id}'`);
  const hostname = options.imageOptions?.[NBD_TLS_HOSTNAME_OPTION];
  return { creds: options.secrets.tlsCreds(id), ...(hostname !== undefined ? { hostname } : {}) };
}

/** The image of format `format` (probed when absent) on an open host; the host is closed if that fails. */
async function openFormatOn(host: HostFile, format: string | undefined, options: OpenOptions, chain: string[]): Promise<BlockImage> {
  try {
    const driver = format ? findDriver(format) : undefined;
    if (format && !driver) throw new QimgError(`Unknown driver '${format}'`);
    return await openOnHost(host, driver, options, chain);
  } catch (err) {
    await host.close().catch(() => undefined);
    throw err;
  }
}

/**
 * `DIR/archive.ova/disk.vmdk`: when a path fails because one of its components is a
 * regular file, that file is an archive and the rest names a member in it.
 */
function splitArchivePath(filename: string): { archive: string; member: string } | undefined {
  try {
    statSync(filename);
    return undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOTDIR') return undefined;
  }
  for (let i = filename.lastIndexOf('/'); i > 0; i = filename.lastIndexOf('/', i - 1)) {
    const prefix = filename.slice(0, i);
    if (statOrUndefined(prefix)?.isFile()) return { archive: prefix, member: filename.slice(i + 1) };
  }
  return undefined;
}

/** Opens a member of an archive image: the archive's driver must know members. */
async function openArchiveMember(
  archive: string,
  member: string,
  format: string | undefined,
  options: OpenOptions,
  chain: string[],
  real: string,
): Promise<BlockImage> {
  if (options.writable) throw new QimgError(`Could not open '${archive}/${member}': members of an archive are read-only`, { file: archive });
  const file = await ImageFile.open(archive, { writable: false, lock: options.forceShare ? 'none' : 'read' });
  try {
    const driver = probeDriver(await probeHead(file), archive);
    if (!driver.archive) throw new QimgError(`Could not open '${archive}/${member}': Not a directory`, { file: archive });
    // -f names the member's format, not the archive's
    return await openOnHost(file, driver, { ...options, memberFormat: format }, [...chain, real], member);
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}

/**
 * What the probes see: as qemu, the first 2 KiB, zeros past the end of a shorter file
 * (a truncated header still probes as its format and then fails on its own terms); an
 * empty file gives an empty buffer (raw).
 */
async function probeHead(host: HostFile): Promise<Buffer> {
  const head = Buffer.alloc(host.size > 0 ? PROBE_BYTES : 0);
  if (head.length > 0) await host.read(head, 0);
  return head;
}

/** Opens `host` with `driver` (or the probed driver); `chain` already holds this image. */
async function openOnHost(
  host: HostFile,
  driver: FormatDriver | undefined,
  options: OpenOptions,
  chain: string[],
  member?: string,
): Promise<BlockImage> {
  if (!driver) {
    driver = probeDriver(await probeHead(host), host.path);
  }
  const ctx: OpenContext = {
    options,
    chain,
    member,
    cacheBudget: options.cacheBudget,
    openBacking: (name, fmt, from) => openBackingOf(name, fmt, from, options, chain),
    openNested: async (inner, fmt) => {
      const d = fmt ? findDriver(fmt) : undefined;
      if (fmt && !d) throw new QimgError(`Unknown driver '${fmt}'`);
      try {
        return await openOnHost(inner, d, options, chain);
      } catch (err) {
        await inner.close().catch(() => undefined);
        throw err;
      }
    },
  };
  return driver.open(host, ctx);
}

function statOrUndefined(path: string): ReturnType<typeof statSync> | undefined {
  try {
    return statSync(path);
  } catch {
    return undefined; // ImageFile.open reports it
  }
}

async function openBackingOf(
  name: string,
  format: string | undefined,
  from: string,
  options: OpenOptions,
  chain: string[],
): Promise<BlockImage> {
  if (isNbdName(from) && !isAbsolute(name) && !isRemoteName(name)) {
    throw new QimgError(`Could not open '${from}': Cannot generate a base directory for NBD nodes`, { file: from });
  }
  const path = resolveRelative(name, from);
  assertReferenceAllowed(path, from, 'backing file');
  try {
    return await openInChain(path, format, { ...options, writable: false, imageOptions: backingImageOptions(options.imageOptions) }, chain);
  } catch (err) {
    if (err instanceof QimgError && /infinite loop|deeper than/.test(err.message)) throw err;
    const msg = err instanceof Error ? err.message : String(err);
    throw new QimgError(`Could not open backing file: ${msg}`, { file: from, cause: err });
  }
}
