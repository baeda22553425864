import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { item, RECEIVED, record } from './support/store-fixtures.js';

/**
 * The retention purge runs on the writer thread in bounded batches, not as one long delete on the
 * event loop: an hour of notifications under load is millions of rows. (What it deletes is the
 * Store contract's `purge` suite, for both stores.)
 */

let dir: string | undefined;
let store: SqliteStore | undefined;

afterEach(async () => {
  await store?.close();
  store = undefined;
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

async function storeWithOldDeliveries(count: number): Promise<SqliteStore> {
  dir = mkdtempSync(join(tmpdir(), 'broker-purge-'));
  const s = new SqliteStore(dir);
  await s.insertSubscription(record('s1'));
  const outcomes = await s.acceptChanges(
    Array.from({ length: count }, (_, i) => item(`old-${i}`, ['s1'], `p-${i}`)),
    RECEIVED,
  );
  await s.recordDeliveries(
    outcomes.flatMap((o) =>
      o.notifications.map((n) => ({
        subscriptionId: n.subscriptionId,
        eventNumber: n.eventNumber,
        state: 'delivered' as const,
        attempts: 1,
        dueAt: RECEIVED,
      })),
    ),
  );
  return s;
}

it('purges in batches and adds up what every batch deleted, a count that is a multiple of the batch included', async () => {
  store = await storeWithOldDeliveries(100);
  expect(await store.purge(RECEIVED + 1, 10)).toEqual({ notifications: 100, eventIds: 100 });
  expect(await store.notificationsInRange('s1', 0, 1000, 1000)).toEqual([]);
  expect(await store.purge(RECEIVED + 1, 10)).toEqual({ notifications: 0, eventIds: 0 });
});

it('lets event commits in between its batches instead of holding them until it is done', async () => {
  store = await storeWithOldDeliveries(300);
  const order: string[] = [];
  const purged = store.purge(RECEIVED + 1, 10).then((r) => {
    order.push('purge done');
    return r;
  });
  // Posted after the purge's first batch: answered after that batch, long before the 30th.
  const accepted = store.acceptChanges([item('new-1', ['s1'], 'p-new')], RECEIVED + 5000).then((r) => {
    order.push('accepted');
    return r;
  });
  const [p, a] = await Promise.all([purged, accepted]);
  expect(order).toEqual(['accepted', 'purge done']);
  expect(p).toEqual({ notifications: 300, eventIds: 300 });
  expect(a[0]?.notifications.map((n) => n.eventNumber)).toEqual([301]);
  // The new notification is pending and newer than the cut-off: kept.
  expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([301]);
});
