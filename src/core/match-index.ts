import type { Interaction, MatchSpec, ResourceChange, SubscriptionRecord, SubscriptionStatus } from './types.js';

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

/**
 * Subscription ids with their end (epoch ms) in parallel arrays: a match walks plain arrays (no
 * iterator or entry allocation, cache-friendly) and needs no second look-up for the end.
 */
class Bucket {
  readonly ids: string[] = [];
  readonly ends: number[] = [];

  add(id: string, endMs: number): void {
    this.ids.push(id);
    this.ends.push(endMs);
  }

  /** Swap-remove: order inside a bucket carries no meaning. */
  delete(id: string): void {
    const k = this.ids.indexOf(id);
    if (k === -1) return;
    const last = this.ids.length - 1;
    this.ids[k] = this.ids[last] as string;
    this.ends[k] = this.ends[last] as number;
    this.ids.pop();
    this.ends.pop();
  }

  get size(): number {
    return this.ids.length;
  }

  collect(nowMs: number, out: string[]): void {
    const { ids, ends } = this;
    for (let k = 0; k < ids.length; k++) if ((ends[k] as number) > nowMs) out.push(ids[k] as string);
  }
}

/**
 * One `type + interaction` slot: subscriptions on every id, and those filtered to some ids. The
 * common case — one subscription on a resource id, without an end — is stored as the bare
 * subscription id, so a match costs one hash look-up and no further memory reads.
 */
interface Slot {
  readonly all: Bucket;
  readonly byId: Map<string, string | Bucket>;
}

type Place = readonly [type: string, interaction: Interaction, resourceId: string | undefined];

interface Entry {
  /** Where the subscription is filed. */
  readonly places: readonly Place[];
}

export class MatchIndex {
  /** resource type (or `*`) → interaction → slot: two look-ups, no key strings built per event. */
  readonly #slots = new Map<string, Map<Interaction, Slot>>();
  readonly #entries = new Map<string, Entry>();

  /** Add, replace or (for statuses that no longer match) remove a subscription. */
  upsert(sub: Pick<SubscriptionRecord, 'id' | 'status' | 'match' | 'end'>): void {
    this.remove(sub.id);
    if (!MATCHING.has(sub.status)) return;
    const endMs = sub.end === undefined ? Number.POSITIVE_INFINITY : Date.parse(sub.end);
    const places = placesOf(sub.match);
    for (const [type, interaction, resourceId] of places) {
      let byInteraction = this.#slots.get(type);
      if (byInteraction === undefined) {
        byInteraction = new Map();
        this.#slots.set(type, byInteraction);
      }
      let slot = byInteraction.get(interaction);
      if (slot === undefined) {
        slot = { all: new Bucket(), byId: new Map() };
        byInteraction.set(interaction, slot);
      }
      if (resourceId === undefined) {
        slot.all.add(sub.id, endMs);
      } else {
        const held = slot.byId.get(resourceId);
        if (held === undefined && endMs === Number.POSITIVE_INFINITY) {
          slot.byId.set(resourceId, sub.id);
        } else {
          const bucket = held instanceof Bucket ? held : new Bucket();
          if (typeof held === 'string') bucket.add(held, Number.POSITIVE_INFINITY);
          bucket.add(sub.id, endMs);
          slot.byId.set(resourceId, bucket);
        }
      }
    }
    this.#entries.set(sub.id, { places });
  }

  remove(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    for (const [type, interaction, resourceId] of entry.places) {
      const byInteraction = this.#slots.get(type);
      const slot = byInteraction?.get(interaction);
      if (byInteraction === undefined || slot === undefined) continue;
      if (resourceId === undefined) {
        slot.all.delete(id);
      } else {
        const held = slot.byId.get(resourceId);
        if (held === id) slot.byId.delete(resourceId);
        else if (held instanceof Bucket) {
          held.delete(id);
          if (held.size === 0) slot.byId.delete(resourceId);
        }
      }
      if (slot.all.size === 0 && slot.byId.size === 0) byInteraction.delete(interaction);
      if (byInteraction.size === 0) this.#slots.delete(type);
    }
    this.#entries.delete(id);
  }

  /** Ids of the subscriptions the change matches, each once, as of `nowMs` (expired ones skipped). */
  match(change: ResourceChange, nowMs: number): string[] {
    const out: string[] = [];
    const { resourceType: type, interaction: i, resourceId: id } = change;
    this.#collect(this.#slots.get(type)?.get(i), id, nowMs, out);
    this.#collect(this.#slots.get(ANY)?.get(i), id, nowMs, out);
    return out;
  }

  get size(): number {
    return this.#entries.size;
  }

  #collect(slot: Slot | undefined, resourceId: string | undefined, nowMs: number, out: string[]): void {
    if (slot === undefined) return;
    slot.all.collect(nowMs, out);
    if (resourceId === undefined || slot.byId.size === 0) return;
    const held = slot.byId.get(resourceId);
    if (typeof held === 'string') out.push(held);
    else held?.collect(nowMs, out);
  }
}

function placesOf(spec: MatchSpec): Place[] {
  const types = spec.resourceTypes === '*' ? [ANY] : spec.resourceTypes;
  const places: Place[] = [];
  for (const type of types) {
    for (const i of spec.interactions) {
      if (spec.ids === undefined) places.push([type, i, undefined]);
      else for (const id of spec.ids) places.push([type, i, id]);
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
