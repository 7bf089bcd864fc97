/**
 * URL import for the service: the configured policy, the early check at POST
 * time, and opening a URL as a source in the worker. The rules themselves live in
 * src/net; nothing here re-implements them.
 */
import type { Config } from '../config.js';
import { checkUrl, openUrlSource, type OpenedUrlSource, type UrlPolicy, type UrlSourceOptions } from '../net/index.js';
import { GrowingFileSource } from './upload-stream.js';

export type { OpenedUrlSource } from '../net/index.js';
export type UrlPolicyShape = UrlPolicy;

export function urlPolicy(config: Pick<Config, 'urlImport' | 'maxUploadBytes'>): UrlPolicy {
  return {
    allow: config.urlImport.allow,
    allowedPorts: config.urlImport.ports,
    connectTimeoutMs: config.urlImport.connectTimeoutMs,
    idleTimeoutMs: config.urlImport.idleTimeoutMs,
    // MAX_UPLOAD_BYTES bounds downloads too.
    maxBytes: config.maxUploadBytes,
    maxRedirects: config.urlImport.maxRedirects,
  };
}

/** Throws URL_REFUSED when the URL breaks a rule (scheme, port, address...). */
export async function checkImportUrl(url: string, policy: UrlPolicy): Promise<void> {
  await checkUrl(url, policy);
}

export function openImportUrl(url: string, policy: UrlPolicy, options: UrlSourceOptions): Promise<OpenedUrlSource> {
  return openUrlSource(url, policy, options);
}

/**
 * The worker's import: a server that cannot be read by ranges is still downloaded
 * whole (and hashed), but the conversion reads the download as it grows, through
 * the same GrowingFileSource that follows an upload (a read of bytes not yet
 * written waits for them; the download's failure fails it).
 */
export function openImportUrlFollowing(url: string, policy: UrlPolicy, options: UrlSourceOptions): Promise<OpenedUrlSource> {
  return openUrlSource(url, policy, { ...options, follow: (path, size, name, feed) => GrowingFileSource.open(path, size, name, { feed }) });
}

/** A URL as shown in info and messages: no user-info, query or fragment (presigned URLs carry secrets there). */
export function displayUrl(raw: string): string {
  try {
    const u = new URL(raw);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return 'url';
  }
}
