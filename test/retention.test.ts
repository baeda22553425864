import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import type { Store } from '../src/store/store.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { RECEIVED, seedDelivered, withMethod } from './support/store-fixtures.js';

/**
 * The dispatcher's retention purge (BROKER_EVENT_RETENTION, default 7 days): run at start and
 * hourly, in the background. After a long stop the first purge can be large; start-up must not
 * wait for it, and shutdown must stop it rather than wait for it or leave it writing to a closed store.
 */

const EIGHT_DAYS_LATER = RECEIVED + 8 * 86_400_000;
const dirs: string[] = [];
let t: TestBroker | undefined;

afterEach(async () => {
  await t?.broker.close(0);
  t = undefined;
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/**
 * A real SQLite store holding 50 delivered notifications 8 days old, whose `purge` waits until
 * released (or until its signal is aborted: the dispatcher's close), then runs for real.
 */
async function heldPurgeStore(): Promise<{ dir: string; store: Store; started: Promise<void>; release: () => void }> {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-retention-'));
  dirs.push(dir);
  const real = new SqliteStore(dir);
  await seedDelivered(real, 'old-sub', 50);
  let started = (): void => undefined;
  let release = (): void => undefined;
  const startedP = new Promise<void>((resolve) => (started = resolve));
  const released = new Promise<void>((resolve) => (release = resolve));
  const store = withMethod(real, 'purge', async (before, signal) => {
    started();
    const aborted = new Promise<void>((resolve) => signal?.addEventListener('abort', () => resolve()));
    await Promise.race([released, aborted]);
    return real.purge(before, signal);
  });
  return { dir, store, started: startedP, release };
}

it('purges what is past retention in the background: start-up does not wait for it', async () => {
  const { store, started, release } = await heldPurgeStore();
  // inProcessBroker awaits broker.start(): it returns while the purge is still held.
  t = await inProcessBroker({}, { store, clock: { now: () => EIGHT_DAYS_LATER } });
  await started;
  expect(t.logger.records.some((r) => r.msg === 'retention purge')).toBe(false);
  release();
  const logged = await t.logger.waitFor((r) => r.msg === 'retention purge', 'the purge');
  expect(logged).toMatchObject({ notifications: 50, eventIds: 50 });
  expect(await store.notificationsInRange('old-sub', 0, 100, 100)).toEqual([]);
});

it('stops a purge in progress when it closes, instead of waiting out its grace period for it', async () => {
  const { dir, store, started } = await heldPurgeStore();
  const broker = await inProcessBroker({}, { store, clock: { now: () => EIGHT_DAYS_LATER } });
  await started;
  // Never released: only the abort from close lets the purge go on, and it then stops before its
  // first batch. Without the abort, close would wait the whole minute of grace (beyond the test's timeout).
  await broker.broker.close(60_000);
  expect(broker.logger.records.filter((r) => r.level === 'error')).toEqual([]);
  expect(broker.logger.records.some((r) => r.msg === 'retention purge')).toBe(false);
  // Nothing was purged: it waits for the next start.
  const reopened = new SqliteStore(dir);
  try {
    expect(await reopened.notificationsInRange('old-sub', 0, 100, 100)).toHaveLength(50);
  } finally {
    await reopened.close();
  }
});

it('purges at most once an hour however often start runs (the AWS dispatcher starts every minute)', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-retention-'));
  dirs.push(dir);
  const real = new SqliteStore(dir);
  let purges = 0;
  const store = withMethod(real, 'purge', async (before, signal) => {
    purges++;
    return real.purge(before, signal);
  });
  let now = EIGHT_DAYS_LATER;
  t = await inProcessBroker({}, { store, clock: { now: () => now } });
  await t.broker.dispatcher.idle(5_000);
  expect(purges).toBe(1);
  // A minute's tick, then another fifty minutes later: still within the hour.
  for (const step of [60_000, 50 * 60_000]) {
    now += step;
    await t.broker.start();
    await t.broker.dispatcher.idle(5_000);
  }
  expect(purges).toBe(1);
  now += 10 * 60_000;
  await t.broker.start();
  await t.broker.dispatcher.idle(5_000);
  expect(purges).toBe(2);
});
