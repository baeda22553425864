import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { BrokerOverrides } from '../src/broker.js';
import { ConfigError, loadConfig } from '../src/config.js';
import { BACKPORT_EXT } from '../src/core/fhir-urls.js';
import { attachWebSocket } from '../src/http/websocket-upgrade.js';
import { MAX_FULL_RESOURCE_BYTES } from '../src/service/content-stage.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { type DynamoDbLocal, dynamoDbEnv, startDynamoDbLocal } from './support/dynamodb-local.js';
import { eventLike, type Json, notifiedNumbers, statusOf, topicSubscription } from './support/fhir-client.js';
import { validateFhir } from './support/fhir-schema.js';
import { FhirServer } from './support/fhir-server.js';
import { inProcessBroker, secretOf, type TestBroker, TOKENS } from './support/in-process.js';
import { readingBroker } from './support/reading-broker.js';
import type { Receiver } from './support/receiver.js';
import { change, withMethod } from './support/store-fixtures.js';
import { tempDir } from './support/temp-dirs.js';
import { WsClient } from './support/ws-client.js';

/**
 * `full-resource` content end to end: the broker reads the changed resource from a real FHIR
 * server over HTTP (the content stage's read), stores it with the notifications of the
 * subscriptions that take it, and sends it in their bundles' focus entries, on retries, after a
 * restart and in `$events`; only for the API clients BROKER_FULL_RESOURCE_CLIENTS names.
 */

const FHIR_TOKEN = 'fhir-server-token-0123456789';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function patient(id: string, family: string, extra: Json = {}): Json {
  return { resourceType: 'Patient', id, name: [{ family }], ...extra };
}

const setup = (env: Record<string, string> = {}, fhir?: FhirServer, overrides?: BrokerOverrides) =>
  readingBroker(
    cleanups,
    { BROKER_FULL_RESOURCE_CLIENTS: 'alice', BROKER_RETRY_DELAYS: '20ms,20ms,20ms', ...env },
    { token: FHIR_TOKEN, ...(fhir === undefined ? {} : { fhir }), ...(overrides === undefined ? {} : { overrides }) },
  );

/** `backport-max-count` as a channel extension. */
const maxCountOf = (n: number): Json => ({
  extension: [
    {
      url: BACKPORT_EXT.maxCount,
      valuePositiveInt: n,
    },
  ],
});

const full = (receiver: Receiver, path: string, options: { filters?: string[]; maxCount?: number } = {}) =>
  topicSubscription('patient-change', `${receiver.url}${path}`, {
    ...(options.filters === undefined ? {} : { filters: options.filters }),
    ...(options.maxCount === undefined ? {} : { channel: maxCountOf(options.maxCount) }),
    content: 'full-resource',
  });

async function active(t: TestBroker, sub: Json): Promise<string> {
  await t.logger.waitForStatus(sub.id as string, 'active');
  return sub.id as string;
}

/** The event notifications `path` received, as bundles. */
const bundlesOn = (receiver: Receiver, path: string): Json[] =>
  receiver
    .on(path)
    .map((r) => JSON.parse(r.body) as Json)
    .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification');

/** Each focus entry of the event notifications `path` received. */
const focusEntries = (receiver: Receiver, path: string): Json[] =>
  bundlesOn(receiver, path).flatMap((b) => (b.entry as Json[]).slice(1));

const metric = async (t: TestBroker, line: string): Promise<number | undefined> => {
  const res = await t.broker.app.request('/metrics', { headers: { authorization: `Bearer ${TOKENS.ingest}` } });
  const text = await res.text();
  const found = text.split('\n').find((l) => l.startsWith(`${line} `));
  return found === undefined ? undefined : Number(found.split(' ')[1]);
};

/** A topic-based websocket Subscription to Patient changes with full-resource content. */
function wsFullSubscription(): Json {
  const sub = topicSubscription('patient-change', 'unused', { content: 'full-resource' });
  const { endpoint: _endpoint, ...channel } = sub.channel as Json;
  return { ...sub, channel: { ...channel, type: 'websocket' } };
}

/** A real socket on `t`'s hub (behind a server on port 0), bound to `id` from its first event. */
async function boundSocket(t: TestBroker, id: string): Promise<WsClient> {
  const server = createServer();
  attachWebSocket(server, { hub: t.broker.websocketHub, apiAuth: t.broker.apiAuth, logger: t.logger });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  cleanups.push(async () => {
    server.closeAllConnections();
    server.close();
  });
  const res = await t.call('GET', `/fhir/Subscription/$get-ws-binding-token?id=${id}`);
  const token = ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString;
  const c = await WsClient.connect(`ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws`);
  cleanups.push(async () => c.close());
  c.send(JSON.stringify({ type: 'bind-with-token', payload: { token, lastEventNumber: 0 } }));
  return c;
}

/** `store`: the broker's store settings (none: SQLite in a temporary directory). */
async function carriesAsRead(store: Record<string, string>): Promise<void> {
  const { t, fhir, receiver } = await setup(store);
  fhir.put(patient('p1', 'Chalmers'));
  fhir.put(patient('p2', 'Windsor'));
  const whole = await active(t, await t.create(full(receiver, '/full')));
  await active(t, await t.create(full(receiver, '/full2')));
  await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/ids`)));

  await t.post([
    eventLike('healthlake-update-patient', 'u1', 'p1'),
    eventLike('healthlake-create-patient', 'c2', 'p2'),
    eventLike('healthlake-delete-patient', 'd1', 'p1'),
  ]);
  await receiver.waitFor(
    () => ['/full', '/full2', '/ids'].every((p) => focusEntries(receiver, p).length === 3),
    'three notifications each',
  );
  const entries = focusEntries(receiver, '/full');
  expect(entries.map((e) => e.resource)).toEqual([
    fhir.current('Patient', 'p1'),
    fhir.current('Patient', 'p2'),
    undefined,
  ]);
  expect(entries[0]?.resource).toMatchObject({ name: [{ family: 'Chalmers' }] });
  expect(entries.map((e) => (e.request as Json).method)).toEqual(['PUT', 'POST', 'DELETE']);
  expect(focusEntries(receiver, '/full2').map((e) => e.resource)).toEqual(entries.map((e) => e.resource));
  expect(focusEntries(receiver, '/ids').every((e) => !('resource' in e))).toBe(true);
  for (const b of bundlesOn(receiver, '/full')) expect(validateFhir(b)).toEqual([]);
  expect(notifiedNumbers(receiver.on('/full'))).toEqual([1, 2, 3]);
  // One read per changed resource, with the configured token; none for the delete.
  expect(fhir.requests.map((r) => `${r.method} ${r.path}`)).toEqual(['GET /fhir/Patient/p1', 'GET /fhir/Patient/p2']);
  expect(fhir.requests[0]?.headers.authorization).toBe(`Bearer ${FHIR_TOKEN}`);
  expect(await metric(t, 'broker_full_resources_total{outcome="included"}')).toBe(2);

  // $events gives the same resources back, and pages by their size too.
  const events = await t.call('GET', `/fhir/Subscription/${whole}/$events`);
  expect(events.status).toBe(200);
  expect((events.body.entry as Json[]).slice(1).map((e) => e.resource)).toEqual([
    fhir.current('Patient', 'p1'),
    fhir.current('Patient', 'p2'),
    undefined,
  ]);
}

async function splitsLargeBacklog(store: Record<string, string>): Promise<void> {
  const { t, fhir, receiver } = await setup(store);
  const ids = Array.from({ length: 12 }, (_, i) => `big${i}`);
  // ~200 KB each: 2.4 MB in all.
  for (const id of ids)
    fhir.put(patient(id, 'Large', { text: { status: 'generated', div: `<div>${'x'.repeat(200_000)}</div>` } }));
  const id = await active(t, await t.create(full(receiver, '/batched', { maxCount: 100 })));
  await t.post(ids.map((p, i) => eventLike('healthlake-update-patient', `u${i}`, p)));
  await receiver.waitFor(() => focusEntries(receiver, '/batched').length === 12, 'all twelve');
  const bundles = bundlesOn(receiver, '/batched');
  expect(bundles.length).toBeGreaterThan(2);
  for (const b of bundles) expect(JSON.stringify(b).length).toBeLessThan(1024 * 1024 + 250_000);
  expect(notifiedNumbers(receiver.on('/batched'))).toEqual(Array.from({ length: 12 }, (_, i) => i + 1));
  expect(focusEntries(receiver, '/batched').map((e) => (e.resource as Json).id)).toEqual(ids);

  // $events: pages of at most ~2 MiB of resources, the rest a next link away, each event once.
  const seen: number[] = [];
  let url: string | undefined = `/fhir/Subscription/${id}/$events`;
  for (let pages = 0; url !== undefined; pages++) {
    expect(pages).toBeLessThan(12);
    const page = await t.call('GET', url);
    expect(page.status).toBe(200);
    expect(JSON.stringify(page.body).length).toBeLessThan(2 * 1024 * 1024 + 250_000);
    const entries = (page.body.entry as Json[]).slice(1);
    expect(entries.every((e) => (e.resource as Json | undefined)?.resourceType === 'Patient')).toBe(true);
    seen.push(...statusOf(page.body).events.map((e) => Number((e.part as Json[])[0]?.valueString)));
    const next = (page.body.link as Json[] | undefined)?.find((l) => l.relation === 'next')?.url as string | undefined;
    url = next?.slice(next.indexOf('/fhir/'));
  }
  expect(seen).toEqual(Array.from({ length: 12 }, (_, i) => i + 1));
}

describe('full-resource content', () => {
  it('carries the resource as read (one read for every subscriber), never to id-only subscribers, never on a delete', () =>
    carriesAsRead({}));

  it('reads nothing for an event only id-only subscriptions match', async () => {
    const { t, fhir, receiver } = await setup();
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/ids`)));
    fhir.hold = new Promise(() => undefined);
    await t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await receiver.waitFor(() => focusEntries(receiver, '/ids').length === 1, 'the notification');
    expect(fhir.requests).toEqual([]);
  });

  it('one read serves content filters and the payload; a filtered-out subscriber gets nothing', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(patient('p1', 'Chalmers', { gender: 'male' }));
    await active(t, await t.create(full(receiver, '/male', { filters: ['Patient?gender=male'] })));
    await active(t, await t.create(full(receiver, '/female', { filters: ['Patient?gender=female'] })));
    await active(t, await t.create(full(receiver, '/all')));
    await t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await receiver.waitFor(
      () => focusEntries(receiver, '/male').length === 1 && focusEntries(receiver, '/all').length === 1,
      'the two notifications',
    );
    expect(focusEntries(receiver, '/male')[0]?.resource).toEqual(fhir.current('Patient', 'p1'));
    expect(focusEntries(receiver, '/all')[0]?.resource).toEqual(fhir.current('Patient', 'p1'));
    expect(bundlesOn(receiver, '/female')).toEqual([]);
    expect(fhir.requests).toHaveLength(1);
  });

  it('refuses the request whole (503, nothing stored) while the resource cannot be read, and carries it once the sender retries', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(patient('p1', 'Chalmers'));
    const id = await active(t, await t.create(full(receiver, '/full')));
    fhir.respond = () => 503;
    const refused = await t.call('POST', '/events', eventLike('healthlake-update-patient', 'u1', 'p1'), TOKENS.ingest);
    expect(refused.status).toBe(503);
    expect(JSON.stringify(refused.body)).toContain('could not be read from the FHIR server');
    const status = await t.call('GET', `/fhir/Subscription/${id}/$status`);
    expect(statusOf(status.body).params.get('events-since-subscription-start')?.valueString).toBe('0');

    fhir.respond = () => undefined;
    await t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await receiver.waitFor(() => focusEntries(receiver, '/full').length === 1, 'the notification');
    expect(focusEntries(receiver, '/full')[0]?.resource).toEqual(fhir.current('Patient', 'p1'));
    expect(notifiedNumbers(receiver.on('/full'))).toEqual([1]);
  });

  it('notifies without the resource when the server has none, or it is too large to carry', async () => {
    const { t, fhir, receiver } = await setup();
    const big = 'x'.repeat(MAX_FULL_RESOURCE_BYTES);
    fhir.put(patient('big', 'Large', { text: { status: 'generated', div: `<div>${big}</div>` } }));
    await active(t, await t.create(full(receiver, '/full')));
    await t.post([
      eventLike('healthlake-update-patient', 'u-ghost', 'ghost'),
      eventLike('healthlake-update-patient', 'u-big', 'big'),
    ]);
    await receiver.waitFor(() => focusEntries(receiver, '/full').length === 2, 'both notifications');
    const entries = focusEntries(receiver, '/full');
    expect(entries.map((e) => String(e.fullUrl).split('/').slice(-2).join('/'))).toEqual([
      'Patient/ghost',
      'Patient/big',
    ]);
    expect(entries.every((e) => !('resource' in e))).toBe(true);
    expect(await metric(t, 'broker_full_resources_total{outcome="missing"}')).toBe(1);
    expect(await metric(t, 'broker_full_resources_total{outcome="too_large"}')).toBe(1);

    // An older event that names no resource: nothing to read, notified without, said and counted.
    const reads = fhir.requests.length;
    await t.post(eventLike('healthlake-update-patient-no-resource-id', 'u-noid'));
    await receiver.waitFor(() => bundlesOn(receiver, '/full').length === 3, 'the third notification');
    expect(fhir.requests.length).toBe(reads);
    expect(await metric(t, 'broker_full_resources_total{outcome="missing"}')).toBe(2);
    expect(
      t.logger.records.find(
        (r) => r.msg === 'full-resource notifications without the resource: the event names no resource id',
      ),
    ).toMatchObject({ eventId: 'u-noid', resourceType: 'Patient' });
    const warned = t.logger.records.find(
      (r) => r.msg === 'a changed resource is too large to carry: its full-resource notifications go without it',
    );
    expect(warned).toMatchObject({ resourceType: 'Patient', limit: MAX_FULL_RESOURCE_BYTES });
    expect(warned?.bytes).toBeGreaterThan(MAX_FULL_RESOURCE_BYTES);
  });

  it('splits a max-count backlog of large resources into bundles of about 1 MiB, and pages $events by about 2 MiB', () =>
    splitsLargeBacklog({}));

  it('holds a backlog of resources 32 notifications at a time (not 256): a lane reads that many from its store', async () => {
    const store = new SqliteStore(tempDir('fsb-full-lane-'));
    cleanups.push(() => store.close());
    const limits: number[] = [];
    const watched = withMethod(store, 'pendingNotifications', (id, after, limit) => {
      limits.push(limit);
      return store.pendingNotifications(id, after, limit);
    });
    const { t, fhir, receiver } = await setup({ BROKER_RETRY_DELAYS: Array(20).fill('100ms').join(',') }, undefined, {
      store: watched,
    });
    await active(t, await t.create(full(receiver, '/lane')));
    // The endpoint is down while 80 changes come: the lane keeps 32, the rest wait in the store.
    receiver.respond = (req) => ({ status: req.body.includes('event-notification') ? 503 : 204 });
    const ids = Array.from({ length: 80 }, (_, i) => `lane${i}`);
    for (const id of ids) fhir.put(patient(id, 'Backlog'));
    await t.post(ids.map((p, i) => eventLike('healthlake-update-patient', `l${i}`, p)));
    await receiver.waitFor(() => receiver.failures.length > 0, 'a failed attempt');
    receiver.respond = () => ({ status: 204 });
    await receiver.waitFor(() => focusEntries(receiver, '/lane').length === 80, 'all 80, once the endpoint is back');
    expect(notifiedNumbers(receiver.on('/lane'))).toEqual(Array.from({ length: 80 }, (_, i) => i + 1));
    expect(focusEntries(receiver, '/lane').map((e) => (e.resource as Json).id)).toEqual(ids);
    // Read from the store in pages of 32: 80 - 32 queued live, at least two reads.
    expect(limits.length).toBeGreaterThanOrEqual(2);
    expect(new Set(limits)).toEqual(new Set([32]));
  });

  it('sends a bundle marked longer than its lane holds (32) whole, under its one webhook-id', async () => {
    // Marked 1-40 by a build whose lanes held 256 (or while the subscription was id-only), pending.
    const dataDir = tempDir('fsb-full-mark-');
    const first = await setup({ BROKER_DATA_DIR: dataDir });
    const id = await active(first.t, await first.t.create(full(first.receiver, '/marked', { maxCount: 100 })));
    await first.t.broker.close(0);
    const store = new SqliteStore(dataDir);
    const ids = Array.from({ length: 40 }, (_, i) => `m${i + 1}`);
    await store.acceptChanges(
      ids.map((p, i) => ({
        change: { ...change(`mark-${i}`, p), resource: JSON.stringify(patient(p, 'Marked')) },
        subscriptionIds: [id],
      })),
      Date.now(),
    );
    await store.markBundles([{ subscriptionId: id, eventNumber: 1, last: 40 }]);
    await store.close();
    await setup({ BROKER_DATA_DIR: dataDir }, first.fhir);
    const receiver = first.receiver;
    await receiver.waitFor(() => focusEntries(receiver, '/marked').length === 40, 'the bundle');
    const sent = receiver.on('/marked').filter((r) => r.body.includes('"event-notification"'));
    expect(sent.map((r) => [r.headers['webhook-id'], notifiedNumbers([r]).length])).toEqual([[`${id}-1-40`, 40]]);
    expect(focusEntries(receiver, '/marked').map((e) => (e.resource as Json).id)).toEqual(ids);
  });

  it('sends the stored resource on a retry after a restart, not a fresh read', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    const dataDir = tempDir('fsb-full-');
    const first = await setup({ BROKER_DATA_DIR: dataDir, BROKER_RETRY_DELAYS: '1s' }, fhir);
    fhir.put(patient('p1', 'Chalmers'));
    await active(first.t, await first.t.create(full(first.receiver, '/full')));
    const failed = first.receiver.answerOnce((req) => req.body.includes('event-notification'), { status: 503 });
    await first.t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await first.receiver.waitFor(() => failed.given && first.receiver.failures.length === 1, 'the failed attempt');
    const [attempt] = first.receiver.failures.map((r) => (JSON.parse(r.body) as { entry: Json[] }).entry[1]);
    expect(attempt?.resource).toEqual(fhir.current('Patient', 'p1'));
    await first.t.broker.close(0);
    // The resource changes on the server; the notification stays of the version read when it came.
    fhir.put(patient('p1', 'Changed'));
    const reads = fhir.requests.length;
    await setup({ BROKER_DATA_DIR: dataDir }, fhir);
    await first.receiver.waitFor(() => focusEntries(first.receiver, '/full').length === 1, 'the retried notification');
    expect(focusEntries(first.receiver, '/full')[0]).toEqual(attempt);
    expect(fhir.requests.length).toBe(reads);
  });
});

describe('full-resource content on DynamoDB (each resource in an item of its own)', () => {
  let local: DynamoDbLocal | undefined;
  const saved = { ...process.env };
  beforeAll(async () => {
    local = await startDynamoDbLocal();
    // The AWS SDK in this process reads its credentials and region from the environment.
    Object.assign(process.env, onDynamoDb());
  });
  afterAll(async () => {
    for (const name of Object.keys(onDynamoDb())) {
      if (saved[name] === undefined) delete process.env[name];
      else process.env[name] = saved[name];
    }
    await local?.stop();
  });
  const onDynamoDb = () => dynamoDbEnv((local as DynamoDbLocal).endpoint, `full-${randomUUID().slice(0, 8)}-`);

  it('carries the resource as read, in webhooks and $events', () => carriesAsRead(onDynamoDb()));

  it('reads a backlog of large resources for bundles of about 1 MiB and $events pages of about 2 MiB', () =>
    splitsLargeBacklog(onDynamoDb()));

  it('retries a bundle marked while id-only (40 events) whole after the client takes full resources (lanes of 32)', async () => {
    const { t, fhir, receiver } = await setup({ ...onDynamoDb(), BROKER_RETRY_DELAYS: '500ms,500ms,500ms' });
    const ids = Array.from({ length: 40 }, (_, i) => `d${i + 1}`);
    for (const p of ids) fhir.put(patient(p, 'Switched'));
    const idOnly = topicSubscription('patient-change', `${receiver.url}/switched`, { channel: maxCountOf(100) });
    const id = await active(t, await t.create(idOnly));
    let down = true;
    receiver.respond = (req) => ({ status: down && req.body.includes('event-notification') ? 503 : 204 });
    await t.post(ids.map((p, i) => eventLike('healthlake-update-patient', `sw${i}`, p)));
    await receiver.waitFor(() => receiver.failures.length > 0, 'the bundle refused');
    const switched = await t.call('PUT', `/fhir/Subscription/${id}`, {
      ...full(receiver, '/switched', { maxCount: 100 }),
      id,
    });
    expect(switched.status).toBe(200);
    down = false;
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/switched')).length === 40, 'the bundle, once back');
    const sent = receiver.on('/switched').filter((r) => r.body.includes('"event-notification"'));
    expect(sent.map((r) => [r.headers['webhook-id'], notifiedNumbers([r]).length])).toEqual([[`${id}-1-40`, 40]]);
  });
});

describe('a classic R4 Subscription with a payload', () => {
  const classic = (receiver: Receiver, path = '/replica/?k=1') => ({
    resourceType: 'Subscription',
    status: 'requested',
    reason: 'replicate',
    criteria: 'Patient',
    channel: { type: 'rest-hook', endpoint: `${receiver.url}${path}`, payload: 'application/fhir+json' },
  });
  const sent = (receiver: Receiver) =>
    receiver.arrived.filter((r) => r.path.startsWith('/replica')).map((r) => `${r.method} ${r.path}`);

  it('updates the resource on the endpoint as a FHIR base: PUT [endpoint]/[type]/[id] with it, DELETE for a delete, signed', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(patient('p1', 'Chalmers'));
    const created = await t.create(classic(receiver));
    expect((created.channel as Json).payload).toBe('application/fhir+json');
    await active(t, created);
    await t.post([
      eventLike('healthlake-update-patient', 'u1', 'p1'),
      eventLike('healthlake-delete-patient', 'd1', 'p1'),
      // Not on the server: nothing to put there (a FHIR base takes no empty POST), said in the log.
      eventLike('healthlake-update-patient', 'u2', 'ghost'),
      eventLike('healthlake-update-patient', 'u3', 'p1'),
    ]);
    await receiver.waitFor(() => sent(receiver).length === 3, 'three requests');
    expect(sent(receiver)).toEqual([
      'PUT /replica/Patient/p1?k=1',
      'DELETE /replica/Patient/p1?k=1',
      'PUT /replica/Patient/p1?k=1',
    ]);
    const got = receiver.arrived.filter((r) => r.path.startsWith('/replica'));
    expect(JSON.parse(got[0]?.body ?? '')).toEqual(fhir.current('Patient', 'p1'));
    expect(got[0]?.headers['content-type']).toBe('application/fhir+json');
    expect(got[1]?.body).toBe('');
    for (const r of got) {
      expect(() => new Webhook(secretOf(created)).verify(r.body, r.headers as Record<string, string>)).not.toThrow();
    }
    expect(
      t.logger.records.find(
        (r) => r.msg === "a change was not sent to a classic subscription's FHIR base: it carries no resource",
      ),
    ).toMatchObject({
      eventNumber: 3,
      resourceType: 'Patient',
      reason: expect.stringContaining('no resource was stored with it'),
    });

    // Only for the clients BROKER_FULL_RESOURCE_CLIENTS names.
    const bob = await t.call('POST', '/fhir/Subscription', classic(receiver), TOKENS.bob);
    expect(bob.status).toBe(422);
    const issue = (bob.body.issue as Json[])[0] as Json;
    expect(issue.diagnostics).toContain('A classic Subscription with channel.payload');
    expect(issue.diagnostics).toContain('not enabled for client bob');
    expect(issue.expression).toEqual(['Subscription.channel.payload']);
  });

  it('sends a DELETE for an update read after its delete (events out of order), and never a dot segment for an id', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(patient('p1', 'Chalmers'));
    fhir.delete('Patient', 'p1');
    await active(t, await t.create(classic(receiver)));
    // The delete's event came first; the update's read finds the resource gone (its last version in history).
    await t.post(eventLike('healthlake-delete-patient', 'd1', 'p1'));
    await t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await t.post(eventLike('healthlake-delete-patient', 'd-dots', '..'));
    await t.post(eventLike('healthlake-update-patient', 'u-after', 'p1'));
    await receiver.waitFor(() => sent(receiver).length === 3, 'three requests');
    expect(sent(receiver)).toEqual([
      'DELETE /replica/Patient/p1?k=1',
      'DELETE /replica/Patient/p1?k=1',
      'DELETE /replica/Patient/p1?k=1',
    ]);
  });

  it('a 404 or 410 to a DELETE is the delete done, a 410 to a PUT an ordinary failure; a client taken off the list fails for good, saying why', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    const dataDir = tempDir('fsb-full-');
    const { t, receiver } = await setup({ BROKER_DATA_DIR: dataDir, BROKER_RETRY_DELAYS: '20ms' }, fhir);
    fhir.put(patient('p1', 'Chalmers'));
    fhir.put(patient('p2', 'Windsor'));
    const created = await t.create(classic(receiver));
    const id = await active(t, created);
    const putP1 = receiver.answerOnce((r) => r.method === 'PUT' && r.path.includes('/p1'), { status: 410 });
    receiver.respond = (
      (before) => (r: Parameters<typeof before>[0]) =>
        r.method === 'DELETE' ? { status: 410 } : before(r)
    )(receiver.respond);
    await t.post([
      eventLike('healthlake-update-patient', 'u1', 'p1'),
      eventLike('healthlake-delete-patient', 'd2', 'p2'),
      eventLike('healthlake-update-patient', 'u2', 'p2'),
    ]);
    await receiver.waitFor(() => sent(receiver).length === 4, 'four requests');
    expect(putP1.given).toBe(true);
    expect(sent(receiver)).toEqual([
      'PUT /replica/Patient/p1?k=1',
      'PUT /replica/Patient/p1?k=1',
      'DELETE /replica/Patient/p2?k=1',
      'PUT /replica/Patient/p2?k=1',
    ]);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    await t.broker.close(0);

    // Restarted with the client off the list: the next change fails for good, and the subscription says why.
    const second = await setup({ BROKER_DATA_DIR: dataDir, BROKER_FULL_RESOURCE_CLIENTS: 'carol' }, fhir);
    await second.t.post(eventLike('healthlake-update-patient', 'u3', 'p1'));
    const failed = await second.t.logger.waitForStatus(id, 'error');
    expect(failed.reason).toContain('full resources are not enabled for client alice (BROKER_FULL_RESOURCE_CLIENTS)');
    expect(sent(receiver)).toHaveLength(4);
  });
});

describe('full-resource over a WebSocket', () => {
  it('carries the resource in the catch-up (from the store) and in live notifications', async () => {
    const { t, fhir } = await setup();
    fhir.put(patient('p1', 'Chalmers'));
    const id = (await t.create(wsFullSubscription())).id as string;
    await t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    const c = await boundSocket(t, id);
    const resources = () =>
      c.bundles
        .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification')
        .map((b) => (b.entry as Json[])[1]?.resource);
    await c.waitFor(() => resources().length === 1, 'the catch-up');
    fhir.put(patient('p1', 'Changed'));
    await t.post(eventLike('healthlake-update-patient', 'u2', 'p1'));
    await c.waitFor(() => resources().length === 2, 'the live notification');
    expect(resources().map((r) => (r as Json | undefined)?.name)).toEqual([
      [{ family: 'Chalmers' }],
      [{ family: 'Changed' }],
    ]);
  });
});

describe('reading stored resources a few at a time', () => {
  it('$events in any content, and a WebSocket catch-up, read a full-resource subscription 16 notifications at a time', async () => {
    /** The SQLite store, recording how many notifications each range read returned. */
    class Recording extends SqliteStore {
      readonly reads: number[] = [];
      override async notificationsInRange(id: string, from: number, to: number, limit: number) {
        const page = await super.notificationsInRange(id, from, to, limit);
        this.reads.push(page.length);
        return page;
      }
    }
    const store = new Recording(tempDir('fsb-full-'));
    const fhir = await FhirServer.start();
    fhir.token = FHIR_TOKEN;
    cleanups.push(() => fhir.close());
    const t = await inProcessBroker(
      { BROKER_FHIR_READ: fhir.url, BROKER_FHIR_READ_TOKEN: FHIR_TOKEN, BROKER_FULL_RESOURCE_CLIENTS: 'alice' },
      { store },
    );
    cleanups.push(() => t.broker.close(0));
    const ids = Array.from({ length: 40 }, (_, i) => `p${i}`);
    for (const id of ids) fhir.put(patient(id, 'Doe'));
    const id = (await t.create(wsFullSubscription())).id as string;
    await t.post(ids.map((p, i) => eventLike('healthlake-update-patient', `u${i}`, p)));

    for (const content of ['id-only', 'empty', 'full-resource']) {
      store.reads.length = 0;
      const page = await t.call('GET', `/fhir/Subscription/${id}/$events?content=${content}`);
      expect(statusOf(page.body).events).toHaveLength(40);
      expect(store.reads.length).toBeGreaterThan(2);
      expect(Math.max(...store.reads)).toBeLessThanOrEqual(16);
    }

    store.reads.length = 0;
    const c = await boundSocket(t, id);
    await c.waitFor(
      () => c.bundles.filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification').length === 40,
      'the catch-up',
    );
    expect(Math.max(...store.reads)).toBeLessThanOrEqual(16);
  });
});

describe('who may have full resources', () => {
  it('refuses full-resource content to a client BROKER_FULL_RESOURCE_CLIENTS does not name, and where nothing is read', async () => {
    const { t, receiver } = await setup();
    const bob = await t.call('POST', '/fhir/Subscription', full(receiver, '/bob'), TOKENS.bob);
    expect(bob.status).toBe(422);
    const issue = (bob.body.issue as Json[])[0] as Json;
    expect(issue.diagnostics).toContain('full-resource content is not enabled for client bob');
    expect(issue.diagnostics).toContain('BROKER_FULL_RESOURCE_CLIENTS');
    expect(issue.expression).toEqual(['Subscription.channel._payload']);
    expect((await t.call('GET', '/fhir/Subscription', undefined, TOKENS.bob)).body.total).toBe(0);

    const everyone = await setup({ BROKER_FULL_RESOURCE_CLIENTS: '*' });
    expect((await everyone.t.call('POST', '/fhir/Subscription', full(receiver, '/bob'), TOKENS.bob)).status).toBe(201);

    const unread = await inProcessBroker({});
    cleanups.push(() => unread.broker.close(0));
    const refused = await unread.call('POST', '/fhir/Subscription', full(receiver, '/x'));
    expect(refused.status).toBe(422);
    expect(((refused.body.issue as Json[])[0] as Json).diagnostics).toContain('BROKER_FHIR_READ');
  });

  it('a client taken off the list gets id-only (no read, nothing stored, $events too) and may still turn its subscription off', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    const dataDir = tempDir('fsb-full-');
    const first = await setup({ BROKER_DATA_DIR: dataDir }, fhir);
    fhir.put(patient('p1', 'Chalmers'));
    const id = await active(first.t, await first.t.create(full(first.receiver, '/full')));
    await first.t.post(eventLike('healthlake-update-patient', 'u1', 'p1'));
    await first.receiver.waitFor(() => focusEntries(first.receiver, '/full').length === 1, 'the notification');
    await first.t.broker.close(0);

    const { t } = await setup({ BROKER_DATA_DIR: dataDir, BROKER_FULL_RESOURCE_CLIENTS: 'carol' }, fhir);
    const [entry] = (await t.call('GET', '/fhir/Subscription')).body.entry as Json[];
    const here = entry?.resource as Json;
    // Kept full-resource: refused; turned off: taken.
    const kept = await t.call('PUT', `/fhir/Subscription/${id}`, here);
    expect(kept.status).toBe(422);
    expect(JSON.stringify(kept.body)).toContain('not enabled for client alice');

    // Events meanwhile go id-only, and the notification stored with the resource is given id-only too.
    const reads = fhir.requests.length;
    await t.post(eventLike('healthlake-update-patient', 'u2', 'p1'));
    expect(fhir.requests.length).toBe(reads);
    expect(await metric(t, 'broker_full_resources_total{outcome="not_allowed"}')).toBe(1);
    const events = await t.call('GET', `/fhir/Subscription/${id}/$events`);
    const entries = (events.body.entry as Json[]).slice(1);
    expect(entries).toHaveLength(2);
    expect(entries.every((e) => !('resource' in e))).toBe(true);

    const off = await t.call('PUT', `/fhir/Subscription/${id}`, { ...here, status: 'off' });
    expect(off.status).toBe(200);
    expect(off.body.status).toBe('off');
  });

  it('BROKER_FULL_RESOURCE_CLIENTS: needs BROKER_FHIR_READ, and takes * or client ids', () => {
    const base = { BROKER_API_KEYS: `alice:${TOKENS.alice}`, BROKER_DATA_DIR: tempDir('fsb-full-') };
    const read = { BROKER_FHIR_READ: 'https://fhir.example.org/r4' };
    expect(loadConfig(base).fullResourceClients).toEqual([]);
    expect(loadConfig({ ...base, ...read, BROKER_FULL_RESOURCE_CLIENTS: 'alice, bob' }).fullResourceClients).toEqual([
      'alice',
      'bob',
    ]);
    expect(loadConfig({ ...base, ...read, BROKER_FULL_RESOURCE_CLIENTS: '*' }).fullResourceClients).toBe('*');
    expect(() => loadConfig({ ...base, BROKER_FULL_RESOURCE_CLIENTS: 'alice' })).toThrow(
      new ConfigError(
        'BROKER_FULL_RESOURCE_CLIENTS',
        'needs BROKER_FHIR_READ: full-resource notifications carry the resource as read from the FHIR server',
      ),
    );
    expect(() => loadConfig({ ...base, ...read, BROKER_FULL_RESOURCE_CLIENTS: 'al ice' })).toThrow(
      /BROKER_FULL_RESOURCE_CLIENTS.*not "al ice"/,
    );
    expect(() => loadConfig({ ...base, ...read, BROKER_FULL_RESOURCE_CLIENTS: '*, alice' })).toThrow(
      /BROKER_FULL_RESOURCE_CLIENTS.*: \* stands alone$/,
    );
    expect(() => loadConfig({ ...base, ...read, BROKER_FULL_RESOURCE_CLIENTS: ' , ' })).toThrow(ConfigError);
  });
});
