/**
 * `map`'s value for `key`, computed and kept on a miss. For per-subscription derivations (parsed
 * endpoints, decoded signing keys): bounded by the subscriptions, and cleared rather than grown
 * past `limit` should something unbounded ever reach it.
 */
export function memo<K, V>(map: Map<K, V>, key: K, compute: (key: K) => V, limit = 10_000): V {
  let value = map.get(key);
  if (value === undefined) {
    value = compute(key);
    if (map.size >= limit) map.clear();
    map.set(key, value);
  }
  return value;
}
