import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { BrokerError } from '../../core/errors.js';
import type { Notification } from '../../core/types.js';
import { type AcceptItem, type AcceptOutcome, type BundleMark, changesOf, type DeliveryUpdate } from '../store.js';

/**
 * Every write of the embedded store — accepting events (a durable, fsync'd commit), recording
 * delivery states, the retention purge, and the rare subscription and status writes — runs on a
 * worker thread with its own SQLite connection, so the event loop that serves HTTP and sends
 * webhooks never waits for the disk or for the write lock (its own connection only reads, once the
 * file is open and migrated). Requests are answered in order; the
 * caller (ingest) groups concurrent requests into one call, so one fsync covers many events.
 *
 * The worker is plain JavaScript evaluated from a string: it loads better-sqlite3 by absolute path
 * and needs no TypeScript loader, so it runs the same under tsx, vitest and a bundle.
 */

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.sqlitePath);
const db = new Database(workerData.file);
db.pragma('journal_mode = WAL');
db.pragma('synchronous = ' + workerData.synchronous);
db.pragma('busy_timeout = 5000');
db.pragma('wal_autocheckpoint = ' + workerData.checkpointPages);
db.pragma('journal_size_limit = ' + workerData.checkpointPages * 4096 * 2);
const seen = db.prepare('INSERT OR IGNORE INTO seen_events (event_id, received_at) VALUES (?, ?)');
// The counter moves only while the subscription collects (it may have been switched off or deleted since matching).
const bump = db.prepare("UPDATE subscription_counters SET events_since_start = events_since_start + 1 WHERE subscription_id = ? AND EXISTS (SELECT 1 FROM subscriptions WHERE id = ? AND status IN ('requested', 'active', 'error')) RETURNING events_since_start AS n");
const insertNote = db.prepare("INSERT INTO notifications (subscription_id, event_number, change_json, resource_json, state, attempts, due_at, created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)");
const delivery = db.prepare('UPDATE notifications SET state = ?, attempts = ?, due_at = ?, last_error = ? WHERE subscription_id = ? AND event_number = ?');
// Each subscription's watermark and counter as the database holds them, for the subscriptions delivery outcomes
// touched lately: this thread is the store's only writer, so they stay right while its transactions commit. A
// re-queue drops its subscription's; a transaction that fails, and every \`steps\` write (subscriptions, statuses),
// empties it.
const marks = new Map();
// items: [eventId, changeJson, k, subscriptionId × k]...; a negative k (-k) marks an item whose subscriptions each
// follow with the resource JSON to keep with it, or null (full-resource ones take it): [eventId, changeJson, -k,
// (subscriptionId, resourceJson | null) × k]. Answer per item: -1 (a duplicate), or 1 then k event numbers (0: that
// subscription no longer collects).
const accept = db.transaction((items, receivedAt) => {
  const out = [];
  for (let i = 0; i < items.length; ) {
    const eventId = items[i], changeJson = items[i + 1], each = items[i + 2] < 0, k = Math.abs(items[i + 2]);
    const step = each ? 2 : 1;
    i += 3;
    if (seen.run(eventId, receivedAt).changes === 0) { out.push(-1); i += k * step; continue; }
    out.push(1);
    for (const end = i + k * step; i < end; i += step) {
      const bumped = bump.get(items[i], items[i]);
      if (bumped === undefined) { out.push(0); continue; }
      insertNote.run(items[i], bumped.n, changeJson, each ? items[i + 1] : null, receivedAt, receivedAt);
      const mark = marks.get(items[i]);
      if (mark !== undefined) mark.top = bumped.n;
      out.push(bumped.n);
    }
  }
  return out;
});
// Delivery outcomes. A subscription's notifications are done (delivered or dead) through its watermark
// subscription_counters.done_through: a row there still in state 'pending' was delivered at its first attempt.
// The common outcome, a first attempt delivered right after the watermark, only moves the watermark (one narrow
// counter row per subscription per batch, on pages every event commit dirties anyway) instead of rewriting the row
// and its index entries. Everything else is written on the row: retries, dead letters, later attempts, and a
// delivery above a truly pending row (the watermark never passes one). A retry of a number at or below the watermark
// first lowers the watermark below it, writing the rows it passes as the delivered ones they are.
const markOf = db.prepare('SELECT done_through AS w, events_since_start AS top FROM subscription_counters WHERE subscription_id = ?');
const setMark = db.prepare('UPDATE subscription_counters SET done_through = ? WHERE subscription_id = ?');
const pendingBetween = db.prepare("SELECT 1 FROM notifications WHERE subscription_id = ? AND event_number > ? AND event_number < ? AND state = 'pending' LIMIT 1");
const materialise = db.prepare("UPDATE notifications SET state = 'delivered', attempts = MAX(attempts, 1) WHERE subscription_id = ? AND event_number > ? AND event_number <= ? AND state = 'pending'");
// updates: [subscriptionId, eventNumber, state, attempts, dueAt, lastError | null]...; answers the moved watermarks.
const record = db.transaction((u) => {
  const moved = new Map();
  for (let i = 0; i < u.length; i += 6) {
    const sub = u[i], n = u[i + 1], state = u[i + 2], attempts = u[i + 3], lastError = u[i + 5];
    let mark = moved.get(sub);
    if (mark === undefined) {
      const known = marks.get(sub) ?? markOf.get(sub);
      if (known === undefined) continue; // a deleted subscription: nothing of it is left to record
      mark = { w: known.w, top: known.top, w0: known.w };
      moved.set(sub, mark);
    }
    if (state === 'pending') {
      if (n <= mark.w) { materialise.run(sub, n - 1, mark.w); mark.w = n - 1; }
      delivery.run(state, attempts, u[i + 4], lastError, sub, n);
      continue;
    }
    // (An outcome for a number never taken, above the counter, moves nothing.)
    const advances = n > mark.w && n <= mark.top && (n === mark.w + 1 || pendingBetween.get(sub, mark.w, n) === undefined);
    if (!advances || state !== 'delivered' || attempts !== 1 || lastError !== null) delivery.run(state, attempts, u[i + 4], lastError, sub, n);
    if (advances) mark.w = n;
  }
  for (const [sub, mark] of moved) if (mark.w !== mark.w0) setMark.run(mark.w, sub);
  return moved;
});
// Re-queueing a subscription (durable, like \`steps\`): the watermark goes below the lowest dead letter, by the same
// statement a retry below it uses, then the dead letters are pending again and the pending retries start over, all
// with no attempt made, due at \`dueAt\`. A retry is a row written pending with attempts, always above the watermark
// (a retry lowers it below its row, and it never passes a pending row): the reset walks only what is above it.
// Answers how many dead letters went back.
const lowestDead = db.prepare("SELECT MIN(event_number) AS n FROM notifications WHERE subscription_id = ? AND state = 'dead'");
const requeueDead = db.prepare("UPDATE notifications SET state = 'pending', attempts = 0, due_at = ?, last_error = NULL WHERE subscription_id = ? AND state = 'dead'");
const restartRetries = db.prepare("UPDATE notifications SET attempts = 0, due_at = ?, last_error = NULL WHERE subscription_id = ? AND event_number > ? AND state = 'pending' AND attempts > 0");
const requeue = db.transaction((sub, dueAt) => {
  marks.delete(sub);
  const mark = markOf.get(sub);
  let done = mark === undefined ? 0 : mark.w;
  const dead = lowestDead.get(sub).n;
  if (dead !== null && dead <= done) {
    materialise.run(sub, dead - 1, done);
    setMark.run(dead - 1, sub);
    done = dead - 1;
  }
  restartRetries.run(dueAt, sub, done);
  return dead === null ? 0 : requeueDead.run(dueAt, sub).changes;
});
// Where bundles end (Store.markBundles): on each one's first notification, while it is pending and still has the
// mark the caller read. marks: [subscriptionId, eventNumber, last, previous | null]...; answers 1 or 0 per mark.
const markBundle = db.prepare("UPDATE notifications SET bundle_last = ? WHERE subscription_id = ? AND event_number = ? AND state = 'pending' AND bundle_last IS ?");
const markBundles = db.transaction((m) => {
  const written = [];
  for (let i = 0; i < m.length; i += 4) written.push(markBundle.run(m[i + 2], m[i], m[i + 1], m[i + 3]).changes);
  return written;
});
// A transaction that failed may have left the cached watermarks ahead of the database: forget them all.
function forgettingMarksOnFailure(fn) {
  try { return fn(); } catch (err) { marks.clear(); throw err; }
}
function recordDeliveries(u) {
  const moved = forgettingMarksOnFailure(() => record(u));
  if (marks.size > 100000) marks.clear();
  for (const [sub, mark] of moved) marks.set(sub, { w: mark.w, top: mark.top });
}
// Retention, a bounded batch at a time. Notifications are walked oldest first through notifications_created, from
// a (created_at, seq) cursor the caller keeps, up to \`limit\` rows or the first one received at or after \`before\`;
// those done (on the row, or at or below their subscription's watermark) go, pending ones stay and are walked past.
// Two statements, so each seeks: the rest of the cursor's time (rows received in the same millisecond, by seq), then
// the times after it. (A row value \`(created_at, seq) > (?, ?)\` seeks on created_at alone: with many rows of one
// time, every batch walked again past the pending ones already seen.)
const PURGE_COLUMNS = \`SELECT n.seq, n.event_number, n.state, n.created_at, c.done_through
  FROM notifications n INDEXED BY notifications_created
  LEFT JOIN subscription_counters c ON c.subscription_id = n.subscription_id\`;
const purgeSameTime = db.prepare(\`\${PURGE_COLUMNS} WHERE n.created_at = @at AND n.created_at < @before AND n.seq > @seq ORDER BY n.seq LIMIT @limit\`);
const purgeLater = db.prepare(\`\${PURGE_COLUMNS} WHERE n.created_at > @at AND n.created_at < @before ORDER BY n.created_at, n.seq LIMIT @limit\`);
const purgeNote = db.prepare('DELETE FROM notifications WHERE seq = ?');
const purgeSeen = db.prepare('DELETE FROM seen_events WHERE event_id IN (SELECT event_id FROM seen_events WHERE received_at < ? LIMIT ?)');
// cursor: [created_at, seq] of the last row walked. Answers [notifications deleted, event ids deleted, cursor,
// whether the walk reached its end].
const purge = db.transaction((cursor, before, limit) => {
  let rows = purgeSameTime.all({ at: cursor[0], seq: cursor[1], before, limit });
  if (rows.length < limit) rows = rows.concat(purgeLater.all({ at: cursor[0], before, limit: limit - rows.length }));
  let deleted = 0, last = cursor;
  for (const r of rows) {
    last = [r.created_at, r.seq];
    const done = r.state !== 'pending' || (r.done_through !== null && r.event_number <= r.done_through);
    if (done) deleted += purgeNote.run(r.seq).changes;
  }
  return [deleted, purgeSeen.run(before, limit).changes, last, rows.length < limit];
});
// The store's other writes (subscriptions, statuses, re-queues), rare and small: statements by SQL text,
// prepared once. steps: [sql, params (array, or object for named ones), 'run' | 'get'].
const prepared = new Map();
function statement(sql) {
  let st = prepared.get(sql);
  if (st === undefined) { st = db.prepare(sql); prepared.set(sql, st); }
  return st;
}
const steps = db.transaction((list) => list.map(([sql, params, kind]) => {
  const st = statement(sql);
  const args = Array.isArray(params) ? params : [params];
  return kind === 'get' ? st.get(...args) : st.run(...args).changes;
}));
// Writes whose loss to a power cut costs nothing but a redelivery or a purge redone: no fsync of their own.
function withoutFsync(fn) {
  if (workerData.synchronous !== 'FULL') return fn();
  db.pragma('synchronous = NORMAL');
  try { return fn(); } finally { db.pragma('synchronous = FULL'); }
}
parentPort.on('message', (msg) => {
  try {
    if (msg.op === 'accept') {
      parentPort.postMessage({ id: msg.id, result: forgettingMarksOnFailure(() => accept(msg.items, msg.receivedAt)) });
    } else if (msg.op === 'deliveries') {
      // Delivery states ride on the next durable commit.
      withoutFsync(() => recordDeliveries(msg.updates));
      parentPort.postMessage({ id: msg.id, result: null });
    } else if (msg.op === 'bundles') {
      // Committed before the attempts they precede: a process killed after this keeps them.
      parentPort.postMessage({ id: msg.id, result: withoutFsync(() => markBundles(msg.marks)) });
    } else if (msg.op === 'steps') {
      marks.clear();
      parentPort.postMessage({ id: msg.id, result: steps.immediate(msg.steps) });
    } else if (msg.op === 'requeue') {
      const result = forgettingMarksOnFailure(() => requeue.immediate(msg.subscriptionId, msg.dueAt));
      parentPort.postMessage({ id: msg.id, result });
    } else if (msg.op === 'purge') {
      parentPort.postMessage({ id: msg.id, result: withoutFsync(() => purge(msg.cursor, msg.before, msg.limit)) });
    } else if (msg.op === 'ping') {
      db.prepare('SELECT 1').get();
      parentPort.postMessage({ id: msg.id, result: null });
    } else if (msg.op === 'close') {
      db.close();
      parentPort.postMessage({ id: msg.id, result: null });
    } else {
      parentPort.postMessage({ id: msg.id, error: 'unknown op ' + msg.op });
    }
  } catch (err) {
    parentPort.postMessage({ id: msg.id, error: String(err && err.message || err), code: err && err.code });
  }
});
`;

/**
 * WAL pages between automatic checkpoints on the writer connection (SQLite's default: 1,000).
 * Each commit dirties tens of pages (~42 for 13 events under schema version 2: a leaf of the
 * (subscription, event number) index per subscriber, `seen_events` leaves, the appended tails),
 * many of them the same hot pages commit after commit; a checkpoint writes each page once however
 * often it changed, so checkpointing every 10,000 pages (a WAL of up to ~40 MB, truncated to twice
 * that at most) writes far less. Measured under schema version 1 on 6,000 commits of 15 events:
 * mean commit 1.91 ms at 1,000 pages, 1.35 ms at 4,000, 1.17 ms at 10,000.
 */
const CHECKPOINT_PAGES = 10_000;

/**
 * The background checkpointer: its own connection, on its own thread, copies committed WAL pages
 * into the database file every CHECKPOINT_INTERVAL_MS (PASSIVE: it never waits for, nor blocks,
 * the writer). The writer's automatic checkpoint then usually finds most pages copied already, so
 * a commit, which the 202s wait for, seldom stalls while thousands of pages are copied and the
 * database file is fsync'd. Under sustained load the writer still checkpoints inline whenever the
 * WAL reaches CHECKPOINT_PAGES (pages committed since the last pass are left to copy, and the WAL
 * is reset). Measured at 500 events/s: the slowest of each 1,000 commits took 4–9 ms with
 * checkpoints on the writer only, mostly 1–2 ms with this.
 *
 * A pass that fails (a PASSIVE checkpoint reports a concurrent checkpoint in its result row rather
 * than throwing; what can throw is I/O, SQLITE_BUSY_RECOVERY and the like) is reported once per
 * error code and the next tick tries again: the writer's own checkpoints bound the WAL meanwhile.
 */
const CHECKPOINTER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.sqlitePath);
const db = new Database(workerData.file);
const reported = new Set();
const timer = setInterval(() => {
  try {
    db.pragma('wal_checkpoint(PASSIVE)');
  } catch (err) {
    const code = String(err && err.code || 'unknown');
    if (!reported.has(code)) {
      reported.add(code);
      parentPort.postMessage({ warning: code + ': ' + String(err && err.message || err) });
    }
  }
}, workerData.intervalMs);
parentPort.on('message', () => {
  clearInterval(timer);
  db.close();
  parentPort.postMessage('closed');
});
`;

/**
 * Rows per table per purge transaction (so up to 1,000 deletions): ~3 ms of the writer's time, so
 * an event commit waits at most about that long behind one (suite `retention`: commit p50 2.0–2.6
 * ms while 450,000 rows go; 2,000 per batch gave 6.8 ms). Rows walked past (pending ones) count
 * towards the batch too, so old pending rows ahead cannot make a batch slower.
 */
const PURGE_BATCH = 500;

/** 100 ms: a tenth of a second of commits (a few hundred pages under load) per pass. */
const CHECKPOINT_INTERVAL_MS = 100;

/** One statement of `steps`: SQL, its parameters (positional, or one object of named ones), what to answer. */
type Step = readonly [sql: string, params: readonly unknown[] | Readonly<Record<string, unknown>>, kind: 'run' | 'get'];

interface Pending {
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: Error) => void;
}

export class SqliteWriterError extends Error {
  /** SQLite's extended result code when SQLite raised it (e.g. `SQLITE_CONSTRAINT_PRIMARYKEY`). */
  readonly code: string | undefined;

  constructor(message: string, code?: string) {
    super(message);
    this.name = 'SqliteWriterError';
    this.code = code;
  }
}

export class SqliteWriter {
  readonly #worker: Worker;
  readonly #checkpointer: Worker;
  #checkpointerAlive = true;
  #closing = false;
  readonly #pending = new Map<number, Pending>();
  #next = 1;
  #failed: Error | undefined;
  #onFailure: ((err: Error) => void) | undefined;

  constructor(file: string, synchronous: 'FULL' | 'NORMAL') {
    const sqlitePath = createRequire(import.meta.url).resolve('better-sqlite3');
    this.#worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { file, synchronous, sqlitePath, checkpointPages: CHECKPOINT_PAGES },
    });
    this.#worker.on('message', (msg: { id: number; result?: unknown; error?: string; code?: string }) => {
      const p = this.#pending.get(msg.id);
      if (p === undefined) return;
      this.#pending.delete(msg.id);
      if (msg.error === undefined) p.resolve(msg.result);
      else p.reject(new SqliteWriterError(msg.error, typeof msg.code === 'string' ? msg.code : undefined));
    });
    this.#worker.on('error', (err) => this.fail(err));
    this.#worker.on('exit', (code) => this.fail(new SqliteWriterError(`the SQLite writer stopped (exit ${code})`)));
    this.#checkpointer = new Worker(CHECKPOINTER_SOURCE, {
      eval: true,
      workerData: { file, sqlitePath, intervalMs: CHECKPOINT_INTERVAL_MS },
    });
    this.#checkpointer.unref();
    this.#checkpointer.on('message', (msg: unknown) => {
      if (typeof msg === 'object' && msg !== null && 'warning' in msg)
        process.emitWarning(`SQLite background checkpoint failed (${String(msg.warning)}); it tries again`);
    });
    this.#checkpointer.on('error', (err) => {
      process.emitWarning(`SQLite background checkpointer stopped (${err.message}); the writer checkpoints alone`);
    });
    this.#checkpointer.on('exit', () => {
      this.#checkpointerAlive = false;
    });
  }

  /**
   * Across the thread boundary in flat arrays of strings and numbers: cloning those costs a
   * fraction of cloning objects, on both sides.
   */
  async accept(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    const flat: (string | number | null)[] = [];
    for (const item of items) {
      const changeJson = JSON.stringify(item.change);
      const k = item.subscriptionIds.length;
      if (item.resource === undefined) {
        flat.push(item.change.eventId, changeJson, k);
        // One at a time: spread into push(), every id is an argument on the stack, and an event that
        // matches ~130,000 subscriptions overflowed it (RangeError) on every retry.
        for (const id of item.subscriptionIds) flat.push(id);
        continue;
      }
      // Full-resource subscriptions keep the resource beside the change; the others nothing.
      const { json, for: takers } = item.resource;
      flat.push(item.change.eventId, changeJson, -k);
      for (const id of item.subscriptionIds) flat.push(id, takers.has(id) ? json : null);
    }
    const numbers = (await this.#call({ op: 'accept', items: flat, receivedAt })) as number[];
    let at = 0;
    return items.map((item): AcceptOutcome => {
      if (numbers[at++] === -1) return { duplicate: true, notifications: [] };
      const notifications: Notification[] = [];
      const changeOf = changesOf(item);
      for (const subscriptionId of item.subscriptionIds) {
        const eventNumber = numbers[at++] as number;
        if (eventNumber > 0) notifications.push({ subscriptionId, eventNumber, change: changeOf(subscriptionId) });
      }
      return { duplicate: false, notifications };
    });
  }

  async recordDeliveries(updates: readonly DeliveryUpdate[]): Promise<void> {
    const flat: (string | number | null)[] = [];
    for (const u of updates)
      flat.push(u.subscriptionId, u.eventNumber, u.state, u.attempts, u.dueAt, u.lastError ?? null);
    await this.#call({ op: 'deliveries', updates: flat });
  }

  async markBundles(marks: readonly BundleMark[]): Promise<boolean[]> {
    const flat: (string | number | null)[] = [];
    for (const m of marks) flat.push(m.subscriptionId, m.eventNumber, m.last, m.previous ?? null);
    return ((await this.#call({ op: 'bundles', marks: flat })) as number[]).map((changes) => changes > 0);
  }

  /**
   * Statements in one durable transaction on the writer's connection, each answered by its changes
   * (`run`) or its first row (`get`). Every write of the store goes through this thread, in one
   * order: the event loop's connection only reads, so it never waits for the write lock (nor meets
   * SQLITE_BUSY upgrading a read to a write) and never waits for an fsync.
   */
  async steps(list: readonly Step[]): Promise<unknown[]> {
    return (await this.#call({ op: 'steps', steps: list })) as unknown[];
  }

  /**
   * Dead letters of a subscription pending again and its pending retries started over, all due at
   * `dueAt` with no attempt made, in one durable transaction; answers how many dead letters.
   */
  async requeue(subscriptionId: string, dueAt: number): Promise<number> {
    return (await this.#call({ op: 'requeue', subscriptionId, dueAt })) as number;
  }

  /**
   * Deletes what retention allows, in transactions of at most `batch` rows per table, each its own
   * message: event commits queued meanwhile go between the batches, and neither the event loop nor
   * ingest waits for one long delete (200,000 rows in one transaction held the event loop ~0.4 s).
   */
  async purge(
    before: number,
    signal?: AbortSignal,
    batch = PURGE_BATCH,
  ): Promise<{ notifications: number; eventIds: number }> {
    if (!Number.isInteger(batch) || batch < 1)
      throw new RangeError(`purge batch must be a positive integer, not ${batch}`);
    let notifications = 0;
    let eventIds = 0;
    let cursor: [number, number] = [Number.MIN_SAFE_INTEGER, 0];
    let walked = false;
    // Aborted or closing: what is left waits for the next purge.
    while (!this.#closing && signal?.aborted !== true) {
      const [notes, seen, last, end] = (await this.#call({ op: 'purge', cursor, before, limit: batch })) as [
        number,
        number,
        [number, number],
        boolean,
      ];
      notifications += notes;
      eventIds += seen;
      cursor = last;
      walked ||= end;
      if (walked && seen < batch) break;
    }
    return { notifications, eventIds };
  }

  /** Round trip through the writer: a stopped writer makes the store unhealthy. */
  async ping(): Promise<void> {
    await this.#call({ op: 'ping' });
  }

  async close(): Promise<void> {
    this.#closing = true;
    if (this.#checkpointerAlive) {
      const closed = new Promise<void>((resolve) => {
        this.#checkpointer.on('message', (msg) => msg === 'closed' && resolve());
        this.#checkpointer.once('exit', () => resolve());
      });
      this.#checkpointer.postMessage('close');
      await closed;
      await this.#checkpointer.terminate();
    }
    if (this.#failed === undefined) await this.#call({ op: 'close' });
    this.#failed ??= new SqliteWriterError('the SQLite writer is closed');
    await this.#worker.terminate();
  }

  #call(msg: Record<string, unknown>): Promise<unknown> {
    if (this.#failed !== undefined) return Promise.reject(this.#failed);
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...msg, id });
    });
  }

  /**
   * The writer is gone (it crashed, or the store noticed its file was replaced): every call from
   * now on answers STORE_UNAVAILABLE (a 503 on every route), and `onFailure` hears it once.
   */
  fail(err: Error): void {
    if (this.#failed !== undefined) return;
    this.#failed =
      this.#closing || err instanceof BrokerError
        ? err
        : new BrokerError('STORE_UNAVAILABLE', `the SQLite store failed: ${describe(err)}`, { cause: err });
    for (const p of this.#pending.values()) p.reject(this.#failed);
    this.#pending.clear();
    if (!this.#closing) this.#onFailure?.(this.#failed);
  }

  /** Called once when the writer fails (not when it is closed): `main` exits so that a restart recovers. */
  onFailure(fn: (err: Error) => void): void {
    this.#onFailure = fn;
  }
}

/** An error's message, else its code (a worker's SQLite error can arrive with only `code`). */
function describe(err: Error): string {
  const code = (err as { code?: unknown }).code;
  return err.message || (typeof code === 'string' ? code : String(err));
}
