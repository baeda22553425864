import { matchFromStore, storedMatch } from '../../core/stored-match.js';
import type {
  Channel,
  DeliveryState,
  FhirResource,
  ResourceChange,
  StoredNotification,
  SubscriptionKind,
  SubscriptionRecord,
  SubscriptionStatus,
  SubscriptionVersion,
} from '../../core/types.js';
import {
  type Expression,
  type Item,
  N,
  readNumber,
  readOptionalNumber,
  readOptionalString,
  readString,
  S,
} from './attributes.js';
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
    match: S(storedMatch(rec.match)),
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
    match: matchFromStore(readString(item, 'match')),
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

/** `resource`: read from its own item (resource-items.ts); else the item's own, as written before that. */
export function fromNotificationItem(
  item: Item,
  resource: string | undefined = readOptionalString(item, 'resource'),
): StoredNotification {
  const lastError = readOptionalString(item, 'lastError');
  const bundleLast = readOptionalNumber(item, 'bundleLast');
  const change = JSON.parse(readString(item, 'change')) as ResourceChange;
  return {
    subscriptionId: readString(item, 'subscriptionId'),
    eventNumber: readNumber(item, 'eventNumber'),
    change: resource === undefined ? change : { ...change, resource },
    state: readString(item, 'state') as DeliveryState,
    attempts: readNumber(item, 'attempts'),
    dueAt: readNumber(item, 'dueAt'),
    ...(lastError === undefined ? {} : { lastError }),
    ...(bundleLast === undefined ? {} : { bundleLast }),
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

/**
 * The reconciler's checkpoints are event-id items under this scope: every function that may
 * reconcile accepts changes, so it holds that table already, and no acceptance writes or reads
 * the scope (`#` is in no FHIR id). The item carries neither `expiresAt` (the table's TTL) nor
 * `receivedAt` (what `purge` takes): it stays until a later save moves it on.
 */
export const CHECKPOINT_SCOPE = '#reconcile';
/** The checkpoint's attribute (epoch ms: every change before it was reconciled). */
export const CHECKPOINT_ATTRIBUTE = 'reconciledThrough';
/** DynamoDB's limit on a partition key value, in UTF-8 bytes. */
const PARTITION_KEY_MAX_BYTES = 2048;

/** The key of `source`'s checkpoint; the source is the partition key, whose limit is the larger. */
export function checkpointKey(source: string): Item {
  const bytes = Buffer.byteLength(source, 'utf8');
  if (bytes === 0 || bytes > PARTITION_KEY_MAX_BYTES) {
    throw new TypeError(`a reconcile source must be 1 to ${PARTITION_KEY_MAX_BYTES} UTF-8 bytes: got ${bytes}`);
  }
  return { eventId: S(source), scope: S(CHECKPOINT_SCOPE) };
}

export function eventIdKey(eventId: string, scope: string): string {
  return `${scope}\n${eventId}`;
}

export function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Earlier versions of a subscription live in the type index table (never matched: `#` is in no
 * resource type), partition `#versions <id>`, in a ring of `slots` items (`v0`, `v1`, ...): the
 * write that replaces version n of a subscription puts it in slot n mod slots, in its own
 * transaction. The subscription item counts its versions (`VERSIONS_WRITTEN`), so no write reads
 * the ring or prunes it, and a deleted subscription's are found by key.
 */
export const VERSIONS_WRITTEN = 'versionsWritten';

export function versionsPartition(subscriptionId: string): string {
  return `#versions ${subscriptionId}`;
}

export function versionKey(subscriptionId: string, slot: number): Item {
  return { resourceType: S(versionsPartition(subscriptionId)), subscriptionId: S(`v${slot}`) };
}

/** The version `rec` is, for slot `slot`; `createdAt` tells it from a same-id subscription's before a delete. */
export function toVersionItem(rec: SubscriptionRecord, slot: number): Item {
  return {
    ...versionKey(rec.id, slot),
    createdAt: S(rec.createdAt),
    updatedAt: S(rec.updatedAt),
    status: S(rec.status),
    ...(rec.error === undefined ? {} : { error: S(rec.error) }),
    resource: S(JSON.stringify(rec.resource)),
  };
}

export function fromVersionItem(item: Item): SubscriptionVersion & { readonly createdAt: string } {
  const error = readOptionalString(item, 'error');
  return {
    createdAt: readString(item, 'createdAt'),
    updatedAt: readString(item, 'updatedAt'),
    status: readString(item, 'status') as SubscriptionStatus,
    ...(error === undefined ? {} : { error }),
    resource: JSON.parse(readString(item, 'resource')) as FhirResource,
  };
}
