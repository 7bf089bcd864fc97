/**
 * URL import for the service: the configured policy, the early check at POST
 * time, and opening a URL as a source in the worker. The rules themselves live in
 * src/net (url-policy.ts, http-source.ts); nothing here re-implements them.
 */
import type { Config } from '../config.js';
import type { RandomAccessSource } from '../engine/index.js';

export interface UrlPolicyShape {
  allow: string[];
  allowedPorts: number[];
  connectTimeoutMs: number;
  idleTimeoutMs: number;
  maxBytes: number;
  maxRedirects: number;
}

export interface OpenedUrlSource {
  source: RandomAccessSource;
  mode: 'range' | 'staged';
  finalUrl: string;
  size: number;
  sha256?: string;
  close(): Promise<void>;
}

export interface OpenUrlOptions {
  signal?: AbortSignal;
  stagingPath: string;
  expectedSha256?: string;
  onProgress?: (done: number, total: number | undefined) => void;
}

interface NetApi {
  checkUrl(raw: string, policy: UrlPolicyShape): Promise<{ url: URL; address: string; family: 4 | 6 }>;
  openUrlSource(url: string, policy: UrlPolicyShape, options: OpenUrlOptions): Promise<OpenedUrlSource>;
}

// Loaded lazily: src/net is built alongside the service, and a process that never
// imports a URL need not load it.
let net: Promise<NetApi> | undefined;
async function loadNet(): Promise<NetApi> {
  const policyModule = '../net/url-policy.js';
  const sourceModule = '../net/http-source.js';
  net ??= Promise.all([import(policyModule), import(sourceModule)]).then(([p, s]) => ({
    checkUrl: (p as NetApi).checkUrl,
    openUrlSource: (s as NetApi).openUrlSource,
  }));
  return net;
}

export function urlPolicy(config: Pick<Config, 'urlImport' | 'maxUploadBytes'>): UrlPolicyShape {
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
export async function checkImportUrl(url: string, policy: UrlPolicyShape): Promise<void> {
  await (await loadNet()).checkUrl(url, policy);
}

export async function openImportUrl(url: string, policy: UrlPolicyShape, options: OpenUrlOptions): Promise<OpenedUrlSource> {
  return (await loadNet()).openUrlSource(url, policy, options);
}
