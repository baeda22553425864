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

/** Subscription id → its end (epoch ms), kept in the bucket so a match needs no second look-up. */
type Bucket = Map<string, number>;

/** One `type + interaction` slot: subscriptions on every id, and those filtered to some ids. */
interface Slot {
  readonly all: Bucket;
  readonly byId: Map<string, Bucket>;
}

interface Entry {
  /** Where the subscription is filed: slot key and, for id filters, the resource id. */
  readonly places: readonly (readonly [string, string | undefined])[];
}

export class MatchIndex {
  readonly #slots = new Map<string, Slot>();
  readonly #entries = new Map<string, Entry>();

  /** Add, replace or (for statuses that no longer match) remove a subscription. */
  upsert(sub: Pick<SubscriptionRecord, 'id' | 'status' | 'match' | 'end'>): void {
    this.remove(sub.id);
    if (!MATCHING.has(sub.status)) return;
    const endMs = sub.end === undefined ? Number.POSITIVE_INFINITY : Date.parse(sub.end);
    const places = placesOf(sub.match);
    for (const [key, resourceId] of places) {
      let slot = this.#slots.get(key);
      if (slot === undefined) {
        slot = { all: new Map(), byId: new Map() };
        this.#slots.set(key, slot);
      }
      if (resourceId === undefined) {
        slot.all.set(sub.id, endMs);
      } else {
        let bucket = slot.byId.get(resourceId);
        if (bucket === undefined) {
          bucket = new Map();
          slot.byId.set(resourceId, bucket);
        }
        bucket.set(sub.id, endMs);
      }
    }
    this.#entries.set(sub.id, { places });
  }

  remove(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    for (const [key, resourceId] of entry.places) {
      const slot = this.#slots.get(key);
      if (slot === undefined) continue;
      if (resourceId === undefined) {
        slot.all.delete(id);
      } else {
        const bucket = slot.byId.get(resourceId);
        bucket?.delete(id);
        if (bucket?.size === 0) slot.byId.delete(resourceId);
      }
      if (slot.all.size === 0 && slot.byId.size === 0) this.#slots.delete(key);
    }
    this.#entries.delete(id);
  }

  /** Ids of the subscriptions the change matches, each once, as of `nowMs` (expired ones skipped). */
  match(change: ResourceChange, nowMs: number): string[] {
    const out: string[] = [];
    const { resourceType: type, interaction: i, resourceId: id } = change;
    this.#collect(this.#slots.get(`${type}\u0000${i}`), id, nowMs, out);
    this.#collect(this.#slots.get(`${ANY}\u0000${i}`), id, nowMs, out);
    return out;
  }

  get size(): number {
    return this.#entries.size;
  }

  #collect(slot: Slot | undefined, resourceId: string | undefined, nowMs: number, out: string[]): void {
    if (slot === undefined) return;
    for (const [sub, endMs] of slot.all) if (endMs > nowMs) out.push(sub);
    if (resourceId === undefined || slot.byId.size === 0) return;
    const bucket = slot.byId.get(resourceId);
    if (bucket !== undefined) for (const [sub, endMs] of bucket) if (endMs > nowMs) out.push(sub);
  }
}

function placesOf(spec: MatchSpec): [string, string | undefined][] {
  const types = spec.resourceTypes === '*' ? [ANY] : spec.resourceTypes;
  const places: [string, string | undefined][] = [];
  for (const type of types) {
    for (const i of spec.interactions) {
      const key = `${type}\u0000${i}`;
      if (spec.ids === undefined) places.push([key, undefined]);
      else for (const id of spec.ids) places.push([key, id]);
    }
  }
  return places;
}

/** The reference semantics the index must agree with; also the bench's linear-scan baseline. */
export function matchesSpec(spec: MatchSpec, change: ResourceChange): boolean {
  if (spec.resourceTypes !== '*' && !spec.resourceTypes.includes(change.resourceType)) return false;
  if (!spec.interactions.includes(change.interaction)) return false;
  if (spec.ids !== undefined) return change.resourceId !== undefined && spec.ids.includes(change.resourceId);
  return true;
}

/**
 * The ids among `candidates` (a store's type-index answer for the change's type) that the change
 * matches as of `nowMs`: the same result as `MatchIndex.match` over those subscriptions.
 */
export function matchCandidates(
  candidates: readonly Pick<SubscriptionRecord, 'id' | 'match' | 'end'>[],
  change: ResourceChange,
  nowMs: number,
): string[] {
  return candidates
    .filter((c) => (c.end === undefined || Date.parse(c.end) > nowMs) && matchesSpec(c.match, change))
    .map((c) => c.id);
}
