import type { Interaction, MatchSpec, ResourceChange, SubscriptionRecord, SubscriptionStatus } from './types.js';

/**
 * In-memory matching index, kept in step with the store by the subscription registry.
 *
 * Stage one of matching: what a CloudTrail event carries (type, interaction, id). Each subscription
 * is filed under exact keys, so one event costs two type look-ups, one id look-up and the size of
 * the answer, whatever the number of subscriptions that cannot match. A content stage (search
 * parameters over the fetched resource) will filter these candidates when it exists.
 *
 * Layout, chosen for memory latency (at 100k subscriptions the index no longer fits the caches, and
 * every dependent read that misses costs more than the rest of a match):
 * - per resource type (or `*`), one bucket per interaction for subscriptions on every id;
 * - per resource type, ONE map from resource id to a flat posting list `[subId, flags, subId, flags…]`
 *   where `flags` holds the interactions as bits. One id look-up serves all three interactions, so
 *   the map has a key per (type, id), not per (type, interaction, id), and a hit costs one array
 *   read. Posting lists are copied on write, so an array and its elements are allocated together.
 */

const ANY = '*';

/** Statuses whose subscriptions still collect notifications (delivery waits until `active`). */
const MATCHING: ReadonlySet<SubscriptionStatus> = new Set(['requested', 'active', 'error']);

const BIT: Readonly<Record<Interaction, number>> = { create: 1, update: 2, delete: 4 };
/** Flag on a posting whose subscription has an `end`: look it up in `#ends` before matching. */
const HAS_END = 8;
const NO_END = Number.POSITIVE_INFINITY;

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

/** `[subId, flags, subId, flags, …]`; never mutated in place (copy on write). */
type Postings = readonly (string | number)[];

/** Everything filed under one resource type (or `*`). */
class TypeSlot {
  /** Subscriptions on every id of the type, by interaction. */
  readonly create = new Bucket();
  readonly update = new Bucket();
  readonly delete = new Bucket();
  /** Subscriptions filtered to some ids: resource id → posting list. */
  readonly byId = new Map<string, Postings>();

  get empty(): boolean {
    return this.create.size === 0 && this.update.size === 0 && this.delete.size === 0 && this.byId.size === 0;
  }
}

interface Entry {
  readonly types: readonly string[];
  readonly interactions: readonly Interaction[];
  readonly ids: readonly string[] | undefined;
}

export class MatchIndex {
  readonly #slots = new Map<string, TypeSlot>();
  readonly #entries = new Map<string, Entry>();
  /** End (epoch ms) of the id-filtered subscriptions that have one (postings flagged HAS_END). */
  readonly #ends = new Map<string, number>();

  /** Add, replace or (for statuses that no longer match) remove a subscription. */
  upsert(sub: Pick<SubscriptionRecord, 'id' | 'status' | 'match' | 'end'>): void {
    this.remove(sub.id);
    if (!MATCHING.has(sub.status)) return;
    const endMs = sub.end === undefined ? NO_END : Date.parse(sub.end);
    const entry = entryOf(sub.match);
    let flags = 0;
    for (const i of entry.interactions) flags |= BIT[i];
    if (endMs !== NO_END) {
      flags |= HAS_END;
      if (entry.ids !== undefined) this.#ends.set(sub.id, endMs);
    }
    for (const type of entry.types) {
      let slot = this.#slots.get(type);
      if (slot === undefined) {
        slot = new TypeSlot();
        this.#slots.set(type, slot);
      }
      if (entry.ids === undefined) {
        for (const i of entry.interactions) slot[i].add(sub.id, endMs);
      } else {
        for (const id of entry.ids) slot.byId.set(id, [...(slot.byId.get(id) ?? []), sub.id, flags]);
      }
    }
    this.#entries.set(sub.id, entry);
  }

  remove(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    for (const type of entry.types) {
      const slot = this.#slots.get(type);
      if (slot === undefined) continue;
      if (entry.ids === undefined) {
        for (const i of entry.interactions) slot[i].delete(id);
      } else {
        for (const resourceId of entry.ids) {
          const kept = withoutSub(slot.byId.get(resourceId) ?? [], id);
          if (kept.length === 0) slot.byId.delete(resourceId);
          else slot.byId.set(resourceId, kept);
        }
      }
      if (slot.empty) this.#slots.delete(type);
    }
    this.#ends.delete(id);
    this.#entries.delete(id);
  }

  /** Ids of the subscriptions the change matches, each once, as of `nowMs` (expired ones skipped). */
  match(change: ResourceChange, nowMs: number): string[] {
    const out: string[] = [];
    const { resourceType: type, interaction: i, resourceId: id } = change;
    const typed = this.#slots.get(type);
    if (typed !== undefined) this.#collect(typed, i, id, nowMs, out);
    const any = this.#slots.get(ANY);
    if (any !== undefined) this.#collect(any, i, id, nowMs, out);
    return out;
  }

  get size(): number {
    return this.#entries.size;
  }

  #collect(slot: TypeSlot, i: Interaction, resourceId: string | undefined, nowMs: number, out: string[]): void {
    slot[i].collect(nowMs, out);
    if (resourceId === undefined || slot.byId.size === 0) return;
    const postings = slot.byId.get(resourceId);
    if (postings === undefined) return;
    const bit = BIT[i];
    for (let k = 0; k < postings.length; k += 2) {
      const flags = postings[k + 1] as number;
      if ((flags & bit) === 0) continue;
      const subId = postings[k] as string;
      if ((flags & HAS_END) !== 0 && (this.#ends.get(subId) as number) <= nowMs) continue;
      out.push(subId);
    }
  }
}

function entryOf(spec: MatchSpec): Entry {
  return {
    types: spec.resourceTypes === '*' ? [ANY] : [...new Set(spec.resourceTypes)],
    interactions: [...new Set(spec.interactions)],
    ids: spec.ids === undefined ? undefined : [...new Set(spec.ids)],
  };
}

function withoutSub(postings: Postings, subId: string): Postings {
  const kept: (string | number)[] = [];
  for (let k = 0; k < postings.length; k += 2) {
    if (postings[k] !== subId) kept.push(postings[k] as string, postings[k + 1] as number);
  }
  return kept;
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
