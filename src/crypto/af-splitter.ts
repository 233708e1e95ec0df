/**
 * The LUKS1 anti-forensic splitter (LUKS1 On-Disk Format Specification, section 2.4):
 * a key of n bytes becomes `stripes` stripes of n bytes, all needed to recover it, so
 * destroying any part of the stored material destroys the key.
 *
 *   split:  s_0..s_{k-2} random;  d_0 = 0;  d_{i+1} = H(d_i ^ s_i);  s_{k-1} = d_{k-1} ^ key
 *   merge:  d as above from the stored stripes;  key = d_{k-1} ^ s_{k-1}
 *
 * H ("diffuse") hashes the stripe in digest-sized pieces: piece j becomes the first
 * bytes of hash(be32(j) || piece j), so H keeps the length of its input.
 */
import { createHash, randomFillSync } from 'node:crypto';
import { hashDigestLength } from './sector-cipher.js';

/** Splits key into key.length * stripes bytes of AF material (random except the last stripe). */
export function afSplit(hash: string, key: Buffer, stripes: number): Buffer {
  checkArgs(hash, key.length, stripes);
  const n = key.length;
  const out = Buffer.alloc(n * stripes);
  randomFillSync(out, 0, n * (stripes - 1));
  const d = Buffer.alloc(n);
  try {
    for (let i = 0; i < stripes - 1; i++) {
      xorInPlace(d, out.subarray(i * n, (i + 1) * n));
      diffuse(hash, d);
    }
    const last = out.subarray((stripes - 1) * n);
    for (let j = 0; j < n; j++) last[j] = d[j] ^ key[j];
  } finally {
    d.fill(0);
  }
  return out;
}

/** Recovers the key of keyLength bytes from AF material of keyLength * stripes bytes. */
export function afMerge(hash: string, material: Buffer, keyLength: number, stripes: number): Buffer {
  checkArgs(hash, keyLength, stripes);
  if (material.length < keyLength * stripes) {
    throw new Error(`AF material is ${material.length} bytes, ${keyLength * stripes} needed`);
  }
  const n = keyLength;
  const d = Buffer.alloc(n);
  for (let i = 0; i < stripes - 1; i++) {
    xorInPlace(d, material.subarray(i * n, (i + 1) * n));
    diffuse(hash, d);
  }
  xorInPlace(d, material.subarray((stripes - 1) * n, stripes * n));
  return d;
}

/** H(d) in place. */
function diffuse(hash: string, d: Buffer): void {
  const dl = hashDigestLength(hash);
  const iv = Buffer.alloc(4);
  for (let j = 0, at = 0; at < d.length; j++, at += dl) {
    const piece = d.subarray(at, Math.min(d.length, at + dl));
    iv.writeUInt32BE(j, 0);
    const digest = createHash(hash).update(iv).update(piece).digest();
    digest.copy(piece, 0, 0, piece.length);
    digest.fill(0);
  }
}

function xorInPlace(d: Buffer, s: Buffer): void {
  for (let j = 0; j < d.length; j++) d[j] ^= s[j];
}

function checkArgs(hash: string, keyLength: number, stripes: number): void {
  hashDigestLength(hash);
  if (!Number.isSafeInteger(stripes) || stripes < 1) throw new Error(`Invalid AF stripe count ${stripes}`);
  if (!Number.isSafeInteger(keyLength) || keyLength < 1) throw new Error(`Invalid AF key length ${keyLength}`);
}
