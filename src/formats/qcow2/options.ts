/** The `-o` options qcow2 accepts at creation, as qemu-img lists them. */
import type { OptionSpec } from '../../core/options.js';

export const qcow2CreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'compat', type: 'string', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
  { name: 'data_file', type: 'string', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
  { name: 'cluster_size', type: 'size', help: 'qcow2 cluster size', default: '65536' },
  {
    name: 'preallocation',
    type: 'string',
    help: 'Preallocation mode (allowed values: off, metadata, falloc, full)',
  },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates', default: 'off' },
  { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits', default: '16' },
  { name: 'compression_type', type: 'string', help: 'Compression method used for image cluster compression', default: 'zlib' },
  { name: 'extended_l2', type: 'bool', help: 'Extended L2 tables', default: 'off' },
];
