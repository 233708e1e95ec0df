/**
 * Hostile bitmap tables and data under qimg's write paths: a damaged table entry, a
 * table or data cluster past the end of the file. Every write that would have to set
 * bits (or a bitmap operation that reads them) fails with one line and leaves the
 * image byte for byte as it was.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir } from '../helpers/qemu.js';
import { getU32, getU64, readAt, setU32, setU64 } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-bm-');
afterAll(() => tmp.cleanup());
const T = (name: string) => join(tmp.path, name);

/** Offset of the first bitmap directory entry (via the header's bitmaps extension). */
function firstDirEntry(file: string): number {
  let p = getU32(file, 100);
  for (;;) {
    const type = getU32(file, p);
    const len = getU32(file, p + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === 0x23852875) return Number(getU64(file, p + 8 + 16));
    p += 8 + Math.ceil(len / 8) * 8;
  }
}

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'qcow2', T('bm.qcow2'), '64M']));
  ok(qemuImg(['bitmap', '--add', '-g', '512', T('bm.qcow2'), 'b0']));
  ok(qemuIo(['-c', 'write -P 7 0 1M', T('bm.qcow2')]));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', T('src.qcow2'), '64M']));
  ok(qemuIo(['-c', 'write -P 9 0 64k', T('src.qcow2')]));
});

type Mutation = { name: string; mutate: (f: string) => void; message: RegExp };
const mutations: Mutation[] = [
  {
    name: 'table entry with reserved bits',
    mutate: (f) => {
      const table = Number(getU64(f, firstDirEntry(f)));
      setU64(f, table, getU64(f, table) | 0x2n);
    },
    message: /bitmap table entry 0 is invalid/,
  },
  {
    name: 'table entry with the all-ones flag and an offset',
    mutate: (f) => {
      const table = Number(getU64(f, firstDirEntry(f)));
      setU64(f, table, getU64(f, table) | 0x1n);
    },
    message: /bitmap table entry 0 is invalid/,
  },
  {
    name: 'data cluster past the end of the file',
    mutate: (f) => {
      const table = Number(getU64(f, firstDirEntry(f)));
      setU64(f, table, 0x7fff0000n);
    },
    message: /beyond the end of the file/,
  },
  {
    name: 'table past the end of the file',
    mutate: (f) => {
      const e = firstDirEntry(f);
      setU64(f, e, 0x7fff0000n);
      setU32(f, e + 8, 1);
    },
    message: /beyond the end of the file/,
  },
];

const writes: Array<[string, (f: string) => string[]]> = [
  ['bitmap --clear', (f) => ['bitmap', '--clear', f, 'b0']],
  ['bitmap --merge', (f) => ['bitmap', '--merge', 'b0', f, 'b0']],
  ['convert -n onto it', (f) => ['convert', '-n', '-f', 'qcow2', '-O', 'qcow2', T('src.qcow2'), f]],
  ['resize', (f) => ['resize', '-f', 'qcow2', f, '128M']],
];

describe.skipIf(!enabled)('hostile persistent bitmaps under writes', () => {
  let n = 0;
  for (const m of mutations) {
    for (const [what, args] of writes) {
      it(`${m.name}: ${what} fails cleanly, the image unchanged`, () => {
        const f = T(`case-${n++}.qcow2`);
        copyFileSync(T('bm.qcow2'), f);
        m.mutate(f);
        const before = sha256File(f);
        const r = qimg(args(f));
        expect(r.status).toBe(1);
        const lines = r.stderr.trimEnd().split('\n');
        expect(lines).toHaveLength(1);
        expect(lines[0]).toMatch(/^qimg: /);
        expect(lines[0]).toMatch(m.message);
        expect(r.stderr).not.toMatch(/\n\s+at /);
        expect(sha256File(f)).toBe(before);
        // a readable header still: qemu-img sees the same (damaged) image
        expect(readAt(f, 0, 4).toString('latin1')).toBe('QFI\xfb');
      });
    }
  }
});
