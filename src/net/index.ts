/**
 * URL import for the service: the URL policy (SSRF rules) and sources that read
 * a remote image by range requests or stage it locally. Depends on the engine;
 * the engine never imports from here.
 */
export * from './errors.js';
export {
  DEFAULT_URL_POLICY,
  checkUrl,
  checkRedirect,
  isForbiddenAddress,
  parseAllowList,
  parsePortList,
  validateUrlPolicy,
  type CheckedUrl,
  type UrlPolicy,
} from './url-policy.js';
export { openUrlSource, type OpenedUrlSource, type UrlSourceOptions } from './http-source.js';
export { HttpRangeSource, DEFAULT_RANGE_TUNING, type RangeSourceTuning, type RangeSourceStats } from './range-source.js';
