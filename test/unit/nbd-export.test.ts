/** The export's own logic: dirty-bitmap runs, range checks, flags, context matching, keys.psk. */
import { describe, expect, it } from 'vitest';
import type { BlockImage } from '../../src/core/block-image.js';
import { NbdExport, NbdRequestError } from '../../src/serve/export.js';
import { parsePskFile } from '../../src/io/tls-creds.js';
import * as P from '../../src/io/nbd/protocol.js';

const G = 4096;
const SIZE = 64 * G + 100; // a partial last granule

function exportWith(bits: Buffer, readOnly = true, shared = false): NbdExport {
  const image = { virtualSize: SIZE } as unknown as BlockImage;
  return new NbdExport(image, { name: 'x', readOnly, shared, allocationDepth: true, bitmap: { name: 'b', granularity: G, bits } });
}

/** The dirty bit of every byte range from a naive per-granule walk. */
function naive(bits: Buffer, offset: number, length: number): Array<{ length: number; flags: number }> {
  const out: Array<{ length: number; flags: number }> = [];
  for (let pos = offset; pos < offset + length; ) {
    const n = Math.floor(pos / G);
    const next = Math.min(offset + length, (n + 1) * G);
    const flags = (bits[n >> 3] >> (n & 7)) & 1;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += next - pos;
    else out.push({ length: next - pos, flags });
    pos = next;
  }
  return out;
}

describe('NbdExport', () => {
  it('reports dirty-bitmap runs as a per-granule walk does, whole bytes or not', async () => {
    const bits = Buffer.alloc(9);
    bits[0] = 0b11110000;
    bits[1] = 0xff;
    bits[2] = 0xff;
    bits[3] = 0b00000001;
    bits[6] = 0x80;
    bits[8] = 0x01; // the partial last granule
    const exp = exportWith(bits);
    const ctx = exp.contexts.find((c) => c.name === 'qemu:dirty-bitmap:b')!;
    for (const [offset, length] of [
      [0, SIZE],
      [100, SIZE - 100],
      [5 * G + 7, 20 * G],
      [63 * G, SIZE - 63 * G],
      [24 * G, 30 * G],
    ]) {
      expect(await exp.blockStatus(ctx, offset, length, false), `${offset}+${length}`).toEqual(naive(bits, offset, length));
    }
    expect(await exp.blockStatus(ctx, 0, SIZE, true)).toEqual([{ length: 4 * G, flags: 0 }]);
  });

  it('checks ranges without overflow and names the right error', () => {
    const exp = exportWith(Buffer.alloc(9), false);
    const code = (fn: () => void) => {
      try {
        fn();
        return 0;
      } catch (err) {
        return (err as NbdRequestError).code;
      }
    };
    expect(code(() => exp.checkRange(0n, BigInt(SIZE), false))).toBe(0);
    expect(code(() => exp.checkRange(1n, BigInt(SIZE), false))).toBe(P.NBD_EINVAL);
    expect(code(() => exp.checkRange(2n ** 64n - 1n, 2n, false))).toBe(P.NBD_EINVAL);
    expect(code(() => exp.checkRange(BigInt(SIZE) - 1n, 2n, true))).toBe(P.NBD_ENOSPC);
    expect(code(() => exp.checkRange(2n ** 63n, 1n, true))).toBe(P.NBD_EINVAL);
  });

  it('offers multi-conn on every shared export (read-only or writable, as qemu-nbd), DF only with structured replies', () => {
    expect(exportWith(Buffer.alloc(9), true, true).flags(true) & P.NBD_FLAG_CAN_MULTI_CONN).not.toBe(0);
    expect(exportWith(Buffer.alloc(9), false, true).flags(true) & P.NBD_FLAG_CAN_MULTI_CONN).not.toBe(0);
    expect(exportWith(Buffer.alloc(9), true, false).flags(true) & P.NBD_FLAG_CAN_MULTI_CONN).toBe(0);
    expect(exportWith(Buffer.alloc(9), false, false).flags(true) & P.NBD_FLAG_CAN_MULTI_CONN).toBe(0);
    expect(exportWith(Buffer.alloc(9)).flags(false) & P.NBD_FLAG_SEND_DF).toBe(0);
    const rw = exportWith(Buffer.alloc(9), false).flags(true);
    expect(rw & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO)).toBe(P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO);
  });

  it('matches contexts by exact name, and by namespace only when listing', () => {
    const exp = exportWith(Buffer.alloc(9));
    expect(exp.matchContexts('qemu:', true).map((c) => c.name)).toEqual(['qemu:allocation-depth', 'qemu:dirty-bitmap:b']);
    expect(exp.matchContexts('qemu:dirty-bitmap:', true).map((c) => c.name)).toEqual(['qemu:dirty-bitmap:b']);
    expect(exp.matchContexts('qemu:', false)).toEqual([]);
    expect(exp.matchContexts('base:allocation', false).map((c) => c.id)).toEqual([1]);
  });

  it('reads keys.psk and refuses malformed lines', () => {
    const keys = parsePskFile('alice:00ff\nbob:0a0b0c\n');
    expect(keys.get('alice')).toEqual(Buffer.from([0, 255]));
    expect(keys.get('bob')).toEqual(Buffer.from([10, 11, 12]));
    expect(() => parsePskFile('alice:0g\n')).toThrow(/Invalid line/);
    expect(() => parsePskFile(':00\n')).toThrow(/Invalid line/);
    expect(() => parsePskFile('\n')).toThrow(/No keys/);
  });

  it('runs writes to disjoint ranges of a raw-like image at once, in arrival order where they overlap, flushes after all', async () => {
    const log: string[] = [];
    let running = 0;
    let most = 0;
    const content = Buffer.alloc(64);
    const tick = () => new Promise((resolve) => setTimeout(resolve, 5));
    const image = {
      virtualSize: 64,
      concurrentWrites: true,
      async write(offset: number, data: Buffer) {
        running++;
        most = Math.max(most, running);
        log.push(`start ${offset}`);
        // later writes finish first when nothing orders them
        await tick();
        if (offset === 0) await tick();
        data.copy(content, offset);
        log.push(`end ${offset}`);
        running--;
      },
      async flush() {
        log.push(`flush (running ${running})`);
      },
    } as unknown as BlockImage;
    const exp = new NbdExport(image, { name: 'x', readOnly: false, shared: false, allocationDepth: false });
    const all = [
      exp.write(0, Buffer.alloc(16, 1)),
      exp.write(16, Buffer.alloc(16, 2)),
      exp.write(32, Buffer.alloc(16, 3)),
      exp.write(8, Buffer.alloc(16, 4)), // overlaps the first two: after both
      exp.flush(),
      exp.write(48, Buffer.alloc(16, 5)), // after the flush
    ];
    await Promise.all(all);
    expect(most).toBeGreaterThan(1);
    expect(log.indexOf('start 8')).toBeGreaterThan(log.indexOf('end 0'));
    expect(log.indexOf('start 8')).toBeGreaterThan(log.indexOf('end 16'));
    expect(log.indexOf('flush (running 0)')).toBeGreaterThan(log.indexOf('end 8'));
    expect(log.indexOf('start 48')).toBeGreaterThan(log.indexOf('flush (running 0)'));
    expect(content).toEqual(Buffer.concat([Buffer.alloc(8, 1), Buffer.alloc(16, 4), Buffer.alloc(8, 2), Buffer.alloc(16, 3), Buffer.alloc(16, 5)]));
    await exp.drain();
  });
});
