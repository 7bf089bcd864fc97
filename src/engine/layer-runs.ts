/**
 * Coalescing a differencing image's layer map (VHD and VHDX, src/engine/formats/):
 * entries of one kind that follow each other in the guest (and, when stored, in
 * the file) become one run. `add` yields the run an entry closes, `end` the last.
 */
import type { LayerEntry } from './types.js';

export interface LayerRuns {
  add(entry: LayerEntry): Generator<LayerEntry>;
  end(): Generator<LayerEntry>;
}

export function layerRuns(): LayerRuns {
  let run: LayerEntry | undefined;
  return {
    *add(e: LayerEntry): Generator<LayerEntry> {
      if (run && run.kind === e.kind && run.offset + run.length === e.offset && (run.kind !== 'stored' || (e.kind === 'stored' && run.fileOffset + run.length === e.fileOffset))) {
        run.length += e.length;
        return;
      }
      if (run) yield run;
      run = e;
    },
    *end(): Generator<LayerEntry> {
      if (run) yield run;
      run = undefined;
    },
  };
}
