/**
 * `qimg serve [-p PORT] [-b ADDR] [-k SOCKET] [-x NAME] [-D TEXT] [-r] [-f FMT] [-e N]
 * [-t] [-s] [-l SNAPSHOT] [-A] [-B BITMAP] [-n] [--cache MODE] [--aio MODE] [--discard MODE]
 * [--detect-zeroes MODE] [--fork] [--pid-file PATH] [--object OBJDEF]
 * [--tls-creds ID] [--image-opts] FILE`: serves an image over NBD with qemu-nbd's option
 * letters and meanings, but bound to 127.0.0.1 unless -b says otherwise.
 */
import { spawn } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import type { Command } from 'commander';
import { QimgError } from '../../core/errors.js';
import type { BlockImage } from '../../core/block-image.js';
import { NBD_DEFAULT_PORT } from '../../io/nbd/protocol.js';
import { openSnapshotView, parseSnapshotParam } from '../../ops/snapshot-param.js';
import { NbdExport, type ExportedBitmap } from '../../serve/export.js';
import { NbdServer, type ListenAddress } from '../../serve/server.js';
import { openTemporaryOverlay } from '../../serve/temporary-overlay.js';
import { TlsServerCreds, type TlsCredsSpec } from '../../serve/tls.js';
import { UsageError, writeErrorLines } from '../errors.js';
import { programName } from '../../core/program-name.js';
import { NbdConnection } from '../../io/nbd/connection.js';
import type { NbdClientTls } from '../../io/nbd/tls-client.js';
import type { NbdAddress } from '../../io/nbd/uri.js';
import { formatExportList } from '../output/nbd-list.js';
import { splitAuthzObjects, splitTlsObjects } from '../tls-objects.js';
import { addImageOptsOption, addObjectOption, withObjects, writeOut } from './common.js';
import { openResolved, resolveImage } from './image-opts.js';

/** Set in the environment of the server process `--fork` starts. */
const DAEMON_ENV = 'QIMG_SERVE_DAEMON';

interface ServeFlags {
  port?: string;
  bind?: string;
  socket?: string;
  exportName: string;
  description?: string;
  readOnly?: boolean;
  format?: string;
  shared: string;
  persistent?: boolean;
  loadSnapshot?: string;
  snapshot?: boolean;
  list?: boolean;
  nocache?: boolean;
  cache?: string;
  aio?: string;
  discard?: string;
  detectZeroes?: string;
  allocationDepth?: boolean;
  bitmap?: string;
  fork?: boolean;
  pidFile?: string;
  tlsCreds?: string;
  tlsAuthz?: string;
  object: string[];
  imageOpts?: boolean;
}

export function registerServe(program: Command, run: (file: string | undefined, fn: () => Promise<number | void>) => Promise<void>): void {
  const cmd = program
    .command('serve')
    .description('serve an image over NBD (qemu-nbd\'s options; listens on 127.0.0.1:10809 by default)')
    .option('-p, --port <port>', `TCP port to listen on (default ${NBD_DEFAULT_PORT})`)
    .option('-b, --bind <address>', 'address to listen on (default 127.0.0.1)')
    .option('-k, --socket <path>', 'listen on this unix socket instead of TCP')
    .option('-x, --export-name <name>', 'the export\'s name', '')
    .option('-D, --description <text>', 'a human-readable description of the export')
    .option('-r, --read-only', 'export read-only')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-e, --shared <num>', 'clients served at once (0: no limit)', '1')
    .option('-t, --persistent', 'keep serving after the last client disconnects')
    .option('-s, --snapshot', 'serve a temporary overlay (in TMPDIR, deleted at exit): writes never reach the image')
    .option('-l, --load-snapshot <snapshot>', 'export an internal snapshot read-only: snapshot.id=ID,snapshot.name=NAME or ID_OR_NAME')
    .option('-A, --allocation-depth', 'offer the qemu:allocation-depth metadata context')
    .option('-B, --bitmap <name>', 'offer persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME context')
    .option('-n, --nocache', 'the same as --cache=none')
    .option('--cache <mode>', 'none, writeback (default), writethrough, directsync or unsafe: writethrough and directsync flush every change, unsafe drops flushes')
    .option('--aio <mode>', 'threads, native or io_uring (checked as qemu-nbd checks them; qimg has one I/O engine)')
    .option('--discard <mode>', 'ignore (default: trims are answered, nothing freed) or unmap')
    .option('--detect-zeroes <mode>', 'off (default), on or unmap: writes of zeros become zeroing')
    .option('-L, --list', 'list the exports of another NBD server (-k or -b/-p say where) as qemu-nbd -L does')
    .option('--fork', 'start the server in the background; return once it listens')
    .option('--pid-file <path>', 'write the server\'s process id to this file')
    .option('--tls-authz <id>', 'let in only the TLS client --object authz-simple,id=ID,identity=NAME names (certificate DN or PSK username)')
    .option('--tls-creds <id>', 'require TLS with the credentials of --object tls-creds-psk|tls-creds-x509,id=ID,dir=DIR,endpoint=server');
  addObjectOption(cmd);
  addImageOptsOption(cmd)
    .argument('[filename]')
    .action((filename: string | undefined, opts: ServeFlags) =>
      run(opts.imageOpts ? undefined : filename, async () => {
        if (opts.list) return listServer(filename, opts);
        if (filename === undefined) {
          writeErrorLines(`${programName()}: Expecting one image file name`, `Try '${programName()} --help' for more information`);
          return 1;
        }
        const { tlsSpecs, others: nonTls } = splitTlsObjects(opts.object, 'server');
        const { authz, others } = splitAuthzObjects(nonTls);
        if (opts.tlsAuthz !== undefined && opts.tlsCreds === undefined) throw new UsageError('--tls-authz is not permitted without --tls-creds');
        const allowed = opts.tlsAuthz !== undefined ? authz.get(opts.tlsAuthz) : undefined;
        if (opts.tlsAuthz !== undefined && allowed === undefined) throw new UsageError(`No authorization object with id '${opts.tlsAuthz}' (qimg takes authz-simple)`);
        const settings = checkFlags(opts, tlsSpecs);
        if (opts.fork && process.env[DAEMON_ENV] !== '1') return forkServer();
        const daemon = process.env[DAEMON_ENV] === '1';
        delete process.env[DAEMON_ENV];
        return withObjects(others, async (secrets) => {
          const tls = settings.tls ? TlsServerCreds.load(settings.tls, allowed) : undefined;
          const readOnly = !!opts.readOnly || opts.loadSnapshot !== undefined;
          const snapshot = opts.loadSnapshot !== undefined ? usage(() => parseSnapshotParam(opts.loadSnapshot!)) : undefined;
          if (settings.aioNeedsDirect) {
            throw new QimgError(`Failed to blk_new_open '${filename}': aio=native was specified, but it requires cache.direct=on, which was not specified.`, { file: '' });
          }
          const spec = await resolveImage(filename, { imageOpts: !!opts.imageOpts, format: opts.format, writable: !readOnly && !opts.snapshot, opensBacking: true, secrets });
          const overlay = opts.snapshot ? await openTemporaryOverlay({ path: spec.path, format: spec.format, imageOptions: spec.imageOptions, secrets }) : undefined;
          const base = overlay ? overlay.image : await openResolved(spec, { writable: !readOnly, secrets });
          let img: BlockImage = base;
          let server: NbdServer | undefined;
          try {
            if (snapshot) img = await openSnapshotView(base, snapshot);
            const bitmap = opts.bitmap !== undefined ? await exportedBitmap(img, opts.bitmap, readOnly) : undefined;
            const exp = new NbdExport(img, {
              name: opts.exportName,
              description: opts.description,
              readOnly,
              shared: settings.shared !== 1,
              allocationDepth: !!opts.allocationDepth,
              bitmap,
              discard: settings.discard,
              detectZeroes: settings.detectZeroes,
              flushPolicy: settings.flushPolicy,
            });
            server = new NbdServer(exp, { address: settings.address, shared: settings.shared, persistent: !!opts.persistent, tls });
            await server.listen();
            const stop = () => void server!.stop();
            process.once('SIGTERM', stop);
            process.once('SIGINT', stop);
            if (opts.pidFile !== undefined) writePidFile(opts.pidFile);
            if (daemon) announceReady();
            await server.done;
            await server.stop();
          } finally {
            if (img !== base) await img.close().catch(() => undefined);
            // (the overlay's dispose closes it, then deletes its file)
            if (overlay) await overlay.dispose();
            else await base.close();
            if (opts.pidFile !== undefined && server) rmSync(opts.pidFile, { force: true });
          }
        });
      }),
    );
}

function usage<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw err instanceof QimgError ? new UsageError(err.message) : err;
  }
}

interface Settings {
  address: ListenAddress;
  shared: number;
  tls?: TlsCredsSpec;
  discard: 'ignore' | 'unmap';
  detectZeroes: 'off' | 'on' | 'unmap';
  flushPolicy: 'writeback' | 'writethrough' | 'unsafe';
  /** --aio=native needs a cache mode that bypasses the page cache: refused once the file is named */
  aioNeedsDirect: boolean;
}

/** `-L`: the exports of the server -k or -b/-p name, with qemu-nbd's refusals of what list mode ignores. */
async function listServer(filename: string | undefined, opts: ServeFlags): Promise<number> {
  if (filename !== undefined) throw new UsageError('List mode is incompatible with a file name');
  const perDevice = [opts.exportName !== '', opts.description, opts.format, opts.loadSnapshot, opts.bitmap, opts.allocationDepth, opts.discard, opts.nocache, opts.cache, opts.aio];
  if (perDevice.some((v) => v !== undefined && v !== false)) throw new UsageError('List mode is incompatible with per-device settings');
  if (opts.fork) throw new UsageError('List mode is incompatible with forking');
  const { tlsSpecs, others } = splitTlsObjects(opts.object);
  const settings = checkFlags(opts, tlsSpecs);
  return (
    (await withObjects(others, async () => {
      const tls: NbdClientTls | undefined = settings.tls ? { creds: settings.tls } : undefined;
      const a = settings.address;
      const addr: NbdAddress = 'path' in a ? { transport: 'unix', socket: a.path, exportName: '' } : { transport: 'tcp', host: a.host, port: a.port, exportName: '' };
      const list = await NbdConnection.listExports(addr, tls ? { tls } : {}).catch((err: unknown) => {
        throw new QimgError(err instanceof Error ? err.message : String(err), { file: '' });
      });
      await writeOut(formatExportList(list));
      return 0;
    })) ?? 0
  );
}

/** qemu-nbd's checks of the command line, before anything is opened. */
function checkFlags(opts: ServeFlags, tlsSpecs: Map<string, TlsCredsSpec>): Settings {
  let address: ListenAddress;
  if (opts.socket !== undefined) {
    if (opts.port !== undefined || opts.bind !== undefined) throw new UsageError('-p and -b cannot be used with -k (a unix socket)');
    address = { path: opts.socket };
  } else {
    const port = opts.port === undefined ? NBD_DEFAULT_PORT : Number(opts.port);
    if (!/^\d+$/.test(opts.port ?? '0') || !Number.isInteger(port) || port > 65535) throw new UsageError(`Invalid port '${opts.port}'`);
    address = { host: opts.bind ?? '127.0.0.1', port };
  }
  const shared = Number(opts.shared);
  if (!/^\d+$/.test(opts.shared) || !Number.isSafeInteger(shared)) throw new UsageError(`Invalid shared device number '${opts.shared}'`);
  if (opts.exportName.length > 4096) throw new UsageError('export name is too long (more than 4096 bytes)');
  if (opts.description !== undefined && opts.description.length > 4096) throw new UsageError('description is too long (more than 4096 bytes)');
  // (qemu-nbd lays the overlay over the loaded snapshot; qimg's snapshot views are read-only)
  if (opts.snapshot && opts.loadSnapshot !== undefined) throw new UsageError('qimg serve does not support -s together with -l');
  let tls: TlsCredsSpec | undefined;
  if (opts.tlsCreds !== undefined) {
    tls = tlsSpecs.get(opts.tlsCreds);
    if (!tls) throw new UsageError(`No TLS credentials with id '${opts.tlsCreds}'`);
  }
  return { address, shared, tls, ...ioFlags(opts) };
}

const CACHE_MODES: Record<string, Settings['flushPolicy']> = { none: 'writeback', off: 'writeback', writeback: 'writeback', writethrough: 'writethrough', directsync: 'writethrough', unsafe: 'unsafe' };

/** -n, --cache, --aio, --discard and --detect-zeroes, with qemu-nbd's refusals. */
function ioFlags(opts: ServeFlags): Pick<Settings, 'discard' | 'detectZeroes' | 'flushPolicy' | 'aioNeedsDirect'> {
  if (opts.nocache && opts.cache !== undefined) throw new UsageError('-n and --cache can only be specified once');
  const cache = opts.nocache ? 'none' : (opts.cache ?? 'writeback');
  const flushPolicy = CACHE_MODES[cache];
  if (!flushPolicy) throw new UsageError(`Invalid cache mode \`${cache}'`);
  const aio = opts.aio ?? 'threads';
  if (!['threads', 'native', 'io_uring'].includes(aio)) throw new UsageError(`Invalid aio mode '${aio}'`);
  const discardModes: Record<string, Settings['discard']> = { ignore: 'ignore', off: 'ignore', unmap: 'unmap', on: 'unmap' };
  const discard = discardModes[opts.discard ?? 'ignore'];
  if (!discard) throw new UsageError(`Invalid discard mode \`${opts.discard}'`);
  const detectZeroes = opts.detectZeroes ?? 'off';
  if (detectZeroes !== 'off' && detectZeroes !== 'on' && detectZeroes !== 'unmap') throw new UsageError(`Failed to parse detect_zeroes mode: invalid parameter value: ${detectZeroes}`);
  if (detectZeroes === 'unmap' && discard !== 'unmap') throw new UsageError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  return { discard, detectZeroes, flushPolicy, aioNeedsDirect: aio === 'native' && !['none', 'off', 'directsync'].includes(cache) };
}

/** The persistent bitmap -B names, refused as qemu-nbd refuses it. */
async function exportedBitmap(img: BlockImage, name: string, readOnly: boolean): Promise<ExportedBitmap> {
  if (!img.dirtyBitmap || !(await img.persistentBitmaps?.())?.some((b) => b.name === name)) throw new QimgError(`Bitmap '${name}' is not found`, { file: '' });
  const b = await img.dirtyBitmap(name);
  if (b.enabled && !readOnly) throw new QimgError(`Enabled bitmap '${name}' incompatible with writable export`, { file: '' });
  return { name, granularity: b.granularity, bits: b.bits };
}

function writePidFile(path: string): void {
  try {
    writeFileSync(path, `${process.pid}\n`);
  } catch (err) {
    throw new QimgError(`Failed to write pid file: ${(err as Error).message}`, { file: path });
  }
}

/**
 * --fork: runs the same command line as a detached server process and returns once it
 * listens (its errors until then are this command's), as qemu-nbd's parent does.
 */
function forkServer(): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
      env: { ...process.env, [DAEMON_ENV]: '1' },
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    let settled = false;
    child.stderr!.on('data', (d: Buffer) => process.stderr.write(d));
    child.on('message', (m) => {
      if (m !== 'ready' || settled) return;
      settled = true;
      child.stderr!.destroy();
      child.disconnect();
      child.unref();
      resolve(0);
    });
    child.on('exit', (code) => {
      if (settled) return;
      settled = true;
      resolve(code === 0 || code === null ? 1 : code);
    });
    child.on('error', () => {
      if (!settled) {
        settled = true;
        resolve(1);
      }
    });
  });
}

/** The server process --fork started: tell the parent it listens, then leave its stderr. */
function announceReady(): void {
  process.stderr.on('error', () => undefined);
  process.send?.('ready', () => process.disconnect?.());
}
