import { copyFileSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import { afterEach, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { item, RECEIVED, record } from './support/store-fixtures.js';

/**
 * Committed pages reach the database file without the commit path copying them: the event loop's
 * connection never checkpoints and the writer's own checkpoint waits for 10,000 WAL pages, so the
 * file grows here only through the background checkpointer.
 */

let dir: string | undefined;
let store: SqliteStore | undefined;

afterEach(async () => {
  await store?.close();
  store = undefined;
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
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
  // The WAL was not reset by a writer checkpoint (that needs 10,000 pages): the copy was the background thread's.
  expect(statSync(`${file}-wal`).size).toBeGreaterThan(0);
  // And the store reads back whole.
  expect(await store.pendingNotifications('s1', 0, 1000)).toHaveLength(300);
});
