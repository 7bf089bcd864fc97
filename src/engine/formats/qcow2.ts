import { UnsupportedFormatError } from '../errors.js';
import type { FormatDriver } from '../types.js';

// Placeholder until the driver lands: probes nothing, so images fall through to raw.
export const qcow2Driver: FormatDriver = {
  id: 'qcow2',
  probe: () => false,
  open: async () => {
    throw new UnsupportedFormatError('qcow2 is not implemented yet');
  },
};
