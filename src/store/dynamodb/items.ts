import type {
  Channel,
  DeliveryState,
  FhirResource,
  MatchSpec,
  ResourceChange,
  StoredNotification,
  SubscriptionKind,
  SubscriptionRecord,
  SubscriptionStatus,
  SubscriptionVersion,
} from '../../core/types.js';
import { EARLIER_VERSIONS_KEPT } from '../store.js';
import { type Expression, type Item, N, readNumber, readOptionalString, readString, S } from './attributes.js';
import { TTL_ATTRIBUTE } from './tables.js';

/** How records become DynamoDB items and back, and the keys and scopes items are found by. */

/** The `scope` of the item that marks an EventBridge id as accepted (FHIR ids cannot contain `#`). */
export const EVENT_SCOPE = '#event';

/** Statuses that still collect notifications; mirrors the matching index and the SQLite adapter. */
export const COLLECTING: readonly SubscriptionStatus[] = ['requested', 'active', 'error'];

/** The type index key of subscriptions on every resource type. */
export const ANY_TYPE = '*';

export type IndexedFields = Pick<SubscriptionRecord, 'status' | 'match' | 'end'>;

export function toSubscriptionItem(rec: SubscriptionRecord): Item {
  return {
    id: S(rec.id),
    owner: S(rec.owner),
    kind: S(rec.kind),
    topic: S(rec.topic),
    status: S(rec.status),
    ...(rec.error === undefined ? {} : { error: S(rec.error) }),
    match: S(JSON.stringify(rec.match)),
    channel: S(JSON.stringify(rec.channel)),
    webhookSecret: S(rec.webhookSecret),
    ...(rec.previousSecret === undefined ? {} : { previousSecret: S(JSON.stringify(rec.previousSecret)) }),
    ...(rec.end === undefined ? {} : { end: S(rec.end) }),
    eventsSinceStart: N(rec.eventsSinceStart),
    createdAt: S(rec.createdAt),
    updatedAt: S(rec.updatedAt),
    resource: S(JSON.stringify(rec.resource)),
    ...(COLLECTING.includes(rec.status) ? { collectingOwner: S(rec.owner) } : {}),
  };
}

// Items are written only by this adapter from validated records, so reading them back is trusted
// as far as their JSON goes; missing or mistyped attributes fail loudly (CorruptItemError).
export function fromSubscriptionItem(item: Item): SubscriptionRecord {
  const error = readOptionalString(item, 'error');
  const previousSecret = readOptionalString(item, 'previousSecret');
  const end = readOptionalString(item, 'end');
  return {
    id: readString(item, 'id'),
    owner: readString(item, 'owner'),
    kind: readString(item, 'kind') as SubscriptionKind,
    topic: readString(item, 'topic'),
    status: readString(item, 'status') as SubscriptionStatus,
    ...(error === undefined ? {} : { error }),
    match: JSON.parse(readString(item, 'match')) as MatchSpec,
    channel: JSON.parse(readString(item, 'channel')) as Channel,
    webhookSecret: readString(item, 'webhookSecret'),
    ...(previousSecret === undefined
      ? {}
      : { previousSecret: JSON.parse(previousSecret) as { secret: string; until: string } }),
    ...(end === undefined ? {} : { end }),
    eventsSinceStart: readNumber(item, 'eventsSinceStart'),
    createdAt: readString(item, 'createdAt'),
    updatedAt: readString(item, 'updatedAt'),
    resource: JSON.parse(readString(item, 'resource')) as FhirResource,
  };
}

/**
 * A subscription's earlier versions live on its own item, in `versions` (JSON, newest first), so a
 * write keeps the version it replaces in the same conditional UpdateItem that replaces it. An
 * entry leaves out a resource equal to the next newer version's (the handshake, a dead letter, a
 * 410 change only the status), and the list keeps at most EARLIER_VERSIONS_KEPT entries and, past
 * the newest, only as many as fit in VERSIONS_MAX_BYTES: the item stays within DynamoDB's 400 KB
 * beside the current resource (at most 64 KiB, MAX_STORED_BYTES) and what derives from it.
 */
const VERSIONS_MAX_BYTES = 64 * 1024;

/** One earlier version, with short keys (the list is stored on every write of the item). */
interface VersionEntry {
  /** updatedAt */
  readonly u: string;
  /** status */
  readonly s: SubscriptionStatus;
  /** error */
  readonly e?: string;
  /** The resource as JSON; absent: the same as the next newer version's (for the newest, the current one's). */
  readonly r?: string;
}

/**
 * `versions` after a write replaces `current` (whose item held `stored`) with `next`. A write that
 * leaves `updatedAt` as it was makes no version (as in the SQLite store, whose trigger follows
 * `updated_at`); the registry moves it on with every change.
 */
export function versionsAfterWrite(
  current: SubscriptionRecord,
  next: SubscriptionRecord,
  stored: string | undefined,
): string | undefined {
  if (next.updatedAt === current.updatedAt) return stored;
  const resource = JSON.stringify(current.resource);
  const entry: VersionEntry = {
    u: current.updatedAt,
    s: current.status,
    ...(current.error === undefined ? {} : { e: current.error }),
    ...(resource === JSON.stringify(next.resource) ? {} : { r: resource }),
  };
  const entries = [entry, ...(stored === undefined ? [] : (JSON.parse(stored) as VersionEntry[]))].slice(
    0,
    EARLIER_VERSIONS_KEPT,
  );
  let json = JSON.stringify(entries);
  while (entries.length > 1 && Buffer.byteLength(json) > VERSIONS_MAX_BYTES) {
    entries.pop();
    json = JSON.stringify(entries);
  }
  return json;
}

/** The earlier versions `versions` holds, newest first, resources filled in from `current` down. */
export function readVersions(current: SubscriptionRecord, stored: string | undefined): SubscriptionVersion[] {
  if (stored === undefined) return [];
  let resource = current.resource;
  return (JSON.parse(stored) as VersionEntry[]).map((v) => {
    if (v.r !== undefined) resource = JSON.parse(v.r) as FhirResource;
    return { updatedAt: v.u, status: v.s, ...(v.e === undefined ? {} : { error: v.e }), resource };
  });
}

export function fromNotificationItem(item: Item): StoredNotification {
  const lastError = readOptionalString(item, 'lastError');
  return {
    subscriptionId: readString(item, 'subscriptionId'),
    eventNumber: readNumber(item, 'eventNumber'),
    change: JSON.parse(readString(item, 'change')) as ResourceChange,
    state: readString(item, 'state') as DeliveryState,
    attempts: readNumber(item, 'attempts'),
    dueAt: readNumber(item, 'dueAt'),
    ...(lastError === undefined ? {} : { lastError }),
  };
}

/** A condition that the subscription item still has the attributes its type index items derive from. */
export function unchangedSince(e: Expression, item: Item): string {
  return ['status', 'updatedAt', 'match', 'end']
    .map((attr) => {
      const value = item[attr];
      return value === undefined ? `attribute_not_exists(${e.name(attr)})` : `${e.name(attr)} = ${e.value(value)}`;
    })
    .join(' AND ');
}

/** The type index keys of a subscription: its types, or `*`; none unless it collects. */
export function indexedTypes(sub: IndexedFields | undefined): string[] {
  if (sub === undefined || !COLLECTING.includes(sub.status)) return [];
  return sub.match.resourceTypes === ANY_TYPE ? [ANY_TYPE] : [...new Set(sub.match.resourceTypes)];
}

export function notificationKey(item: Item): Item {
  return { subscriptionId: S(readString(item, 'subscriptionId')), eventNumber: N(readNumber(item, 'eventNumber')) };
}

export function eventIdItem(eventId: string, scope: string, receivedAt: number, expiresAt: number): Item {
  return { eventId: S(eventId), scope: S(scope), receivedAt: N(receivedAt), [TTL_ATTRIBUTE]: N(expiresAt) };
}

export function eventIdKey(eventId: string, scope: string): string {
  return `${scope}\n${eventId}`;
}

export function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
