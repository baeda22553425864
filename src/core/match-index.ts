import { HAS_END, IdTable } from './id-table.js';
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
 * - per resource type, ONE id table (see id-table.ts) from resource id to postings (subscription id,
 *   interactions as bits). One id look-up serves all three interactions, so the table has a key per
 *   (type, id), not per (type, interaction, id), and a hit reads one cell (the key's fingerprint and
 *   its first four postings side by side) and then the id string to confirm it.
 */

const ANY = '*';

/** Statuses whose subscriptions still collect notifications (delivery waits until `active`). */
const MATCHING: ReadonlySet<SubscriptionStatus> = new Set(['requested', 'active', 'error']);

const BIT: Readonly<Record<Interaction, number>> = { create: 1, update: 2, delete: 4 };
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

/** Everything filed under one resource type (or `*`). */
class TypeSlot {
  /** Subscriptions on every id of the type, by interaction. */
  readonly create = new Bucket();
  readonly update = new Bucket();
  readonly delete = new Bucket();
  /** Subscriptions filtered to some ids: resource id → postings (subscription id, interaction bits). */
  readonly byId = new IdTable();

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
    this.#entries.set(sub.id, entry);
    // Nothing can match a subscription without interactions; postings need a non-zero flag.
    if (entry.interactions.length === 0) return;
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
        for (const id of entry.ids) slot.byId.add(id, sub.id, flags);
      }
    }
  }

  remove(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    this.#entries.delete(id);
    if (entry.interactions.length === 0) return;
    for (const type of entry.types) {
      const slot = this.#slots.get(type);
      if (slot === undefined) continue;
      if (entry.ids === undefined) {
        for (const i of entry.interactions) slot[i].delete(id);
      } else {
        for (const resourceId of entry.ids) slot.byId.remove(resourceId, id);
      }
      if (slot.empty) this.#slots.delete(type);
    }
    this.#ends.delete(id);
  }

  /** Ids of the subscriptions the change matches, each once, as of `nowMs` (expired ones skipped). */
  match(change: ResourceChange, nowMs: number): string[] {
    const out: string[] = [];
    const { resourceType: type, interaction: i, resourceId: id } = change;
    const typed = this.#slots.get(type);
    const any = this.#slots.get(ANY);
    if (typed !== undefined) typed[i].collect(nowMs, out);
    if (any !== undefined) any[i].collect(nowMs, out);
    if (id === undefined) return out;
    if (typed !== undefined) typed.byId.collect(id, BIT[i], nowMs, this.#ends, out);
    if (any !== undefined) any.byId.collect(id, BIT[i], nowMs, this.#ends, out);
    return out;
  }

  get size(): number {
    return this.#entries.size;
  }
}

function entryOf(spec: MatchSpec): Entry {
  return {
    types: spec.resourceTypes === '*' ? [ANY] : [...new Set(spec.resourceTypes)],
    interactions: [...new Set(spec.interactions)],
    ids: spec.ids === undefined ? undefined : [...new Set(spec.ids)],
  };
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
