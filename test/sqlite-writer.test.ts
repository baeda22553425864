import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import { afterEach, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { SqliteWriter } from '../src/store/sqlite/sqlite-writer.js';
import { item, RECEIVED, record, seedDelivered } from './support/store-fixtures.js';

const RECEIVED_ISO = new Date(RECEIVED).toISOString();

/**
 * The SQLite writer thread (src/store/sqlite/sqlite-writer.ts). Every write of the embedded store
 * runs there, in one order. The retention purge goes in bounded batches, not as one long delete on
 * the event loop (an hour of notifications under load is millions of rows). Status and
 * subscription writes no longer race the writer for the lock: on the event loop's connection a
 * read-then-write transaction met SQLITE_BUSY as soon as an event commit landed between its read
 * and its write. Committed pages reach the database file through the background checkpointer, not
 * the commit path. (What each write does is the Store contract suite, for both stores.)
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
  await seedDelivered(s, 's1', count);
  return s;
}

it('adds up what each batch of a purge deleted, a count that is a multiple of the batch included', async () => {
  store = await storeWithOldDeliveries(100);
  expect(await store.purge(RECEIVED + 1, undefined, 10)).toEqual({ notifications: 100, eventIds: 100 });
  expect(await store.notificationsInRange('s1', 0, 1000, 1000)).toEqual([]);
  expect(await store.purge(RECEIVED + 1, undefined, 10)).toEqual({ notifications: 0, eventIds: 0 });
});

it('lets event commits in between its batches instead of holding them until it is done', async () => {
  store = await storeWithOldDeliveries(300);
  const order: string[] = [];
  const purged = store.purge(RECEIVED + 1, undefined, 10).then((r) => {
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

it('stops purging between batches when the store closes, and refuses a batch size that would never end', async () => {
  const s = await storeWithOldDeliveries(300);
  store = s;
  await expect(s.purge(RECEIVED + 1, undefined, 0)).rejects.toThrow(RangeError);
  const purging = s.purge(RECEIVED + 1, undefined, 10);
  store = undefined;
  await s.close();
  // The batch already asked for finished; none after it was started.
  expect(await purging).toEqual({ notifications: 10, eventIds: 10 });
});

it('stops purging between batches once its signal is aborted', async () => {
  store = await storeWithOldDeliveries(300);
  const abort = new AbortController();
  const purging = store.purge(RECEIVED + 1, abort.signal, 10);
  abort.abort();
  expect(await purging).toEqual({ notifications: 10, eventIds: 10 });
  expect(await store.purge(RECEIVED + 1, undefined, 10)).toEqual({ notifications: 290, eventIds: 290 });
});

it("answers a failed write with SQLite's message and code, and keeps nothing of its transaction", async () => {
  dir = mkdtempSync(join(tmpdir(), 'broker-writes-'));
  store = new SqliteStore(dir);
  await store.insertSubscription(record('s1'));
  await expect(store.insertSubscription(record('s1'))).rejects.toMatchObject({
    name: 'SqliteWriterError',
    code: 'SQLITE_CONSTRAINT_PRIMARYKEY',
    message: expect.stringContaining('UNIQUE constraint failed: subscriptions.id'),
  });
  // A second writer on the same file (the store's own is private): its first statement succeeds,
  // its second fails, and the first is rolled back with it.
  const writer = new SqliteWriter(join(dir, 'broker.sqlite3'), 'FULL');
  try {
    await expect(
      writer.steps([
        ['DELETE FROM subscription_counters WHERE subscription_id = ?', ['s1'], 'run'],
        ['INSERT INTO subscription_counters (subscription_id, events_since_start) VALUES (?, ?)', ['s1', null], 'run'],
      ]),
    ).rejects.toMatchObject({ code: 'SQLITE_CONSTRAINT_NOTNULL' });
  } finally {
    await writer.close();
  }
  expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(0);
  expect(await store.listSubscriptions()).toHaveLength(1);
});

it('changes statuses and subscriptions while event commits run back to back, without SQLITE_BUSY', async () => {
  dir = mkdtempSync(join(tmpdir(), 'broker-writes-'));
  const s = new SqliteStore(dir);
  store = s;
  const subs = Array.from({ length: 20 }, (_, i) => `s${i}`);
  for (const id of subs) await s.insertSubscription(record(id));
  let running = true;
  let accepted = 0;
  const load = async (lane: number): Promise<void> => {
    for (let k = 0; running; k++) {
      const items = Array.from({ length: 10 }, (_, i) => item(`l${lane}-${k}-${i}`, [subs[i] as string], `p-${i}`));
      accepted += (await s.acceptChanges(items, RECEIVED)).length;
    }
  };
  const loads = [load(1), load(2)];
  try {
    for (let i = 0; i < 300; i++) {
      const id = subs[i % 20] as string;
      const status = i % 2 === 0 ? 'error' : 'active';
      const updated = await s.updateStatus(id, { status, error: `round ${i}` }, RECEIVED_ISO);
      expect(updated?.status).toBe(status);
      expect(updated?.eventsSinceStart).toBeGreaterThanOrEqual(0);
      // Let the commit loops go on between the writes.
      await new Promise((resolve) => setImmediate(resolve));
      if (i % 5 === 0) {
        await s.insertSubscription(record(`extra-${i}`));
        expect(await s.deleteSubscription(`extra-${i}`)).toBe(true);
      }
    }
  } finally {
    running = false;
    await Promise.all(loads);
  }
  expect(accepted).toBeGreaterThan(0);
  expect((await s.getSubscription('s19'))?.status).toBe('active');
  expect(await s.getSubscription('extra-295')).toBeUndefined();
});

/** Rows of `notifications` in the database file alone: a copy without its WAL. */
function rowsInFileAlone(file: string, copy: string): number {
  copyFileSync(file, copy);
  const db = new Database(copy, { readonly: true });
  try {
    return (db.prepare('SELECT count(*) AS n FROM notifications').get() as { n: number }).n;
  } catch {
    return 0; // The schema itself not copied yet.
  } finally {
    db.close();
  }
}

it('copies committed pages into the database file in the background, well before the WAL fills', async () => {
  dir = mkdtempSync(join(tmpdir(), 'broker-checkpointer-'));
  store = new SqliteStore(dir);
  await store.insertSubscription(record('s1'));
  const file = join(dir, 'broker.sqlite3');
  const copy = join(dir, 'copy.sqlite3');
  for (let batch = 0; batch < 10; batch++) {
    const items = Array.from({ length: 30 }, (_, i) => item(`e-${batch}-${i}`, ['s1'], `p-${batch}-${i}`));
    const outcomes = await store.acceptChanges(items, RECEIVED);
    expect(outcomes.every((o) => !o.duplicate && o.notifications.length === 1)).toBe(true);
  }
  // Right after the commits the file alone holds at most what a pass already copied; within a
  // few checkpoint intervals (100 ms each, bounded) it holds all 300 notifications.
  let rows = rowsInFileAlone(file, copy);
  for (let waited = 0; rows < 300 && waited < 3000; waited += 50) {
    await sleep(50);
    rows = rowsInFileAlone(file, copy);
  }
  expect(rows).toBe(300);
  // And the store reads back whole.
  expect(await store.pendingNotifications('s1', 0, 1000)).toHaveLength(300);
});

it('fails for good, once, with STORE_UNAVAILABLE when its database file is deleted while open', async () => {
  dir = mkdtempSync(join(tmpdir(), 'fsb-deleted-'));
  store = new SqliteStore(dir);
  await store.insertSubscription(record('s1'));
  const failures: Error[] = [];
  store.onFailure((err) => failures.push(err));
  for (const f of ['broker.sqlite3', 'broker.sqlite3-wal', 'broker.sqlite3-shm']) rmSync(join(dir, f), { force: true });
  // /healthz's ping sees it at once (a timer would, within five seconds).
  await expect(store.ping()).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE', status: 503 });
  expect(failures.map((e) => e.message)).toEqual([expect.stringContaining('was deleted or replaced while open')]);
  // Nothing is acknowledged into a file nobody can read again.
  await expect(store.acceptChanges([item('e-after-delete', ['s1'])], RECEIVED)).rejects.toMatchObject({
    code: 'STORE_UNAVAILABLE',
  });
  await expect(store.ping()).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE' });
  expect(failures).toHaveLength(1);
});

it('answers every call with STORE_UNAVAILABLE once the writer thread has stopped, and says so once', async () => {
  dir = mkdtempSync(join(tmpdir(), 'fsb-crashed-'));
  const writer = new SqliteWriter(join(dir, 'w.sqlite3'), 'FULL');
  const failures: Error[] = [];
  writer.onFailure((err) => failures.push(err));
  writer.fail(new Error('worker crashed'));
  await expect(writer.ping()).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE', status: 503 });
  expect(failures.map((e) => e.message)).toEqual(['the SQLite store failed: worker crashed']);
  await writer.close();
});

it('names the database file when it cannot be used (not a database)', () => {
  dir = mkdtempSync(join(tmpdir(), 'fsb-corrupt-'));
  writeFileSync(
    join(dir, 'broker.sqlite3'),
    'this is not a SQLite database, but long enough to be read as one '.repeat(100),
  );
  expect(() => new SqliteStore(dir as string)).toThrow(
    new RegExp(`cannot use the SQLite database ${join(dir, 'broker.sqlite3')}: file is not a database`),
  );
});

it('commits an event that notifies 140,000 subscriptions, with the rest of its group commit', async () => {
  dir = mkdtempSync(join(tmpdir(), 'fsb-fanout-'));
  store = new SqliteStore(dir);
  await store.insertSubscription(record('s0'));
  // 139,999 more like s0, written straight into the file: through the store that takes half a minute.
  const db = new Database(join(dir, 'broker.sqlite3'));
  try {
    db.pragma('busy_timeout = 5000');
    db.exec(`
      WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 139999)
      INSERT INTO subscriptions SELECT 'b' || i, owner, kind, topic, status, error, match_json, channel_json,
        webhook_secret, previous_secret_json, end_at, created_at, updated_at, resource_json
      FROM n, subscriptions WHERE id = 's0';
      INSERT INTO subscription_counters (subscription_id, events_since_start)
        SELECT id, 0 FROM subscriptions WHERE id != 's0';
    `);
  } finally {
    db.close();
  }
  const ids = ['s0', ...Array.from({ length: 139_999 }, (_, i) => `b${i + 1}`)];
  const [fanout, other] = await store.acceptChanges(
    [item('fan-1', ids, 'p-fan'), item('other-1', ['s0'], 'p-other')],
    RECEIVED,
  );
  expect(fanout?.duplicate).toBe(false);
  expect(fanout?.notifications).toHaveLength(140_000);
  expect(fanout?.notifications.every((n) => n.eventNumber === 1)).toBe(true);
  expect(other?.notifications.map((n) => [n.subscriptionId, n.eventNumber])).toEqual([['s0', 2]]);
  expect((await store.pendingNotifications('b139999', 0, 10)).map((n) => n.change.resourceId)).toEqual(['p-fan']);
  // Committed for good: the same event again is a duplicate.
  expect(await store.acceptChanges([item('fan-1', ids, 'p-fan')], RECEIVED)).toEqual([
    { duplicate: true, notifications: [] },
  ]);
}, 20_000);
