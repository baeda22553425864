import {
  DeleteItemCommand,
  DescribeTableCommand,
  DescribeTimeToLiveCommand,
  type DynamoDBClient,
  GetItemCommand,
  PutItemCommand,
  QueryCommand,
  ScanCommand,
  TransactionCanceledException,
  TransactWriteItemsCommand,
  UpdateItemCommand,
} from '@aws-sdk/client-dynamodb';
import { describe, expect, it } from 'vitest';
import { BACKPORT_EXT } from '../src/core/fhir-urls.js';
import { R4_RESOURCE_TYPES } from '../src/core/resource-types.js';
import { MAX_RESOURCE_TYPES, parseSubscription } from '../src/core/subscription.js';
import { outcomeOf } from '../src/http/outcome.js';
import { DynamoDbBindings } from '../src/store/dynamodb/dynamodb-bindings.js';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { SubscriptionExistsError, WriteConflictError } from '../src/store/dynamodb/errors.js';
import { ensureTables, INDEX, tableNames } from '../src/store/dynamodb/tables.js';
import { EARLIER_VERSIONS_KEPT } from '../src/store/store.js';
import { loadTopicCatalog } from '../src/store/topic-files.js';
import { storePerTest } from './support/dynamodb-store-per-test.js';
import { change, item, RECEIVED, record } from './support/store-fixtures.js';

/**
 * What only the DynamoDB adapter has: table creation, the crash-retry path of acceptChanges,
 * TTL-expired items, sparse indexes. The shared behaviour is in store-contract.test.ts.
 */

let client: DynamoDBClient;
let prefix: string;
let store: DynamoDbStore;

storePerTest('ddb', (t) => {
  ({ client, prefix, store } = t);
});

const names = () => tableNames(prefix);

/** Every item of a subscription's partition of `notifications`, by event number. */
const notificationItems = async (subscriptionId: string) => {
  const out = await client.send(
    new QueryCommand({
      TableName: names().notifications,
      KeyConditionExpression: 'subscriptionId = :s',
      ExpressionAttributeValues: { ':s': { S: subscriptionId } },
      ConsistentRead: true,
    }),
  );
  return out.Items ?? [];
};

describe('ensureTables', () => {
  it('creates the five tables, ACTIVE, with TTL on event ids and connections', async () => {
    const t = names();
    const described = await Promise.all(
      [t.subscriptions, t.notifications, t.eventIds, t.connections, t.subscriptionTypes].map(async (TableName) => {
        const { Table } = await client.send(new DescribeTableCommand({ TableName }));
        const ttl = await client.send(new DescribeTimeToLiveCommand({ TableName }));
        return [
          TableName,
          Table?.TableStatus,
          Table?.BillingModeSummary?.BillingMode,
          (Table?.GlobalSecondaryIndexes ?? []).map((i) => i.IndexName).sort(),
          ttl.TimeToLiveDescription?.AttributeName ?? null,
        ];
      }),
    );
    expect(described).toEqual([
      [t.subscriptions, 'ACTIVE', 'PAY_PER_REQUEST', [INDEX.byOwner, INDEX.collectingByOwner], null],
      [t.notifications, 'ACTIVE', 'PAY_PER_REQUEST', [INDEX.pending], null],
      [t.eventIds, 'ACTIVE', 'PAY_PER_REQUEST', [], 'expiresAt'],
      [t.connections, 'ACTIVE', 'PAY_PER_REQUEST', [INDEX.connectionsBySubscription], 'expiresAt'],
      [t.subscriptionTypes, 'ACTIVE', 'PAY_PER_REQUEST', [], null],
    ]);
  });

  it('leaves existing tables and their items alone when run again', async () => {
    await ensureTables(client, prefix);
    expect(await store.getSubscription('s1')).toEqual(record('s1'));
  });
});

describe('DynamoDbStore', () => {
  it('raises SubscriptionExistsError for a taken id', async () => {
    await expect(store.insertSubscription(record('s1', { owner: 'bob' }))).rejects.toThrow(SubscriptionExistsError);
  });

  it('finishes a half-done acceptance on retry without a second notification or number', async () => {
    await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
    // A crash after the notification and its marker, before the event id was recorded.
    await client.send(
      new DeleteItemCommand({ TableName: names().eventIds, Key: { eventId: { S: 'e1' }, scope: { S: '#event' } } }),
    );
    expect(await store.acceptChanges([item('e1', ['s1'])], RECEIVED + 1)).toEqual([
      { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 1, change: change('e1', 'p1') }] },
    ]);
    expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => n.eventNumber)).toEqual([1]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(1);
    expect(await store.acceptChanges([item('e1', ['s1'])], RECEIVED + 2)).toEqual([
      { duplicate: true, notifications: [] },
    ]);
  });

  it('writes a pending outcome only over a pending row: never over a delivery another container made since', async () => {
    await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
    // Container Y, holding the lane after a re-activation, delivered #1; container X's attempt at it
    // (on the wire when the lane changed hands) failed, and X records it started over, late.
    await store.recordDeliveries([{ subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 }]);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'pending', attempts: 0, dueAt: 5, lastError: 'HTTP 503' },
      { subscriptionId: 's1', eventNumber: 2, state: 'pending', attempts: 1, dueAt: 7, lastError: 'HTTP 503' },
    ]);
    const rows = await store.notificationsInRange('s1', 0, 10, 10);
    expect(rows.map(({ eventNumber, state, attempts, dueAt }) => ({ eventNumber, state, attempts, dueAt }))).toEqual([
      { eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 0 },
      // A retry of a row still pending is written as before.
      { eventNumber: 2, state: 'pending', attempts: 1, dueAt: 7 },
    ]);
  });

  it('writes a marked bundle’s first notification after the rest of its states: a death between leaves its mark', async () => {
    await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1']), item('e3', ['s1'])], RECEIVED);
    expect(await store.markBundles([{ subscriptionId: 's1', eventNumber: 1, last: 3 }])).toEqual([true]);
    // The process dies as it writes the first notification's state.
    const order: number[] = [];
    const dying = {
      send: async (command: Parameters<DynamoDBClient['send']>[0]) => {
        if (command instanceof UpdateItemCommand) {
          const n = Number(command.input.Key?.eventNumber?.N);
          order.push(n);
          if (n === 1) throw new Error('the process died');
        }
        return client.send(command);
      },
    } as unknown as DynamoDBClient;
    const delivered = [1, 2, 3].map((eventNumber) => ({
      subscriptionId: 's1',
      eventNumber,
      state: 'delivered' as const,
      attempts: 1,
      dueAt: RECEIVED,
      ...(eventNumber === 1 ? { bundleHead: true as const } : {}),
    }));
    await expect(new DynamoDbStore(dying, prefix).recordDeliveries(delivered)).rejects.toThrow('the process died');
    expect(order).toEqual([2, 3, 1]);
    // What is left pending still names its bundle: it goes again under that bundle's id.
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => [n.eventNumber, n.bundleLast])).toEqual([[1, 3]]);
  });

  it('leaves a gap in event numbers when a process died between taking a number and queueing', async () => {
    await client.send(
      new UpdateItemCommand({
        TableName: names().subscriptions,
        Key: { id: { S: 's1' } },
        UpdateExpression: 'ADD eventsSinceStart :one',
        ExpressionAttributeValues: { ':one': { N: '1' } },
      }),
    );
    const [outcome] = await store.acceptChanges([item('e1', ['s1'])], RECEIVED);
    expect(outcome?.notifications.map((n) => n.eventNumber)).toEqual([2]);
    expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => n.eventNumber)).toEqual([2]);
  });

  it('treats an event id past its TTL as new even before DynamoDB deletes it', async () => {
    const shortLived = new DynamoDbStore(client, prefix, { eventTtlMs: 60_000 });
    await shortLived.acceptChanges([item('e1', ['s1'])], RECEIVED);
    expect(await shortLived.acceptChanges([item('e1', ['s1'])], RECEIVED + 59_000)).toEqual([
      { duplicate: true, notifications: [] },
    ]);
    expect(await shortLived.acceptChanges([item('e1', ['s1'])], RECEIVED + 60_000)).toEqual([
      { duplicate: false, notifications: [{ subscriptionId: 's1', eventNumber: 2, change: change('e1', 'p1') }] },
    ]);
  });

  it('numbers concurrent acceptChanges calls on one store in call order', async () => {
    const [a, b] = await Promise.all([
      store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED),
      store.acceptChanges([item('e3', ['s1'])], RECEIVED),
    ]);
    expect([...(a ?? []), ...(b ?? [])].flatMap((o) => o.notifications.map((n) => n.eventNumber))).toEqual([1, 2, 3]);
  });

  it('keeps the sparse indexes to collecting subscriptions and pending notifications', async () => {
    const query = async (IndexName: string, TableName: string, key: string) => {
      const out = await client.send(
        new QueryCommand({
          TableName,
          IndexName,
          KeyConditionExpression: '#k = :v',
          ExpressionAttributeNames: { '#k': key },
          ExpressionAttributeValues: { ':v': { S: key === 'collectingOwner' ? 'alice' : 's1' } },
        }),
      );
      return (out.Items ?? []).length;
    };
    const collecting = () => query(INDEX.collectingByOwner, names().subscriptions, 'collectingOwner');
    const pending = () => query(INDEX.pending, names().notifications, 'pendingSubscriptionId');

    await store.acceptChanges([item('e1', ['s1']), item('e2', ['s1'])], RECEIVED);
    expect([await collecting(), await pending()]).toEqual([1, 2]);
    await store.recordDeliveries([{ subscriptionId: 's1', eventNumber: 1, state: 'dead', attempts: 1, dueAt: 0 }]);
    await store.updateStatus('s1', { status: 'off' }, RECEIVED.toString());
    expect([await collecting(), await pending()]).toEqual([0, 1]);
    await store.replaceSubscription(record('s1', { status: 'requested' }));
    await store.requeueDeadLetters('s1', RECEIVED);
    expect([await collecting(), await pending()]).toEqual([1, 2]);
  });

  it('keeps earlier versions in a ring of 10 items beside the subscription item, ignores a same-id one’s, removes them with it', async () => {
    const partition = async () => {
      const out = await client.send(
        new QueryCommand({
          TableName: names().subscriptionTypes,
          KeyConditionExpression: 'resourceType = :p',
          ExpressionAttributeValues: { ':p': { S: '#versions s1' } },
          ConsistentRead: true,
        }),
      );
      return (out.Items ?? []).map((i) => [i.subscriptionId?.S, i.updatedAt?.S]);
    };
    const at = (i: number) => new Date(Date.parse('2030-02-01T00:00:00.000Z') + i * 1000).toISOString();
    // s1 is there already (storePerTest).
    for (let i = 1; i <= EARLIER_VERSIONS_KEPT + 3; i++) {
      await store.updateStatus('s1', { status: i % 2 === 1 ? 'active' : 'error' }, at(i));
    }
    // 13 writes: 13 versions replaced, in 10 slots, the 3 oldest overwritten (no read, no prune).
    const slots = await partition();
    expect(slots).toHaveLength(EARLIER_VERSIONS_KEPT);
    expect(slots.find(([slot]) => slot === 'v0')?.[1]).toBe(at(10));
    expect(slots.find(([slot]) => slot === 'v3')?.[1]).toBe(at(3));
    const raw = await client.send(
      new QueryCommand({
        TableName: names().subscriptions,
        KeyConditionExpression: 'id = :id',
        ExpressionAttributeValues: { ':id': { S: 's1' } },
      }),
    );
    expect(raw.Items?.[0]?.versionsWritten).toEqual({ N: String(EARLIER_VERSIONS_KEPT + 3) });
    expect((await store.subscriptionVersions('s1')).map((v) => v.updatedAt)).toEqual(
      Array.from({ length: EARLIER_VERSIONS_KEPT }, (_, i) => at(EARLIER_VERSIONS_KEPT + 2 - i)),
    );

    // A delete that stopped before removing them: a new subscription under the id sees none of them.
    await client.send(new DeleteItemCommand({ TableName: names().subscriptions, Key: { id: { S: 's1' } } }));
    await store.insertSubscription(record('s1', { status: 'requested', createdAt: at(100), updatedAt: at(100) }));
    expect(await store.subscriptionVersions('s1')).toEqual([]);
    await store.updateStatus('s1', { status: 'active' }, at(101));
    expect(await store.subscriptionVersions('s1')).toEqual([
      { updatedAt: at(100), status: 'requested', resource: record('s1').resource },
    ]);
    expect(await store.deleteSubscription('s1')).toBe(true);
    expect(await partition()).toEqual([]);
  });

  it('finishes at the next purge a delete that stopped half-way, and a lease item written after a delete', async () => {
    const rows = async (subscriptionId: string) =>
      (await notificationItems(subscriptionId)).map((i) => Number(i.eventNumber?.N));
    for (const id of ['s2', 's3']) await store.insertSubscription(record(id));
    await store.acceptChanges([item('e1', ['s1', 's2']), item('e2', ['s1', 's2'])], RECEIVED);
    for (const id of ['s1', 's2']) await store.laneLeases.take(id, 'instance-a', RECEIVED, RECEIVED + 90_000);
    // s2: deleted by an instance that died before deleting its notifications (every batch write fails).
    const dying = new DynamoDbStore(
      {
        send: (command: { constructor: { name: string } }) =>
          command.constructor.name === 'BatchWriteItemCommand'
            ? Promise.reject(new Error('killed'))
            : client.send(command as never),
      } as unknown as DynamoDBClient,
      prefix,
    );
    await expect(dying.deleteSubscription('s2')).rejects.toThrow('killed');
    expect(await rows('s2')).toEqual([0, 1, 2]);
    // s3: deleted whole, then a lane that had not heard of it took its lease.
    expect(await store.deleteSubscription('s3')).toBe(true);
    await store.laneLeases.take('s3', 'instance-b', RECEIVED, RECEIVED + 90_000);
    expect(await rows('s3')).toEqual([0]);

    // Nothing past the window: the lease items lead to both, and s2's pending rows go too.
    expect(await store.purge(RECEIVED - 1)).toEqual({ notifications: 2, eventIds: 0 });
    expect(await rows('s2')).toEqual([]);
    expect(await rows('s3')).toEqual([]);
    // s1 is untouched: its pending rows wait for delivery, its lease stays.
    expect(await rows('s1')).toEqual([0, 1, 2]);
    expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 0, eventIds: 2 });
    expect(await rows('s1')).toEqual([0, 1, 2]);
  });

  describe('candidatesFor (the subscription-types index)', () => {
    const candidates = async (type: string) =>
      [...(await store.candidatesFor(type))].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const patient = { resourceTypes: ['Patient'], interactions: ['create', 'update', 'delete'] } as const;
    const indexItems = async () => {
      const out = await client.send(new ScanCommand({ TableName: names().subscriptionTypes, ConsistentRead: true }));
      // The owners' subscription counts (partition `#owner`) and earlier versions (`#versions <id>`)
      // share the table: not index items.
      return (out.Items ?? [])
        .filter((i) => i.resourceType?.S !== '#owner' && !i.resourceType?.S?.startsWith('#versions '))
        .map((i) => `${i.resourceType?.S}/${i.subscriptionId?.S}`)
        .sort();
    };

    it('returns the collecting subscriptions of a type and those on every type, with match and end', async () => {
      const end = '2031-01-01T00:00:00.000Z';
      const any = { resourceTypes: '*', interactions: ['create'] } as const;
      const both = { resourceTypes: ['Patient', 'Observation', 'Patient'], interactions: ['update'] } as const;
      await store.insertSubscription(record('s2', { match: any, end, status: 'requested' }));
      await store.insertSubscription(record('s3', { match: both, status: 'error', error: 'x' }));
      await store.insertSubscription(record('s4', { status: 'off' }));
      expect(await candidates('Patient')).toEqual([
        { id: 's1', match: patient },
        { id: 's2', match: any, end },
        { id: 's3', match: both },
      ]);
      expect(await candidates('Observation')).toEqual([
        { id: 's2', match: any, end },
        { id: 's3', match: both },
      ]);
      expect(await candidates('Encounter')).toEqual([{ id: 's2', match: any, end }]);
      expect(await indexItems()).toEqual(['*/s2', 'Observation/s3', 'Patient/s1', 'Patient/s3']);
    });

    it('drops a subscription that stops collecting or is deleted, and takes it back when it collects again', async () => {
      await store.insertSubscription(record('s2'));
      await store.updateStatus('s1', { status: 'off' }, '2030-03-01T00:00:00.000Z');
      expect((await candidates('Patient')).map((c) => c.id)).toEqual(['s2']);
      await store.updateStatus('s1', { status: 'requested' }, '2030-03-02T00:00:00.000Z');
      await store.updateStatus('s1', { status: 'active', expected: ['requested'] }, '2030-03-03T00:00:00.000Z');
      expect((await candidates('Patient')).map((c) => c.id)).toEqual(['s1', 's2']);
      expect(await store.deleteSubscription('s2')).toBe(true);
      await store.replaceSubscription(record('s1', { status: 'off' }));
      expect(await candidates('Patient')).toEqual([]);
      expect(await indexItems()).toEqual([]);
    });

    it('moves a subscription when a replace changes its types or end, and not when its CAS fails', async () => {
      const observation = { resourceTypes: ['Observation'], interactions: ['create'] } as const;
      const end = '2031-01-01T00:00:00.000Z';
      const replaced = await store.replaceSubscription(
        record('s1', { match: observation, end, updatedAt: '2030-03-01T00:00:00.000Z' }),
        { status: 'active', updatedAt: record('s1').updatedAt },
      );
      expect(replaced?.match).toEqual(observation);
      expect(await candidates('Patient')).toEqual([]);
      expect(await candidates('Observation')).toEqual([{ id: 's1', match: observation, end }]);
      // A stale compare-and-set changes neither the subscription nor the index.
      expect(
        await store.replaceSubscription(record('s1'), { status: 'active', updatedAt: record('s1').updatedAt }),
      ).toBeUndefined();
      expect(await indexItems()).toEqual(['Observation/s1']);
      // A status change that keeps it collecting keeps its item.
      await store.updateStatus('s1', { status: 'error', error: 'x' }, '2030-03-02T00:00:00.000Z');
      expect(await candidates('Observation')).toEqual([{ id: 's1', match: observation, end }]);
    });

    it('is filled once from the subscriptions of tables written before it existed', async () => {
      await store.insertSubscription(record('s2', { status: 'off' }));
      // As an older version left it: subscriptions, no type index items.
      await client.send(
        new DeleteItemCommand({
          TableName: names().subscriptionTypes,
          Key: { resourceType: { S: 'Patient' }, subscriptionId: { S: 's1' } },
        }),
      );
      expect(await candidates('Patient')).toEqual([]);
      expect(await store.ensureTypeIndex()).toBe(1);
      expect(await candidates('Patient')).toEqual([{ id: 's1', match: patient }]);
      expect(await indexItems()).toEqual(['#index/#built', 'Patient/s1']);
      // Built: later starts only read the marker.
      await store.updateStatus('s1', { status: 'off' }, '2030-03-01T00:00:00.000Z');
      expect(await store.ensureTypeIndex()).toBe(0);
      expect(await candidates('Patient')).toEqual([]);
    });

    it(`stores the most a Subscription may watch (${MAX_RESOURCE_TYPES} types, a match near the size cap) and moves it to ${MAX_RESOURCE_TYPES} others, one transaction each`, async () => {
      // About the largest match the parser lets through at the type cap: short ids make a match
      // half as large again as the filters, here 64 KiB from 44 KB.
      const topics = loadTopicCatalog('subscriptions/topics');
      const ids = Array.from({ length: 11_000 }, (_, i) => i.toString(36)).join(',');
      const spec = (types: readonly string[]) =>
        parseSubscription(
          {
            resourceType: 'Subscription',
            reason: 'test',
            criteria: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/resource-change',
            _criteria: {
              extension: [`_type=${types.join(',')}`, `_id=${ids}`].map((valueString) => ({
                url: BACKPORT_EXT.filterCriteria,
                valueString,
              })),
            },
            channel: { type: 'rest-hook', endpoint: 'https://hooks.example.com/x' },
          },
          topics,
        );
      const all = [...R4_RESOURCE_TYPES].slice(0, 2 * MAX_RESOURCE_TYPES);
      const [before, after] = [all.slice(0, MAX_RESOURCE_TYPES), all.slice(MAX_RESOURCE_TYPES)];
      const [first, second] = [spec(before), spec(after)];
      expect(JSON.stringify(second.match).length).toBeGreaterThan(65_000);
      const transactions: number[] = [];
      const counting = {
        send: (command: Parameters<DynamoDBClient['send']>[0]) => {
          if (command instanceof TransactWriteItemsCommand) transactions.push(command.input.TransactItems?.length ?? 0);
          return client.send(command);
        },
      } as unknown as DynamoDBClient;
      const watching = async () => {
        const found: string[] = [];
        for (const type of all) if ((await candidates(type)).some((c) => c.id === 's2')) found.push(type);
        return found;
      };
      const counted = new DynamoDbStore(counting, prefix);

      await counted.insertSubscription(record('s2', { match: first.match, resource: first.resource }));
      expect(await watching()).toEqual(before);
      const replaced = await counted.replaceSubscription(
        record('s2', { match: second.match, resource: second.resource }),
      );
      expect(replaced?.match).toEqual(second.match);
      expect(await watching()).toEqual(after);
      expect(await candidates(after[0] as string)).toEqual([{ id: 's2', match: second.match }]);
      // The subscription, its owner's count and 40 types; then the subscription, the version it
      // replaced, 40 out and 40 in.
      expect(transactions).toEqual([42, 82]);
    });

    it('reads and plans again when the subscription changed between its read and its write', async () => {
      // A client that lets the broker switch s1 off just before the replace's transaction is sent.
      let raced = 0;
      const racing = {
        send: async (command: Parameters<DynamoDBClient['send']>[0]) => {
          if (raced % 2 === 0 && command instanceof TransactWriteItemsCommand) {
            raced++;
            await store.updateStatus('s1', { status: 'off' }, `2030-03-01T00:00:0${raced}.000Z`);
          }
          return client.send(command);
        },
      } as unknown as DynamoDBClient;
      const observation = { resourceTypes: ['Observation'], interactions: ['create'] } as const;
      const next = record('s1', { match: observation, updatedAt: '2030-03-02T00:00:00.000Z' });
      const seen = { status: 'active', updatedAt: record('s1').updatedAt } as const;
      expect(await new DynamoDbStore(racing, prefix).replaceSubscription(next, seen)).toBeUndefined();
      expect(raced).toBe(1);
      expect((await store.getSubscription('s1'))?.status).toBe('off');
      expect(await indexItems()).toEqual([]);
      // Without an expectation the replace applies to what is there now, index included.
      raced = 2;
      const replaced = await new DynamoDbStore(racing, prefix).replaceSubscription(next);
      expect(raced).toBe(3);
      expect([replaced?.status, replaced?.match]).toEqual(['active', observation]);
      expect(await indexItems()).toEqual(['Observation/s1']);
    });
  });
});

describe("a full-resource notification's resource item", () => {
  const json = JSON.stringify({ resourceType: 'Patient', id: 'p1', name: [{ text: 'Zoë' }] });
  const withResource = { ...change('e1', 'p1'), resource: json };
  /** e1 for s1 (with the resource) and s2 (without), e2 for s1 (without). */
  const accept = async () => {
    await store.insertSubscription(record('s2'));
    await store.acceptChanges(
      [{ ...item('e1', ['s1', 's2']), resource: { json, for: new Set(['s1']) } }, item('e2', ['s1'])],
      RECEIVED,
    );
  };
  /** Every item of the subscription's partition: event number and attribute names. */
  const partition = async (subscriptionId: string) =>
    (await notificationItems(subscriptionId)).map((i) => [Number(i.eventNumber?.N), Object.keys(i).sort()]);
  const delivered = (eventNumber: number, subscriptionId = 's1') => ({
    subscriptionId,
    eventNumber,
    state: 'delivered' as const,
    attempts: 1,
    dueAt: RECEIVED,
  });

  it('is written beside its notification, at the number negated, and never copied into the pending index', async () => {
    await accept();
    const notification = ['attempts', 'change', 'createdAt', 'dueAt', 'eventNumber', 'pendingSubscriptionId'];
    expect(await partition('s1')).toEqual([
      [-1, ['createdAt', 'eventNumber', 'resource', 'state', 'subscriptionId']],
      [1, [...notification, 'resourceBytes', 'state', 'subscriptionId'].sort()],
      [2, [...notification, 'state', 'subscriptionId'].sort()],
    ]);
    expect(await partition('s2')).toEqual([[1, [...notification, 'state', 'subscriptionId'].sort()]]);
    const indexed = await client.send(new ScanCommand({ TableName: names().notifications, IndexName: INDEX.pending }));
    expect(indexed.Items?.map((i) => [i.subscriptionId?.S, Number(i.eventNumber?.N), i.resource?.S])).toEqual(
      expect.arrayContaining([
        ['s1', 1, undefined],
        ['s1', 2, undefined],
        ['s2', 1, undefined],
      ]),
    );
    expect(indexed.Items).toHaveLength(3);
    const first = await client.send(
      new GetItemCommand({
        TableName: names().notifications,
        Key: { subscriptionId: { S: 's1' }, eventNumber: { N: '1' } },
      }),
    );
    expect(first.Item?.resourceBytes?.N).toBe(String(Buffer.byteLength(json)));
  });

  it('is read with its notification by every read that sends or answers one', async () => {
    await accept();
    const changes = (notes: readonly { change: unknown }[]) => notes.map((n) => n.change);
    expect(changes(await store.pendingNotifications('s1', 0, 10))).toEqual([withResource, change('e2', 'p1')]);
    expect(changes(await store.notificationsInRange('s1', 1, 2, 10))).toEqual([withResource, change('e2', 'p1')]);
    expect(changes((await store.laneLeases.read('s1', 0, 10, RECEIVED)).notes)).toEqual([
      withResource,
      change('e2', 'p1'),
    ]);
    expect(changes(await store.pendingNotifications('s2', 0, 10))).toEqual([change('e1', 'p1')]);
    // A retry of a half-done acceptance (the event's key never written) hands on the queued one, resource included.
    await client.send(
      new DeleteItemCommand({ TableName: names().eventIds, Key: { eventId: { S: 'e1' }, scope: { S: '#event' } } }),
    );
    const [again] = await store.acceptChanges(
      [{ ...item('e1', ['s1', 's2']), resource: { json, for: new Set(['s1']) } }],
      RECEIVED + 1,
    );
    expect(again?.notifications).toEqual([
      { subscriptionId: 's1', eventNumber: 1, change: withResource },
      { subscriptionId: 's2', eventNumber: 1, change: change('e1', 'p1') },
    ]);
    // Dead-lettered and re-queued, it still has it.
    await store.recordDeliveries([{ ...delivered(1), state: 'dead', lastError: 'HTTP 500' }]);
    expect(await store.requeueDeadLetters('s1', RECEIVED + 2)).toBe(1);
    await store.requeueSettled('s1', RECEIVED + 2);
    expect(changes(await store.pendingNotifications('s1', 0, 1))).toEqual([withResource]);
  });

  it('has a state no purge or re-queue takes: a broker from before resource items (a rollback) purges past it', async () => {
    await accept();
    await store.recordDeliveries([delivered(1), delivered(2)]);
    // The previous release's purge reads `state` of every item its scan finds but the lease item,
    // and deletes those delivered, dead or void; its re-queue reads dead and pending ones.
    const scanned = await client.send(
      new ScanCommand({
        TableName: names().notifications,
        ConsistentRead: true,
        FilterExpression: 'createdAt < :before AND eventNumber <> :lane',
        ExpressionAttributeValues: { ':before': { N: String(RECEIVED + 1) }, ':lane': { N: '0' } },
      }),
    );
    expect(
      scanned.Items?.map((i) => [i.subscriptionId?.S, Number(i.eventNumber?.N), i.state?.S]).sort((a, b) =>
        `${a[0]}${a[1]}`.localeCompare(`${b[0]}${b[1]}`),
      ),
    ).toEqual([
      ['s1', -1, 'resource'],
      ['s1', 1, 'delivered'],
      ['s1', 2, 'delivered'],
      ['s2', 1, 'pending'],
    ]);
  });

  it('still reads a resource written on the notification item itself (before resource items)', async () => {
    const bare = { ...change('e9', 'p9') };
    await client.send(
      new PutItemCommand({
        TableName: names().notifications,
        Item: {
          subscriptionId: { S: 's1' },
          eventNumber: { N: '1' },
          change: { S: JSON.stringify(bare) },
          resource: { S: json },
          state: { S: 'pending' },
          attempts: { N: '0' },
          dueAt: { N: String(RECEIVED) },
          createdAt: { N: String(RECEIVED) },
          pendingSubscriptionId: { S: 's1' },
        },
      }),
    );
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.change)).toEqual([{ ...bare, resource: json }]);
  });

  it('goes with its notification: the purge, an orphan a stopped purge left, the subscription delete', async () => {
    await accept();
    // Pending past the window: both stay.
    expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 0, eventIds: 2 });
    expect((await partition('s1')).map(([n]) => n)).toEqual([-1, 1, 2]);
    // Delivered: the notification and its resource go, and are counted as one.
    await store.recordDeliveries([delivered(1), delivered(2)]);
    expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 2, eventIds: 0 });
    expect(await partition('s1')).toEqual([]);

    // A purge that stopped between the two deletes left a resource item alone: the next takes it.
    await store.acceptChanges([{ ...item('e3', ['s1']), resource: { json, for: new Set(['s1']) } }], RECEIVED);
    await client.send(
      new DeleteItemCommand({
        TableName: names().notifications,
        Key: { subscriptionId: { S: 's1' }, eventNumber: { N: '3' } },
      }),
    );
    expect(await store.purge(RECEIVED - 1)).toEqual({ notifications: 0, eventIds: 0 });
    expect((await partition('s1')).map(([n]) => n)).toEqual([-3]);
    expect(await store.purge(RECEIVED + 1)).toEqual({ notifications: 0, eventIds: 1 });
    expect(await partition('s1')).toEqual([]);

    // Deleting the subscription deletes its resource items, counted as nothing.
    await store.acceptChanges([{ ...item('e4', ['s1']), resource: { json, for: new Set(['s1']) } }], RECEIVED);
    expect((await partition('s1')).map(([n]) => n)).toEqual([-4, 4]);
    expect(await store.deleteSubscription('s1')).toBe(true);
    expect(await partition('s1')).toEqual([]);
  });
});

describe('DynamoDbBindings', () => {
  it('knows a connection’s owner at once, and forgets all of its bindings (more than a batch) on disconnect', async () => {
    const bindings = new DynamoDbBindings({ client, tablePrefix: prefix });
    await bindings.connect('conn-a', 'alice');
    expect(await bindings.ownerOf('conn-a')).toBe('alice');
    const subs = Array.from({ length: 60 }, (_, i) => `sub-${i}`);
    for (const subscriptionId of subs) await bindings.bind({ connectionId: 'conn-a', subscriptionId, mode: 'bundle' });
    await bindings.bind({ connectionId: 'conn-b', subscriptionId: 'sub-0', mode: 'r4' });
    expect((await bindings.bindingsOf('conn-a')).map((b) => b.subscriptionId).sort()).toEqual([...subs].sort());
    expect((await bindings.bindingsFor('sub-0')).map((b) => b.connectionId).sort()).toEqual(['conn-a', 'conn-b']);

    await bindings.unbind('conn-a');
    expect(await bindings.bindingsOf('conn-a')).toEqual([]);
    expect(await bindings.ownerOf('conn-a')).toBeUndefined();
    expect(await bindings.bindingsFor('sub-0')).toEqual([
      { connectionId: 'conn-b', subscriptionId: 'sub-0', mode: 'r4' },
    ]);
  });
});

describe('the per-owner quota', () => {
  const countItems = async () => {
    const out = await client.send(
      new QueryCommand({
        TableName: names().subscriptionTypes,
        ConsistentRead: true,
        KeyConditionExpression: 'resourceType = :o',
        ExpressionAttributeValues: { ':o': { S: '#owner' } },
      }),
    );
    // `#counted`: the marker that every owner of an older table was counted.
    return Object.fromEntries(
      (out.Items ?? [])
        .filter((i) => i.subscriptionId?.S !== '#counted')
        .map((i) => [i.subscriptionId?.S, Number(i.held?.N)]),
    );
  };

  it('holds across instances: creates racing on two stores never pass it', async () => {
    const other = new DynamoDbStore(client, prefix);
    const ids = Array.from({ length: 12 }, (_, i) => `r${i}`);
    const results = await Promise.all(
      ids.map((id, i) => (i % 2 === 0 ? store : other).insertSubscription(record(id, { owner: 'racer' }), 4)),
    );
    expect(results.filter(Boolean)).toHaveLength(4);
    expect(await store.listSubscriptions('racer')).toHaveLength(4);
    expect((await countItems()).racer).toBe(4);
    await other.close();
  });

  it("deletes one client's subscriptions in parallel, all of them, and its count follows", async () => {
    const ids = Array.from({ length: 40 }, (_, i) => `p${i}`);
    for (const id of ids) expect(await store.insertSubscription(record(id, { owner: 'parallel' }), 100)).toBe(true);
    expect((await store.acceptChanges([item('e-parallel', ids)], RECEIVED))[0]?.notifications).toHaveLength(40);
    const results = await Promise.allSettled(ids.map((id) => store.deleteSubscription(id)));
    expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
    expect(await store.listSubscriptions('parallel')).toEqual([]);
    expect((await countItems()).parallel).toBe(0);
    for (const id of ids.slice(0, 5)) expect(await store.pendingNotifications(id, 0, 10)).toEqual([]);
  });

  it('counts the subscriptions of tables written before the counts existed, exactly, once', async () => {
    await store.insertSubscription(record('s2'));
    await store.insertSubscription(record('b1', { owner: 'bob' }));
    // As an older version left it: alice's s1 and s2, bob's b1, no count items and no marker.
    const remove = (resourceType: string, subscriptionId: string) =>
      client.send(
        new DeleteItemCommand({
          TableName: names().subscriptionTypes,
          Key: { resourceType: { S: resourceType }, subscriptionId: { S: subscriptionId } },
        }),
      );
    await remove('#owner', 'alice');
    await remove('#owner', 'bob');
    await remove('#owner', '#counted');
    expect(await countItems()).toEqual({});
    // The first create counts every owner, then goes by its own count.
    expect(await store.insertSubscription(record('s3'), 3)).toBe(true);
    expect(await countItems()).toEqual({ alice: 3, bob: 1 });
    expect(await store.insertSubscription(record('s4'), 3)).toBe(false);
    expect(await store.insertSubscription(record('b2', { owner: 'bob' }), 2)).toBe(true);
    expect(await store.insertSubscription(record('b3', { owner: 'bob' }), 2)).toBe(false);
    // Done once: later calls only read the marker; a new owner starts at 0; deletes give places back.
    expect(await store.ensureOwnerCounts()).toBe(-1);
    expect(await store.insertSubscription(record('c1', { owner: 'carol' }), 1)).toBe(true);
    expect(await store.insertSubscription(record('c2', { owner: 'carol' }), 1)).toBe(false);
    expect(await store.deleteSubscription('b1')).toBe(true);
    expect(await countItems()).toEqual({ alice: 3, bob: 1, carol: 1 });
  });

  it('counts older tables right when the first writes race on two instances', async () => {
    await store.insertSubscription(record('s2'));
    await client.send(
      new DeleteItemCommand({
        TableName: names().subscriptionTypes,
        Key: { resourceType: { S: '#owner' }, subscriptionId: { S: 'alice' } },
      }),
    );
    await client.send(
      new DeleteItemCommand({
        TableName: names().subscriptionTypes,
        Key: { resourceType: { S: '#owner' }, subscriptionId: { S: '#counted' } },
      }),
    );
    const other = new DynamoDbStore(client, prefix);
    const results = await Promise.all([
      store.insertSubscription(record('x1'), 4),
      other.insertSubscription(record('x2'), 4),
      store.deleteSubscription('s1'),
      other.insertSubscription(record('x3'), 4),
      store.insertSubscription(record('x4'), 4),
    ]);
    const held = (await store.listSubscriptions('alice')).length;
    expect(held).toBeLessThanOrEqual(4);
    expect(results.filter((r) => r === true).length - 1).toBe(held - 1);
    expect(await countItems()).toEqual({ alice: held });
    await other.close();
  });
});

describe('acceptChanges under throttling and concurrent duplicates', () => {
  /** A client whose TransactWriteItems calls go through `before` first (DynamoDB Local never throttles). */
  const withTransactHook = (before: (n: number) => Promise<void>): DynamoDBClient => {
    let n = 0;
    return {
      send: async (command: Parameters<DynamoDBClient['send']>[0]) => {
        if (command instanceof TransactWriteItemsCommand) await before(++n);
        return client.send(command);
      },
    } as unknown as DynamoDBClient;
  };

  it('tries a transaction cancelled by throttling again, so the event keeps the number it took', async () => {
    const throttledOnce = withTransactHook(async (n) => {
      if (n > 1) return;
      // What DynamoDB answers when one item's partition or index is throttled.
      throw new TransactionCanceledException({
        message: 'Transaction cancelled [None, ThrottlingError, None]',
        $metadata: { httpStatusCode: 400 },
        CancellationReasons: [{ Code: 'None' }, { Code: 'ThrottlingError' }, { Code: 'None' }],
      });
    });
    const outcomes = await new DynamoDbStore(throttledOnce, prefix).acceptChanges([item('e1', ['s1'])], RECEIVED);
    expect(outcomes.map((o) => o.notifications.map((n) => n.eventNumber))).toEqual([[1]]);
    expect((await store.getSubscription('s1'))?.eventsSinceStart).toBe(1);
    expect((await store.notificationsInRange('s1', 1, 10, 10)).map((n) => n.eventNumber)).toEqual([1]);
  });

  it('accepts an event delivered twice at the same moment once: the other copy is a duplicate', async () => {
    // Both copies read "not seen"; one's transaction lands later.
    const slower = new DynamoDbStore(
      withTransactHook(() => new Promise((resolve) => setTimeout(resolve, 200))),
      prefix,
    );
    const outcomes = await Promise.all([
      slower.acceptChanges([item('twice', ['s1'])], RECEIVED),
      store.acceptChanges([item('twice', ['s1'])], RECEIVED),
    ]);
    const flat = outcomes.flat();
    expect(flat.map((o) => o.duplicate).sort()).toEqual([false, true]);
    expect(flat.flatMap((o) => o.notifications)).toHaveLength(1);
    expect((await store.notificationsInRange('s1', 1, 10, 10)).map((n) => n.state)).toEqual(['pending']);
  });
});

it('answers a write that kept conflicting as 409 CONFLICT at the HTTP edge (the client may try again)', () => {
  const { status, body } = outcomeOf(new WriteConflictError('writing subscription s1', 6));
  expect(status).toBe(409);
  expect(JSON.stringify(body)).toContain('still conflicting after 6 attempts; try again');
});
