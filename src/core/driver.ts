/**
 * Format drivers and their registry. Formats register themselves (src/formats/index.ts);
 * core only knows this interface, so a qcow2 image can open a backing file of any
 * format without importing that format.
 */
import type { BlockImage } from './block-image.js';
import type { OptionSpec, OptionValue, ParsedOptions } from './options.js';
import type { ImageFile } from '../io/file.js';
import type { OpenContext } from './open.js';

export interface FormatDriver {
  readonly name: string;
  /** Score for the first bytes of a file: 0 = not mine, higher wins; raw answers 1. */
  probe(head: Buffer, filename: string): number;
  /** Opens an image on an already open file. */
  open(file: ImageFile, ctx: OpenContext): Promise<BlockImage>;
  /** Options `create`/`convert -o` accept for this format. */
  readonly createOptions: readonly OptionSpec[];
  /**
   * The options part of create's "Formatting '...'" line, as qemu-img prints it
   * (fixed order, numbers normalised, strings as given).
   */
  describeCreate(size: bigint, options: ParsedOptions): string;
  /** Validates options (qemu-img's messages) and creates the image; size in bytes. */
  create(path: string, size: number, options: Map<string, OptionValue>): Promise<void>;
}

const drivers: FormatDriver[] = [];

export function registerDriver(driver: FormatDriver): void {
  if (!drivers.some((d) => d.name === driver.name)) drivers.push(driver);
}

export function findDriver(name: string): FormatDriver | undefined {
  return drivers.find((d) => d.name === name);
}

export function allDrivers(): readonly FormatDriver[] {
  return drivers;
}

/** The driver whose probe scores highest; raw (score 1) is the fallback. */
export function probeDriver(head: Buffer, filename: string): FormatDriver {
  let best: FormatDriver | undefined;
  let bestScore = 0;
  for (const d of drivers) {
    const score = d.probe(head, filename);
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  if (!best) throw new Error('no format driver registered');
  return best;
}
