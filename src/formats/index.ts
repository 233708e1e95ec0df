/** Registers every format driver with core, in probe order (raw, the fallback, last). */
import { registerDriver } from '../core/driver.js';
import { qcow2Driver } from './qcow2/driver.js';
import { rawDriver } from './raw/driver.js';
import { ovaDriver } from './ova/driver.js';
import { qcow1Driver } from './qcow1/driver.js';
import { qedDriver } from './qed/driver.js';
import { vhdxDriver } from './vhdx/driver.js';
import { parallelsDriver } from './parallels/driver.js';
import { dmgDriver } from './dmg/driver.js';
import { bochsDriver } from './bochs/driver.js';
import { cloopDriver } from './cloop/driver.js';
import { vpcDriver } from './vpc/driver.js';
import { vmdkDriver } from './vmdk/driver.js';
import { vdiDriver } from './vdi/driver.js';
import { luksDriver } from './luks/driver.js';

let done = false;

export function registerFormats(): void {
  if (done) return;
  done = true;
  registerDriver(qcow2Driver);
  registerDriver(qcow1Driver);
  registerDriver(qedDriver);
  registerDriver(ovaDriver);
  registerDriver(vhdxDriver);
  registerDriver(parallelsDriver);
  registerDriver(dmgDriver);
  registerDriver(bochsDriver);
  registerDriver(cloopDriver);
  registerDriver(vpcDriver);
  registerDriver(vmdkDriver);
  registerDriver(vdiDriver);
  registerDriver(luksDriver);
  registerDriver(rawDriver);
}
