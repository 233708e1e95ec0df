/** Registers every format driver with core, in probe order (raw, the fallback, last). */
import { registerDriver } from '../core/driver.js';
import { qcow2Driver } from './qcow2/driver.js';
import { rawDriver } from './raw/driver.js';
import { vdiDriver } from './vdi/driver.js';

let done = false;

export function registerFormats(): void {
  if (done) return;
  done = true;
  registerDriver(qcow2Driver);
  registerDriver(vdiDriver);
  registerDriver(rawDriver);
}
