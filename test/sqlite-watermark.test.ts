import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { DeliveryState } from '../src/core/types.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import type { DeliveryUpdate } from '../src/store/store.js';
import { prng } from './support/prng.js';
import { item, RECEIVED, record, T0 } from './support/store-fixtures.js';

/**
 * The embedded store records a notification delivered at its first attempt by moving its
 * subscription's watermark (`subscription_counters.done_through`), not by rewriting the row; every
 * other outcome is written on the row. What the store answers must not show the difference: these
 * tests read the file underneath to see which path was taken, and check the answers against a model.
 */

let dir: string;
let store: SqliteStore;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'broker-watermark-'));
  store = new SqliteStore(dir, { synchronous: 'NORMAL' });
});

afterEach(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

/** The file as another connection sees it: watermark and row states of `sub`. */
function onDisk(sub: string): { mark: number; rows: [number, string, number][] } {
  const db = new Database(join(dir, 'broker.sqlite3'), { readonly: true });
  try {
    const mark = db.prepare('SELECT done_through AS w FROM subscription_counters WHERE subscription_id = ?').get(sub) as
      | { w: number }
      | undefined;
    const rows = db
      .prepare(
        'SELECT event_number, state, attempts FROM notifications WHERE subscription_id = ? ORDER BY event_number',
      )
      .raw()
      .all(sub) as [number, string, number][];
    return { mark: mark?.w ?? -1, rows };
  } finally {
    db.close();
  }
}

const delivered = (subscriptionId: string, eventNumber: number, attempts = 1): DeliveryUpdate => ({
  subscriptionId,
  eventNumber,
  state: 'delivered',
  attempts,
  dueAt: RECEIVED,
});

async function states(sub: string): Promise<[number, DeliveryState, number][]> {
  return (await store.notificationsInRange(sub, 0, 1000, 1000)).map((n) => [n.eventNumber, n.state, n.attempts]);
}

async function pending(sub: string): Promise<number[]> {
  return (await store.pendingNotifications(sub, 0, 1000)).map((n) => n.eventNumber);
}

describe('SQLite delivery watermark', () => {
  beforeEach(async () => {
    await store.insertSubscription(record('s1'));
    await store.acceptChanges(
      ['e1', 'e2', 'e3', 'e4', 'e5'].map((id) => item(id, ['s1'])),
      RECEIVED,
    );
  });

  it('marks first-attempt deliveries with the watermark and leaves their rows as queued', async () => {
    await store.recordDeliveries([delivered('s1', 1), delivered('s1', 2)]);
    expect(onDisk('s1')).toEqual({
      mark: 2,
      rows: [1, 2, 3, 4, 5].map((n) => [n, 'pending', 0]),
    });
    expect(await states('s1')).toEqual([
      [1, 'delivered', 1],
      [2, 'delivered', 1],
      [3, 'pending', 0],
      [4, 'pending', 0],
      [5, 'pending', 0],
    ]);
    expect(await pending('s1')).toEqual([3, 4, 5]);
    expect(await store.pendingNotifications('s1', 3, 10)).toHaveLength(2);
    // Numbers taken after the writer last read the counter go the same way.
    await store.acceptChanges([item('e6', ['s1'])], RECEIVED);
    await store.recordDeliveries([3, 4, 5, 6].map((n) => delivered('s1', n)));
    expect(onDisk('s1')).toEqual({ mark: 6, rows: [1, 2, 3, 4, 5, 6].map((n) => [n, 'pending', 0]) });
  });

  it('shows no earlier error on a notification the watermark marks delivered', async () => {
    // Started over (a re-activation while its attempt was on the wire): pending, no attempt, its error kept.
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'pending', attempts: 0, dueAt: RECEIVED, lastError: 'HTTP 503' },
    ]);
    expect((await store.notificationsInRange('s1', 1, 1, 1))[0]?.lastError).toBe('HTTP 503');
    // Then delivered at the first attempt after: the watermark passes it, the row is not rewritten.
    await store.recordDeliveries([delivered('s1', 1)]);
    expect(onDisk('s1').mark).toBe(1);
    const [note] = await store.notificationsInRange('s1', 1, 1, 1);
    expect(note).toMatchObject({ eventNumber: 1, state: 'delivered', attempts: 1 });
    expect(note?.lastError).toBeUndefined();
  });

  it('writes a delivery above a pending notification on its row, and the watermark passes it later', async () => {
    await store.recordDeliveries([delivered('s1', 3)]);
    expect(onDisk('s1').mark).toBe(0);
    expect(await pending('s1')).toEqual([1, 2, 4, 5]);
    await store.recordDeliveries([delivered('s1', 1), delivered('s1', 2)]);
    expect(onDisk('s1').mark).toBe(2);
    await store.recordDeliveries([delivered('s1', 4)]);
    expect(onDisk('s1').mark).toBe(4);
    expect(await pending('s1')).toEqual([5]);
    expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    await store.recordDeliveries([delivered('s1', 5)]);
    expect(await store.subscriptionsWithPending()).toEqual([]);
    expect((await states('s1')).map(([, state]) => state)).toEqual(Array(5).fill('delivered'));
  });

  it('lowers the watermark for a retry at or below it, keeping the others delivered', async () => {
    await store.recordDeliveries([1, 2, 3, 4].map((n) => delivered('s1', n)));
    await store.recordDeliveries([
      {
        subscriptionId: 's1',
        eventNumber: 2,
        state: 'pending',
        attempts: 2,
        dueAt: RECEIVED + 9,
        lastError: 'HTTP 503',
      },
    ]);
    expect(onDisk('s1').mark).toBe(1);
    expect(await states('s1')).toEqual([
      [1, 'delivered', 1],
      [2, 'pending', 2],
      [3, 'delivered', 1],
      [4, 'delivered', 1],
      [5, 'pending', 0],
    ]);
    expect(await pending('s1')).toEqual([2, 5]);
  });

  it('moves nothing for an outcome above the counter: the number, once taken, is pending', async () => {
    await store.recordDeliveries([1, 2, 3, 4, 5, 6].map((n) => delivered('s1', n)));
    expect(onDisk('s1').mark).toBe(5);
    const [fresh] = await store.acceptChanges([item('e6', ['s1'])], RECEIVED);
    expect(fresh?.notifications.map((n) => n.eventNumber)).toEqual([6]);
    expect(await pending('s1')).toEqual([6]);
  });

  it('reads the watermark a re-queue lowered (no stale copy on the writer)', async () => {
    await store.recordDeliveries([
      delivered('s1', 1),
      { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'HTTP 500' },
      delivered('s1', 3),
    ]);
    expect(onDisk('s1').mark).toBe(3);
    expect(await store.requeueDeadLetters('s1', RECEIVED + 1)).toBe(1);
    expect(onDisk('s1').mark).toBe(1);
    expect(await pending('s1')).toEqual([2, 4, 5]);
    await store.recordDeliveries([delivered('s1', 2), delivered('s1', 4)]);
    expect(onDisk('s1').mark).toBe(4);
    expect(await pending('s1')).toEqual([5]);
    expect(await states('s1')).toEqual([
      [1, 'delivered', 1],
      [2, 'delivered', 1],
      [3, 'delivered', 1],
      [4, 'delivered', 1],
      [5, 'pending', 0],
    ]);
  });

  it('purges by time received: a wall clock that jumped ahead for a while holds back only what came meanwhile', async () => {
    const DAY = 86_400_000;
    await store.acceptChanges([item('e6', ['s1'])], RECEIVED + 365 * DAY); // the clock a year ahead, then corrected
    await store.acceptChanges([item('e7', ['s1'])], RECEIVED + 1);
    await store.recordDeliveries([1, 2, 3, 4, 5, 6, 7].map((n) => delivered('s1', n)));
    expect(await store.purge(RECEIVED + 8 * DAY)).toEqual({ notifications: 6, eventIds: 6 });
    expect((await states('s1')).map(([n]) => n)).toEqual([6]);
  });

  it('purges what the watermark marks delivered, and keeps what is pending', async () => {
    await store.recordDeliveries([delivered('s1', 1), delivered('s1', 2), delivered('s1', 4)]);
    expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 3, eventIds: 5 });
    expect(await states('s1')).toEqual([
      [3, 'pending', 0],
      [5, 'pending', 0],
    ]);
  });
});

interface ModelNote {
  state: DeliveryState;
  attempts: number;
  lastError?: string;
  createdAt: number;
}

describe('SQLite delivery watermark against a model', () => {
  for (const seed of [1, 2, 3, 4, 5, 6]) {
    it(`answers as the model does through random deliveries, retries, late outcomes, dead letters, re-queues, restarts and purges (seed ${seed})`, async () => {
      const rnd = prng(seed);
      const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T;
      const subs = ['a', 'b', 'c'];
      for (const s of subs) await store.insertSubscription(record(s));
      const model = new Map<string, Map<number, ModelNote>>(subs.map((s) => [s, new Map()]));
      let clock = RECEIVED;
      let eventId = 0;

      for (let step = 0; step < 250; step++) {
        clock += 10;
        const roll = rnd();
        if (roll < 0.3) {
          // Events matched by one to three subscriptions.
          const items = Array.from({ length: 1 + Math.floor(rnd() * 3) }, () =>
            item(
              `ev-${eventId++}`,
              subs.filter(() => rnd() < 0.6),
            ),
          );
          for (const outcome of await store.acceptChanges(items, clock))
            for (const n of outcome.notifications)
              model.get(n.subscriptionId)?.set(n.eventNumber, { state: 'pending', attempts: 0, createdAt: clock });
        } else if (roll < 0.85) {
          // Outcomes of attempts, as lanes report them: mostly the lowest pending number, sometimes a later one
          // (a hand-over race), several subscriptions in one batch.
          const updates: DeliveryUpdate[] = [];
          // Reports an outcome, and applies it to the model when the number is there (the store ignores the others).
          const outcome = (s: string, number: number, note: ModelNote | undefined, state: DeliveryState): ModelNote => {
            const attempts = (note?.attempts ?? 0) + 1;
            const lastError = state === 'delivered' ? undefined : pick(['HTTP 503', 'timeout']);
            const error = lastError === undefined ? {} : { lastError };
            updates.push({ subscriptionId: s, eventNumber: number, state, attempts, dueAt: clock, ...error });
            const next = { state, attempts, createdAt: note?.createdAt ?? clock, ...error };
            if (note !== undefined) model.get(s)?.set(number, next);
            return next;
          };
          for (const s of subs) {
            const notes = model.get(s) as Map<number, ModelNote>;
            const open = [...notes].filter(([, n]) => n.state === 'pending').sort((x, y) => x[0] - y[0]);
            for (let k = 0; k < 3 && open.length > 0; k++) {
              const at = rnd() < 0.85 || open.length < 2 ? 0 : 1 + Math.floor(rnd() * (open.length - 1));
              const [number, note] = open.splice(at, 1)[0] as [number, ModelNote];
              const r = rnd();
              const state: DeliveryState = r < 0.7 ? 'delivered' : r < 0.9 ? 'pending' : 'dead';
              if (outcome(s, number, note, state).state === 'pending') break; // the lane waits for the retry
            }
            if (rnd() < 0.15) {
              // A late outcome for a number already done (a redelivery after a crash), or one for a number not yet
              // taken: applied to the row, or ignored.
              const known = [...notes].filter(([, n]) => n.state !== 'pending');
              const top = Math.max(0, ...notes.keys());
              const [number, note] =
                known.length > 0 && rnd() < 0.7 ? (pick(known) as [number, ModelNote]) : [top + 1, undefined];
              outcome(s, number, note, rnd() < 0.5 ? 'delivered' : 'pending');
            }
          }
          await store.recordDeliveries(updates);
        } else if (roll < 0.9) {
          // The writer's copy of the watermarks is dropped by any other write, and gone after a restart.
          if (rnd() < 0.5) await store.updateStatus(pick(subs), { status: 'active' }, T0);
          else {
            await store.close();
            store = new SqliteStore(dir, { synchronous: 'NORMAL' });
          }
        } else if (roll < 0.95) {
          const s = pick(subs);
          const notes = model.get(s) as Map<number, ModelNote>;
          let dead = 0;
          // Dead letters go back, and retries start over: both with no attempt made and no error.
          for (const [number, note] of notes)
            if (note.state === 'dead' || (note.state === 'pending' && note.attempts > 0)) {
              notes.set(number, { state: 'pending', attempts: 0, createdAt: note.createdAt });
              if (note.state === 'dead') dead++;
            }
          expect(await store.requeueDeadLetters(s, clock)).toBe(dead);
        } else {
          const before = clock - 300;
          let count = 0;
          for (const notes of model.values())
            for (const [number, note] of notes)
              if (note.state !== 'pending' && note.createdAt < before) {
                notes.delete(number);
                count++;
              }
          expect((await store.purge(before)).notifications).toBe(count);
        }

        for (const s of subs) {
          const notes = [...(model.get(s) as Map<number, ModelNote>)].sort((x, y) => x[0] - y[0]);
          const expected = notes.map(([number, n]) => [number, n.state, n.attempts, n.lastError]);
          const actual = (await store.notificationsInRange(s, 0, 1e9, 1e6)).map((n) => [
            n.eventNumber,
            n.state,
            n.attempts,
            n.lastError,
          ]);
          expect(actual, `seed ${seed}, step ${step}, subscription ${s}`).toEqual(expected);
          expect((await store.pendingNotifications(s, 0, 1e6)).map((n) => n.eventNumber)).toEqual(
            notes.filter(([, n]) => n.state === 'pending').map(([number]) => number),
          );
        }
        expect((await store.subscriptionsWithPending()).sort()).toEqual(
          subs.filter((s) => [...(model.get(s) as Map<number, ModelNote>).values()].some((n) => n.state === 'pending')),
        );
      }
    });
  }
});
