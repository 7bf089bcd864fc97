import { UnsupportedFormatError } from '../errors.js';
import type { FormatDriver } from '../types.js';

// Placeholder until the driver lands: probes nothing, so images fall through to raw.
export const vdiDriver: FormatDriver = {
  id: 'vdi',
  probe: () => false,
  open: async () => {
    throw new UnsupportedFormatError('vdi is not implemented yet');
  },
};
