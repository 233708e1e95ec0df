#!/usr/bin/env node
/**
 * The crash test's write workload: a seeded random sequence of write / writeZeroes /
 * discard / flush through the library (dist/index.js), journalled so that a run killed
 * at any instant can be checked afterwards.
 *
 *   node test/crash/writer.mjs IMAGE JOURNAL SEED [OPS]
 *
 * Journal (one JSON object a line, appended with write(2) before the step it
 * describes, so it is in the file even when SIGKILL strikes during the step):
 *   {"t":"open","size":N,"cs":N,"seed":S}
 *   {"t":"w","i":k,"off":N,"len":N,"seed":D,"sha":"..."}   write of makeData(D, len)
 *   {"t":"z","i":k,"off":N,"len":N,"unmap":bool}           writeZeroes
 *   {"t":"d","i":k,"off":N,"len":N}                        discard
 *   {"t":"f","i":k}       a flush() that completed: every step before it is durable
 *   {"t":"closed"}        close() completed: everything is durable
 * Intent lines are written before their step; flush lines after the flush and fsync'd.
 * A step after the last flush line may or may not have reached the image (maybe in
 * part); a step before it must read back exactly.
 */
import { openSync, writeSync, fsyncSync, closeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';

/** mulberry32, as test/helpers/prng.ts (same seed, same sequence). */
export class Rng {
  constructor(seed) {
    this.state = seed >>> 0;
  }
  u32() {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  next() {
    return this.u32() / 0x100000000;
  }
  int(lo, hi) {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  chance(p) {
    return this.next() < p;
  }
}

/**
 * The bytes of a write, from its data seed alone: a repeated non-zero byte, LCG words
 * (incompressible), or LCG words with a repeated-byte half.
 */
export function makeData(seed, length) {
  const buf = Buffer.allocUnsafe(length);
  const kind = seed % 3;
  const fill = ((seed >>> 8) % 255) + 1;
  if (kind === 0) return buf.fill(fill);
  let x = seed | 1;
  const words = length >>> 2;
  for (let i = 0; i < words; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    buf.writeUInt32LE(x, i * 4);
  }
  for (let i = words * 4; i < length; i++) buf[i] = (seed + i) & 0xff;
  if (kind === 2) buf.fill(fill, length >>> 2, (length >>> 2) * 3);
  return buf;
}

export function sha256(buf) {
  return createHash('sha256').update(buf).digest('hex').slice(0, 16);
}

/** A random range of varied shape (unaligned, cluster runs, across L2 tables). */
function randomRange(rng, size, cs) {
  const l2Span = (cs / 8) * cs;
  let off;
  let len;
  switch (rng.int(0, 5)) {
    case 0: // small, unaligned
      off = rng.int(0, size - 1);
      len = rng.int(1, 8192);
      break;
    case 1: // sectors
      off = rng.int(0, size / 512 - 1) * 512;
      len = rng.int(1, 32) * 512;
      break;
    case 2: // whole clusters
      off = rng.int(0, size / cs - 1) * cs;
      len = rng.int(1, Math.max(1, Math.floor((1 << 20) / cs))) * cs;
      break;
    case 3: // across a cluster boundary
      off = rng.int(1, size / cs - 1) * cs - rng.int(1, 4096);
      len = rng.int(2, cs + 8192);
      break;
    case 4: // across an L2 table boundary (when the image has more than one)
      if (size > l2Span) {
        off = rng.int(1, Math.floor((size - 1) / l2Span)) * l2Span - rng.int(1, 2 * cs);
        len = rng.int(2, 4 * cs);
        break;
      }
      off = rng.int(0, size - 1);
      len = rng.int(1, 65536);
      break;
    default: // large
      off = rng.int(0, size - 1);
      len = rng.int(65536, 1 << 20);
  }
  off = Math.max(0, Math.min(off, size - 1));
  len = Math.max(1, Math.min(len, size - off));
  return [off, len];
}

async function main() {
  const [image, journalPath, seedText, opsText] = process.argv.slice(2);
  if (!image || !journalPath) {
    process.stderr.write('usage: writer.mjs IMAGE JOURNAL SEED [OPS]\n');
    process.exit(2);
  }
  const seed = Number(seedText ?? 1) >>> 0;
  const ops = Number(opsText ?? 400);
  const lib = await import(pathToFileURL(fileURLToPath(new URL('../../dist/index.js', import.meta.url))).href);
  const rng = new Rng(seed);
  const img = await lib.openImage(image, { writable: true });
  const info = await img.info();
  const cs = info.clusterSize ?? 65536;
  const size = img.virtualSize;
  const jfd = openSync(journalPath, 'a');
  const log = (obj, durable = false) => {
    writeSync(jfd, JSON.stringify(obj) + '\n');
    if (durable) fsyncSync(jfd);
  };
  log({ t: 'open', size, cs, seed }, true);
  for (let i = 0; i < ops; i++) {
    const r = rng.next();
    if (r < 0.1) {
      await img.flush();
      log({ t: 'f', i }, true);
      continue;
    }
    const [off, len] = randomRange(rng, size, cs);
    if (r < 0.7) {
      const dseed = rng.u32();
      const data = makeData(dseed, len);
      log({ t: 'w', i, off, len, seed: dseed, sha: sha256(data) });
      await img.write(off, data);
    } else if (r < 0.88) {
      const unmap = rng.chance(0.5);
      log({ t: 'z', i, off, len, unmap });
      await img.writeZeroes(off, len, { mayUnmap: unmap });
    } else {
      log({ t: 'd', i, off, len });
      await img.discard(off, len);
    }
  }
  await img.close();
  log({ t: 'closed' }, true);
  closeSync(jfd);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err) => {
    process.stderr.write(`writer: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  });
}
