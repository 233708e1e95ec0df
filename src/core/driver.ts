/**
 * Format drivers and their registry. Formats register themselves (src/formats/index.ts);
 * core only knows this interface, so a qcow2 image can open a backing file of any
 * format without importing that format.
 */
import type { BlockImage } from './block-image.js';
import type { OptionSpec, OptionValue, ParsedOptions } from './options.js';
import type { HostFile } from '../io/host.js';
import type { SequentialInput, SequentialOutput } from '../io/stdio.js';
import type { OpenContext } from './open.js';
import type { ImageOptions, SecretStore } from './secrets.js';

/** What one `check` pass found (qemu's BdrvCheckResult); zero counts are not printed. */
export interface ImageCheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** end of the last used host cluster (0 = not reported) */
  imageEndOffset: number;
  /** virtual size in clusters (0 = not reported) */
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** A check result with nothing found yet. */
export function emptyCheckCounts(): ImageCheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

export interface FormatCheckOptions {
  /** FIX_LEAKS (1) | FIX_ERRORS (2), or 0 for a read-only check */
  fix: number;
  /** receives each per-problem line (qemu prints them on stderr), without newline */
  log: (line: string) => void;
}

/** What `create` may need beyond the options (`-o key-secret=ID` names a secret). */
export interface CreateContext {
  secrets?: SecretStore;
}

/** What a format's own `amend` gets: --object secrets and --image-opts keys for its open. */
export interface AmendContext {
  secrets?: SecretStore;
  imageOptions?: ImageOptions;
  /** qemu-img amend --force (overwrite active key slots, erase the last one) */
  force?: boolean;
}

export interface FormatDriver {
  readonly name: string;
  /** Score for the first bytes of a file: 0 = not mine, higher wins; raw answers 1. */
  probe(head: Buffer, filename: string): number;
  /** Opens an image on an already open file. */
  open(file: HostFile, ctx: OpenContext): Promise<BlockImage>;
  /** Options `create`/`convert -o` accept for this format. */
  readonly createOptions: readonly OptionSpec[];
  /**
   * The options part of create's "Formatting '...'" line, as qemu-img prints it
   * (fixed order, numbers normalised, strings as given).
   */
  describeCreate(size: bigint, options: ParsedOptions): string;
  /**
   * Validates options (qemu-img's messages) and creates the image; size in bytes.
   * Absent: the format is read-only ("Format driver 'X' does not support image creation").
   */
  create?(path: string, size: number, options: Map<string, OptionValue>, ctx?: CreateContext): Promise<void>;
  /**
   * qemu-img check for this format, run on the file by name (the image is not open);
   * absent: "This image format does not support checks" (exit 63).
   */
  check?(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts>;
  /**
   * `amend` of a format other than qcow2 (qemu's bdrv_amend_options): opens the image
   * itself (with its key), checks the -o options against amendOptions with qemu's
   * messages and applies them; 'help' when -o asks for the list.
   */
  amend?(filename: string, optionStrings: string[], ctx: AmendContext): Promise<'help' | void>;
  /** the options `amend -o help` lists (qemu's amend_opts) */
  readonly amendOptions?: readonly OptionSpec[];
  /**
   * `measure -O` for a format other than raw and qcow2: the sizes a new image of
   * `virtualSize` bytes needs (qemu's bdrv_measure), or qemu's refusal.
   */
  measure?(virtualSize: bigint, options: Map<string, OptionValue>, ctx: CreateContext): Promise<{ required: bigint; fullyAllocated: bigint }>;
  /**
   * A new image does not read as zeros (qemu's bdrv_has_zero_init() is 0: a luks
   * payload nobody wrote decrypts to noise), so convert must write its zero ranges.
   */
  readonly noZeroInit?: boolean;
  /** `convert -c` is allowed for this output format (qemu's bdrv_co_pwritev_compressed) */
  readonly supportsCompression?: boolean;
  /** `measure -O` works for this format (qemu's bdrv_measure); else qemu's refusal */
  readonly supportsMeasure?: boolean;
  /**
   * Not offered to probing (a format that is only opened by name, or one whose probe
   * would shadow another). Probe scores: qemu's, 100 for a certain magic.
   */
  readonly noProbe?: boolean;
  /** an archive of images (OVA): `ARCHIVE/MEMBER` names open one of its disks */
  readonly archive?: boolean;
  /**
   * Reads an image in one forward pass (standard input): formats laid out for it only
   * (raw, stream-optimized VMDK). Reads must come in increasing offsets.
   */
  openSequential?(input: SequentialInput): Promise<BlockImage>;
  /**
   * Writes a new image in one forward pass (standard output); `options` are the parsed
   * -o values (size, backing_file, ...). Throws qemu-style refusals for options that
   * need random access.
   */
  createStream?(out: SequentialOutput, size: number, options: Map<string, OptionValue>): StreamImageWriter;
}

/** A run of allocation units of a streamed image, as a copy will fill it. */
export interface UnitRun {
  /** first unit (offset / unit) */
  start: number;
  count: number;
  /** data: stored, written by the copy; zero: reads as zeros without data (zero flag) */
  kind: 'data' | 'zero';
}

/** A new image written to a stream: metadata and data in one forward pass. */
export interface StreamImageWriter {
  /** the allocation unit: plans and data come in whole units (the last may be short) */
  readonly unit: number;
  /**
   * 'plan': the writer needs every unit's kind before its first byte (its tables come
   * first) and then exactly the data units, in order; 'live': data comes in increasing
   * offsets as the copy finds it, anything not written reads as zeros.
   */
  readonly mode: 'plan' | 'live';
  /** zero units with a backing file: kept as zero-flagged units, or stored as data */
  readonly zeroUnits: 'flag' | 'data';
  /** the -o backing file, if any (ranges left out show it) */
  readonly backingFile?: string;
  readonly backingFormat?: string;
  /** Writes what comes before the data ('plan' writers get the runs, in order). */
  begin(plan?: readonly UnitRun[]): Promise<void>;
  /** Data at `offset`, in increasing offsets. */
  write(offset: number, data: Buffer): Promise<void>;
  /** Writes what comes after the data. */
  finish(): Promise<void>;
}

/** qemu-img's refusal for a format that cannot be created (create, convert, measure). */
export function creationRefusal(driver: FormatDriver): string | undefined {
  return driver.create ? undefined : `Format driver '${driver.name}' does not support image creation`;
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
    if (d.noProbe) continue;
    const score = d.probe(head, filename);
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  if (!best) throw new Error('no format driver registered');
  return best;
}
