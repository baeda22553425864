import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DeleteTableCommand } from '@aws-sdk/client-dynamodb';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { SubscriptionRecord } from '../src/core/types.js';
import { MAX_FULL_RESOURCE_BYTES } from '../src/service/content-stage.js';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { ensureTables, tableDefinitions } from '../src/store/dynamodb/tables.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { type AcceptItem, EARLIER_VERSIONS_KEPT, NOTIFIED_SCAN_SLACK_MS, type Store } from '../src/store/store.js';
import { type DynamoDbLocal, startDynamoDbLocal } from './support/dynamodb-local.js';
import { change, item, RECEIVED, record, T0 } from './support/store-fixtures.js';

/**
 * The Store port's contract, run against every adapter: what the core may rely on, whichever
 * store is behind it. Each test gets a fresh store (a temp dir, or a fresh table prefix).
 */

interface OpenStore {
  readonly store: Store;
  /** Closes the store and opens a new one over the same data (a process restart). */
  reopen(): Promise<Store>;
  dispose(): Promise<void>;
}

interface Adapter {
  readonly name: string;
  start(): Promise<void>;
  stop(): Promise<void>;
  open(): Promise<OpenStore>;
}

function sqliteAdapter(): Adapter {
  return {
    name: 'sqlite',
    start: async () => {},
    stop: async () => {},
    async open() {
      const dir = mkdtempSync(join(tmpdir(), 'broker-store-contract-'));
      let store: Store = new SqliteStore(dir, { synchronous: 'NORMAL' });
      return {
        get store() {
          return store;
        },
        async reopen() {
          await store.close();
          store = new SqliteStore(dir, { synchronous: 'NORMAL' });
          return store;
        },
        async dispose() {
          await store.close();
          rmSync(dir, { recursive: true, force: true });
        },
      };
    },
  };
}

function dynamoDbAdapter(): Adapter {
  let local: DynamoDbLocal | undefined;
  const running = (): DynamoDbLocal => {
    if (local === undefined) throw new Error('DynamoDB Local is not running');
    return local;
  };
  return {
    name: 'dynamodb',
    async start() {
      local = await startDynamoDbLocal();
    },
    async stop() {
      await local?.stop();
    },
    async open() {
      const { client } = running();
      const prefix = `contract-${randomUUID().slice(0, 8)}-`;
      await ensureTables(client, prefix);
      let store: Store = new DynamoDbStore(client, prefix);
      return {
        get store() {
          return store;
        },
        async reopen() {
          await store.close();
          store = new DynamoDbStore(client, prefix);
          return store;
        },
        async dispose() {
          await store.close();
          await Promise.all(
            tableDefinitions(prefix).map((d) => client.send(new DeleteTableCommand({ TableName: d.input.TableName }))),
          );
        },
      };
    },
  };
}

describe.each([sqliteAdapter(), dynamoDbAdapter()])('Store contract: $name', (adapter) => {
  let opened: OpenStore;
  let store: Store;

  beforeAll(() => adapter.start());
  afterAll(() => adapter.stop());

  beforeEach(async () => {
    opened = await adapter.open();
    store = opened.store;
  });

  afterEach(() => opened.dispose());

  describe('subscriptions', () => {
    it('reads back exactly what it stored', async () => {
      const rec = record('s1', {
        end: '2031-01-01T00:00:00Z',
        error: 'earlier failure',
        status: 'error',
        previousSecret: { secret: `whsec_${Buffer.alloc(32, 2).toString('base64')}`, until: '2030-01-02T00:00:00Z' },
      });
      await store.insertSubscription(rec);
      expect(await store.getSubscription('s1')).toEqual(rec);
    });

    it('leaves optional fields out rather than storing nulls', async () => {
      await store.insertSubscription(record('s1'));
      const got = await store.getSubscription('s1');
      expect(got).toEqual(record('s1'));
      expect(Object.keys(got ?? {}).filter((k) => ['end', 'error', 'previousSecret'].includes(k))).toEqual([]);
    });

    it('answers undefined for an unknown id', async () => {
      expect(await store.getSubscription('nope')).toBeUndefined();
    });

    it('refuses a second subscription with the same id', async () => {
      await store.insertSubscription(record('s1'));
      await expect(store.insertSubscription(record('s1', { owner: 'bob' }))).rejects.toThrow();
      expect(await store.getSubscription('s1')).toEqual(record('s1'));
    });

    it('inserts with a quota only below it, counted with the insert; a delete gives its place back', async () => {
      expect(await store.insertSubscription(record('a1'), 2)).toBe(true);
      expect(await store.insertSubscription(record('a2'), 2)).toBe(true);
      expect(await store.insertSubscription(record('a3'), 2)).toBe(false);
      expect(await store.getSubscription('a3')).toBeUndefined();
      expect(await store.insertSubscription(record('b1', { owner: 'bob' }), 2)).toBe(true);
      expect(await store.deleteSubscription('a1')).toBe(true);
      expect(await store.insertSubscription(record('a3'), 2)).toBe(true);
      expect(await store.insertSubscription(record('a4'), 2)).toBe(false);
      // A delete refused by its version gives nothing back.
      const a2 = (await store.getSubscription('a2')) as SubscriptionRecord;
      expect(await store.deleteSubscription('a2', '2030-12-31T00:00:00.000Z')).toBe(false);
      expect(await store.insertSubscription(record('a4'), 2)).toBe(false);
      expect(await store.deleteSubscription('a2', a2.updatedAt)).toBe(true);
      expect(await store.insertSubscription(record('a4'), 2)).toBe(true);
      expect((await store.listSubscriptions('alice')).map((s) => s.id).sort()).toEqual(['a3', 'a4']);
    });

    it('never lets concurrent creates of one owner past the quota', async () => {
      const ids = Array.from({ length: 8 }, (_, i) => `c${i}`);
      const results = await Promise.all(ids.map((id) => store.insertSubscription(record(id, { owner: 'carol' }), 3)));
      expect(results.filter(Boolean)).toHaveLength(3);
      expect(await store.listSubscriptions('carol')).toHaveLength(3);
    });

    it('lists all subscriptions or one owner’s, oldest first, ties by id', async () => {
      await store.insertSubscription(record('b', { createdAt: '2030-01-01T00:00:02.000Z' }));
      await store.insertSubscription(record('a', { createdAt: '2030-01-01T00:00:02.000Z' }));
      await store.insertSubscription(record('c', { owner: 'bob', createdAt: '2030-01-01T00:00:01.000Z' }));
      expect((await store.listSubscriptions()).map((s) => s.id)).toEqual(['c', 'a', 'b']);
      expect((await store.listSubscriptions('alice')).map((s) => s.id)).toEqual(['a', 'b']);
      expect((await store.listSubscriptions('bob')).map((s) => s.id)).toEqual(['c']);
      expect(await store.listSubscriptions('carol')).toEqual([]);
    });

    it('lists the current state of each subscription, counters included', async () => {
      await store.insertSubscription(record('s1'));
      await store.insertSubscription(record('s2', { owner: 'bob' }));
      await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
      await store.updateStatus('s2', { status: 'off' }, '2030-03-01T00:00:00.000Z');
      expect(await store.listSubscriptions()).toEqual([
        record('s1', { eventsSinceStart: 1 }),
        record('s2', { owner: 'bob', status: 'off', updatedAt: '2030-03-01T00:00:00.000Z' }),
      ]);
      expect(await store.listSubscriptions('alice')).toEqual([record('s1', { eventsSinceStart: 1 })]);
    });

    it('replaces what the client controls but keeps owner, event counter and creation time', async () => {
      await store.insertSubscription(record('s1', { error: 'old', previousSecret: { secret: 'x', until: T0 } }));
      await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
      const next = record('s1', {
        owner: 'mallory',
        status: 'requested',
        channel: { type: 'rest-hook', endpoint: 'https://new.example.com/y', content: 'empty', headers: [] },
        match: { resourceTypes: ['Patient'], interactions: ['delete'], ids: ['p9'] },
        eventsSinceStart: 0,
        createdAt: '2099-01-01T00:00:00.000Z',
        updatedAt: '2030-02-01T00:00:00.000Z',
        end: '2031-01-01T00:00:00Z',
      });
      const expected = { ...next, owner: 'alice', eventsSinceStart: 2, createdAt: T0 };
      expect(await store.replaceSubscription(next)).toEqual(expected);
      expect(await store.getSubscription('s1')).toEqual(expected);
      expect((await store.listSubscriptions('alice')).map((s) => s.id)).toEqual(['s1']);
      expect(await store.listSubscriptions('mallory')).toEqual([]);
    });

    it('replaces only when status and updatedAt are still as expected (compare-and-set)', async () => {
      const original = record('s1', { status: 'active' });
      await store.insertSubscription(original);
      const seen = { status: original.status, updatedAt: original.updatedAt };
      // The broker moves it to error in between: the client's stale replace must not undo that.
      await store.updateStatus('s1', { status: 'error', error: 'dead letter' }, '2030-03-01T00:00:00.000Z');
      const stale = { ...original, topic: 'changed-by-the-client', updatedAt: '2030-03-02T00:00:00.000Z' };
      expect(await store.replaceSubscription(stale, seen)).toBeUndefined();
      expect((await store.getSubscription('s1'))?.status).toBe('error');
      const fresh = await store.getSubscription('s1');
      const next = { ...original, status: 'requested' as const, updatedAt: '2030-03-03T00:00:00.000Z' };
      const replaced = await store.replaceSubscription(next, {
        status: fresh?.status ?? 'error',
        updatedAt: fresh?.updatedAt ?? '',
      });
      expect([replaced?.status, replaced?.updatedAt, replaced?.error]).toEqual([
        'requested',
        '2030-03-03T00:00:00.000Z',
        undefined,
      ]);
    });

    it('answers undefined when replacing an unknown subscription, and creates nothing', async () => {
      expect(await store.replaceSubscription(record('ghost'))).toBeUndefined();
      expect(await store.getSubscription('ghost')).toBeUndefined();
      expect(await store.listSubscriptions()).toEqual([]);
    });

    it('updates the status unconditionally when no status is expected', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      const at = '2030-03-01T00:00:00.000Z';
      const expected = record('s1', { status: 'error', error: 'handshake failed', updatedAt: at });
      expect(await store.updateStatus('s1', { status: 'error', error: 'handshake failed' }, at)).toEqual(expected);
      expect(await store.getSubscription('s1')).toEqual(expected);
    });

    it('compare-and-sets the status: applies only when the stored status is expected', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      const at = '2030-03-01T00:00:00.000Z';
      expect(await store.updateStatus('s1', { status: 'error', error: 'x', expected: ['active'] }, at)).toBeUndefined();
      expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'requested' }));
      expect(await store.updateStatus('s1', { status: 'active', expected: ['requested', 'error'] }, at)).toEqual(
        record('s1', { status: 'active', updatedAt: at }),
      );
      expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'active', updatedAt: at }));
    });

    it('compare-and-sets on updatedAt: applies only while the record is the one the caller read', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      const stored = (await store.getSubscription('s1'))?.updatedAt as string;
      const at = '2030-03-01T00:00:00.000Z';
      const stale = '2029-12-31T23:59:59.999Z';
      expect(await store.updateStatus('s1', { status: 'active', unchangedSince: stale }, at)).toBeUndefined();
      expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'requested' }));
      expect(
        await store.updateStatus('s1', { status: 'active', expected: ['requested'], unchangedSince: stored }, at),
      ).toEqual(record('s1', { status: 'active', updatedAt: at }));
      // The write moved updatedAt on: the same basis no longer applies.
      expect(
        await store.updateStatus('s1', { status: 'error', error: 'x', unchangedSince: stored }, at),
      ).toBeUndefined();
      expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'active', updatedAt: at }));
    });

    it('never applies a compare-and-set that expects no status', async () => {
      await store.insertSubscription(record('s1'));
      expect(await store.updateStatus('s1', { status: 'off', expected: [] }, T0)).toBeUndefined();
      expect(await store.getSubscription('s1')).toEqual(record('s1'));
    });

    it('clears a previous error when the new status carries none', async () => {
      await store.insertSubscription(record('s1', { status: 'error', error: 'old' }));
      const at = '2030-03-01T00:00:00.000Z';
      const updated = await store.updateStatus('s1', { status: 'requested' }, at);
      expect(updated).toEqual(record('s1', { status: 'requested', updatedAt: at }));
      expect(await store.getSubscription('s1')).toEqual(record('s1', { status: 'requested', updatedAt: at }));
    });

    it('moves updatedAt on by 1 ms when a write names an instant not after the stored one', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      const next = (iso: string) => new Date(Date.parse(iso) + 1).toISOString();
      const first = await store.updateStatus('s1', { status: 'active' }, T0);
      expect(first?.updatedAt).toBe(next(T0));
      const earlier = '2020-01-01T00:00:00.000Z';
      const second = await store.updateStatus('s1', { status: 'error', error: 'x' }, earlier);
      expect(second?.updatedAt).toBe(next(next(T0)));
      const replaced = await store.replaceSubscription(record('s1', { updatedAt: earlier }));
      expect(replaced?.updatedAt).toBe(next(next(next(T0))));
      expect((await store.getSubscription('s1'))?.updatedAt).toBe(replaced?.updatedAt);
    });

    it('answers undefined when updating the status of an unknown subscription, and creates nothing', async () => {
      expect(await store.updateStatus('ghost', { status: 'off' }, T0)).toBeUndefined();
      expect(await store.updateStatus('ghost', { status: 'off', expected: ['active'] }, T0)).toBeUndefined();
      expect(await store.getSubscription('ghost')).toBeUndefined();
    });

    it('deletes a subscription with its notifications', async () => {
      await store.insertSubscription(record('s1'));
      await store.insertSubscription(record('s2'));
      await store.acceptChanges([item('e1', ['s1', 's2']), item('e2', ['s1'])], RECEIVED);
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 },
      ]);
      expect(await store.deleteSubscription('s1')).toBe(true);
      expect(await store.getSubscription('s1')).toBeUndefined();
      expect(await store.listSubscriptions()).toEqual([record('s2', { eventsSinceStart: 1 })]);
      expect(await store.pendingNotifications('s1', 0, 100)).toEqual([]);
      expect(await store.notificationsInRange('s1', 0, 100, 100)).toEqual([]);
      expect(await store.subscriptionsWithPending()).toEqual(['s2']);
      expect((await store.pendingNotifications('s2', 0, 100)).map((n) => n.eventNumber)).toEqual([1]);
    });

    it('deletes only the version named (compare-and-delete): a changed subscription keeps everything', async () => {
      await store.insertSubscription(record('s1'));
      await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
      const read = (await store.getSubscription('s1')) as SubscriptionRecord;
      const changed = await store.updateStatus('s1', { status: 'active' }, '2030-01-01T00:00:09.000Z');
      expect(changed?.updatedAt).not.toBe(read.updatedAt);
      expect(await store.deleteSubscription('s1', read.updatedAt)).toBe(false);
      expect(await store.getSubscription('s1')).toEqual(changed);
      expect((await store.pendingNotifications('s1', 0, 100)).map((n) => n.eventNumber)).toEqual([1]);
      expect(await store.subscriptionsWithPending()).toEqual(['s1']);
      expect(await store.deleteSubscription('s1', changed?.updatedAt)).toBe(true);
      expect(await store.getSubscription('s1')).toBeUndefined();
      expect(await store.pendingNotifications('s1', 0, 100)).toEqual([]);
      expect(await store.deleteSubscription('s1', changed?.updatedAt)).toBe(false);
    });

    it('answers false when deleting an unknown subscription', async () => {
      expect(await store.deleteSubscription('ghost')).toBe(false);
    });
  });

  // Each write keeps the version it replaced: SQLite by triggers, DynamoDB in a ring of items
  // written in the subscription write's transaction (items.ts, versionKey).
  describe('earlier versions', () => {
    const at = (minute: number) => new Date(Date.parse(T0) + minute * 60_000).toISOString();
    const resource = (reason: string) => ({ ...record('s1').resource, reason });

    it('keeps the version each status update or replace replaced, newest first, across a reopen', async () => {
      await store.insertSubscription(record('s1', { status: 'requested', resource: resource('v1') }));
      expect(await store.subscriptionVersions('s1')).toEqual([]);
      await store.updateStatus('s1', { status: 'error', error: 'handshake failed' }, at(1));
      await store.replaceSubscription(
        record('s1', { status: 'requested', resource: resource('v3'), updatedAt: at(2) }),
      );
      await store.updateStatus('s1', { status: 'active' }, at(3));
      const earlier = [
        { updatedAt: at(2), status: 'requested', resource: resource('v3') },
        { updatedAt: at(1), status: 'error', error: 'handshake failed', resource: resource('v1') },
        { updatedAt: T0, status: 'requested', resource: resource('v1') },
      ];
      expect(await store.subscriptionVersions('s1')).toEqual(earlier);
      store = await opened.reopen();
      expect(await store.subscriptionVersions('s1')).toEqual(earlier);
      expect((await store.getSubscription('s1'))?.resource).toEqual(resource('v3'));
    });

    it('keeps nothing for a write it declined (compare-and-set)', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      expect(await store.updateStatus('s1', { status: 'off', expected: ['active'] }, at(1))).toBeUndefined();
      const stale = { status: 'active' as const, updatedAt: at(9) };
      expect(await store.replaceSubscription(record('s1', { updatedAt: at(2) }), stale)).toBeUndefined();
      expect(await store.subscriptionVersions('s1')).toEqual([]);
    });

    it('keeps each of two writes given the same instant: the second moves the version 1 ms on', async () => {
      // A client's PUT and a broker status change in one millisecond both ask for T+1 (each over the
      // T it read): without the store moving the second on, one version would be lost and one
      // version id would name two states.
      await store.insertSubscription(record('s1', { status: 'active' }));
      const put = await store.replaceSubscription(record('s1', { topic: 'changed', updatedAt: at(1) }), {
        status: 'active',
        updatedAt: T0,
      });
      expect(put?.updatedAt).toBe(at(1));
      const failed = await store.updateStatus('s1', { status: 'error', error: 'x', expected: ['active'] }, at(1));
      expect(failed?.updatedAt).toBe(new Date(Date.parse(at(1)) + 1).toISOString());
      expect(await store.getSubscription('s1')).toEqual(failed);
      expect((await store.subscriptionVersions('s1')).map((v) => [v.updatedAt, v.status])).toEqual([
        [at(1), 'active'],
        [T0, 'active'],
      ]);
    });

    it('forgets the earlier versions on request, keeping the current one, and keeps the next ones again', async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      await store.updateStatus('s1', { status: 'active' }, at(1));
      await store.updateStatus('s1', { status: 'error', error: 'x' }, at(2));
      expect(await store.forgetSubscriptionVersions('s1')).toBe(2);
      expect(await store.subscriptionVersions('s1')).toEqual([]);
      expect((await store.getSubscription('s1'))?.status).toBe('error');
      await store.updateStatus('s1', { status: 'active' }, at(3));
      expect((await store.subscriptionVersions('s1')).map((v) => [v.updatedAt, v.status])).toEqual([[at(2), 'error']]);
      expect(await store.forgetSubscriptionVersions('ghost')).toBe(0);
    });

    it(`keeps the last ${EARLIER_VERSIONS_KEPT}, and forgets them with the subscription`, async () => {
      await store.insertSubscription(record('s1', { status: 'requested' }));
      for (let i = 1; i <= EARLIER_VERSIONS_KEPT + 3; i++) {
        await store.updateStatus('s1', { status: i % 2 === 1 ? 'active' : 'error' }, at(i));
      }
      const kept = await store.subscriptionVersions('s1');
      expect(kept.map((v) => v.updatedAt)).toEqual(
        Array.from({ length: EARLIER_VERSIONS_KEPT }, (_, i) => at(EARLIER_VERSIONS_KEPT + 2 - i)),
      );
      expect(await store.deleteSubscription('s1')).toBe(true);
      expect(await store.subscriptionVersions('s1')).toEqual([]);
      // The id created anew starts with no history of the one deleted.
      await store.insertSubscription(record('s1', { status: 'requested', updatedAt: at(50) }));
      expect(await store.subscriptionVersions('s1')).toEqual([]);
      expect(await store.subscriptionVersions('ghost')).toEqual([]);
    });
  });

  describe('acceptChanges', () => {
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
      expect(await store.acceptChanges([item('e3', ['s2'])], RECEIVED)).toEqual([
        { duplicate: false, notifications: [{ subscriptionId: 's2', eventNumber: 2, change: change('e3', 'p1') }] },
      ]);
      expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(2);
      expect((await store.getSubscription('s2'))?.eventsSinceStart).toBe(2);
    });

    it('answers an empty batch with no outcomes', async () => {
      expect(await store.acceptChanges([], RECEIVED)).toEqual([]);
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
      expect(await store.acceptChanges([item('e1', ['s1'])], RECEIVED)).toEqual([
        { duplicate: true, notifications: [] },
      ]);
      expect(await store.pendingNotifications('s1', 0, 10)).toEqual([]);
      expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(0);
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
      const outcomes = await store.acceptChanges(
        [item('e1', ['s1']), item('e2', ['s1']), item('e1', ['s1'])],
        RECEIVED,
      );
      expect(outcomes).toEqual([
        { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 1, change: change('e1', 'p1') }] },
        { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 2, change: change('e2', 'p1') }] },
        { duplicate: true, notifications: [] },
      ]);
      expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(2);
    });

    it('skips a subscription switched off since matching, and one deleted since', async () => {
      await store.updateStatus('s1', { status: 'off' }, T0);
      await store.deleteSubscription('s2');
      expect(await store.acceptChanges([item('e1', ['s1', 's2'])], RECEIVED)).toEqual([
        { duplicate: false, notifications: [] },
      ]);
      expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(0);
      expect(await store.getSubscription('s2')).toBeUndefined();
      expect(await store.subscriptionsWithPending()).toEqual([]);
      expect(await store.notificationsInRange('s2', 0, 10, 10)).toEqual([]);
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

    it('stops collecting after a replace switches it off, and numbers on after it is back', async () => {
      await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
      await store.replaceSubscription(record('s1', { status: 'off' }));
      expect(await store.acceptChanges([item('e2', ['s1'])], RECEIVED)).toEqual([
        { duplicate: false, notifications: [] },
      ]);
      await store.replaceSubscription(record('s1', { status: 'requested' }));
      const [outcome] = await store.acceptChanges([item('e3', ['s1'])], RECEIVED);
      expect(outcome?.notifications).toEqual([{ subscriptionId: 's1', eventNumber: 2, change: change('e3', 'p1') }]);
    });

    it('keeps the resource with the notifications of the subscriptions that take it, and only theirs', async () => {
      await store.insertSubscription(record('s3'));
      // Non-ASCII and JSON's escapes survive both stores; a duplicate of the event writes nothing.
      const json = JSON.stringify({ resourceType: 'Patient', id: 'p1', name: [{ text: 'Zoë "Q" \\ \u2028' }] });
      const withResource = { ...change('e1', 'p1'), resource: json };
      const accepted = { ...item('e1', ['s1', 's2', 's3']), resource: { json, for: new Set(['s1', 's3']) } };
      const [outcome] = await store.acceptChanges([accepted, { ...accepted }], RECEIVED);
      expect(outcome?.notifications).toEqual([
        { subscriptionId: 's1', eventNumber: 1, change: withResource },
        { subscriptionId: 's2', eventNumber: 1, change: change('e1', 'p1') },
        { subscriptionId: 's3', eventNumber: 1, change: withResource },
      ]);
      expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.change)).toEqual([withResource]);
      expect((await store.pendingNotifications('s2', 0, 10)).map((n) => n.change)).toEqual([change('e1', 'p1')]);
      expect((await store.notificationsInRange('s3', 1, 1, 10)).map((n) => n.change)).toEqual([withResource]);
      // The next event, without one, is stored without one for every subscription.
      await store.acceptChanges([item('e2', ['s1', 's2'])], RECEIVED);
      expect((await store.notificationsInRange('s1', 2, 2, 10)).map((n) => n.change)).toEqual([change('e2', 'p1')]);
    });

    it("keeps a resource at the size cap whose JSON is mostly escapes (not escaped twice, past a DynamoDB item's 400 KB)", async () => {
      const payload = JSON.stringify(Array.from({ length: 10_500 }, () => ({ a: '', b: '' })));
      const json = JSON.stringify({ resourceType: 'Observation', id: 'o1', status: 'final', valueString: payload });
      expect(Buffer.byteLength(json)).toBeLessThanOrEqual(MAX_FULL_RESOURCE_BYTES);
      expect(Buffer.byteLength(json)).toBeGreaterThan(MAX_FULL_RESOURCE_BYTES * 0.9);
      const accepted = { ...item('e1', ['s1']), resource: { json, for: new Set(['s1']) } };
      await store.acceptChanges([accepted], RECEIVED);
      const [n] = await store.pendingNotifications('s1', 0, 10);
      expect(n?.change.resource).toBe(json);
    });

    it('round-trips a change without a resource id', async () => {
      await store.acceptChanges([{ change: change('e1'), subscriptionIds: ['s1'] }], RECEIVED);
      const [n] = await store.pendingNotifications('s1', 0, 10);
      expect(n?.change).toEqual(change('e1'));
      expect(Object.keys(n?.change ?? {})).not.toContain('resourceId');
    });
  });

  describe('notifications', () => {
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
      expect((await store.pendingNotifications('s1', 2, 2)).map((n) => n.eventNumber)).toEqual([3, 4]);
      expect((await store.pendingNotifications('s1', 5, 10)).map((n) => n.eventNumber)).toEqual([]);
      expect(await store.pendingNotifications('s2', 0, 10)).toEqual([]);
    });

    it('lists pending notifications from the start past delivered and dead ones, whatever other subscriptions hold', async () => {
      await store.acceptChanges(
        ['e6', 'e7', 'e8'].map((id) => item(id, ['s2', 's1'], `p-${id}`)),
        RECEIVED,
      );
      const outcome = (subscriptionId: string, eventNumber: number, state: 'delivered' | 'dead') => ({
        subscriptionId,
        eventNumber,
        state,
        attempts: 1,
        dueAt: RECEIVED,
      });
      await store.recordDeliveries([
        outcome('s1', 1, 'delivered'),
        outcome('s1', 2, 'delivered'),
        outcome('s1', 3, 'dead'),
        outcome('s1', 5, 'delivered'),
        outcome('s2', 1, 'delivered'),
      ]);
      expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([4, 6, 7, 8]);
      expect((await store.pendingNotifications('s1', 0, 2)).map((n) => n.eventNumber)).toEqual([4, 6]);
      expect((await store.pendingNotifications('s2', 0, 10)).map((n) => n.eventNumber)).toEqual([2, 3]);
      await store.recordDeliveries([outcome('s2', 2, 'delivered'), outcome('s2', 3, 'delivered')]);
      expect(await store.pendingNotifications('s2', 0, 10)).toEqual([]);
      expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    });

    it('lists the subscriptions with pending notifications, each once', async () => {
      expect(await store.subscriptionsWithPending()).toEqual(['s1']);
      await store.acceptChanges([item('e6', ['s2', 's1'])], RECEIVED);
      expect((await store.subscriptionsWithPending()).sort()).toEqual(['s1', 's2']);
      await store.recordDeliveries([
        { subscriptionId: 's2', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 },
      ]);
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
      expect(await store.notificationsInRange('s1', 1, 3, 10)).toEqual([
        {
          subscriptionId: 's1',
          eventNumber: 1,
          change: change('e1', 'p-e1'),
          state: 'delivered',
          attempts: 1,
          dueAt: RECEIVED,
        },
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
          eventNumber: 3,
          change: change('e3', 'p-e3'),
          state: 'dead',
          attempts: 7,
          dueAt: RECEIVED,
          lastError: 'timeout',
        },
      ]);
    });

    it('clears lastError when a later outcome carries none', async () => {
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'pending', attempts: 1, dueAt: RECEIVED, lastError: 'HTTP 500' },
      ]);
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 2, dueAt: RECEIVED },
      ]);
      expect(await store.notificationsInRange('s1', 1, 1, 10)).toEqual([
        {
          subscriptionId: 's1',
          eventNumber: 1,
          change: change('e1', 'p-e1'),
          state: 'delivered',
          attempts: 2,
          dueAt: RECEIVED,
        },
      ]);
    });

    it('applies outcomes for the same notification in the order given', async () => {
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'pending', attempts: 1, dueAt: RECEIVED + 5, lastError: 'x' },
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 2, dueAt: RECEIVED + 9 },
      ]);
      const [n] = await store.notificationsInRange('s1', 1, 1, 1);
      expect([n?.state, n?.attempts, n?.dueAt, n?.lastError]).toEqual(['delivered', 2, RECEIVED + 9, undefined]);
    });

    it('ignores an outcome for a notification that does not exist', async () => {
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 99, state: 'delivered', attempts: 1, dueAt: 0 },
        { subscriptionId: 'ghost', eventNumber: 1, state: 'pending', attempts: 1, dueAt: 0 },
      ]);
      expect((await store.notificationsInRange('s1', 0, 1000, 1000)).map((n) => n.eventNumber)).toEqual([
        1, 2, 3, 4, 5,
      ]);
      expect(await store.notificationsInRange('ghost', 0, 1000, 1000)).toEqual([]);
      expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    });

    it('stores where a bundle ends on its first notification, kept across a reopen and a re-queue', async () => {
      expect(
        await store.markBundles([
          { subscriptionId: 's1', eventNumber: 1, last: 3 },
          { subscriptionId: 's1', eventNumber: 4, last: 4 },
        ]),
      ).toEqual([true, true]);
      // Over a mark only while it is the one the caller read.
      expect(
        await store.markBundles([
          { subscriptionId: 's1', eventNumber: 4, last: 5, previous: 4 },
          { subscriptionId: 's1', eventNumber: 1, last: 2 },
          { subscriptionId: 's1', eventNumber: 1, last: 2, previous: 2 },
        ]),
      ).toEqual([true, false, false]);
      const marks = async () =>
        (await store.pendingNotifications('s1', 0, 10)).map((n) => [n.eventNumber, n.bundleLast]);
      const marked = [
        [1, 3],
        [2, undefined],
        [3, undefined],
        [4, 5],
        [5, undefined],
      ];
      expect(await marks()).toEqual(marked);
      expect((await store.notificationsInRange('s1', 1, 5, 10)).map((n) => n.bundleLast)).toEqual([
        3,
        undefined,
        undefined,
        5,
        undefined,
      ]);
      store = await opened.reopen();
      expect(await marks()).toEqual(marked);
      // A bundle dead-lettered keeps its mark (a mark for a notification no longer pending is not
      // written), and goes out as it was once re-queued.
      await store.recordDeliveries(
        [4, 5].map((eventNumber) => ({
          subscriptionId: 's1',
          eventNumber,
          state: 'dead' as const,
          attempts: 3,
          dueAt: RECEIVED,
          lastError: 'HTTP 500',
        })),
      );
      expect(await store.markBundles([{ subscriptionId: 's1', eventNumber: 4, last: 4, previous: 5 }])).toEqual([
        false,
      ]);
      expect(await store.requeueDeadLetters('s1', RECEIVED + 1)).toBe(2);
      expect(await marks()).toEqual(marked);
      // One for a notification that does not exist writes nothing.
      expect(
        await store.markBundles([
          { subscriptionId: 's1', eventNumber: 99, last: 100 },
          { subscriptionId: 'ghost', eventNumber: 1, last: 2 },
        ]),
      ).toEqual([false, false]);
      expect((await store.notificationsInRange('s1', 0, 1000, 1000)).map((n) => n.eventNumber)).toEqual([
        1, 2, 3, 4, 5,
      ]);
      expect(await store.notificationsInRange('ghost', 0, 1000, 1000)).toEqual([]);
    });

    it('lists stored notifications in an inclusive range whatever their state, up to a limit', async () => {
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 2, state: 'delivered', attempts: 1, dueAt: 0 },
      ]);
      expect((await store.notificationsInRange('s1', 2, 4, 10)).map((n) => n.eventNumber)).toEqual([2, 3, 4]);
      expect((await store.notificationsInRange('s1', 1, 5, 2)).map((n) => n.eventNumber)).toEqual([1, 2]);
      expect((await store.notificationsInRange('s1', 0, 1, 10)).map((n) => n.eventNumber)).toEqual([1]);
      expect((await store.notificationsInRange('s1', 4, 2, 10)).map((n) => n.eventNumber)).toEqual([]);
      expect((await store.notificationsInRange('s1', 6, 9, 10)).map((n) => n.eventNumber)).toEqual([]);
      expect(await store.notificationsInRange('s2', 0, 10, 10)).toEqual([]);
    });
  });

  describe('dead letters', () => {
    beforeEach(async () => {
      await store.insertSubscription(record('s1'));
      await store.insertSubscription(record('s2'));
      await store.acceptChanges(
        ['e1', 'e2', 'e3', 'e4'].map((id) => item(id, ['s1', 's2'], `p-${id}`)),
        RECEIVED,
      );
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: RECEIVED },
        { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'HTTP 500' },
        { subscriptionId: 's1', eventNumber: 3, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'HTTP 500' },
        { subscriptionId: 's2', eventNumber: 1, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'timeout' },
      ]);
    });

    it('requeues the dead letters of one subscription as fresh pending notifications due at the given time', async () => {
      const due = RECEIVED + 60_000;
      expect(await store.requeueDeadLetters('s1', due)).toBe(2);
      expect(await store.notificationsInRange('s1', 1, 4, 10)).toEqual([
        {
          subscriptionId: 's1',
          eventNumber: 1,
          change: change('e1', 'p-e1'),
          state: 'delivered',
          attempts: 1,
          dueAt: RECEIVED,
        },
        {
          subscriptionId: 's1',
          eventNumber: 2,
          change: change('e2', 'p-e2'),
          state: 'pending',
          attempts: 0,
          dueAt: due,
        },
        {
          subscriptionId: 's1',
          eventNumber: 3,
          change: change('e3', 'p-e3'),
          state: 'pending',
          attempts: 0,
          dueAt: due,
        },
        {
          subscriptionId: 's1',
          eventNumber: 4,
          change: change('e4', 'p-e4'),
          state: 'pending',
          attempts: 0,
          dueAt: RECEIVED,
        },
      ]);
      expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([2, 3, 4]);
      // Another subscription's dead letters stay dead.
      expect((await store.notificationsInRange('s2', 1, 1, 1)).map((n) => n.state)).toEqual(['dead']);
    });

    it('starts the pending retries of that subscription over, due at the same time; untried ones keep theirs', async () => {
      const due = RECEIVED + 60_000;
      const later = RECEIVED + 3_600_000;
      await store.acceptChanges([item('e5', ['s1'], 'p-e5')], RECEIVED + 1);
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 4, state: 'pending', attempts: 2, dueAt: later, lastError: 'HTTP 503' },
        { subscriptionId: 's2', eventNumber: 2, state: 'pending', attempts: 2, dueAt: later, lastError: 'HTTP 503' },
      ]);
      // Only the dead letters are counted.
      expect(await store.requeueDeadLetters('s1', due)).toBe(2);
      const fresh = (eventNumber: number, dueAt: number) => ({
        subscriptionId: 's1',
        eventNumber,
        change: change(`e${eventNumber}`, `p-e${eventNumber}`),
        state: 'pending',
        attempts: 0,
        dueAt,
      });
      expect(await store.notificationsInRange('s1', 2, 5, 10)).toEqual([
        fresh(2, due),
        fresh(3, due),
        fresh(4, due),
        fresh(5, RECEIVED + 1),
      ]);
      expect(await store.pendingNotifications('s1', 0, 10)).toEqual([
        fresh(2, due),
        fresh(3, due),
        fresh(4, due),
        fresh(5, RECEIVED + 1),
      ]);
      // Another subscription's retry keeps its attempts and its due time.
      expect(await store.notificationsInRange('s2', 2, 2, 1)).toEqual([
        {
          subscriptionId: 's2',
          eventNumber: 2,
          change: change('e2', 'p-e2'),
          state: 'pending',
          attempts: 2,
          dueAt: later,
          lastError: 'HTTP 503',
        },
      ]);
    });

    it('starts the pending retries over when nothing is dead, answering 0', async () => {
      expect(await store.requeueDeadLetters('s2', RECEIVED)).toBe(1);
      await store.recordDeliveries([
        {
          subscriptionId: 's2',
          eventNumber: 3,
          state: 'pending',
          attempts: 1,
          dueAt: RECEIVED + 5_000,
          lastError: 'x',
        },
      ]);
      expect(await store.requeueDeadLetters('s2', RECEIVED + 10)).toBe(0);
      expect(
        (await store.pendingNotifications('s2', 0, 10)).map((n) => [n.eventNumber, n.attempts, n.dueAt, n.lastError]),
      ).toEqual([
        [1, 0, RECEIVED, undefined],
        [2, 0, RECEIVED, undefined],
        [3, 0, RECEIVED + 10, undefined],
        [4, 0, RECEIVED, undefined],
      ]);
    });

    it('answers 0 when there is nothing dead to requeue', async () => {
      expect(await store.requeueDeadLetters('s1', RECEIVED)).toBe(2);
      expect(await store.requeueDeadLetters('s1', RECEIVED)).toBe(0);
      expect(await store.requeueDeadLetters('ghost', RECEIVED)).toBe(0);
    });
  });

  describe('purge', () => {
    const LATER = RECEIVED + 10_000;

    beforeEach(async () => {
      await store.insertSubscription(record('s1'));
      await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1']), item('e3', ['s1']), item('e0', [])], RECEIVED);
      await store.acceptChanges([item('e4', ['s1'])], LATER);
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: RECEIVED },
        { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 7, dueAt: RECEIVED, lastError: 'x' },
        { subscriptionId: 's1', eventNumber: 4, state: 'delivered', attempts: 1, dueAt: LATER },
      ]);
    });

    it('forgets delivered and dead notifications and event ids older than the cut-off, never pending ones', async () => {
      expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 2, eventIds: 4 });
      expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => [n.eventNumber, n.state])).toEqual([
        [3, 'pending'],
        [4, 'delivered'],
      ]);
      expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([3]);
      expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 0, eventIds: 0 });
    });

    it('accepts a forgotten event id again as new, and still deduplicates the ones it kept', async () => {
      await store.purge(RECEIVED + 1);
      expect(await store.acceptChanges([item('e1', ['s1']), item('e4', ['s1'])], LATER)).toEqual([
        { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 5, change: change('e1', 'p1') }] },
        { duplicate: true, notifications: [] },
      ]);
    });

    it('purges nothing once its signal is aborted, and keeps what it would have taken for the next purge', async () => {
      expect(await store.purge(RECEIVED + 1, AbortSignal.abort())).toEqual({ notifications: 0, eventIds: 0 });
      expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => n.eventNumber)).toEqual([1, 2, 3, 4]);
      expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 2, eventIds: 4 });
    });

    it('keeps everything at or after the cut-off', async () => {
      expect(await store.purge(RECEIVED)).toEqual({ notifications: 0, eventIds: 0 });
      expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => n.eventNumber)).toEqual([1, 2, 3, 4]);
      expect(await store.acceptChanges([item('e1', ['s1'])], LATER)).toEqual([{ duplicate: true, notifications: [] }]);
    });
  });

  describe('reconciliation', () => {
    const SINCE = RECEIVED;
    const SLACK = NOTIFIED_SCAN_SLACK_MS;

    /** A change of `type`/`resourceId` that happened at `time` (epoch ms), for `subscriptionIds`. */
    const changedAt = (
      eventId: string,
      subscriptionIds: string[],
      resourceId: string,
      time: number,
      resourceType = 'Patient',
    ): AcceptItem => ({
      change: { ...change(eventId, resourceId), resourceType, time: new Date(time).toISOString() },
      subscriptionIds,
    });

    beforeEach(async () => {
      await store.insertSubscription(record('s1'));
      await store.insertSubscription(record('s2'));
    });

    it('maps each resource notified to the latest change time at or after since, by type and id', async () => {
      await store.acceptChanges(
        [
          // Two notifications of each resource: the later change time counts, whichever came first.
          changedAt('e1', ['s1'], 'p1', SINCE + 2),
          changedAt('e2', ['s1'], 'p1', SINCE + 1),
          changedAt('e3', ['s1'], 'p2', SINCE),
          changedAt('e4', ['s1'], 'p2', SINCE + 3),
          changedAt('e5', ['s1'], 'p1', SINCE, 'Observation'),
        ],
        SINCE,
      );
      expect(await store.notifiedResources('s1', SINCE)).toEqual(
        new Map([
          ['Patient/p1', SINCE + 2],
          ['Patient/p2', SINCE + 3],
          ['Observation/p1', SINCE],
        ]),
      );
    });

    it('leaves out changes before since, other subscriptions, and answers empty for an unknown subscription', async () => {
      await store.acceptChanges(
        [
          changedAt('e1', ['s1'], 'p1', SINCE - 1),
          changedAt('e2', ['s1'], 'p2', SINCE - 1),
          changedAt('e3', ['s1'], 'p2', SINCE),
          changedAt('e4', ['s2'], 'p3', SINCE),
        ],
        SINCE,
      );
      expect(await store.notifiedResources('s1', SINCE)).toEqual(new Map([['Patient/p2', SINCE]]));
      expect(await store.notifiedResources('s1', SINCE + 1)).toEqual(new Map());
      expect(await store.notifiedResources('s2', SINCE)).toEqual(new Map([['Patient/p3', SINCE]]));
      expect(await store.notifiedResources('ghost', SINCE)).toEqual(new Map());
    });

    it('counts delivered and dead-lettered notifications as well as pending ones', async () => {
      await store.acceptChanges(
        ['p1', 'p2', 'p3'].map((id, i) => changedAt(`e${i}`, ['s1'], id, SINCE)),
        SINCE,
      );
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: SINCE },
        { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 7, dueAt: SINCE, lastError: 'HTTP 500' },
      ]);
      // Where the store has lanes, one held (DynamoDB keeps its lease beside the notifications).
      await store.laneLeases?.take('s1', 'holder', SINCE, SINCE + 60_000);
      expect((await store.notificationsInRange('s1', 1, 3, 10)).map((n) => n.state)).toEqual([
        'delivered',
        'dead',
        'pending',
      ]);
      expect(await store.notifiedResources('s1', SINCE)).toEqual(
        new Map([
          ['Patient/p1', SINCE],
          ['Patient/p2', SINCE],
          ['Patient/p3', SINCE],
        ]),
      );
    });

    it('leaves out a notification of an event without a resource id', async () => {
      await store.acceptChanges(
        [
          { change: { ...change('e1'), time: new Date(SINCE).toISOString() }, subscriptionIds: ['s1'] },
          changedAt('e2', ['s1'], 'p1', SINCE),
        ],
        SINCE,
      );
      expect(await store.notifiedResources('s1', SINCE)).toEqual(new Map([['Patient/p1', SINCE]]));
    });

    it('reads past many pages to the oldest notification within the window', async () => {
      // p0 first, at the bound, with the latest change; then 1,200 more (above SQLite's 500-row
      // step and DynamoDB's 100-item page), p0 among them again with an earlier change.
      await store.acceptChanges([changedAt('e0', ['s1'], 'p0', SINCE + 5)], SINCE - SLACK);
      const count = 1_200;
      await store.acceptChanges(
        Array.from({ length: count }, (_, i) => changedAt(`e${i + 1}`, ['s1'], `q${i}`, SINCE + 1)),
        SINCE,
      );
      await store.acceptChanges([changedAt('f0', ['s1'], 'p0', SINCE + 1)], SINCE + 1);
      const found = await store.notifiedResources('s1', SINCE);
      expect(found.size).toBe(count + 1);
      expect(found.get('Patient/p0')).toBe(SINCE + 5);
      expect(found.get('Patient/q0')).toBe(SINCE + 1);
      expect(found.get(`Patient/q${count - 1}`)).toBe(SINCE + 1);
    });

    it('stops at notifications accepted more than NOTIFIED_SCAN_SLACK_MS before since, whatever their change time', async () => {
      // Each change happened at `since`: only when it was accepted tells them apart.
      await store.acceptChanges([changedAt('e1', ['s1'], 'p1', SINCE)], SINCE - SLACK - 1);
      await store.acceptChanges([changedAt('e2', ['s1'], 'p2', SINCE)], SINCE - SLACK);
      await store.acceptChanges([changedAt('e3', ['s1'], 'p3', SINCE)], SINCE);
      expect(await store.notifiedResources('s1', SINCE)).toEqual(
        new Map([
          ['Patient/p2', SINCE],
          ['Patient/p3', SINCE],
        ]),
      );
      // An earlier since reaches it.
      expect((await store.notifiedResources('s1', SINCE - 1)).get('Patient/p1')).toBe(SINCE);
    });

    it('has no checkpoint for a source never saved', async () => {
      expect(await store.reconcileCheckpoint('fhir:never')).toBeUndefined();
    });

    it('reads back the checkpoint it saved, and moves it only forward', async () => {
      const source = `fhir:${'0123456789abcdef'.repeat(2)}`;
      await store.saveReconcileCheckpoint(source, SINCE);
      expect(await store.reconcileCheckpoint(source)).toBe(SINCE);
      await store.saveReconcileCheckpoint(source, SINCE - 1);
      expect(await store.reconcileCheckpoint(source)).toBe(SINCE);
      await store.saveReconcileCheckpoint(source, SINCE);
      expect(await store.reconcileCheckpoint(source)).toBe(SINCE);
      await store.saveReconcileCheckpoint(source, SINCE + 1);
      expect(await store.reconcileCheckpoint(source)).toBe(SINCE + 1);
    });

    it('keeps the checkpoints of different sources apart, a long source included', async () => {
      const long = `fhir:${'a'.repeat(295)}`;
      await store.saveReconcileCheckpoint('fhir:a', SINCE + 2);
      await store.saveReconcileCheckpoint(long, SINCE);
      await store.saveReconcileCheckpoint('fhir:b', SINCE + 1);
      expect(await store.reconcileCheckpoint('fhir:a')).toBe(SINCE + 2);
      expect(await store.reconcileCheckpoint('fhir:b')).toBe(SINCE + 1);
      expect(await store.reconcileCheckpoint(long)).toBe(SINCE);
    });

    it('keeps checkpoints across a purge of everything and across close and reopen', async () => {
      await store.saveReconcileCheckpoint('fhir:a', SINCE);
      await store.purge(SINCE + 365 * 86_400_000);
      store = await opened.reopen();
      expect(await store.reconcileCheckpoint('fhir:a')).toBe(SINCE);
      await store.saveReconcileCheckpoint('fhir:a', SINCE - 1);
      expect(await store.reconcileCheckpoint('fhir:a')).toBe(SINCE);
    });
  });

  describe('lifecycle', () => {
    it('answers ping', async () => {
      await expect(store.ping()).resolves.toBeUndefined();
    });

    it('keeps subscriptions, notifications, counters and seen event ids across close and reopen', async () => {
      await store.insertSubscription(record('s1'));
      await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
      await store.recordDeliveries([
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 },
      ]);

      store = await opened.reopen();
      await store.ping();
      expect(await store.getSubscription('s1')).toEqual(record('s1', { eventsSinceStart: 2 }));
      expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([2]);
      expect(await store.acceptChanges([item('e2', ['s1'])], RECEIVED)).toEqual([
        { duplicate: true, notifications: [] },
      ]);
      const [next] = await store.acceptChanges([item('e3', ['s1'])], RECEIVED);
      expect(next?.notifications.map((n) => n.eventNumber)).toEqual([3]);
    });

    it('tolerates a second close', async () => {
      await store.close();
      await expect(store.close()).resolves.toBeUndefined();
    });
  });
});
