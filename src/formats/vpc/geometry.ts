/**
 * CHS geometry of a VHD (the specification's appendix algorithm) and qemu-img's rule
 * for the size of a new image: the smallest geometry that holds the requested size;
 * sizes beyond what CHS can describe get the maximum geometry and keep their size.
 */
import { CHS_MAX_C, CHS_MAX_H, CHS_MAX_S, VHD_MAX_GEOMETRY, VHD_MAX_SECTORS } from './structs.js';

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** The spec's geometry for `sectors` (which may round the size down). */
export function calculateGeometry(sectors: number): Geometry {
  const total = Math.min(sectors, VHD_MAX_GEOMETRY);
  let spt: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.floor((cth + 1023) / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

export interface NewDiskSize {
  geometry: Geometry;
  /** the disk's size in bytes (footer current_size) */
  totalSize: number;
}

/**
 * The geometry and size of a new image of `size` bytes (a multiple of 512). Returns
 * null when the size exceeds qemu's 2040 GiB limit.
 */
export function newDiskSize(size: number, forceSize: boolean): NewDiskSize | null {
  let geometry: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  const chs = (g: Geometry) => g.cylinders * g.heads * g.sectorsPerTrack;
  if (forceSize) {
    geometry = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };
  } else {
    // Grow the request until the geometry holds it: convert must never truncate.
    const wanted = Math.min(VHD_MAX_GEOMETRY, Math.floor(size / 512));
    for (let i = 0; wanted > chs(geometry); i++) geometry = calculateGeometry(wanted + i);
  }
  if (chs(geometry) === VHD_MAX_GEOMETRY) {
    const sectors = Math.floor(size / 512);
    if (sectors > VHD_MAX_SECTORS) return null;
    return { geometry, totalSize: sectors * 512 };
  }
  return { geometry, totalSize: chs(geometry) * 512 };
}
