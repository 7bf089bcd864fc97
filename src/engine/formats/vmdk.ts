import { UnsupportedFormatError } from '../errors.js';
import type { FormatDriver } from '../types.js';

// Placeholder until the driver lands: probes nothing, so images fall through to raw.
export const vmdkDriver: FormatDriver = {
  id: 'vmdk',
  probe: () => false,
  open: async () => {
    throw new UnsupportedFormatError('vmdk is not implemented yet');
  },
};
