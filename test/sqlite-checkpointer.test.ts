import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
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

it('copies committed pages into the database file in the background, well before the WAL fills', async () => {
  dir = mkdtempSync(join(tmpdir(), 'broker-checkpointer-'));
  store = new SqliteStore(dir);
  await store.insertSubscription(record('s1'));
  const file = join(dir, 'broker.sqlite3');
  const before = statSync(file).size;
  for (let batch = 0; batch < 10; batch++) {
    const items = Array.from({ length: 30 }, (_, i) => item(`e-${batch}-${i}`, ['s1'], `p-${batch}-${i}`));
    const outcomes = await store.acceptChanges(items, RECEIVED);
    expect(outcomes.every((o) => !o.duplicate && o.notifications.length === 1)).toBe(true);
  }
  // A few checkpoint intervals (100 ms each), bounded.
  let after = statSync(file).size;
  for (let waited = 0; after <= before && waited < 3000; waited += 50) {
    await sleep(50);
    after = statSync(file).size;
  }
  expect(after).toBeGreaterThan(before);
  // And what was copied reads back whole.
  expect(await store.pendingNotifications('s1', 0, 1000)).toHaveLength(300);
});
