import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Interaction, ResourceChange, SubscriptionRecord } from '../../core/types.js';
import type { AcceptItem } from '../store.js';
import { SqliteStore } from './sqlite-store.js';

const T0 = '2030-01-01T00:00:00.000Z';
const RECEIVED = Date.parse('2030-01-02T00:00:00Z');

function record(id: string, overrides: Partial<SubscriptionRecord> = {}): SubscriptionRecord {
  return {
    id,
    owner: 'alice',
    kind: 'topic',
    topic: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
    status: 'active',
    match: { resourceTypes: ['Patient'], interactions: ['create', 'update', 'delete'] },
    channel: {
      type: 'rest-hook',
      endpoint: 'https://hooks.example.com/x',
      payload: 'application/fhir+json',
      content: 'id-only',
      headers: ['Authorization: Bearer t'],
      heartbeatPeriodSeconds: 60,
    },
    webhookSecret: `whsec_${Buffer.alloc(32, 1).toString('base64')}`,
    eventsSinceStart: 0,
    createdAt: T0,
    updatedAt: T0,
    resource: {
      resourceType: 'Subscription',
      criteria: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
      channel: { type: 'rest-hook', endpoint: 'https://hooks.example.com/x' },
    },
    ...overrides,
  };
}

function change(eventId: string, resourceId?: string, interaction: Interaction = 'update'): ResourceChange {
  return {
    eventId,
    resourceType: 'Patient',
    ...(resourceId === undefined ? {} : { resourceId }),
    interaction,
    datastoreId: 'ds1',
    fhirBase: 'https://healthlake.us-east-1.amazonaws.com/datastore/ds1/r4',
    time: '2030-01-01T12:00:00.000Z',
  };
}

function item(eventId: string, subscriptionIds: string[], resourceId = 'p1'): AcceptItem {
  return { change: change(eventId, resourceId), subscriptionIds };
}

let dir: string;
let store: SqliteStore;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'broker-sqlite-test-'));
  store = new SqliteStore(dir, { synchronous: 'NORMAL' });
});

afterEach(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('SqliteStore subscriptions', () => {
  it('reads back exactly what it stored', async () => {
    const rec = record('s1', { end: '2031-01-01T00:00:00Z', error: 'earlier failure', status: 'error' });
    await store.insertSubscription(rec);
    expect(await store.getSubscription('s1')).toEqual(rec);
  });

  it('leaves optional fields out rather than storing nulls', async () => {
    await store.insertSubscription(record('s1'));
    const got = await store.getSubscription('s1');
    expect(got !== undefined && Object.hasOwn(got, 'end')).toBe(false);
    expect(got !== undefined && Object.hasOwn(got, 'error')).toBe(false);
  });

  it('answers undefined for an unknown id', async () => {
    expect(await store.getSubscription('nope')).toBeUndefined();
  });

  it('refuses a second subscription with the same id', async () => {
    await store.insertSubscription(record('s1'));
    await expect(store.insertSubscription(record('s1', { owner: 'bob' }))).rejects.toThrow();
    expect((await store.getSubscription('s1'))?.owner).toBe('alice');
  });

  it('lists all subscriptions or one owner’s, oldest first', async () => {
    await store.insertSubscription(record('b', { createdAt: '2030-01-01T00:00:02.000Z' }));
    await store.insertSubscription(record('a', { createdAt: '2030-01-01T00:00:02.000Z' }));
    await store.insertSubscription(record('c', { owner: 'bob', createdAt: '2030-01-01T00:00:01.000Z' }));
    expect((await store.listSubscriptions()).map((s) => s.id)).toEqual(['c', 'a', 'b']);
    expect((await store.listSubscriptions('alice')).map((s) => s.id)).toEqual(['a', 'b']);
    expect((await store.listSubscriptions('bob')).map((s) => s.id)).toEqual(['c']);
    expect(await store.listSubscriptions('carol')).toEqual([]);
  });

  it('replaces what the client controls but keeps the event counter and creation time', async () => {
    await store.insertSubscription(record('s1'));
    await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
    const next = record('s1', {
      status: 'requested',
      channel: { type: 'rest-hook', endpoint: 'https://new.example.com/y', content: 'empty', headers: [] },
      match: { resourceTypes: ['Patient'], interactions: ['delete'], ids: ['p9'] },
      eventsSinceStart: 0,
      createdAt: '2099-01-01T00:00:00.000Z',
      updatedAt: '2030-02-01T00:00:00.000Z',
      end: '2031-01-01T00:00:00Z',
    });
    expect(await store.replaceSubscription(next)).toEqual({ ...next, eventsSinceStart: 2, createdAt: T0 });
    expect(await store.getSubscription('s1')).toEqual({ ...next, eventsSinceStart: 2, createdAt: T0 });
  });

  it('answers undefined when replacing an unknown subscription, and creates nothing', async () => {
    expect(await store.replaceSubscription(record('ghost'))).toBeUndefined();
    expect(await store.getSubscription('ghost')).toBeUndefined();
  });

  it('updates the status unconditionally when no status is expected', async () => {
    await store.insertSubscription(record('s1', { status: 'requested' }));
    const at = '2030-03-01T00:00:00.000Z';
    expect(await store.updateStatus('s1', { status: 'error', error: 'handshake failed' }, at)).toEqual(
      record('s1', { status: 'error', error: 'handshake failed', updatedAt: at }),
    );
    expect(await store.getSubscription('s1')).toEqual(
      record('s1', { status: 'error', error: 'handshake failed', updatedAt: at }),
    );
  });

  it('compare-and-sets the status: applies only when the stored status is expected', async () => {
    await store.insertSubscription(record('s1', { status: 'requested' }));
    const at = '2030-03-01T00:00:00.000Z';
    expect(await store.updateStatus('s1', { status: 'error', error: 'x', expected: ['active'] }, at)).toBeUndefined();
    expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'requested' }));
    expect(await store.updateStatus('s1', { status: 'active', expected: ['requested', 'error'] }, at)).toEqual(
      record('s1', { status: 'active', updatedAt: at }),
    );
  });

  it('clears a previous error when the new status carries none', async () => {
    await store.insertSubscription(record('s1', { status: 'error', error: 'old' }));
    const updated = await store.updateStatus('s1', { status: 'requested' }, T0);
    expect(updated !== undefined && Object.hasOwn(updated, 'error')).toBe(false);
    expect((await store.getSubscription('s1'))?.error).toBeUndefined();
  });

  it('answers undefined when updating the status of an unknown subscription', async () => {
    expect(await store.updateStatus('ghost', { status: 'off' }, T0)).toBeUndefined();
  });

  it('deletes a subscription with its notifications', async () => {
    await store.insertSubscription(record('s1'));
    await store.insertSubscription(record('s2'));
    await store.acceptChanges([item('e1', ['s1', 's2'])], RECEIVED);
    expect(await store.deleteSubscription('s1')).toBe(true);
    expect(await store.getSubscription('s1')).toBeUndefined();
    expect(await store.pendingNotifications('s1', 0, 100)).toEqual([]);
    expect(await store.notificationsInRange('s1', 0, 100, 100)).toEqual([]);
    expect(await store.subscriptionsWithPending()).toEqual(['s2']);
    expect(await store.pendingNotifications('s2', 0, 100)).toHaveLength(1);
  });

  it('answers false when deleting an unknown subscription', async () => {
    expect(await store.deleteSubscription('ghost')).toBe(false);
  });
});

describe('SqliteStore.acceptChanges', () => {
  beforeEach(async () => {
    await store.insertSubscription(record('s1'));
    await store.insertSubscription(record('s2'));
  });

  it('numbers events per subscription from 1 and returns the notifications it queued', async () => {
    const outcomes = await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1', 's2'])], RECEIVED);
    expect(outcomes).toEqual([
      { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 1, change: change('e1', 'p1') }] },
      {
        duplicate: false,
        notifications: [
          { subscriptionId: 's1', eventNumber: 2, change: change('e2', 'p1') },
          { subscriptionId: 's2', eventNumber: 1, change: change('e2', 'p1') },
        ],
      },
    ]);
    const [third] = await store.acceptChanges([item('e3', ['s2'])], RECEIVED);
    expect(third?.notifications).toEqual([{ subscriptionId: 's2', eventNumber: 2, change: change('e3', 'p1') }]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(2);
    expect((await store.getSubscription('s2'))?.eventsSinceStart).toBe(2);
  });

  it('queues the notification as pending, due when received, with no attempts', async () => {
    await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
    expect(await store.pendingNotifications('s1', 0, 10)).toEqual([
      {
        subscriptionId: 's1',
        eventNumber: 1,
        change: change('e1', 'p1'),
        state: 'pending',
        attempts: 0,
        dueAt: RECEIVED,
      },
    ]);
  });

  it('records a change that matched nothing, so a replay of it is still a duplicate', async () => {
    expect(await store.acceptChanges([item('e1', [])], RECEIVED)).toEqual([{ duplicate: false, notifications: [] }]);
    expect(await store.acceptChanges([item('e1', ['s1'])], RECEIVED)).toEqual([{ duplicate: true, notifications: [] }]);
    expect(await store.pendingNotifications('s1', 0, 10)).toEqual([]);
  });

  it('writes nothing for a duplicate event id from an earlier batch', async () => {
    await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
    expect(await store.acceptChanges([item('e1', ['s1', 's2'])], RECEIVED + 1)).toEqual([
      { duplicate: true, notifications: [] },
    ]);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([1]);
    expect(await store.pendingNotifications('s2', 0, 10)).toEqual([]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(1);
    expect((await store.getSubscription('s2'))?.eventsSinceStart).toBe(0);
  });

  it('writes nothing for a duplicate event id within one batch', async () => {
    const outcomes = await store.acceptChanges([item('e1', ['s1']), item('e1', ['s1'])], RECEIVED);
    expect(outcomes.map((o) => o.duplicate)).toEqual([false, true]);
    expect(outcomes[1]?.notifications).toEqual([]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(1);
  });

  it('skips a subscription switched off since matching, and one deleted since', async () => {
    await store.updateStatus('s1', { status: 'off' }, T0);
    await store.deleteSubscription('s2');
    expect(await store.acceptChanges([item('e1', ['s1', 's2'])], RECEIVED)).toEqual([
      { duplicate: false, notifications: [] },
    ]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(0);
    expect(await store.subscriptionsWithPending()).toEqual([]);
  });

  it('keeps collecting for subscriptions in requested and error', async () => {
    await store.updateStatus('s1', { status: 'requested' }, T0);
    await store.updateStatus('s2', { status: 'error', error: 'x' }, T0);
    const [outcome] = await store.acceptChanges([item('e1', ['s1', 's2'])], RECEIVED);
    expect(outcome?.notifications.map((n) => [n.subscriptionId, n.eventNumber])).toEqual([
      ['s1', 1],
      ['s2', 1],
    ]);
  });

  it('round-trips a change without a resource id', async () => {
    await store.acceptChanges([{ change: change('e1'), subscriptionIds: ['s1'] }], RECEIVED);
    const [n] = await store.pendingNotifications('s1', 0, 10);
    expect(n?.change).toEqual(change('e1'));
    expect(n !== undefined && Object.hasOwn(n.change, 'resourceId')).toBe(false);
  });
});

describe('SqliteStore notifications', () => {
  beforeEach(async () => {
    await store.insertSubscription(record('s1'));
    await store.insertSubscription(record('s2'));
    await store.acceptChanges(
      ['e1', 'e2', 'e3', 'e4', 'e5'].map((id) => item(id, ['s1'], `p-${id}`)),
      RECEIVED,
    );
  });

  it('lists pending notifications oldest first, after a given event number, up to a limit', async () => {
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([1, 2, 3, 4, 5]);
    expect((await store.pendingNotifications('s1', 2, 10)).map((n) => n.eventNumber)).toEqual([3, 4, 5]);
    expect((await store.pendingNotifications('s1', 0, 2)).map((n) => n.eventNumber)).toEqual([1, 2]);
    expect((await store.pendingNotifications('s1', 5, 10)).map((n) => n.eventNumber)).toEqual([]);
    expect(await store.pendingNotifications('s2', 0, 10)).toEqual([]);
  });

  it('lists the subscriptions with pending notifications', async () => {
    expect(await store.subscriptionsWithPending()).toEqual(['s1']);
  });

  it('records delivery outcomes: delivered and dead leave the pending list, retries stay with their state', async () => {
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: RECEIVED },
      {
        subscriptionId: 's1',
        eventNumber: 2,
        state: 'pending',
        attempts: 2,
        dueAt: RECEIVED + 30_000,
        lastError: 'HTTP 503',
      },
      { subscriptionId: 's1', eventNumber: 3, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'timeout' },
    ]);
    expect(await store.pendingNotifications('s1', 0, 10)).toEqual([
      {
        subscriptionId: 's1',
        eventNumber: 2,
        change: change('e2', 'p-e2'),
        state: 'pending',
        attempts: 2,
        dueAt: RECEIVED + 30_000,
        lastError: 'HTTP 503',
      },
      {
        subscriptionId: 's1',
        eventNumber: 4,
        change: change('e4', 'p-e4'),
        state: 'pending',
        attempts: 0,
        dueAt: RECEIVED,
      },
      {
        subscriptionId: 's1',
        eventNumber: 5,
        change: change('e5', 'p-e5'),
        state: 'pending',
        attempts: 0,
        dueAt: RECEIVED,
      },
    ]);
    const range = await store.notificationsInRange('s1', 1, 3, 10);
    expect(range.map((n) => [n.eventNumber, n.state, n.attempts, n.lastError])).toEqual([
      [1, 'delivered', 1, undefined],
      [2, 'pending', 2, 'HTTP 503'],
      [3, 'dead', 7, 'timeout'],
    ]);
  });

  it('clears lastError when a later outcome carries none', async () => {
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'pending', attempts: 1, dueAt: RECEIVED, lastError: 'HTTP 500' },
    ]);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 2, dueAt: RECEIVED },
    ]);
    const [n] = await store.notificationsInRange('s1', 1, 1, 10);
    expect(n !== undefined && Object.hasOwn(n, 'lastError')).toBe(false);
    expect(n?.state).toBe('delivered');
  });

  it('ignores an outcome for a notification that does not exist', async () => {
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 99, state: 'delivered', attempts: 1, dueAt: 0 },
    ]);
    expect(await store.notificationsInRange('s1', 0, 1000, 1000)).toHaveLength(5);
  });

  it('lists stored notifications in an inclusive range whatever their state, up to a limit', async () => {
    await store.recordDeliveries([{ subscriptionId: 's1', eventNumber: 2, state: 'delivered', attempts: 1, dueAt: 0 }]);
    expect((await store.notificationsInRange('s1', 2, 4, 10)).map((n) => n.eventNumber)).toEqual([2, 3, 4]);
    expect((await store.notificationsInRange('s1', 1, 5, 2)).map((n) => n.eventNumber)).toEqual([1, 2]);
    expect((await store.notificationsInRange('s1', 4, 2, 10)).map((n) => n.eventNumber)).toEqual([]);
    expect((await store.notificationsInRange('s1', 6, 9, 10)).map((n) => n.eventNumber)).toEqual([]);
    expect(await store.notificationsInRange('s2', 0, 10, 10)).toEqual([]);
  });
});

describe('SqliteStore durability', () => {
  it('keeps subscriptions, notifications, counters and seen event ids across close and reopen', async () => {
    await store.insertSubscription(record('s1'));
    await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
    await store.recordDeliveries([{ subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 }]);
    await store.close();

    store = new SqliteStore(dir);
    await store.ping();
    expect(await store.getSubscription('s1')).toEqual(record('s1', { eventsSinceStart: 2 }));
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([2]);
    expect(await store.acceptChanges([item('e2', ['s1'])], RECEIVED)).toEqual([{ duplicate: true, notifications: [] }]);
    const [next] = await store.acceptChanges([item('e3', ['s1'])], RECEIVED);
    expect(next?.notifications.map((n) => n.eventNumber)).toEqual([3]);
  });

  it('creates its data directory when missing and tolerates a second close', async () => {
    const nested = join(dir, 'a', 'b');
    const other = new SqliteStore(nested);
    await other.ping();
    await other.close();
    await other.close();
    const reopened = new SqliteStore(nested);
    expect(await reopened.listSubscriptions()).toEqual([]);
    await reopened.close();
  });
});
