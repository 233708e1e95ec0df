/** `serve -L`: a server's exports printed as qemu-nbd -L prints them. */
import type { ListedExport } from '../../io/nbd/handshake.js';

/** qemu-nbd's names of the transmission flags, by bit. */
const FLAG_NAMES: Array<[number, string]> = [
  [1, 'readonly'],
  [2, 'flush'],
  [3, 'fua'],
  [4, 'rotational'],
  [5, 'trim'],
  [6, 'zeroes'],
  [7, 'df'],
  [8, 'multi'],
  [9, 'resize'],
  [10, 'cache'],
  [11, 'fast-zero'],
];
const HAS_FLAGS = 1;

export function formatExportList(list: ListedExport[]): string {
  const out = [`exports available: ${list.length}`];
  for (const e of list) {
    out.push(` export: '${e.name}'`);
    if (e.description !== '') out.push(`  description: ${e.description}`);
    if (e.flags !== undefined && e.flags & HAS_FLAGS) {
      const names = FLAG_NAMES.filter(([bit]) => e.flags! & (1 << bit)).map(([, n]) => ` ${n}`);
      out.push(`  size:  ${e.size}`, `  flags: 0x${e.flags.toString(16)} (${names.join('')} )`);
    }
    if (e.blockSizes && e.blockSizes.min !== 0) {
      out.push(`  min block: ${e.blockSizes.min}`, `  opt block: ${e.blockSizes.preferred}`, `  max block: ${e.blockSizes.max}`);
    }
    if (e.contexts.length > 0) out.push(`  available meta contexts: ${e.contexts.length}`, ...e.contexts.map((c) => `   ${c}`));
  }
  return out.join('\n') + '\n';
}
