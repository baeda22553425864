import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { change, item, RECEIVED, record } from './support/store-fixtures.js';

/**
 * Data dirs written by earlier releases open under the current one with nothing lost: counters,
 * pending / delivered / dead notifications, seen event ids. Version 1: the event counter on the
 * subscription row, notifications WITHOUT ROWID. Version 2: every delivery state on its row, with
 * partial indexes of pending and of purgeable rows; version 3 keeps a per-subscription watermark;
 * version 4 marks where bundles end (`bundle_last`).
 */

// The version-1 schema as the first release created it (kept verbatim: it is what is on disk).
const SCHEMA_V1 = `
CREATE TABLE subscriptions (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, topic TEXT NOT NULL, status TEXT NOT NULL,
  error TEXT, match_json TEXT NOT NULL, channel_json TEXT NOT NULL, webhook_secret TEXT NOT NULL,
  previous_secret_json TEXT, end_at TEXT, events_since_start INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL, updated_at TEXT NOT NULL, resource_json TEXT NOT NULL
);
CREATE INDEX subscriptions_owner ON subscriptions(owner);
CREATE TABLE seen_events (event_id TEXT PRIMARY KEY, received_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE notifications (
  subscription_id TEXT NOT NULL, event_number INTEGER NOT NULL, change_json TEXT NOT NULL, state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, due_at INTEGER NOT NULL, last_error TEXT, created_at INTEGER NOT NULL,
  PRIMARY KEY (subscription_id, event_number)
) WITHOUT ROWID;
CREATE INDEX notifications_pending ON notifications(subscription_id) WHERE state = 'pending';
CREATE INDEX notifications_created ON notifications(created_at);
CREATE INDEX seen_events_received ON seen_events(received_at);
`;

// The version-2 schema as the release of 2026-11-27 created it (verbatim).
const SCHEMA_V2 = `
CREATE TABLE subscriptions (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, topic TEXT NOT NULL, status TEXT NOT NULL,
  error TEXT, match_json TEXT NOT NULL, channel_json TEXT NOT NULL, webhook_secret TEXT NOT NULL,
  previous_secret_json TEXT, end_at TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
  resource_json TEXT NOT NULL
);
CREATE INDEX subscriptions_owner ON subscriptions(owner);
CREATE TABLE subscription_counters (
  subscription_id TEXT PRIMARY KEY, events_since_start INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE seen_events (event_id TEXT PRIMARY KEY, received_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE notifications (
  seq INTEGER PRIMARY KEY, subscription_id TEXT NOT NULL, event_number INTEGER NOT NULL,
  change_json TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  due_at INTEGER NOT NULL, last_error TEXT, created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX notifications_key ON notifications(subscription_id, event_number);
CREATE INDEX notifications_pending ON notifications(seq) WHERE state = 'pending';
CREATE INDEX notifications_expirable ON notifications(created_at) WHERE state IN ('delivered', 'dead');
CREATE INDEX seen_events_received ON seen_events(received_at);
PRAGMA user_version = 2;
`;

let dir: string;
let store: SqliteStore | undefined;

/** `check` on the data dir's file, opened read-only (the store closed first). */
async function onDisk(check: (db: Database.Database) => void): Promise<void> {
  await store?.close();
  store = undefined;
  const db = new Database(join(dir, 'broker.sqlite3'), { readonly: true });
  try {
    check(db);
  } finally {
    db.close();
  }
}

/** The store closed, then `sql` run on its file: the file as an older release left it. */
async function asLeftBy(sql: string): Promise<void> {
  await store?.close();
  store = undefined;
  const db = new Database(join(dir, 'broker.sqlite3'));
  try {
    db.exec(sql);
  } finally {
    db.close();
  }
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'broker-migration-'));
});

afterEach(async () => {
  await store?.close();
  store = undefined;
  rmSync(dir, { recursive: true, force: true });
});

function writeVersion1(): void {
  const db = new Database(join(dir, 'broker.sqlite3'));
  db.exec(SCHEMA_V1);
  const insertSub = db.prepare(`INSERT INTO subscriptions VALUES
    (@id, @owner, @kind, @topic, @status, @error, @match_json, @channel_json, @webhook_secret, NULL, NULL,
     @events_since_start, @created_at, @updated_at, @resource_json)`);
  for (const [id, count, status] of [
    ['s1', 3, 'active'],
    ['s2', 1, 'error'],
  ] as const) {
    const rec = record(id, { status, eventsSinceStart: count });
    insertSub.run({
      id,
      owner: rec.owner,
      kind: rec.kind,
      topic: rec.topic,
      status,
      error: status === 'error' ? 'delivery failed' : null,
      match_json: JSON.stringify(rec.match),
      channel_json: JSON.stringify(rec.channel),
      webhook_secret: rec.webhookSecret,
      events_since_start: count,
      created_at: rec.createdAt,
      updated_at: rec.updatedAt,
      resource_json: JSON.stringify(rec.resource),
    });
  }
  const note = db.prepare('INSERT INTO notifications VALUES (?, ?, ?, ?, ?, ?, ?, ?)');
  note.run('s1', 1, JSON.stringify(change('e1', 'p1')), 'delivered', 1, RECEIVED, null, RECEIVED);
  note.run('s1', 2, JSON.stringify(change('e2', 'p2')), 'pending', 2, RECEIVED + 5, 'HTTP 503', RECEIVED);
  note.run('s1', 3, JSON.stringify(change('e3', 'p3')), 'pending', 0, RECEIVED, null, RECEIVED);
  note.run('s2', 1, JSON.stringify(change('e1', 'p1')), 'dead', 9, RECEIVED, 'HTTP 500', RECEIVED);
  for (const e of ['e1', 'e2', 'e3']) db.prepare('INSERT INTO seen_events VALUES (?, ?)').run(e, RECEIVED);
  db.close();
}

function writeVersion2(): void {
  const db = new Database(join(dir, 'broker.sqlite3'));
  db.exec(SCHEMA_V2);
  for (const [id, count] of [
    ['s1', 6],
    ['s2', 2],
    ['s3', 0],
  ] as const) {
    const rec = record(id);
    db.prepare(
      `INSERT INTO subscriptions VALUES (@id, @owner, @kind, @topic, 'active', NULL, @match_json, @channel_json,
        @webhook_secret, NULL, NULL, @created_at, @updated_at, @resource_json)`,
    ).run({
      id,
      owner: rec.owner,
      kind: rec.kind,
      topic: rec.topic,
      match_json: JSON.stringify(rec.match),
      channel_json: JSON.stringify(rec.channel),
      webhook_secret: rec.webhookSecret,
      created_at: rec.createdAt,
      updated_at: rec.updatedAt,
      resource_json: JSON.stringify(rec.resource),
    });
    db.prepare('INSERT INTO subscription_counters VALUES (?, ?)').run(id, count);
  }
  const note = db.prepare(
    `INSERT INTO notifications (subscription_id, event_number, change_json, state, attempts, due_at, last_error,
     created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
  );
  const rows: [string, number, string, number, string | null][] = [
    ['s1', 1, 'delivered', 1, null],
    ['s2', 1, 'delivered', 1, null],
    ['s1', 2, 'delivered', 1, null],
    ['s1', 3, 'dead', 7, 'HTTP 500'],
    ['s1', 4, 'pending', 2, 'HTTP 503'],
    ['s2', 2, 'delivered', 1, null],
    ['s1', 5, 'pending', 0, null],
    ['s1', 6, 'delivered', 1, null],
  ];
  for (const [sub, n, state, attempts, lastError] of rows)
    note.run(sub, n, JSON.stringify(change(`e${n}`, `p${n}`)), state, attempts, RECEIVED, lastError, RECEIVED);
  db.prepare('INSERT INTO seen_events VALUES (?, ?)').run('e1', RECEIVED);
  db.close();
}

describe('SQLite data dir from schema version 2', () => {
  it('sets each watermark below the lowest pending notification and reads every state as written', async () => {
    writeVersion2();
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });

    expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => [n.eventNumber, n.attempts])).toEqual([
      [4, 2],
      [5, 0],
    ]);
    const states = async (id: string) =>
      (await store?.notificationsInRange(id, 1, 100, 100))?.map((n) => [n.eventNumber, n.state, n.attempts]);
    expect(await states('s1')).toEqual([
      [1, 'delivered', 1],
      [2, 'delivered', 1],
      [3, 'dead', 7],
      [4, 'pending', 2],
      [5, 'pending', 0],
      [6, 'delivered', 1],
    ]);
    expect(await store.pendingNotifications('s2', 0, 10)).toEqual([]);

    // Deliveries go on from there; a requeued dead letter goes out again; a new event takes number 7.
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 4, state: 'delivered', attempts: 3, dueAt: RECEIVED },
      { subscriptionId: 's1', eventNumber: 5, state: 'delivered', attempts: 1, dueAt: RECEIVED },
    ]);
    expect(await store.subscriptionsWithPending()).toEqual([]);
    expect(await store.requeueDeadLetters('s1', RECEIVED + 1)).toBe(1);
    const [fresh] = await store.acceptChanges([item('e7', ['s1'])], RECEIVED + 2);
    expect(fresh?.notifications.map((n) => n.eventNumber)).toEqual([7]);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([3, 7]);
    expect(await states('s1')).toEqual([
      [1, 'delivered', 1],
      [2, 'delivered', 1],
      [3, 'pending', 0],
      [4, 'delivered', 3],
      [5, 'delivered', 1],
      [6, 'delivered', 1],
      [7, 'pending', 0],
    ]);

    await onDisk((db) => {
      expect(db.pragma('user_version', { simple: true })).toBe(4);
      const indexes = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'notifications' ORDER BY name")
        .all();
      expect(indexes).toEqual([{ name: 'notifications_created' }, { name: 'notifications_key' }]);
    });
  });

  it('a migrated subscription with nothing pending has its watermark at its counter', async () => {
    writeVersion2();
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    await onDisk((db) => {
      expect(db.prepare('SELECT * FROM subscription_counters ORDER BY subscription_id').all()).toEqual([
        { subscription_id: 's1', events_since_start: 6, done_through: 3 },
        { subscription_id: 's2', events_since_start: 2, done_through: 2 },
        { subscription_id: 's3', events_since_start: 0, done_through: 0 },
      ]);
    });
  });
});

describe('SQLite data dir from schema version 1', () => {
  it('keeps counters, notifications and seen event ids, and numbering goes on', async () => {
    writeVersion1();
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });

    const subs = await store.listSubscriptions();
    expect(subs.map((s) => [s.id, s.status, s.eventsSinceStart, s.error])).toEqual([
      ['s1', 'active', 3, undefined],
      ['s2', 'error', 1, 'delivery failed'],
    ]);
    expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    const pending = await store.pendingNotifications('s1', 0, 10);
    expect(pending.map((n) => [n.eventNumber, n.attempts, n.dueAt, n.lastError, n.change.eventId])).toEqual([
      [2, 2, RECEIVED + 5, 'HTTP 503', 'e2'],
      [3, 0, RECEIVED, undefined, 'e3'],
    ]);
    const all = await store.notificationsInRange('s1', 1, 3, 10);
    expect(all.map((n) => n.state)).toEqual(['delivered', 'pending', 'pending']);
    expect(await store.requeueDeadLetters('s2', RECEIVED + 1)).toBe(1);

    // A seen id stays a duplicate; a new event takes the next number on both subscriptions.
    const [dup, fresh] = await store.acceptChanges([item('e2', ['s1']), item('e4', ['s1', 's2'])], RECEIVED);
    expect(dup?.duplicate).toBe(true);
    expect(fresh?.notifications.map((n) => [n.subscriptionId, n.eventNumber])).toEqual([
      ['s1', 4],
      ['s2', 2],
    ]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(4);
    // Earlier versions are kept from the first change on.
    await store.updateStatus('s1', { status: 'off' }, '2031-01-01T00:00:00.000Z');
    expect((await store.subscriptionVersions('s1')).map((v) => [v.updatedAt, v.status])).toEqual([
      [record('s1').updatedAt, 'active'],
    ]);

    await onDisk((db) => {
      expect(db.pragma('user_version', { simple: true })).toBe(4);
      const columns = (db.pragma('table_info(subscriptions)') as { name: string }[]).map((c) => c.name);
      expect(columns).not.toContain('events_since_start');
      expect(db.prepare("SELECT name FROM sqlite_master WHERE name = 'notifications_v1'").get()).toBeUndefined();
    });
  });

  it('opens a migrated data dir again without migrating twice', async () => {
    writeVersion1();
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    await store.close();
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(3);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([2, 3]);
  });

  it('refuses a data dir written by a newer broker, leaving it untouched', async () => {
    const db = new Database(join(dir, 'broker.sqlite3'));
    db.exec('CREATE TABLE future (x)');
    db.pragma('user_version = 99');
    db.close();
    expect(() => new SqliteStore(dir, { synchronous: 'NORMAL' })).toThrow(/newer broker \(schema version 99/);
    await onDisk((again) => {
      expect(again.pragma('user_version', { simple: true })).toBe(99);
      expect(again.pragma('journal_mode', { simple: true })).toBe('delete');
      expect(again.prepare("SELECT name FROM sqlite_master WHERE name = 'subscriptions'").get()).toBeUndefined();
    });
  });
});

describe('SQLite data dir of schema version 3 from before earlier versions were kept', () => {
  it('gains the versions table on opening, and its triggers keep it right whoever writes the file', async () => {
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    await store.insertSubscription(record('s1', { status: 'requested' }));
    // As the release of 2026-11-27 left the file: no table, no triggers.
    await asLeftBy(`DROP TRIGGER subscription_versions_keep; DROP TRIGGER subscription_versions_drop;
      DROP TABLE subscription_versions;`);

    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    expect(await store.subscriptionVersions('s1')).toEqual([]);
    await store.updateStatus('s1', { status: 'active' }, '2031-01-01T00:00:00.000Z');
    await store.close();
    store = undefined;
    // A broker that knows nothing of the table (an older one, on the same file) still keeps it.
    const older = new Database(join(dir, 'broker.sqlite3'));
    older
      .prepare("UPDATE subscriptions SET status = 'off', updated_at = ? WHERE id = 's1'")
      .run('2031-01-02T00:00:00.000Z');
    older.close();

    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    expect((await store.subscriptionVersions('s1')).map((v) => [v.updatedAt, v.status])).toEqual([
      ['2031-01-01T00:00:00.000Z', 'active'],
      [record('s1').updatedAt, 'requested'],
    ]);
    await onDisk((db) => expect(db.pragma('user_version', { simple: true })).toBe(4));
  });
});

describe('SQLite data dir from schema version 3', () => {
  it('gains the bundle marks column, keeps every notification, and marks bundles from then on', async () => {
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    await store.insertSubscription(record('s1'));
    await store.acceptChanges(
      ['e1', 'e2', 'e3'].map((id) => item(id, ['s1'], `p-${id}`)),
      RECEIVED,
    );
    // As the release of 2026-11-28 left the file: no bundle_last column, user_version 3.
    await asLeftBy('ALTER TABLE notifications DROP COLUMN bundle_last; PRAGMA user_version = 3;');

    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    const pending = await store.pendingNotifications('s1', 0, 10);
    expect(pending.map((n) => [n.eventNumber, n.bundleLast])).toEqual([
      [1, undefined],
      [2, undefined],
      [3, undefined],
    ]);
    await store.markBundles([{ subscriptionId: 's1', eventNumber: 1, last: 2 }]);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.bundleLast)).toEqual([2, undefined, undefined]);
    await onDisk((db) => {
      expect(db.pragma('user_version', { simple: true })).toBe(4);
      expect(db.prepare('SELECT event_number, bundle_last FROM notifications ORDER BY event_number').all()).toEqual([
        { event_number: 1, bundle_last: 2 },
        { event_number: 2, bundle_last: null },
        { event_number: 3, bundle_last: null },
      ]);
    });
  });
});

describe('SQLite data dir of schema version 4 from before full-resource content', () => {
  it('gains the resource column on opening, keeps every notification, and keeps resources from then on', async () => {
    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    await store.insertSubscription(record('s1'));
    await store.acceptChanges([item('e1', ['s1'], 'p1')], RECEIVED);
    // As the release of 2026-11-30 left the file: no resource_json column.
    await asLeftBy('ALTER TABLE notifications DROP COLUMN resource_json;');

    store = new SqliteStore(dir, { synchronous: 'NORMAL' });
    const json = JSON.stringify({ resourceType: 'Patient', id: 'p2' });
    await store.acceptChanges([{ ...item('e2', ['s1'], 'p2'), resource: { json, for: new Set(['s1']) } }], RECEIVED);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => [n.eventNumber, n.change.resource])).toEqual([
      [1, undefined],
      [2, json],
    ]);
    await onDisk((db) => {
      expect(db.pragma('user_version', { simple: true })).toBe(4);
      // Beside the change, not inside its JSON.
      expect(
        db.prepare('SELECT event_number, change_json, resource_json FROM notifications ORDER BY event_number').all(),
      ).toEqual([
        { event_number: 1, change_json: JSON.stringify(item('e1', ['s1'], 'p1').change), resource_json: null },
        { event_number: 2, change_json: JSON.stringify(item('e2', ['s1'], 'p2').change), resource_json: json },
      ]);
    });
  });
});
