/**
 * Image locking compatible with QEMU: open-file-description (OFD) byte-range locks on
 * the bytes QEMU uses, so qimg refuses an image a running QEMU, qemu-io or qemu-nbd
 * writes (and they refuse while qimg writes it). For each permission P, holding it
 * takes a shared lock on byte 100+P, refusing it to others takes one on byte 200+P;
 * a conflict is someone else's lock on the opposite byte. Without native support
 * (koffi unavailable) no locks are taken.
 */
import { loadKoffi } from './koffi.js';
import { QimgError } from '../core/errors.js';

const PERM_BASE = 100;
const SHARED_BASE = 200;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const READ = 0;
const WRITE = 1;
const RESIZE = 3;

const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;

export type LockMode = 'none' | 'read' | 'write';

/** What each mode holds and what it refuses to others (as qemu-img's opens). */
const MODES: Record<Exclude<LockMode, 'none'>, { perms: number[]; deny: number[] }> = {
  read: { perms: [READ], deny: [WRITE] },
  write: { perms: [READ, WRITE, RESIZE], deny: [WRITE, RESIZE] },
};

type Fcntl = (fd: number, cmd: number, type: string, arg: Buffer) => number;
let fcntl: Fcntl | null | undefined;

function loadFcntl(): Fcntl | null {
  if (fcntl !== undefined) return fcntl;
  fcntl = null;
  if (process.env.QIMG_NO_NATIVE === '1' || process.platform !== 'linux') return fcntl;
  try {
    const koffi = loadKoffi();
    const lib = koffi.load('libc.so.6');
    fcntl = lib.func('int fcntl(int fd, int cmd, ...)') as Fcntl;
  } catch {
    fcntl = null;
  }
  return fcntl;
}

/** struct flock on 64-bit Linux: type, whence, start, len, pid (0 for OFD locks). */
function flock(type: number, byte: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeInt16LE(type, 0);
  b.writeInt16LE(0, 2); // SEEK_SET
  b.writeBigInt64LE(BigInt(byte), 8);
  b.writeBigInt64LE(1n, 16);
  return b;
}

/** Someone else holds a lock on `byte` of this file. */
function heldByOthers(f: Fcntl, fd: number, byte: number): boolean {
  const b = flock(F_WRLCK, byte);
  if (f(fd, F_OFD_GETLK, 'void *', b) < 0) return false;
  return b.readInt16LE(0) !== F_UNLCK;
}

/** Takes QEMU's locks for `mode` on an open file; throws when another user conflicts. */
export function lockImage(fd: number, path: string, mode: LockMode): void {
  if (mode === 'none') return;
  const f = loadFcntl();
  if (!f) return;
  const { perms, deny } = MODES[mode];
  for (const p of perms) f(fd, F_OFD_SETLK, 'void *', flock(F_RDLCK, PERM_BASE + p));
  for (const p of deny) f(fd, F_OFD_SETLK, 'void *', flock(F_RDLCK, SHARED_BASE + p));
  for (const p of perms) {
    if (heldByOthers(f, fd, SHARED_BASE + p)) {
      throw new QimgError(`Failed to get "${PERM_NAMES[p]}" lock: is another process using the image?`, { file: path });
    }
  }
  for (const p of deny) {
    if (heldByOthers(f, fd, PERM_BASE + p)) {
      throw new QimgError(`Failed to get shared "${PERM_NAMES[p]}" lock: is another process using the image?`, { file: path });
    }
  }
}
