import type { StoredNotification } from '../../core/types.js';
import { type Item, N, readNumber, readOptionalString, readString, S } from './attributes.js';
import { fromNotificationItem } from './items.js';
import type { DynamoDbRequests } from './requests.js';

/**
 * A full-resource notification's resource is an item of its own in the `notifications` table:
 * the notification's partition, its event number negated (`-n`). Notifications are numbered from 1
 * and 0 is the lane's lease item, so every read of notifications (`> 0`, `BETWEEN 1 AND …`) passes
 * it by; it has no `pendingSubscriptionId`, so the `pending` index (projected whole) never copies
 * it, and the dispatcher's reads of that index and the scheduled scan for subscriptions with
 * pending notifications pay for small items only. It is written in the acceptance's transaction,
 * read when the notification is (`withResources`), and deleted with the notification (the
 * retention purge, the subscription's delete). The notification item carries `resourceBytes`
 * (the resource's length in UTF-8) to say it has one.
 *
 * Notifications written before this layout carry the resource as their own `resource` attribute;
 * `fromNotificationItem` still reads that.
 */

export const RESOURCE_BYTES = 'resourceBytes';

export function resourceKey(subscriptionId: string, eventNumber: number): Item {
  return { subscriptionId: S(subscriptionId), eventNumber: N(-eventNumber) };
}

/**
 * `createdAt` as on its notification: the purge finds both in one scan (see `resourceItemsToPurge`).
 * `state` is `resource`, a state no release's purge deletes and no re-queue reads: a broker from
 * before this layout (a rollback, or old functions beside new ones during a deploy) purges past
 * these items instead of failing on an item without a state, and leaves them to this one.
 */
export function resourceItem(subscriptionId: string, eventNumber: number, json: string, createdAt: number): Item {
  return {
    ...resourceKey(subscriptionId, eventNumber),
    resource: S(json),
    createdAt: N(createdAt),
    state: S('resource'),
  };
}

export function isResourceItem(item: Item): boolean {
  return readNumber(item, 'eventNumber') < 0;
}

/**
 * Notification items as notifications, each with its resource when it has one (one consistent
 * BatchGetItem per 100). A resource item that is not found (a purge deleting both between the two
 * reads) leaves its notification without one, as a resource that was never read would.
 */
export async function withResources(
  requests: DynamoDbRequests,
  table: string,
  items: readonly Item[],
): Promise<StoredNotification[]> {
  const keys = items
    .filter((item) => item[RESOURCE_BYTES] !== undefined && item.resource === undefined)
    .map((item) => resourceKey(readString(item, 'subscriptionId'), readNumber(item, 'eventNumber')));
  if (keys.length === 0) return items.map((item) => fromNotificationItem(item));
  const found = new Map<string, string>();
  for (const r of await requests.batchGet(table, keys)) {
    const json = readOptionalString(r, 'resource');
    if (json !== undefined) found.set(keyOf(readString(r, 'subscriptionId'), -readNumber(r, 'eventNumber')), json);
  }
  return items.map((item) =>
    fromNotificationItem(item, found.get(keyOf(readString(item, 'subscriptionId'), readNumber(item, 'eventNumber')))),
  );
}

/**
 * Of the items a purge scanned (everything accepted before its bound), the resource items to
 * delete: those whose notification is not among `kept` (scanned and still there). A notification
 * and its resource item share `createdAt`, so a resource item the scan found has its notification
 * in the same scan unless that is gone (an earlier purge or delete stopped between the two).
 */
export function resourceItemsToPurge(scanned: readonly Item[], kept: ReadonlySet<string>): Item[] {
  return scanned.filter(
    (item) =>
      isResourceItem(item) && !kept.has(keyOf(readString(item, 'subscriptionId'), -readNumber(item, 'eventNumber'))),
  );
}

export function notificationKeyOf(item: Item): string {
  return keyOf(readString(item, 'subscriptionId'), readNumber(item, 'eventNumber'));
}

function keyOf(subscriptionId: string, eventNumber: number): string {
  return `${subscriptionId}\n${eventNumber}`;
}
