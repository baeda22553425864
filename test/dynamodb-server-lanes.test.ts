import { randomUUID } from 'node:crypto';
import { PutItemCommand, UpdateItemCommand } from '@aws-sdk/client-dynamodb';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { BACKPORT_EXT } from '../src/core/fhir-urls.js';
import { operationOutcome } from '../src/http/outcome.js';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { ensureTables, tableNames } from '../src/store/dynamodb/tables.js';
import { type DynamoDbLocal, startDynamoDbLocal } from './support/dynamodb-local.js';
import { eventLike, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { change } from './support/store-fixtures.js';

/**
 * The broker as a server on the DynamoDB store (BROKER_STORE=dynamodb, several instances may share
 * the tables): no scheduled run comes by, so a lane that stopped below a number another instance
 * took but never wrote must come back by itself once that number may be voided.
 */

let local: DynamoDbLocal;
let receiver: Receiver;
let t: TestBroker | undefined;

beforeAll(async () => {
  local = await startDynamoDbLocal();
  receiver = await Receiver.start();
});
afterEach(async () => {
  await t?.broker.close(0);
  t = undefined;
});
afterAll(async () => {
  await receiver?.close();
  await local?.stop();
});

it('a lane waiting below a number whose acceptance died reads again once it may be voided, and sends', async () => {
  const prefix = `server-lanes-${randomUUID().slice(0, 8)}-`;
  await ensureTables(local.client, prefix);
  t = await inProcessBroker({}, { store: new DynamoDbStore(local.client, prefix, { voidAfterMs: 1_000 }) });
  const sub = await t.create(
    topicSubscription('patient-change', `${receiver.url}/wait`, { filters: ['Patient?_id=w-p'] }),
  );
  const id = sub.id as string;
  await t.logger.waitForStatus(id, 'active');
  // An acceptance elsewhere took number 1, and its process died before writing the notification.
  await local.client.send(
    new UpdateItemCommand({
      TableName: tableNames(prefix).subscriptions,
      Key: { id: { S: id } },
      UpdateExpression: 'ADD eventsSinceStart :one',
      ExpressionAttributeValues: { ':one': { N: '1' } },
    }),
  );
  const notified = () =>
    notifiedNumbers(receiver.arrived.filter((r) => r.path === '/wait' && r.body.includes('"event-notification"')));
  await t.post([eventLike('healthlake-update-patient', randomUUID(), 'w-p')]);
  // Number 2 waits behind 1 ...
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(notified()).toEqual([]);
  // ... until 1 may be voided (1 s here, 30 s by default): then it goes, with nothing else to wake it.
  await receiver.waitFor(() => notified().length === 1, 'notification 2', 10_000);
  expect(notified()).toEqual([2]);
});

/** The lease of subscription `id`'s lane, held until `until` by an instance that died (watermark 0, epoch 0). */
function deadHoldersLease(prefix: string, id: string, until: number): PutItemCommand {
  return new PutItemCommand({
    TableName: tableNames(prefix).notifications,
    Item: {
      subscriptionId: { S: id },
      eventNumber: { N: '0' },
      laneHolder: { S: 'a-dead-instance' },
      laneUntil: { N: String(until) },
      laneThrough: { N: '0' },
      laneEpoch: { N: '0' },
    },
  });
}

it('a lane held by an instance that died is taken over once its lease runs out, with nothing else to wake it', async () => {
  const prefix = `server-lanes-${randomUUID().slice(0, 8)}-`;
  await ensureTables(local.client, prefix);
  t = await inProcessBroker({}, { store: new DynamoDbStore(local.client, prefix) });
  const sub = await t.create(
    topicSubscription('patient-change', `${receiver.url}/dead`, { filters: ['Patient?_id=d-p'] }),
  );
  const id = sub.id as string;
  await t.logger.waitForStatus(id, 'active');
  // Another instance holds the lane for 1.5 s more, and has died: it will neither read again nor let go.
  await local.client.send(deadHoldersLease(prefix, id, Date.now() + 1_500));
  const notified = () =>
    notifiedNumbers(receiver.arrived.filter((r) => r.path === '/dead' && r.body.includes('"event-notification"')));
  await t.post([eventLike('healthlake-update-patient', randomUUID(), 'd-p')]);
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(notified()).toEqual([]);
  // Once the lease ran out, this instance's lane takes it and sends.
  await receiver.waitFor(() => notified().length === 1, 'notification 1', 10_000);
  expect(notified()).toEqual([1]);
});

/**
 * A broker on fresh tables (also `t`, for the clean-up) with one active subscription at `path` for the patients `ids`,
 * up to five events per bundle: its id and tables' prefix.
 */
async function bundledSubscription(
  path: string,
  ids: string,
  env: Record<string, string> = {},
): Promise<{ broker: TestBroker; id: string; prefix: string }> {
  const prefix = `server-lanes-${randomUUID().slice(0, 8)}-`;
  await ensureTables(local.client, prefix);
  const broker = await inProcessBroker(env, { store: new DynamoDbStore(local.client, prefix) });
  t = broker;
  const sub = await broker.create(
    topicSubscription('patient-change', `${receiver.url}${path}`, {
      filters: [`Patient?_id=${ids}`],
      channel: { extension: [{ url: BACKPORT_EXT.maxCount, valuePositiveInt: 5 }] },
    }),
  );
  const id = sub.id as string;
  await broker.logger.waitForStatus(id, 'active');
  // The lane the activation woke has read (nothing yet): a test that writes notifications to the
  // store itself is not raced by that read (which took them, and marked their bundles, first).
  await broker.broker.dispatcher.idle(5_000);
  return { broker, id, prefix };
}

it('a bundle the instance that died sent goes out as it was from the instance that takes its lane over', async () => {
  const { broker: b, id, prefix } = await bundledSubscription('/taken', 't1,t2,t3,t4,t5');
  // Another instance holds the lane: it sent events 1–2 as one bundle (stored where it ends, before
  // the attempt) and died with the attempt unrecorded.
  await local.client.send(deadHoldersLease(prefix, id, Date.now() + 60_000));
  await b.post([1, 2, 3, 4].map((n) => eventLike('healthlake-update-patient', randomUUID(), `t${n}`)));
  expect(await b.broker.store.markBundles([{ subscriptionId: id, eventNumber: 1, last: 2 }])).toEqual([true]);
  // Its lease runs out in 1.5 s; a fifth event wakes this instance's lane, which takes it then.
  await local.client.send(deadHoldersLease(prefix, id, Date.now() + 1_500));
  await b.post([eventLike('healthlake-update-patient', randomUUID(), 't5')]);
  const arrivals = () => receiver.arrived.filter((r) => r.path === '/taken' && r.body.includes('"event-notification"'));
  await receiver.waitFor(() => notifiedNumbers(arrivals()).length >= 5, 'the five, once the lease ran out', 10_000);
  // Not `1-5`: the endpoint may have processed 1–2 already, and deduplicates on the id.
  expect(arrivals().map((r) => [String(r.headers['webhook-id']), notifiedNumbers([r]).join(',')])).toEqual([
    [`${id}-1-2`, '1,2'],
    [`${id}-3-5`, '3,4,5'],
  ]);
});

it('dead-letters a marked bundle resent in part (the rest recorded delivered before a death), and says so', async () => {
  const { broker: b, id } = await bundledSubscription('/gaps', 'g', { BROKER_RETRY_DELAYS: '50ms' });
  const isEvent = (r: { path: string; body: string }) => r.path === '/gaps' && r.body.includes('"event-notification"');
  const answer = receiver.respond;
  receiver.respond = (req) => (isEvent(req) ? { status: 500 } : answer(req));
  try {
    // An instance sent 1–5 as one bundle, and died writing its states: 2–4 recorded delivered, 1 and 5 not.
    const store = b.broker.store;
    await store.acceptChanges(
      [1, 2, 3, 4, 5].map((n) => ({ change: change(`gaps-${n}-${randomUUID()}`, 'g'), subscriptionIds: [id] })),
      Date.now(),
    );
    expect(await store.markBundles([{ subscriptionId: id, eventNumber: 1, last: 5 }])).toEqual([true]);
    await store.recordDeliveries(
      [2, 3, 4].map((eventNumber) => ({ subscriptionId: id, eventNumber, state: 'delivered', attempts: 1, dueAt: 0 })),
    );
    // This instance's scheduled run finds the rest, and the endpoint now fails for good.
    await b.broker.dispatcher.start();
    await b.logger.waitForStatus(id, 'error', 10_000);
  } finally {
    receiver.respond = answer;
  }
  // Under the bundle's id, twice (the attempt and its one retry), then dead-lettered: counted and told.
  expect(
    receiver.arrived.filter(isEvent).map((r) => [String(r.headers['webhook-id']), notifiedNumbers([r]).join(',')]),
  ).toEqual([
    [`${id}-1-5`, '1,5'],
    [`${id}-1-5`, '1,5'],
  ]);
  expect(b.broker.metrics.value('broker_notifications_total', { outcome: 'dead-lettered' })).toBe(2);
  expect((await b.broker.store.notificationsInRange(id, 1, 5, 5)).map((n) => n.state)).toEqual([
    'dead',
    'delivered',
    'delivered',
    'delivered',
    'dead',
  ]);
});

it('serves the create’s version after the handshake by vread and _history on DynamoDB too', async () => {
  const prefix = `server-versions-${randomUUID().slice(0, 8)}-`;
  await ensureTables(local.client, prefix);
  t = await inProcessBroker({}, { store: new DynamoDbStore(local.client, prefix) });
  const sub = await t.create(
    topicSubscription('patient-change', `${receiver.url}/versions`, { filters: ['Patient?_id=v-p'] }),
  );
  const id = sub.id as string;
  const created = String((sub.meta as Record<string, unknown>).versionId);
  await t.logger.waitForStatus(id, 'active');
  const now = await t.call('GET', `/fhir/Subscription/${id}`);
  const current = String((now.body.meta as Record<string, unknown>).versionId);
  expect(current).not.toBe(created);
  const read = await t.call('GET', `/fhir/Subscription/${id}/_history/${current}`);
  expect([read.status, read.body]).toEqual([200, now.body]);
  const earlier = await t.call('GET', `/fhir/Subscription/${id}/_history/${created}`);
  expect([earlier.status, earlier.body.status, (earlier.body.meta as Record<string, unknown>).versionId]).toEqual([
    200,
    'requested',
    created,
  ]);
  const history = await t.call('GET', `/fhir/Subscription/${id}/_history`);
  const entries = history.body.entry as { resource: Record<string, unknown>; request: { method: string } }[];
  expect([history.body.total, entries.map((e) => [e.resource.status, e.request.method])]).toEqual([
    2,
    [
      ['active', 'PUT'],
      ['requested', 'POST'],
    ],
  ]);
  const unknown = await t.call('GET', `/fhir/Subscription/${id}/_history/1`);
  expect([unknown.status, unknown.body]).toEqual([
    404,
    operationOutcome(
      'NOT_FOUND',
      `Subscription/${id}/_history/1 not found: the broker keeps the current version of a Subscription and the last 10 before it`,
    ),
  ]);
});

it('keeps a pause an origin asked for in the store: another instance does not send the held notification before it ends', async () => {
  const prefix = `server-pause-${randomUUID().slice(0, 8)}-`;
  await ensureTables(local.client, prefix);
  const retries = { BROKER_RETRY_DELAYS: '20ms,20ms,20ms' };
  t = await inProcessBroker(retries, { store: new DynamoDbStore(local.client, prefix) });
  const other = await inProcessBroker(retries, { store: new DynamoDbStore(local.client, prefix) });
  try {
    const at = (path: string, id: string) =>
      t?.create(topicSubscription('patient-change', `${receiver.url}${path}`, { filters: [`Patient?_id=${id}`] }));
    const limited = (await at('/limited', 'l-p')) as Record<string, unknown>;
    const neighbour = (await at('/neighbour', 'n-p')) as Record<string, unknown>;
    for (const sub of [limited, neighbour]) await t.logger.waitForStatus(sub.id as string, 'active');
    const notified = (path: string) =>
      receiver.arrived.filter((r) => r.path === path && r.body.includes('"event-notification"'));
    receiver.answerOnce((r) => r.path === '/limited' && r.body.includes('"event-notification"'), {
      status: 429,
      headers: { 'retry-after': '3' },
    });
    await t.post([eventLike('healthlake-update-patient', randomUUID(), 'l-p')]);
    await t.logger.waitFor((r) => r.msg === 'endpoint origin asked for a pause', 'the pause');
    const refusedAt = Date.now();
    // This instance holds the neighbour's notification 1 and writes it due when the pause ends ...
    await t.post([eventLike('healthlake-update-patient', randomUUID(), 'n-p')]);
    await new Promise((resolve) => setTimeout(resolve, 300));
    // ... so the other instance, which never saw the 429, accepting notification 2 reads 1 as not due yet.
    await other.post([eventLike('healthlake-update-patient', randomUUID(), 'n-p')]);
    await receiver.waitFor(() => notifiedNumbers(notified('/neighbour')).length === 2, 'both notifications', 15_000);
    expect(notifiedNumbers(notified('/neighbour'))).toEqual([1, 2]);
    expect((notified('/neighbour')[0]?.at ?? 0) - refusedAt).toBeGreaterThanOrEqual(2_500);
    expect(receiver.failures.filter((r) => r.path === '/neighbour')).toEqual([]);
    expect(t.broker.metrics.value('broker_origin_pauses_total')).toBe(1);
  } finally {
    await other.broker.close(0);
  }
});
