import type { MatchSpec, ResourceChange, SubscriptionRecord, SubscriptionStatus } from './types.js';

/**
 * In-memory matching index, kept in step with the store by the subscription registry.
 *
 * Stage one of matching: what a CloudTrail event carries (type, interaction, id). Each subscription
 * is filed under exact keys, so one event costs at most four map look-ups plus the size of the
 * answer, whatever the number of subscriptions that cannot match. A content stage (search
 * parameters over the fetched resource) will filter these candidates when it exists.
 */

const ANY = '*';

/** Statuses whose subscriptions still collect notifications (delivery waits until `active`). */
const MATCHING: ReadonlySet<SubscriptionStatus> = new Set(['requested', 'active', 'error']);

interface Entry {
  readonly keys: readonly string[];
  readonly endMs: number;
}

export class MatchIndex {
  readonly #buckets = new Map<string, Set<string>>();
  readonly #entries = new Map<string, Entry>();

  /** Add, replace or (for statuses that no longer match) remove a subscription. */
  upsert(sub: Pick<SubscriptionRecord, 'id' | 'status' | 'match' | 'end'>): void {
    this.remove(sub.id);
    if (!MATCHING.has(sub.status)) return;
    const keys = keysOf(sub.match);
    for (const key of keys) {
      let bucket = this.#buckets.get(key);
      if (bucket === undefined) {
        bucket = new Set();
        this.#buckets.set(key, bucket);
      }
      bucket.add(sub.id);
    }
    const endMs = sub.end === undefined ? Number.POSITIVE_INFINITY : Date.parse(sub.end);
    this.#entries.set(sub.id, { keys, endMs });
  }

  remove(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    for (const key of entry.keys) {
      const bucket = this.#buckets.get(key);
      bucket?.delete(id);
      if (bucket?.size === 0) this.#buckets.delete(key);
    }
    this.#entries.delete(id);
  }

  /** Ids of the subscriptions the change matches, each once, as of `nowMs` (expired ones skipped). */
  match(change: ResourceChange, nowMs: number): string[] {
    const out: string[] = [];
    const { resourceType: type, interaction: i, resourceId: id } = change;
    this.#collect(`${type}\u0000${i}`, nowMs, out);
    this.#collect(`${ANY}\u0000${i}`, nowMs, out);
    if (id !== undefined) {
      this.#collect(`${type}\u0000${i}\u0000${id}`, nowMs, out);
      this.#collect(`${ANY}\u0000${i}\u0000${id}`, nowMs, out);
    }
    return out;
  }

  get size(): number {
    return this.#entries.size;
  }

  #collect(key: string, nowMs: number, out: string[]): void {
    const bucket = this.#buckets.get(key);
    if (bucket === undefined) return;
    for (const id of bucket) {
      const entry = this.#entries.get(id);
      if (entry !== undefined && entry.endMs > nowMs) out.push(id);
    }
  }
}

function keysOf(spec: MatchSpec): string[] {
  const types = spec.resourceTypes === '*' ? [ANY] : spec.resourceTypes;
  const keys: string[] = [];
  for (const type of types) {
    for (const i of spec.interactions) {
      if (spec.ids === undefined) keys.push(`${type}\u0000${i}`);
      else for (const id of spec.ids) keys.push(`${type}\u0000${i}\u0000${id}`);
    }
  }
  return keys;
}

/** The reference semantics the index must agree with; also the bench's linear-scan baseline. */
export function matchesSpec(spec: MatchSpec, change: ResourceChange): boolean {
  if (spec.resourceTypes !== '*' && !spec.resourceTypes.includes(change.resourceType)) return false;
  if (!spec.interactions.includes(change.interaction)) return false;
  if (spec.ids !== undefined) return change.resourceId !== undefined && spec.ids.includes(change.resourceId);
  return true;
}
