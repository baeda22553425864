import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import type { Store } from '../src/store/store.js';
import { eventLike, focusOf, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * A lane reading its backlog from the store while a new notification is committed: the commit's
 * wake-up finds the lane busy, and the read may have missed the row. The lane must read again
 * instead of going idle with the notification left pending (it used to wait for the next event).
 */

/** A real SQLite store whose next `pendingNotifications` read, once armed, holds its answer until released. */
function gatedStore(): { store: Store; arm: () => { reached: Promise<void>; release: () => void } } {
  const real = new SqliteStore(mkdtempSync(join(tmpdir(), 'fsb-gate-')));
  let gate: { reached: () => void; released: Promise<void> } | undefined;
  const store = new Proxy(real, {
    get(target, prop) {
      if (prop === 'pendingNotifications') {
        return async (...args: Parameters<Store['pendingNotifications']>) => {
          const rows = await target.pendingNotifications(...args);
          const g = gate;
          gate = undefined;
          if (g !== undefined) {
            g.reached();
            await g.released;
          }
          return rows;
        };
      }
      const value = Reflect.get(target, prop, target) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  }) as Store;
  const arm = () => {
    let reached = (): void => undefined;
    let release = (): void => undefined;
    const reachedP = new Promise<void>((resolve) => (reached = resolve));
    const released = new Promise<void>((resolve) => (release = resolve));
    gate = { reached, released };
    return { reached: reachedP, release };
  };
  return { store, arm };
}

describe('dispatcher lane reload', () => {
  let receiver: Receiver | undefined;
  let t: TestBroker | undefined;

  afterEach(async () => {
    await t?.broker.close(0);
    await receiver?.close();
  });

  it('delivers a notification committed while the lane was reading the store', async () => {
    receiver = await Receiver.start();
    const { store, arm } = gatedStore();
    t = await inProcessBroker({}, { store });
    // Activation makes the lane read its backlog: that read is held after it has read (nothing).
    const gate = arm();
    await t.create(topicSubscription('patient-change', `${receiver.url}/hook`));
    await gate.reached;
    await t.post(eventLike('healthlake-update-patient', 'reload-race-1', 'race-patient'));
    gate.release();
    const events = (): Json[] => receiver!.on('/hook').flatMap((r) => statusOf(JSON.parse(r.body) as Json).events);
    await receiver.waitFor(() => events().length === 1, 'the event notification', 5_000);
    expect(events().map(focusOf)).toEqual([expect.stringMatching(/\/Patient\/race-patient$/)]);
  });
});
