import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { deliveredAll, item, RECEIVED, record } from '../test/support/store-fixtures.js';
import { fmt, percentile, printTable, type TargetCheck } from './util.js';

/**
 * Suite `retention`: the hourly purge of notifications and event ids past `BROKER_EVENT_RETENTION`,
 * on the embedded store. An hour of a busy broker is millions of rows; the purge must neither hold
 * the event loop nor make ingest wait. PENDING notifications still pending (a subscription in
 * `error` keeps collecting: they are never purged, and must not slow the purge down), then ROWS
 * delivered ones (100 subscriptions) and as many seen event ids, all past the cut-off; while
 * `purge` runs, an ingest-sized commit (10 events) is issued every 5 ms and a 1 ms timer measures
 * how late the event loop gets to it.
 */

const ROWS = Number(process.env.BENCH_RETENTION_ROWS ?? 200_000);
const PENDING = 50_000;
const SUBSCRIPTIONS = 100;

export async function runRetention(): Promise<TargetCheck[]> {
  console.log(
    `\n## retention: purge of ${fmt(ROWS)} expired notifications and event ids behind ${fmt(PENDING)} old pending ones (SQLite, writer thread)\n`,
  );
  const dir = mkdtempSync(join(tmpdir(), 'broker-bench-retention-'));
  const store = new SqliteStore(dir);
  try {
    const subs = Array.from({ length: SUBSCRIPTIONS }, (_, i) => `s${i}`);
    for (const s of subs) await store.insertSubscription(record(s));
    await store.insertSubscription(record('stuck', { status: 'error' }));
    for (let done = 0; done < PENDING; done += 2000) {
      const items = Array.from({ length: 2000 }, (_, i) => item(`stuck-${done + i}`, ['stuck'], `s-${i}`));
      await store.acceptChanges(items, RECEIVED);
    }
    for (let done = 0; done < ROWS; ) {
      const n = Math.min(2000, ROWS - done);
      const items = Array.from({ length: n }, (_, i) => {
        const e = done + i;
        return item(`expired-${e}`, [subs[e % SUBSCRIPTIONS] as string], `p-${e % 5000}`);
      });
      const outcomes = await store.acceptChanges(items, RECEIVED);
      await store.recordDeliveries(deliveredAll(outcomes, RECEIVED));
      done += n;
    }
    let last = performance.now();
    let worstStall = 0;
    const tick = setInterval(() => {
      const now = performance.now();
      worstStall = Math.max(worstStall, now - last);
      last = now;
    }, 1);
    const commits: number[] = [];
    let purging = true;
    let k = 0;
    const ingest = (async () => {
      while (purging) {
        const t = performance.now();
        const batch = Array.from({ length: 10 }, (_, i) => item(`live-${k}-${i}`, [subs[i] as string], `q-${i}`));
        k++;
        await store.acceptChanges(batch, RECEIVED + 86_400_000);
        commits.push(performance.now() - t);
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    const started = performance.now();
    const purged = await store.purge(RECEIVED + 1);
    const seconds = (performance.now() - started) / 1000;
    purging = false;
    await ingest;
    clearInterval(tick);
    commits.sort((a, b) => a - b);
    const kept = (await store.notificationsInRange('stuck', 0, PENDING, PENDING)).length;
    if (kept !== PENDING) throw new Error(`the purge took pending notifications: ${kept} of ${PENDING} left`);
    printTable([
      [
        'rows purged',
        'old pending kept',
        'seconds',
        'rows/s',
        'longest event-loop stall ms',
        'commits meanwhile',
        'commit p50 ms',
        'commit max ms',
      ],
      [
        `${fmt(purged.notifications)} + ${fmt(purged.eventIds)} ids`,
        fmt(kept),
        fmt(seconds, 2),
        fmt((purged.notifications + purged.eventIds) / seconds),
        fmt(worstStall, 1),
        fmt(commits.length),
        fmt(percentile(commits, 50), 2),
        fmt(percentile(commits, 100), 2),
      ],
    ]);
    return [];
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
