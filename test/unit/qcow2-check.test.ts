/**
 * The qcow2 check without qemu: refcount entry codecs of every width, the in-memory
 * refcount table, qemu's number formatting and JSON member order, and check/repair
 * passes over damaged copies of fixture images.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkQcow2, FIX_ERRORS, FIX_LEAKS, RefArray, type Qcow2CheckResult } from '../../src/formats/qcow2/check.js';
import { maxRefcount, readRefcountEntry, refcountEntryText, writeRefcountEntry } from '../../src/formats/qcow2/refcount.js';
import { checkHuman, checkJson, printf2f } from '../../src/cli/commands/check.js';
import { checkExitCode, type ImageCheck } from '../../src/ops/check.js';
import { prettyJson } from '../../src/cli/output/json.js';
import { FIXTURES_DIR } from '../helpers/fixtures.js';
import { emptyCheckCounts } from '../../src/core/driver.js';

const tmp = mkdtempSync(join(tmpdir(), 'qimg-check-unit-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('refcount entries of every width', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`${bits}-bit entries round-trip without touching their neighbours`, () => {
      const block = Buffer.alloc(64);
      const entries = (64 * 8) / bits;
      const max = maxRefcount(bits);
      const value = (i: number) => (bits >= 53 ? (i * 0x1234567 + 1) % max : ((i * 7 + 3) % (max + 1)));
      for (let i = 0; i < entries; i++) writeRefcountEntry(block, i, bits, value(i));
      for (let i = 0; i < entries; i++) expect(readRefcountEntry(block, i, bits)).toBe(value(i));
      // overwrite one entry with max, then 0: only that entry changes
      writeRefcountEntry(block, 3, bits, max);
      expect(readRefcountEntry(block, 3, bits)).toBe(max);
      writeRefcountEntry(block, 3, bits, 0);
      for (let i = 0; i < entries; i++) expect(readRefcountEntry(block, i, bits)).toBe(i === 3 ? 0 : value(i));
    });
  }

  it('sub-byte widths: entry 0 in the least significant bits', () => {
    const b = Buffer.alloc(2);
    writeRefcountEntry(b, 0, 1, 1);
    expect(b[0]).toBe(0x01);
    writeRefcountEntry(b, 7, 1, 1);
    expect(b[0]).toBe(0x81);
    writeRefcountEntry(b, 9, 1, 1);
    expect(b[1]).toBe(0x02);
    const c = Buffer.alloc(1);
    writeRefcountEntry(c, 1, 2, 3);
    expect(c[0]).toBe(0x0c);
    const d = Buffer.alloc(1);
    writeRefcountEntry(d, 1, 4, 0xa);
    writeRefcountEntry(d, 0, 4, 0x5);
    expect(d[0]).toBe(0xa5);
  });

  it('multi-byte widths are big endian', () => {
    const b = Buffer.alloc(16);
    writeRefcountEntry(b, 1, 16, 0x1234);
    expect(b.subarray(2, 4)).toEqual(Buffer.from([0x12, 0x34]));
    writeRefcountEntry(b, 1, 32, 0x89abcdef);
    expect(b.readUInt32BE(4)).toBe(0x89abcdef);
    writeRefcountEntry(b, 1, 64, 2 ** 40 + 5);
    expect(b.readBigUInt64BE(8)).toBe(2n ** 40n + 5n);
    expect(readRefcountEntry(b, 1, 64)).toBe(2 ** 40 + 5);
  });

  it('64-bit entries beyond 2^53 read saturated, their text exact', () => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64BE(0xffffffffffffff01n, 8);
    expect(readRefcountEntry(b, 1, 64)).toBe(Number.MAX_SAFE_INTEGER);
    expect(refcountEntryText(b, 1, 64)).toBe('18446744073709551361');
    b.writeBigUInt64BE(2n ** 53n - 1n, 0);
    expect(readRefcountEntry(b, 0, 64)).toBe(Number.MAX_SAFE_INTEGER);
    expect(refcountEntryText(b, 0, 64)).toBe(String(2 ** 53 - 1));
    // narrower widths read as they are
    writeRefcountEntry(b, 3, 4, 9);
    expect(refcountEntryText(b, 3, 4)).toBe('9');
  });

  it('any Uint8Array holds entries (not only Buffers)', () => {
    const u = new Uint8Array(16);
    writeRefcountEntry(u, 1, 64, 2 ** 40 + 5);
    writeRefcountEntry(u, 1, 16, 0xbeef);
    expect(readRefcountEntry(u, 1, 64)).toBe(2 ** 40 + 5);
    expect(readRefcountEntry(u, 1, 16)).toBe(0xbeef);
  });

  it('maximum refcounts', () => {
    expect(maxRefcount(1)).toBe(1);
    expect(maxRefcount(2)).toBe(3);
    expect(maxRefcount(16)).toBe(65535);
    expect(maxRefcount(32)).toBe(0xffffffff);
    expect(maxRefcount(64)).toBe(Number.MAX_SAFE_INTEGER);
  });
});

describe('in-memory refcount table', () => {
  it('grows with zeros and keeps its values', () => {
    const a = new RefArray(16, 4);
    a.set(2, 7);
    a.ensure(1000);
    expect(a.length).toBe(1000);
    expect(a.get(2)).toBe(7);
    expect(a.get(999)).toBe(0);
    a.set(1500, 1);
    expect(a.length).toBe(1501);
    expect(a.anyInRange(1000, 1500)).toBe(false);
    expect(a.anyInRange(1000, 1501)).toBe(true);
    expect(a.get(5000)).toBe(0);
  });

  it('is as narrow as the refcount width', () => {
    expect(new RefArray(1, 1).max).toBe(1);
    expect(new RefArray(8, 1).max).toBe(255);
    expect(new RefArray(64, 1).max).toBe(0xffffffff);
  });
});

describe('output formatting', () => {
  it('printf %0.2f rounds exact ties to even', () => {
    expect(printf2f(12.125)).toBe('12.12');
    expect(printf2f(0.125)).toBe('0.12');
    expect(printf2f(0.375)).toBe('0.38');
    expect(printf2f(18.75)).toBe('18.75');
    expect(printf2f((1 * 100) / 3)).toBe('33.33');
    expect(printf2f(100)).toBe('100.00');
    expect(printf2f(400)).toBe('400.00');
    expect(printf2f(0)).toBe('0.00');
    expect(printf2f(1.005)).toBe('1.00'); // below the tie in binary
    expect(printf2f(0.005)).toBe('0.01'); // above the tie in binary
  });

  const result = (over: Partial<ImageCheck>): ImageCheck => ({
    ...emptyCheckCounts(),
    filename: 'x.qcow2',
    format: 'qcow2',
    ...over,
  });

  it('JSON members in qemu 7.2 order, zero optional members omitted', () => {
    const all = result({
      checkErrors: 1,
      corruptions: 2,
      leaks: 3,
      corruptionsFixed: 4,
      leaksFixed: 5,
      imageEndOffset: 6,
      totalClusters: 7,
      allocatedClusters: 8,
      fragmentedClusters: 9,
      compressedClusters: 10,
    });
    expect(Object.keys(checkJson(all))).toEqual([
      'image-end-offset',
      'compressed-clusters',
      'total-clusters',
      'corruptions',
      'corruptions-fixed',
      'check-errors',
      'leaks',
      'leaks-fixed',
      'allocated-clusters',
      'filename',
      'format',
      'fragmented-clusters',
    ]);
    expect(prettyJson(checkJson(result({ imageEndOffset: 262144, totalClusters: 16 })))).toBe(
      '{\n    "image-end-offset": 262144,\n    "total-clusters": 16,\n    "check-errors": 0,\n    "filename": "x.qcow2",\n    "format": "qcow2"\n}',
    );
  });

  it('human summary', () => {
    expect(checkHuman(result({ imageEndOffset: 262144, totalClusters: 16 }))).toBe(
      'No errors were found on the image.\nImage end offset: 262144\n',
    );
    expect(checkHuman(result({ corruptions: 2, leaks: 1, checkErrors: 3, totalClusters: 16, allocatedClusters: 3, fragmentedClusters: 1, imageEndOffset: 65536 }))).toBe(
      '\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n' +
        '\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n' +
        '\n3 internal errors have occurred during the check.\n' +
        '3/16 = 18.75% allocated, 33.33% fragmented, 0.00% compressed clusters\nImage end offset: 65536\n',
    );
  });

  it('exit codes', () => {
    expect(checkExitCode(result({}))).toBe(0);
    expect(checkExitCode(result({ leaks: 1 }))).toBe(3);
    expect(checkExitCode(result({ leaks: 1, corruptions: 1 }))).toBe(2);
    expect(checkExitCode(result({ corruptions: 1, checkErrors: 1 }))).toBe(1);
  });
});

// ------------------------------------------------------------------ check passes on fixture copies

/** A copy of a fixture image in the temp dir. */
function copyOf(name: string): string {
  const p = join(tmp, `${name}-${Math.random().toString(36).slice(2)}.qcow2`);
  copyFileSync(join(FIXTURES_DIR, 'images', `${name}.qcow2`), p);
  return p;
}

function poke(path: string, offset: number, bytes: Buffer): void {
  const d = readFileSync(path);
  bytes.copy(d, offset);
  writeFileSync(path, d);
}

/** Refcount block 0 of `path` and its entry width. */
function refblock0(path: string): { offset: number; bits: number; cs: number } {
  const d = readFileSync(path);
  const rt = Number(d.readBigUInt64BE(48));
  return { offset: Number(d.readBigUInt64BE(rt)), bits: 1 << d.readUInt32BE(96), cs: 2 ** d.readUInt32BE(20) };
}

function setRc(path: string, cluster: number, value: number): void {
  const { offset, bits, cs } = refblock0(path);
  const d = readFileSync(path);
  const block = d.subarray(offset, offset + cs);
  writeRefcountEntry(block, cluster, bits, value);
  writeFileSync(path, d);
}

async function check(path: string, fix = 0): Promise<{ res: Qcow2CheckResult; lines: string[] }> {
  const lines: string[] = [];
  const res = await checkQcow2(path, { fix, log: (l) => lines.push(l) });
  return { res, lines };
}

describe('checkQcow2 on fixture copies', () => {
  it('a clean image', async () => {
    const { res, lines } = await check(copyOf('cluster-64k'));
    expect(lines).toEqual([]);
    expect(res.corruptions + res.leaks + res.checkErrors).toBe(0);
    expect(res.allocatedClusters).toBeGreaterThan(0);
  });

  it('a leak is found and repaired by FIX_LEAKS', async () => {
    const p = copyOf('empty');
    setRc(p, 1, 2); // the refcount table's cluster
    const first = await check(p);
    expect(first.res.leaks).toBe(1);
    expect(first.lines).toEqual(['Leaked cluster 1 refcount=2 reference=1']);
    const fixed = await check(p, FIX_LEAKS);
    expect(fixed.res.leaksFixed).toBe(1);
    expect(fixed.res.leaks).toBe(0);
    expect(fixed.lines).toEqual(['Leaked cluster 1 refcount=2 reference=1', 'Repairing cluster 1 refcount=2 reference=1']);
    const again = await check(p);
    expect(again.res.leaks + again.res.corruptions).toBe(0);
  });

  for (const name of ['refcount-1', 'refcount-8', 'refcount-32', 'refcount-64', 'compat-v3']) {
    it(`${name}: a zeroed refcount is corruption; FIX_ERRORS rebuilds the refcount structure`, async () => {
      const p = copyOf(name);
      setRc(p, 0, 0); // the header's own refcount
      const first = await check(p);
      expect(first.res.corruptions).toBeGreaterThan(0);
      expect(first.lines[0]).toBe('ERROR cluster 0 refcount=0 reference=1');
      // leaks only cannot fix it
      await expect(check(p, FIX_LEAKS)).rejects.toThrow(/Check failed: Input\/output error/);
      const fixed = await check(p, FIX_LEAKS | FIX_ERRORS);
      expect(fixed.lines).toContain('Rebuilding refcount structure');
      expect(fixed.res.corruptionsFixed).toBeGreaterThan(0);
      expect(fixed.res.corruptions + fixed.res.leaks + fixed.res.checkErrors).toBe(0);
      const again = await check(p);
      expect(again.lines).toEqual([]);
      expect(again.res.corruptions + again.res.leaks + again.res.checkErrors).toBe(0);
    });
  }

  it('an unaligned refcount block: internal errors, then a rebuild', async () => {
    const p = copyOf('empty');
    const d = readFileSync(p);
    const rt = Number(d.readBigUInt64BE(48));
    poke(p, rt, Buffer.from([0, 0, 0, 0, 0, 2, 2, 0]));
    const first = await check(p);
    expect(first.res.corruptions).toBe(1);
    expect(first.res.checkErrors).toBeGreaterThan(0);
    expect(first.lines[0]).toBe('ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted');
    const fixed = await check(p, FIX_LEAKS | FIX_ERRORS);
    expect(fixed.res.corruptionsFixed).toBe(1);
    const again = await check(p);
    expect(again.res.corruptions + again.res.leaks + again.res.checkErrors).toBe(0);
  });

  it('a missing COPIED flag is repaired by FIX_LEAKS when nothing else is wrong', async () => {
    const p = copyOf('cluster-64k');
    const d = readFileSync(p);
    const l1 = Number(d.readBigUInt64BE(40));
    d[l1] &= 0x7f;
    writeFileSync(p, d);
    const first = await check(p);
    expect(first.res.corruptions).toBe(1);
    expect(first.lines[0]).toMatch(/^ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=[0-9a-f]+ refcount=1$/);
    const fixed = await check(p, FIX_LEAKS);
    expect(fixed.res.corruptionsFixed).toBe(1);
    expect(readFileSync(p)[l1] & 0x80).toBe(0x80);
  });

  it('the dirty bit is cleared by a successful repair', async () => {
    const p = copyOf('dirty');
    expect(readFileSync(p)[79] & 1).toBe(1);
    const first = await check(p);
    expect(first.res.corruptions).toBe(0);
    expect(readFileSync(p)[79] & 1).toBe(1); // a read-only check changes nothing
    await check(p, FIX_LEAKS | FIX_ERRORS);
    expect(readFileSync(p)[79] & 1).toBe(0);
  });
});
