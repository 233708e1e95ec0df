/** One command through qemu-img and qimg, expected to agree (vitest assertions). */
import { expect } from 'vitest';
import { qemuImg, qimg, type RunResult } from './qemu.js';

/** The same exit status and stdout (qimg's map JSON carries qemu 8.2's "compressed" member, dropped here). */
export function sameAsQemuImg(args: string[]): RunResult {
  const q = qemuImg(args);
  const r = qimg(args);
  expect(r.status, `${args.join(' ')}: ${r.stderr} / qemu-img: ${q.stderr}`).toBe(q.status);
  expect(r.stdout.replace(/, "compressed": false/g, ''), args.join(' ')).toBe(q.stdout);
  return r;
}
