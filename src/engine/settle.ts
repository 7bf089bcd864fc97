/**
 * Promise.all that settles only once every promise has: the first rejection (in order) is thrown after the rest
 * have finished, so nothing is still writing into memory its caller reuses on failure, and nothing a caller
 * counts as done is still under way when it hears of the failure.
 */
export async function allSettledOrThrow<T>(promises: Iterable<Promise<T>>): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}
