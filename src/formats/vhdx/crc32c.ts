/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of every VHDX
 * structure. Node's zlib.crc32 is the IEEE CRC-32, a different polynomial.
 * Slicing-by-8 tables: the log checksums cover whole log entries.
 */
const POLY = 0x82f63b78;

const TABLES: Uint32Array[] = (() => {
  const t: Uint32Array[] = [];
  const t0 = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t0[n] = c >>> 0;
  }
  t.push(t0);
  for (let s = 1; s < 8; s++) {
    const prev = t[s - 1];
    const cur = new Uint32Array(256);
    for (let n = 0; n < 256; n++) cur[n] = (prev[n] >>> 8) ^ t0[prev[n] & 0xff];
    t.push(cur);
  }
  return t;
})();

/**
 * Continues a CRC-32C over `buf` from a running (already inverted) state; start with
 * 0xffffffff and invert the result (`crc32c` does both).
 */
export function crc32cUpdate(state: number, buf: Uint8Array): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES;
  let c = state >>> 0;
  let i = 0;
  const n8 = buf.length - (buf.length % 8);
  for (; i < n8; i += 8) {
    const lo = (c ^ (buf[i] | (buf[i + 1] << 8) | (buf[i + 2] << 16) | (buf[i + 3] << 24))) >>> 0;
    c =
      t7[lo & 0xff] ^
      t6[(lo >>> 8) & 0xff] ^
      t5[(lo >>> 16) & 0xff] ^
      t4[lo >>> 24] ^
      t3[buf[i + 4]] ^
      t2[buf[i + 5]] ^
      t1[buf[i + 6]] ^
      t0[buf[i + 7]];
  }
  for (; i < buf.length; i++) c = t0[(c ^ buf[i]) & 0xff] ^ (c >>> 8);
  return c >>> 0;
}

export function crc32c(buf: Uint8Array): number {
  return (crc32cUpdate(0xffffffff, buf) ^ 0xffffffff) >>> 0;
}

/** The checksum of a structure whose own 4-byte checksum field (at `at`) counts as zero. */
export function structureChecksum(buf: Buffer, at = 4): number {
  let c = crc32cUpdate(0xffffffff, buf.subarray(0, at));
  c = crc32cUpdate(c, ZERO4);
  c = crc32cUpdate(c, buf.subarray(at + 4));
  return (c ^ 0xffffffff) >>> 0;
}

/** Writes the checksum of `buf` into its field at `at`. */
export function sealChecksum(buf: Buffer, at = 4): void {
  buf.writeUInt32LE(structureChecksum(buf, at), at);
}

export function checksumValid(buf: Buffer, at = 4): boolean {
  return structureChecksum(buf, at) === buf.readUInt32LE(at);
}

const ZERO4 = new Uint8Array(4);
