/**
 * The publish step: after a successful conversion, make the output a Glance image
 * (disk_format raw, container_format bare) and wait until it is `active`.
 *
 * - location (zero copy): the output is an RBD image in a pool Glance uses; create
 *   the image (queued) and add the location rbd://FSID/POOL/IMAGE/snap with our
 *   md5 and sha512 as validation_data. Where Glance refuses the location, upload.
 * - upload: stream the output from the output store into PUT /v2/images/{id}/file
 *   (GLANCE_METHOD=direct) or stage it and import it with glance-direct (import).
 *
 * Unavailability (network, timeouts, 5xx) is retried with backoff; a refusal (4xx)
 * is not. Nothing here ever deletes the output.
 *
 * Which Glance image is ours: its id is chosen here (a fresh UUID, Glance accepts
 * `id` on create) and recorded in the job before the create call, so a worker that
 * dies at any point leaves the next attempt (or a cancel) the id of every image it
 * may have created; an image is touched only by that recorded id, never found by
 * name or listing. A publish that gives up deletes the image it created; a cancel
 * is the caller's (discard()), since only it knows the job is over for every
 * attempt (a superseded or shut-down attempt must leave the image to the next one).
 */
import { randomUUID } from 'node:crypto';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import type { GlanceConfig } from '../config.js';
import { AbortedError, isDiskconvError } from '../engine/errors.js';
import { sleep } from '../net/request.js';
import type { GlanceOutput, GlanceRequest } from '../queue/records.js';
import { GlanceClient, GlanceRefusedError, GlanceUnavailableError, type GlanceImage } from './glance.js';

/** Glance records an md5 `checksum` and a sha512 `os_hash_value`: a publishing job computes both in the conversion's pass. */
export const GLANCE_HASHES = ['md5', 'sha512'] as const;

export interface PublishInput {
  request: GlanceRequest;
  /** The converted output: its size and digests (md5 and sha512 computed in the conversion's pass). */
  output: { size: number; md5: string; sha512: string };
  /** The output as an RBD image with its Glance-form location, when it was written into a pool. */
  rbd?: { pool: string; location: string };
  /** Called just before the RBD image is registered in place: from then on it is Glance's. */
  beforeLocation?: () => Promise<void>;
  /** The output's bytes from the start, streamed from the output store (a fresh stream per call). */
  openOutput: () => Promise<Readable>;
  /** What an earlier attempt recorded (a worker that died mid-publish): its image is reused or replaced. */
  previous?: GlanceOutput;
  /**
   * Persists what is known so far (the image id before the image exists), so a cancel
   * or a crash can find it. Throws when the job is no longer this attempt's: nothing
   * is created then.
   */
  onUpdate: (glance: GlanceOutput) => Promise<void>;
  signal: AbortSignal;
  log: Logger;
}

/** How long an image may take to become active after its data went in (import runs as a Glance task). */
const ACTIVE_TIMEOUT_MS = 10 * 60_000;

export class Publisher {
  readonly client: GlanceClient;
  constructor(readonly config: GlanceConfig) {
    this.client = new GlanceClient(config);
  }

  /** Whether an RBD output in `pool` can be registered in place. */
  zeroCopy(pool: string | undefined): boolean {
    return pool !== undefined && this.config.rbdPools.includes(pool);
  }

  /** Publishes; resolves with Glance's record once the image is active, or throws GLANCE_UNAVAILABLE / GLANCE_REFUSED / ABORTED. */
  async publish(input: PublishInput): Promise<GlanceOutput> {
    const { signal, log } = input;
    let state: GlanceOutput | undefined = input.previous;
    const attempts = this.config.publishAttempts;
    const update = (next: GlanceOutput): Promise<void> => {
      state = next;
      return input.onUpdate(next);
    };
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          const image = await this.publishOnce(input, state, update);
          const done = finalRecord(image, state as GlanceOutput, input);
          if (input.request.protected) {
            // Protected only once complete: an unfinished image of ours can always be deleted.
            await this.client.setProtected(image.id, true, signal);
          }
          return done;
        } catch (err) {
          if (signal.aborted) throw new AbortedError();
          if (!isDiskconvError(err) || err.deterministic || attempt >= attempts) {
            if (isDiskconvError(err)) throw err;
            throw new GlanceUnavailableError(`publishing into Glance failed: ${(err as Error).message}`, { cause: err });
          }
          const wait = this.config.publishBackoffMs * 2 ** (attempt - 1) * (0.5 + Math.random() / 2);
          log.warn({ code: err.code, attempt, next_in_ms: Math.round(wait) }, `Glance publish attempt failed, will retry: ${err.message}`);
          await sleep(wait, signal);
        }
      }
    } catch (err) {
      // Given up: the image this job created goes (whatever its status: a failed job's image is no product).
      // Aborted: left to the caller, who knows whether the job is over (cancel) or handed to another attempt.
      const current = state as GlanceOutput | undefined;
      if (!signal.aborted && current) {
        const gone = await this.discard(current, log);
        if (gone) await update(gone).catch(() => {});
      }
      throw err;
    }
  }

  /**
   * Deletes the image a job recorded as its own (by its recorded id only), in any
   * status, unprotecting it first if this job protected it. Resolves with the record
   * to keep (status `deleted`), or undefined when it could not be deleted (logged)
   * or there was nothing to delete.
   */
  async discard(glance: GlanceOutput, log: Logger): Promise<GlanceOutput | undefined> {
    if (glance.status === 'deleted') return undefined;
    try {
      const image = await this.client.getImage(glance.image_id);
      if (image) {
        if (image.protected === true) await this.client.setProtected(image.id, false);
        await this.client.deleteImage(image.id);
        log.info({ image: image.id, status: image.status }, 'deleted the Glance image this job created');
      }
      return { ...glance, status: 'deleted' };
    } catch (err) {
      log.warn({ err, image: glance.image_id }, 'could not delete the Glance image this job created');
      return undefined;
    }
  }

  private async publishOnce(input: PublishInput, state: GlanceOutput | undefined, update: (g: GlanceOutput) => Promise<void>): Promise<GlanceImage> {
    const { signal } = input;
    let image: GlanceImage | undefined;
    if (state?.image_id && state.status !== 'deleted') {
      // The recorded id is ours (chosen by an earlier try or a dead worker, created or not).
      image = await this.client.getImage(state.image_id, signal);
      if (image?.status === 'active') return image;
      if (image && image.status !== 'queued') {
        // An earlier try left it saving, importing or killed: it can take no more data. Replace it.
        await this.client.deleteImage(image.id, signal);
        image = undefined;
      }
    }
    const method: GlanceOutput['method'] = input.rbd && this.zeroCopy(input.rbd.pool) && !state?.fallback_reason ? 'location' : 'upload';
    const fallback = state?.fallback_reason ? { fallback_reason: state.fallback_reason } : {};
    if (!image) {
      // Recorded first, created second: whatever happens in between, the job knows the id.
      const id = randomUUID();
      await update({ image_id: id, status: 'creating', method, ...fallback });
      // Not abortable: a create cut off mid-request may still land; this one either
      // lands or fails, and a cancel that follows deletes it by its id.
      image = await this.client.createImage(
        {
          id,
          ...(input.request.name !== undefined ? { name: input.request.name } : {}),
          ...(input.request.visibility !== undefined ? { visibility: input.request.visibility } : {}),
          ...(input.request.min_disk !== undefined ? { min_disk: input.request.min_disk } : {}),
          ...(input.request.min_ram !== undefined ? { min_ram: input.request.min_ram } : {}),
          ...(input.request.properties ? { properties: input.request.properties } : {}),
        },
      );
      if (signal.aborted) throw new AbortedError();
    }
    const base: GlanceOutput = { image_id: image.id, status: image.status, method, ...fallback };
    await update(base);

    if (method === 'location' && input.rbd) {
      try {
        await input.beforeLocation?.();
        await this.client.addLocation(
          image.id,
          input.rbd.location,
          { checksum: input.output.md5, os_hash_algo: 'sha512', os_hash_value: input.output.sha512 },
          signal,
        );
        return this.waitActive(image.id, signal);
      } catch (err) {
        if (!(err instanceof GlanceRefusedError)) throw err;
        input.log.warn({ image: image.id }, `Glance refused the location; uploading instead: ${err.message}`);
        await update({ ...base, method: 'upload', fallback_reason: err.message });
        // A refused location leaves the image queued: the upload goes into the same image.
      }
    }

    const body = await input.openOutput();
    if (this.config.method === 'import') {
      await this.client.stageData(image.id, body, input.output.size, signal);
      await this.client.importStaged(image.id, signal);
    } else {
      await this.client.uploadData(image.id, body, input.output.size, signal);
    }
    return this.waitActive(image.id, signal);
  }

  private async waitActive(id: string, signal: AbortSignal): Promise<GlanceImage> {
    const deadline = Date.now() + ACTIVE_TIMEOUT_MS;
    for (let wait = 100; ; wait = Math.min(2000, wait * 2)) {
      const image = await this.client.getImage(id, signal);
      if (!image) throw new GlanceRefusedError(`the Glance image ${id} disappeared while it was being published`, 404);
      if (image.status === 'active') return image;
      if (image.os_glance_failed_import) throw new GlanceUnavailableError(`Glance's import into ${image.os_glance_failed_import} failed`);
      if (image.status === 'killed' || image.status === 'deleted' || image.status === 'pending_delete') {
        throw new GlanceUnavailableError(`the Glance image ${id} went ${image.status} while it was being published`);
      }
      if (Date.now() > deadline) throw new GlanceUnavailableError(`the Glance image ${id} stayed ${image.status} for ${ACTIVE_TIMEOUT_MS / 1000} s`);
      await sleep(wait, signal);
    }
  }
}

/** Glance's record, checked against ours: its md5 and sha512 must be the output's. */
function finalRecord(image: GlanceImage, state: GlanceOutput, input: PublishInput): GlanceOutput {
  const out: GlanceOutput = {
    image_id: image.id,
    status: image.status,
    method: state.method,
    checksum: image.checksum ?? null,
    os_hash_algo: image.os_hash_algo ?? null,
    os_hash_value: image.os_hash_value ?? null,
    ...(state.fallback_reason ? { fallback_reason: state.fallback_reason } : {}),
  };
  if (image.checksum !== input.output.md5 || image.os_hash_algo !== 'sha512' || image.os_hash_value !== input.output.sha512) {
    throw new GlanceRefusedError(
      `Glance recorded checksum ${image.checksum ?? 'null'} and ${image.os_hash_algo ?? 'no hash'} ${image.os_hash_value ?? 'null'}; ` +
        `the output's md5 is ${input.output.md5} and sha512 ${input.output.sha512}`,
      200,
    );
  }
  return out;
}
