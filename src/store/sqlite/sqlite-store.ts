import { chmodSync, closeSync, fstatSync, openSync, statSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { BrokerError } from '../../core/errors.js';
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
import { makeDataDir } from '../../data-dir-lock.js';
import {
  type AcceptItem,
  type AcceptOutcome,
  type BundleMark,
  type DeliveryUpdate,
  EARLIER_VERSIONS_KEPT,
  NOTIFIED_SCAN_SLACK_MS,
  type StatusUpdate,
  type Store,
} from '../store.js';
import { SqliteWriter } from './sqlite-writer.js';

/**
 * The embedded store: one SQLite file in WAL mode. `synchronous = FULL` makes a commit durable
 * against power loss, not only a process crash; ingest batches requests so the fsync is shared.
 */

/**
 * Schema version 4 (`PRAGMA user_version`). Shaped for the hot commits, which must dirty as few
 * pages as they can (each dirty page is written whole to the WAL and fsync'd):
 * - the event counters live in a narrow `subscription_counters` table (100 counters fit in a page
 *   or two) instead of on the wide subscription rows, which a commit would otherwise rewrite one
 *   page each;
 * - notifications are appended in rowid order (a commit fills the last page or two), with a unique
 *   index on (subscription, event number) for the lanes and `$events`;
 * - a notification delivered at its first attempt is not rewritten: the subscription's watermark
 *   `done_through` (beside its counter) moves past it. Every notification at or below the watermark
 *   is done, and one still in state `pending` there was delivered. Retries, dead letters and the
 *   rare delivery above a truly pending notification are written on the row. So what is pending is
 *   found above the watermark, through the (subscription, event number) index, and no index has to
 *   follow a state change (version 2 kept a partial index of pending rows and one of purgeable rows,
 *   and rewrote a row and both indexes per delivery).
 * Measured on the writer's statements (12-event commits, 100 subscribers, each event delivered):
 * version 2 → 3: see bench/README.md ("Sixth session"). Version 4 adds `bundle_last`, written on a
 * bundle's first notification before its first attempt (`markBundles`), never on the hot commits.
 */
const SCHEMA_VERSION = 4;

/**
 * Earlier versions of each subscription (for FHIR vread), kept by triggers: the row a write
 * replaces is copied here in the same statement, whatever wrote it, and only the last
 * EARLIER_VERSIONS_KEPT stay; a deleted subscription's go with it. Every write moves `updated_at`
 * on (the version id). Added to schema version 3 as it was, without a new version number: the
 * triggers live in the file, so a broker that knows nothing of them keeps the table right too,
 * and an older broker can still open a file a newer one wrote.
 */
const VERSIONS = `
CREATE TABLE IF NOT EXISTS subscription_versions (
  subscription_id TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  status TEXT NOT NULL,
  error TEXT,
  resource_json TEXT NOT NULL,
  PRIMARY KEY (subscription_id, updated_at)
);
CREATE TRIGGER IF NOT EXISTS subscription_versions_keep AFTER UPDATE OF updated_at ON subscriptions
WHEN OLD.updated_at IS NOT NEW.updated_at
BEGIN
  INSERT OR REPLACE INTO subscription_versions (subscription_id, updated_at, status, error, resource_json)
    VALUES (OLD.id, OLD.updated_at, OLD.status, OLD.error, OLD.resource_json);
  DELETE FROM subscription_versions WHERE subscription_id = OLD.id AND updated_at < (
    SELECT v.updated_at FROM subscription_versions v WHERE v.subscription_id = OLD.id
    ORDER BY v.updated_at DESC LIMIT 1 OFFSET ${EARLIER_VERSIONS_KEPT - 1});
END;
CREATE TRIGGER IF NOT EXISTS subscription_versions_drop AFTER DELETE ON subscriptions
BEGIN
  DELETE FROM subscription_versions WHERE subscription_id = OLD.id;
END;
`;

/**
 * The reconciler's checkpoints (src/service/reconciler.ts), one per FHIR server read. Added to
 * schema version 4 as it was, like VERSIONS: a broker that knows nothing of it never reads it.
 */
const RECONCILE = `
CREATE TABLE IF NOT EXISTS reconcile_checkpoints (
  source TEXT PRIMARY KEY,
  through INTEGER NOT NULL
) WITHOUT ROWID;
`;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS subscriptions (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  kind TEXT NOT NULL,
  topic TEXT NOT NULL,
  status TEXT NOT NULL,
  error TEXT,
  match_json TEXT NOT NULL,
  channel_json TEXT NOT NULL,
  webhook_secret TEXT NOT NULL,
  previous_secret_json TEXT,
  end_at TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  resource_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriptions_owner ON subscriptions(owner);
CREATE TABLE IF NOT EXISTS subscription_counters (
  subscription_id TEXT PRIMARY KEY,
  events_since_start INTEGER NOT NULL,
  done_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen_events (
  event_id TEXT PRIMARY KEY,
  received_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notifications (
  seq INTEGER PRIMARY KEY,
  subscription_id TEXT NOT NULL,
  event_number INTEGER NOT NULL,
  change_json TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  due_at INTEGER NOT NULL,
  last_error TEXT,
  created_at INTEGER NOT NULL,
  bundle_last INTEGER,
  resource_json TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS notifications_key ON notifications(subscription_id, event_number);
-- The retention purge's walk, oldest first. Appended to (a commit's rows share one time), never
-- changed by a delivery; by time rather than by seq, so a wall clock that jumped ahead for a while
-- delays only the rows received meanwhile, not every row after them.
CREATE INDEX IF NOT EXISTS notifications_created ON notifications(created_at);
CREATE INDEX IF NOT EXISTS seen_events_received ON seen_events(received_at);
${VERSIONS}${RECONCILE}`;

/**
 * Version 1 (until 2026-11-26) kept `events_since_start` on the subscription row and notifications
 * in a WITHOUT ROWID table keyed by (subscription, event number). In one transaction: the old
 * notifications table steps aside, SCHEMA creates the current tables, the rows move over; so a
 * data dir is either wholly version 1 or wholly current. Their states are all on the rows, as
 * version 2's are: MIGRATE_TO_3_MARKS then sets the watermarks.
 */
const MIGRATE_1_TO_2_BEFORE = `
ALTER TABLE notifications RENAME TO notifications_v1;
DROP INDEX IF EXISTS notifications_pending;
DROP INDEX IF EXISTS notifications_created;
`;
const MIGRATE_1_TO_2_AFTER = `
INSERT INTO subscription_counters (subscription_id, events_since_start) SELECT id, events_since_start FROM subscriptions;
ALTER TABLE subscriptions DROP COLUMN events_since_start;
INSERT INTO notifications (subscription_id, event_number, change_json, state, attempts, due_at, last_error, created_at)
  SELECT subscription_id, event_number, change_json, state, attempts, due_at, last_error, created_at
  FROM notifications_v1 ORDER BY created_at, subscription_id, event_number;
DROP TABLE notifications_v1;
`;

/**
 * Version 2 (until 2026-11-27): no watermark, and two partial indexes that followed the states
 * (early version-2 files have a plain `notifications_created`, which SCHEMA keeps).
 */
const MIGRATE_2_TO_3 = `
ALTER TABLE subscription_counters ADD COLUMN done_through INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS notifications_pending;
DROP INDEX IF EXISTS notifications_expirable;
`;

/**
 * Each subscription's watermark just below its lowest pending notification (or at its counter when
 * none is pending): the rows keep their written states, so nothing is read differently, and the
 * lanes start at the first pending number instead of walking the delivered history.
 */
const MIGRATE_TO_3_MARKS = `
UPDATE subscription_counters SET done_through = IFNULL(
  (SELECT MIN(n.event_number) - 1 FROM notifications n
   WHERE n.subscription_id = subscription_counters.subscription_id AND n.state = 'pending'),
  events_since_start);
`;

/** Version 3 (until 2026-11-29): bundles were not marked (see `markBundles`). */
const MIGRATE_3_TO_4 = `
ALTER TABLE notifications ADD COLUMN bundle_last INTEGER;
`;

/**
 * Full-resource notifications keep the resource beside the change, not inside its JSON (escaped
 * again there, and parsed by every read of the change, the reconciler's "told" walk included).
 */
const ADD_RESOURCE_COLUMN = 'ALTER TABLE notifications ADD COLUMN resource_json TEXT;';

/** Before anything is written to the file: a newer broker's data is left as it is. */
function refuseNewer(db: Database.Database): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) {
    throw new Error(
      `the data dir was written by a newer broker (schema version ${version}; this one knows ${SCHEMA_VERSION})`,
    );
  }
}

/** Brings the file to SCHEMA_VERSION. */
function migrate(db: Database.Database): void {
  db.transaction(() => {
    const version = db.pragma('user_version', { simple: true }) as number;
    const hasSubscriptions =
      db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'").get() !== undefined;
    const fromVersion1 = version < 2 && hasSubscriptions;
    const fromVersion2 = version === 2;
    const fromVersion3 = version === 3;
    if (fromVersion1) db.exec(MIGRATE_1_TO_2_BEFORE);
    if (fromVersion2) db.exec(MIGRATE_2_TO_3);
    if (fromVersion2 || fromVersion3) db.exec(MIGRATE_3_TO_4);
    db.exec(SCHEMA);
    // Added to version 4 without a bump (as the versions and checkpoint tables were): an older
    // broker on the same file names its columns and never reads this one.
    const columns = db.prepare<[], { name: string }>("SELECT name FROM pragma_table_info('notifications')").all();
    if (!columns.some((c) => c.name === 'resource_json')) db.exec(ADD_RESOURCE_COLUMN);
    if (fromVersion1) db.exec(MIGRATE_1_TO_2_AFTER);
    if (fromVersion1 || fromVersion2) db.exec(MIGRATE_TO_3_MARKS);
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  }).immediate();
}

/**
 * An updated subscription as a `SubscriptionRow`, read in the same statement (what a later read
 * returned could already carry another write). A subscription without its counter row is left
 * alone, as the joined read (SELECT_SUBSCRIPTION) would not see it either.
 */
const RETURNING_ROW = `AND EXISTS (SELECT 1 FROM subscription_counters c WHERE c.subscription_id = subscriptions.id)
  RETURNING *, (SELECT c.events_since_start FROM subscription_counters c WHERE c.subscription_id = subscriptions.id)
    AS events_since_start`;

/**
 * The `updated_at` a write sets, as store.ts `nextVersionAt` computes it, in SQL over the stored
 * one: every write moves the version forward, so each is kept (`subscription_versions_keep`).
 * ISO-8601 instants of one format (`toISOString`) compare as text.
 */
function forwardOf(at: string): string {
  return `CASE WHEN ${at} > updated_at THEN ${at} ELSE strftime('%Y-%m-%dT%H:%M:%fZ', updated_at, '+0.001 seconds') END`;
}

/** The writes, run on the writer thread (`SqliteWriter.steps`). */
const SQL = {
  // Only while the owner holds fewer than @quota (null: no limit), counted in the same transaction.
  insertSub: `INSERT INTO subscriptions (id, owner, kind, topic, status, error, match_json, channel_json,
    webhook_secret, previous_secret_json, end_at, created_at, updated_at, resource_json)
    SELECT @id, @owner, @kind, @topic, @status, @error, @match_json, @channel_json, @webhook_secret,
    @previous_secret_json, @end_at, @created_at, @updated_at, @resource_json
    WHERE @quota IS NULL OR (SELECT COUNT(*) FROM subscriptions WHERE owner = @owner) < @quota`,
  insertCounter: `INSERT INTO subscription_counters (subscription_id, events_since_start)
    SELECT ?, ? WHERE EXISTS (SELECT 1 FROM subscriptions WHERE id = ?)`,
  replaceSub: `UPDATE subscriptions SET kind = @kind, topic = @topic, status = @status, error = @error,
    match_json = @match_json, channel_json = @channel_json, webhook_secret = @webhook_secret,
    previous_secret_json = @previous_secret_json, end_at = @end_at,
    updated_at = ${forwardOf('@updated_at')}, resource_json = @resource_json
    WHERE id = @id AND (@expected_status IS NULL OR (status = @expected_status AND updated_at = @expected_updated_at))
    ${RETURNING_ROW}`,
  // The status moves only from one of the expected ones (a JSON array; NULL: from any).
  setStatus: `UPDATE subscriptions SET status = @status, error = @error, updated_at = ${forwardOf('@at')}
    WHERE id = @id AND (@expected IS NULL OR status IN (SELECT value FROM json_each(@expected)))
    AND (@since IS NULL OR updated_at = @since)
    ${RETURNING_ROW}`,
  // With a version (updated_at) given, each statement deletes only while the subscription is still at it: in one
  // transaction, so a subscription changed since the caller read it keeps everything.
  deleteNotes: `DELETE FROM notifications WHERE subscription_id = @id
    AND (@version IS NULL OR EXISTS (SELECT 1 FROM subscriptions WHERE id = @id AND updated_at = @version))`,
  deleteCounter: `DELETE FROM subscription_counters WHERE subscription_id = @id
    AND (@version IS NULL OR EXISTS (SELECT 1 FROM subscriptions WHERE id = @id AND updated_at = @version))`,
  deleteSub: 'DELETE FROM subscriptions WHERE id = @id AND (@version IS NULL OR updated_at = @version)',
  forgetVersions: 'DELETE FROM subscription_versions WHERE subscription_id = @id',
  // Only forward: a run that started before another finished cannot move it back.
  saveCheckpoint: `INSERT INTO reconcile_checkpoints (source, through) VALUES (@source, @through)
    ON CONFLICT (source) DO UPDATE SET through = excluded.through WHERE excluded.through > through`,
} as const;

/** A subscription row with its counter. */
const SELECT_SUBSCRIPTION = `SELECT s.*, c.events_since_start FROM subscriptions s
  JOIN subscription_counters c ON c.subscription_id = s.id`;

interface SubscriptionRow {
  id: string;
  owner: string;
  kind: string;
  topic: string;
  status: string;
  error: string | null;
  match_json: string;
  channel_json: string;
  webhook_secret: string;
  previous_secret_json: string | null;
  end_at: string | null;
  events_since_start: number;
  created_at: string;
  updated_at: string;
  resource_json: string;
}

type VersionRow = Pick<SubscriptionRow, 'updated_at' | 'status' | 'error' | 'resource_json'>;

interface NotificationRow {
  subscription_id: string;
  event_number: number;
  change_json: string;
  state: string;
  attempts: number;
  due_at: number;
  last_error: string | null;
  bundle_last: number | null;
  resource_json: string | null;
}

/** Rows `notifiedResources` reads at a time, between turns of the event loop. */
const NOTIFIED_STEP = 500;

/** How often the database path is checked against the file opened (see `#checkFile`). */
const FILE_CHECK_MS = 5000;
/** How long `ping` waits for the writer thread's answer (one purge batch or commit takes milliseconds). */
const PING_MS = 5000;

export class SqliteStore implements Store {
  readonly #db: Database.Database;
  readonly #stmt;
  readonly #synchronous: 'FULL' | 'NORMAL';

  readonly #writer: SqliteWriter;
  readonly #file: string;
  readonly #inode: number;
  /**
   * A descriptor of the file opened, only ever `fstat`ed: its link count drops to 0 when the file is
   * deleted, even if a new file at the path got the old inode number (file systems reuse them).
   * Closed last in `close`, after every connection: closing a descriptor of a database file drops
   * the process's POSIX locks on it, SQLite's included.
   */
  readonly #fd: number;
  #fdClosed = false;
  readonly #fileCheck: NodeJS.Timeout;

  constructor(dataDir: string, options: { synchronous?: 'FULL' | 'NORMAL' } = {}) {
    makeDataDir(dataDir);
    const file = join(dataDir, 'broker.sqlite3');
    try {
      ownerOnly(file);
      this.#db = new Database(file);
    } catch (err) {
      throw new Error(`cannot open the SQLite database ${file}: ${(err as Error).message}`, { cause: err });
    }
    try {
      refuseNewer(this.#db);
    } catch (err) {
      this.#db.close();
      throw new Error(`cannot use the SQLite database ${file}: ${(err as Error).message}`, { cause: err });
    }
    this.#db.pragma('journal_mode = WAL');
    this.#synchronous = options.synchronous ?? 'FULL';
    this.#db.pragma(`synchronous = ${this.#synchronous}`);
    this.#db.pragma('busy_timeout = 5000');
    // Checkpoints are the writer thread's (see CHECKPOINT_PAGES): the migration is the only commit
    // on this connection, and even a large one leaves the copying to them.
    this.#db.pragma('wal_autocheckpoint = 0');
    migrate(this.#db);
    // From here on this connection (the event loop's) only reads: every write goes through the
    // writer thread, in one order, and a write here by mistake fails instead of taking the lock.
    this.#db.pragma('query_only = ON');
    // The schema exists before the writer opens its own connection.
    this.#writer = new SqliteWriter(file, this.#synchronous);
    // SQLite goes on writing to an open file that was deleted or replaced: every later commit
    // would be lost. The path is checked against the file opened, now and then and on `ping`.
    this.#file = file;
    this.#inode = statSync(file).ino;
    this.#fd = openSync(file, 'r');
    this.#fileCheck = setInterval(() => {
      try {
        this.#checkFile();
      } catch {
        // Failed for good: `onFailure` has heard it, and every call answers STORE_UNAVAILABLE.
        clearInterval(this.#fileCheck);
      }
    }, FILE_CHECK_MS);
    this.#fileCheck.unref();
    const db = this.#db;
    this.#stmt = {
      getSub: db.prepare<[string], SubscriptionRow>(`${SELECT_SUBSCRIPTION} WHERE s.id = ?`),
      listAll: db.prepare<[], SubscriptionRow>(`${SELECT_SUBSCRIPTION} ORDER BY s.created_at, s.id`),
      listOwner: db.prepare<[string], SubscriptionRow>(
        `${SELECT_SUBSCRIPTION} WHERE s.owner = ? ORDER BY s.created_at, s.id`,
      ),
      // Above the watermark (or `after`, when higher): a walk of what is not yet done, not of the
      // delivered history kept for `$events`.
      pending: db.prepare<{ id: string; after: number; limit: number }, NotificationRow>(
        `SELECT * FROM notifications WHERE subscription_id = @id AND state = 'pending'
         AND event_number > MAX(@after, IFNULL((SELECT done_through FROM subscription_counters WHERE subscription_id = @id), 0))
         ORDER BY event_number LIMIT @limit`,
      ),
      // Every number above a subscription's watermark is pending but for the few written done on
      // their row above a pending one (after a re-queue, until it is delivered): an upper bound,
      // exact in the common case, from one page of counters.
      countPending: db.prepare<[], { n: number }>(
        'SELECT IFNULL(SUM(events_since_start - done_through), 0) AS n FROM subscription_counters WHERE events_since_start > done_through',
      ),
      // Counted above the watermark, each confirmed by a pending row there (rows above it may be done
      // on the row); the counters, not a scan of every notification kept for `$events`.
      withPending: db.prepare<[], { subscription_id: string }>(
        `SELECT c.subscription_id FROM subscription_counters c WHERE c.events_since_start > c.done_through
         AND EXISTS (SELECT 1 FROM notifications n WHERE n.subscription_id = c.subscription_id
           AND n.event_number > c.done_through AND n.state = 'pending')`,
      ),
      // A row at or below the watermark still in state 'pending' was delivered (at its first attempt,
      // or at the first after a re-queue started it over): no error of an earlier attempt goes with it.
      range: db.prepare<[string, number, number, number], NotificationRow>(
        `SELECT n.subscription_id, n.event_number, n.change_json, n.resource_json, n.due_at, n.bundle_last,
           CASE WHEN n.state = 'pending' AND n.event_number <= c.done_through THEN NULL ELSE n.last_error END AS last_error,
           CASE WHEN n.state = 'pending' AND n.event_number <= c.done_through THEN 'delivered' ELSE n.state END AS state,
           CASE WHEN n.state = 'pending' AND n.event_number <= c.done_through THEN MAX(n.attempts, 1) ELSE n.attempts END
             AS attempts
         FROM notifications n JOIN subscription_counters c ON c.subscription_id = n.subscription_id
         WHERE n.subscription_id = ? AND n.event_number BETWEEN ? AND ?
         ORDER BY n.event_number LIMIT ?`,
      ),
      versions: db.prepare<[string], VersionRow>(
        `SELECT updated_at, status, error, resource_json FROM subscription_versions
         WHERE subscription_id = ? ORDER BY updated_at DESC`,
      ),
      // Newest first through (subscription, event number): the walk stops at the first row accepted
      // before the caller's bound, so it reads what the subscription accepted since then.
      newestFirst: db.prepare<
        [string, number, number],
        { event_number: number; change_json: string; created_at: number }
      >(
        `SELECT event_number, change_json, created_at FROM notifications
         WHERE subscription_id = ? AND event_number < ? ORDER BY event_number DESC LIMIT ?`,
      ),
      checkpoint: db.prepare<[string], { through: number }>(
        'SELECT through FROM reconcile_checkpoints WHERE source = ?',
      ),
      ping: db.prepare('SELECT 1'),
    };
  }

  async insertSubscription(rec: SubscriptionRecord, quota?: number): Promise<boolean> {
    const [inserted] = await this.#writer.steps([
      [SQL.insertSub, { ...toRow(rec), quota: quota === undefined || quota === Infinity ? null : quota }, 'run'],
      [SQL.insertCounter, [rec.id, rec.eventsSinceStart, rec.id], 'run'],
    ]);
    return (inserted as number) > 0;
  }

  async getSubscription(id: string): Promise<SubscriptionRecord | undefined> {
    const row = this.#stmt.getSub.get(id);
    return row === undefined ? undefined : fromRow(row);
  }

  async listSubscriptions(owner?: string): Promise<SubscriptionRecord[]> {
    const rows = owner === undefined ? this.#stmt.listAll.all() : this.#stmt.listOwner.all(owner);
    return rows.map(fromRow);
  }

  async subscriptionVersions(id: string): Promise<SubscriptionVersion[]> {
    return this.#stmt.versions.all(id).map((row) => ({
      updatedAt: row.updated_at,
      status: row.status as SubscriptionStatus,
      ...(row.error === null ? {} : { error: row.error }),
      resource: JSON.parse(row.resource_json) as FhirResource,
    }));
  }

  async forgetSubscriptionVersions(id: string): Promise<number> {
    const [forgotten] = await this.#writer.steps([[SQL.forgetVersions, { id }, 'run']]);
    return forgotten as number;
  }

  async replaceSubscription(
    rec: SubscriptionRecord,
    expected?: { readonly status: SubscriptionStatus; readonly updatedAt: string },
  ): Promise<SubscriptionRecord | undefined> {
    const params = {
      ...toRow(rec),
      expected_status: expected?.status ?? null,
      expected_updated_at: expected?.updatedAt ?? null,
    };
    const [row] = (await this.#writer.steps([[SQL.replaceSub, params, 'get']])) as [SubscriptionRow | undefined];
    return row === undefined ? undefined : fromRow(row);
  }

  async updateStatus(id: string, update: StatusUpdate, at: string): Promise<SubscriptionRecord | undefined> {
    const expected = update.expected === undefined ? null : JSON.stringify(update.expected);
    const since = update.unchangedSince ?? null;
    const [row] = (await this.#writer.steps([
      [SQL.setStatus, { status: update.status, error: update.error ?? null, at, id, expected, since }, 'get'],
    ])) as [SubscriptionRow | undefined];
    return row === undefined ? undefined : fromRow(row);
  }

  async deleteSubscription(id: string, expectedUpdatedAt?: string): Promise<boolean> {
    const params = { id, version: expectedUpdatedAt ?? null };
    const [, , deleted] = await this.#writer.steps([
      [SQL.deleteNotes, params, 'run'],
      [SQL.deleteCounter, params, 'run'],
      [SQL.deleteSub, params, 'run'],
    ]);
    return (deleted as number) > 0;
  }

  /** On the writer thread: one transaction, committed (fsync'd with FULL) before this resolves. */
  acceptChanges(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    return this.#writer.accept(items, receivedAt);
  }

  async pendingNotifications(
    subscriptionId: string,
    afterEventNumber: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    return this.#stmt.pending.all({ id: subscriptionId, after: afterEventNumber, limit }).map(fromNotificationRow);
  }

  async countPending(): Promise<number> {
    return this.#stmt.countPending.get()?.n ?? 0;
  }

  async subscriptionsWithPending(): Promise<string[]> {
    return this.#stmt.withPending.all().map((r) => r.subscription_id);
  }

  /**
   * On the writer thread, without an fsync of their own: the next event commit makes them durable,
   * and one lost to a power cut only means a redelivery, which at-least-once allows.
   */
  recordDeliveries(updates: readonly DeliveryUpdate[]): Promise<void> {
    return this.#writer.recordDeliveries(updates);
  }

  /** On the writer thread, without an fsync of their own (see Store.markBundles). */
  markBundles(marks: readonly BundleMark[]): Promise<boolean[]> {
    return this.#writer.markBundles(marks);
  }

  async notificationsInRange(
    subscriptionId: string,
    from: number,
    to: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    return this.#stmt.range.all(subscriptionId, from, to, limit).map(fromNotificationRow);
  }

  async requeueDeadLetters(subscriptionId: string, dueAt: number): Promise<number> {
    return this.#writer.requeue(subscriptionId, dueAt);
  }

  /** On the writer thread, in bounded batches between event commits. */
  purge(before: number, signal?: AbortSignal, batch?: number): Promise<{ notifications: number; eventIds: number }> {
    return this.#writer.purge(before, signal, batch);
  }

  /**
   * Newest first through (subscription, event number), NOTIFIED_STEP rows a read, yielding to the
   * event loop between reads (a busy subscription holds thousands of rows in the window), until a
   * row accepted before the bound.
   */
  async notifiedResources(subscriptionId: string, since: number, signal?: AbortSignal): Promise<Map<string, number>> {
    const found = new Map<string, number>();
    const bound = since - NOTIFIED_SCAN_SLACK_MS;
    let below = Number.MAX_SAFE_INTEGER;
    for (;;) {
      const rows = this.#stmt.newestFirst.all(subscriptionId, below, NOTIFIED_STEP);
      for (const row of rows) {
        if (row.created_at < bound) return found;
        const change = JSON.parse(row.change_json) as ResourceChange;
        const time = Date.parse(change.time);
        if (change.resourceId === undefined || !(time >= since)) continue;
        const key = `${change.resourceType}/${change.resourceId}`;
        if (!(time <= (found.get(key) ?? Number.NEGATIVE_INFINITY))) found.set(key, time);
      }
      if (rows.length < NOTIFIED_STEP) return found;
      below = (rows.at(-1) as { event_number: number }).event_number;
      await new Promise((resolve) => setImmediate(resolve));
      signal?.throwIfAborted();
    }
  }

  async reconcileCheckpoint(source: string): Promise<number | undefined> {
    return this.#stmt.checkpoint.get(source)?.through;
  }

  async saveReconcileCheckpoint(source: string, through: number): Promise<void> {
    await this.#writer.steps([[SQL.saveCheckpoint, { source, through }, 'run']]);
  }

  async ping(): Promise<void> {
    this.#checkFile();
    this.#stmt.ping.get();
    // Bounded: a health check answers (503) even when the writer thread does not.
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new BrokerError('STORE_UNAVAILABLE', `the SQLite writer did not answer within ${PING_MS} ms`)),
        PING_MS,
      );
    });
    try {
      await Promise.race([this.#writer.ping(), late]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Hears once that the store failed for good (the writer crashed, the file was deleted or replaced). */
  onFailure(fn: (err: Error) => void): void {
    this.#writer.onFailure(fn);
  }

  #checkFile(): void {
    let same: boolean;
    try {
      same = fstatSync(this.#fd).nlink > 0 && statSync(this.#file).ino === this.#inode;
    } catch {
      same = false;
    }
    if (same) return;
    // (Deleted, it may already be back as a new, empty file: SQLite recreates a missing one.)
    const err = new BrokerError(
      'STORE_UNAVAILABLE',
      `the SQLite database ${this.#file} was deleted or replaced while open`,
    );
    this.#writer.fail(err);
    throw err;
  }

  async close(): Promise<void> {
    clearInterval(this.#fileCheck);
    try {
      await this.#writer.close();
      if (this.#db.open) this.#db.close();
    } finally {
      if (!this.#fdClosed) closeSync(this.#fd);
      this.#fdClosed = true;
    }
  }
}

function toRow(rec: SubscriptionRecord): Omit<SubscriptionRow, 'events_since_start'> {
  return {
    id: rec.id,
    owner: rec.owner,
    kind: rec.kind,
    topic: rec.topic,
    status: rec.status,
    error: rec.error ?? null,
    match_json: storedMatch(rec.match),
    channel_json: JSON.stringify(rec.channel),
    webhook_secret: rec.webhookSecret,
    previous_secret_json: rec.previousSecret === undefined ? null : JSON.stringify(rec.previousSecret),
    end_at: rec.end ?? null,
    created_at: rec.createdAt,
    updated_at: rec.updatedAt,
    resource_json: JSON.stringify(rec.resource),
  };
}

// Rows are written only by this adapter from validated records, so reading them back is trusted.
function fromRow(row: SubscriptionRow): SubscriptionRecord {
  return {
    id: row.id,
    owner: row.owner,
    kind: row.kind as SubscriptionKind,
    topic: row.topic,
    status: row.status as SubscriptionStatus,
    ...(row.error === null ? {} : { error: row.error }),
    match: matchFromStore(row.match_json),
    channel: JSON.parse(row.channel_json) as Channel,
    webhookSecret: row.webhook_secret,
    ...(row.previous_secret_json === null
      ? {}
      : { previousSecret: JSON.parse(row.previous_secret_json) as { secret: string; until: string } }),
    ...(row.end_at === null ? {} : { end: row.end_at }),
    eventsSinceStart: row.events_since_start,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    resource: JSON.parse(row.resource_json) as FhirResource,
  };
}

function fromNotificationRow(row: NotificationRow): StoredNotification {
  const change = JSON.parse(row.change_json) as ResourceChange;
  return {
    subscriptionId: row.subscription_id,
    eventNumber: row.event_number,
    change: row.resource_json === null ? change : { ...change, resource: row.resource_json },
    state: row.state as DeliveryState,
    attempts: row.attempts,
    dueAt: row.due_at,
    ...(row.last_error === null ? {} : { lastError: row.last_error }),
    ...(row.bundle_last === null ? {} : { bundleLast: row.bundle_last }),
  };
}

/**
 * The database holds every client's webhook secrets and `channel.header` values: readable by its
 * owner alone, like credentials.json. Made 0600 if new, and tightened if an earlier build (or a
 * umask) left it open to others; SQLite gives the WAL and shared-memory files it creates the
 * database file's mode, and those already there are tightened too (where this user may).
 */
function ownerOnly(file: string): void {
  closeSync(openSync(file, 'a', 0o600));
  for (const path of [file, `${file}-wal`, `${file}-shm`]) {
    const mode = statSync(path, { throwIfNoEntry: false })?.mode;
    if (mode === undefined || (mode & 0o077) === 0) continue;
    try {
      chmodSync(path, mode & 0o700);
    } catch {
      // Not this user's file (EPERM): it still opens; its owner decides who reads it.
    }
  }
}
