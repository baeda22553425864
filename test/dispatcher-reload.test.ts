import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { ResourceChange } from '../src/core/types.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import type { Store } from '../src/store/store.js';
import { eventLike, focusOf, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { withMethod } from './support/store-fixtures.js';

/**
 * A lane reading its backlog from the store while a new notification is committed: the commit's
 * wake-up finds the lane busy, and the read may have missed the row. The lane must read again
 * instead of going idle with the notification left pending (it used to wait for the next event).
 */

const dirs: string[] = [];

/** A real SQLite store whose next `pendingNotifications` read, once armed, holds its answer until released. */
function gatedStore(): { store: Store; arm: () => { reached: Promise<void>; release: () => void } } {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-gate-'));
  dirs.push(dir);
  const real = new SqliteStore(dir);
  let gate: { reached: () => void; released: Promise<void> } | undefined;
  const store = withMethod(real, 'pendingNotifications', async (...args) => {
    const rows = await real.pendingNotifications(...args);
    const g = gate;
    gate = undefined;
    if (g !== undefined) {
      g.reached();
      await g.released;
    }
    return rows;
  });
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

let receiver: Receiver | undefined;
let t: TestBroker | undefined;

afterEach(async () => {
  await t?.broker.close(0);
  await receiver?.close();
  t = undefined;
  receiver = undefined;
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

describe('dispatcher lane reload', () => {
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

  it('delivers a pending notification numbered below what the lane already delivered (another instance committed it)', async () => {
    receiver = await Receiver.start();
    const { store, arm } = gatedStore();
    t = await inProcessBroker({}, { store });
    // Activation makes the lane read its backlog (nothing yet); once that read is done, the lane
    // holds no pending work and has no reason to read again.
    const activated = arm();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/hook`));
    const id = sub.id as string;
    await activated.reached;
    activated.release();
    // Another instance sharing the store accepts an event for this subscription (number 1) and
    // leaves it pending, e.g. frozen before it could deliver; this instance's dispatcher never saw it.
    await t.broker.store.acceptChanges(
      [{ change: changeOf('other-instance-1', 'elsewhere'), subscriptionIds: [id] }],
      Date.now(),
    );
    // This instance accepts and delivers number 2.
    await t.post(eventLike('healthlake-update-patient', 'this-instance-2', 'here'));
    const events = (): Json[] => receiver!.on('/hook').flatMap((r) => statusOf(JSON.parse(r.body) as Json).events);
    await receiver.waitFor(() => events().length === 1, 'event 2');
    // The scheduled dispatch (what the AWS dispatcher function runs every minute) resumes pending work.
    await t.broker.dispatcher.start();
    await receiver.waitFor(() => events().length === 2, 'event 1, left pending by the other instance', 5_000);
    expect(events().map(focusOf)).toEqual([
      expect.stringMatching(/\/Patient\/here$/),
      expect.stringMatching(/\/Patient\/elsewhere$/),
    ]);
  });
});

describe('dispatcher lane requeue', () => {
  it('delivers dead letters requeued while an attempt of the same lane was on the wire', async () => {
    receiver = await Receiver.start();
    const dir = mkdtempSync(join(tmpdir(), 'fsb-requeue-'));
    dirs.push(dir);
    t = await inProcessBroker({}, { store: new SqliteStore(dir) });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/hook`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    // The lane's read at activation is over: nothing reads the store until the next event.
    await t.broker.dispatcher.idle(5_000);
    // Number 1: a dead letter (left by an earlier failure; the subscription is active again).
    const [first] = await t.broker.store.acceptChanges(
      [{ change: changeOf('dead-1', 'was-dead'), subscriptionIds: [id] }],
      Date.now(),
    );
    expect(first?.notifications.map((n) => n.eventNumber)).toEqual([1]);
    await t.broker.store.recordDeliveries([
      { subscriptionId: id, eventNumber: 1, state: 'dead', attempts: 7, dueAt: Date.now(), lastError: 'HTTP 500' },
    ]);
    // Number 2 goes out; the endpoint holds its answer while number 1 is requeued.
    let onWire = (): void => undefined;
    const reached = new Promise<void>((resolve) => (onWire = resolve));
    receiver.respond = (req) => {
      if (!req.body.includes('event-notification')) return { status: 204 };
      onWire();
      return { status: 204, delayMs: 300 };
    };
    await t.post(eventLike('healthlake-update-patient', 'live-2', 'live'));
    await reached;
    expect(await t.broker.store.requeueDeadLetters(id, Date.now())).toBe(1);
    t.broker.dispatcher.requeued(id);
    const events = (): Json[] => receiver!.on('/hook').flatMap((r) => statusOf(JSON.parse(r.body) as Json).events);
    await receiver.waitFor(() => events().length === 2, 'number 2, then the requeued number 1', 5_000);
    expect(events().map(focusOf)).toEqual([
      expect.stringMatching(/\/Patient\/live$/),
      expect.stringMatching(/\/Patient\/was-dead$/),
    ]);
  });

  it('reads again when dead letters were requeued while the lane was reading the store', async () => {
    receiver = await Receiver.start();
    const { store, arm } = gatedStore();
    t = await inProcessBroker({}, { store });
    // Activation makes the lane read its backlog: that read (nothing) is held once it has read.
    const gate = arm();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/hook`));
    const id = sub.id as string;
    await gate.reached;
    // Meanwhile number 1 is stored, dead-lettered and requeued.
    await t.broker.store.acceptChanges([{ change: changeOf('dead-1', 'was-dead'), subscriptionIds: [id] }], Date.now());
    await t.broker.store.recordDeliveries([
      { subscriptionId: id, eventNumber: 1, state: 'dead', attempts: 7, dueAt: Date.now(), lastError: 'HTTP 500' },
    ]);
    expect(await t.broker.store.requeueDeadLetters(id, Date.now())).toBe(1);
    t.broker.dispatcher.requeued(id);
    gate.release();
    const events = (): Json[] => receiver!.on('/hook').flatMap((r) => statusOf(JSON.parse(r.body) as Json).events);
    await receiver.waitFor(() => events().length === 1, 'the requeued number 1', 5_000);
    expect(events().map(focusOf)).toEqual([expect.stringMatching(/\/Patient\/was-dead$/)]);
  });
});

/** A Patient update as the ingest path stores it. */
function changeOf(eventId: string, resourceId: string): ResourceChange {
  return {
    eventId,
    resourceType: 'Patient',
    resourceId,
    interaction: 'update',
    datastoreId: 'abcdef01234567890abcdef012345678',
    fhirBase: 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4',
    time: '2026-01-01T00:00:00.000Z',
  };
}
