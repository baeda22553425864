import { MedplumClient, OperationOutcomeError } from '@medplum/core';
import { Client as FhirKitClient } from 'fhir-kit-client';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, startBroker } from './support/broker-process.js';
import {
  eventLike,
  expectSubscriptionCapability,
  fixture,
  focusOf,
  type Json,
  statusOf,
  TOPIC,
  topicSubscription,
} from './support/fhir-client.js';
import { type ReceivedRequest, Receiver } from './support/receiver.js';

/**
 * Two widely used third-party FHIR client libraries, unmodified, against the real broker process
 * (port 0) and a real webhook receiver: `fhir-kit-client` (Vermonster's generic R4 client) and
 * Medplum's `MedplumClient` pointed at the broker's base. Each reads the CapabilityStatement,
 * creates a backport rest-hook Subscription (handshake, then `active`), sees a change event
 * delivered, searches, updates, calls `$status` and `$events`, gets the broker's refusals as its
 * own error carrying the OperationOutcome, cannot see another API key's Subscription, and deletes.
 */

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const ERROR_CODES = 'https://fhir-subscription-broker.org/fhir/CodeSystem/error-code';
const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';
/** The resource id in test/fixtures/healthlake-update-patient.json. */
const PATIENT = 'a1b2c3d4-5678-90ab-cdef-EXAMPLE22222';

/** What the broker answers a create without `reason`, and one whose endpoint is a private address. */
const MISSING_REASON = {
  resourceType: 'OperationOutcome',
  issue: [
    {
      severity: 'error',
      code: 'invalid',
      details: {
        coding: [{ system: ERROR_CODES, code: 'INVALID_RESOURCE' }],
        text: 'The resource does not have the required structure.',
      },
      diagnostics: 'Subscription.reason is required (R4: 1..1): say what it is for',
      expression: ['Subscription.reason'],
    },
  ],
};
const PRIVATE_ENDPOINT = {
  resourceType: 'OperationOutcome',
  issue: [
    {
      severity: 'error',
      code: 'security',
      details: {
        coding: [{ system: ERROR_CODES, code: 'ENDPOINT_FORBIDDEN' }],
        text: 'The channel endpoint is refused: it names or resolves to a private or reserved address, or does not resolve.',
      },
      diagnostics: 'channel.endpoint 10.1.2.3: 10.1.2.3 is a private address',
      expression: ['Subscription.channel.endpoint'],
    },
  ],
};
const notFound = (id: string): Json => ({
  resourceType: 'OperationOutcome',
  issue: [
    {
      severity: 'error',
      code: 'not-found',
      details: { coding: [{ system: ERROR_CODES, code: 'NOT_FOUND' }], text: 'No such resource.' },
      diagnostics: `Subscription/${id} not found`,
    },
  ],
});

/** A FHIR resource as both clients take one. */
type Resource = Json & { resourceType: string };

/** A patient-change Subscription filtered on the fixture's patient, id-only, to `endpoint`. */
function patientSubscription(endpoint: string): Resource {
  return topicSubscription('patient-change', endpoint, { filters: [`Patient?_id=${PATIENT}`] }) as Resource;
}

function withoutReason(sub: Resource): Resource {
  const { reason: _reason, ...rest } = sub;
  return rest;
}

function withEndpoint(sub: Resource, endpoint: string): Resource {
  return { ...sub, channel: { ...(sub.channel as Json), endpoint } };
}

function secretOf(created: Json): string {
  const ext = ((created.channel as Json).extension as Json[]).find((e) => String(e.url).endsWith('/webhook-secret'));
  return String(ext?.valueString);
}

/** POST /events with the ingest token: not FHIR, so plain fetch. */
/** Resolves once `ok()` holds (polled every 20 ms); fails after 10 s saying what it waited for. */
async function until(ok: () => boolean, what: string): Promise<void> {
  for (const deadline = Date.now() + 10_000; !ok(); ) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function postEvent(broker: BrokerProcess, event: Json): Promise<{ status: number; body: unknown }> {
  const res = await fetch(`${broker.url}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${INGEST_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(event),
  });
  return { status: res.status, body: await res.json() };
}

/** The CapabilityStatement as the broker serves it at `base` (checked through each client). */
function expectCapabilityStatement(cs: Json, base: string): void {
  expect(cs.resourceType).toBe('CapabilityStatement');
  expect(cs.fhirVersion).toBe('4.0.1');
  expect((cs.implementation as Json).url).toBe(`${base}/fhir`);
  const rest = (cs.rest as Json[])[0] as Json;
  expect(rest.mode).toBe('server');
  expect((rest.resource as Json[]).map((r) => r.type)).toEqual(['Subscription']);
  expectSubscriptionCapability((rest.resource as Json[])[0] as Json);
}

/** The handshake and then nothing but the event-notification for the fixture's patient, signed with `secret`. */
async function expectHandshakeThenNotification(
  receiver: Receiver,
  path: string,
  subscriptionUrl: string,
  secret: string,
): Promise<void> {
  const isNotification = (r: ReceivedRequest) =>
    statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode === 'event-notification';
  await receiver.waitFor(() => receiver.on(path).some(isNotification), `event-notification on ${path}`);
  const [handshake, notification, ...rest] = receiver.on(path);
  expect(rest).toEqual([]);
  const wh = new Webhook(secret);
  for (const r of [handshake, notification] as ReceivedRequest[]) {
    expect(() => wh.verify(r.body, r.headers as Record<string, string>)).not.toThrow();
  }
  expect(statusOf(JSON.parse(String(handshake?.body)) as Json).params.get('type')?.valueCode).toBe('handshake');
  const bundle = JSON.parse(String(notification?.body)) as Json;
  const { params, events } = statusOf(bundle);
  expect(params.get('subscription')?.valueReference).toEqual({ reference: subscriptionUrl });
  expect(params.get('topic')?.valueCanonical).toBe(`${TOPIC}/patient-change`);
  expect(params.get('status')?.valueCode).toBe('active');
  expect(params.get('events-since-subscription-start')?.valueString).toBe('1');
  // Event 1: the change to someone else, posted first, was not this subscription's.
  expect(events.map((e) => [(e.part as Json[])[0], focusOf(e)])).toEqual([
    [{ name: 'event-number', valueString: '1' }, `${HL}/Patient/${PATIENT}`],
  ]);
  expect(
    (bundle.entry as Json[])
      .slice(1)
      .map((e) => [e.fullUrl, (e.request as Json).method, (e.request as Json).url, (e.response as Json).status]),
  ).toEqual([[`${HL}/Patient/${PATIENT}`, 'PUT', `Patient/${PATIENT}`, '200']]);
}

/** A `$status` answer for one subscription: a searchset whose one entry is its status Parameters. */
function expectStatusBundle(bundle: Json, subscriptionUrl: string, status: string, events: string): void {
  expect(bundle.resourceType).toBe('Bundle');
  expect(bundle.type).toBe('searchset');
  expect(bundle.total).toBe(1);
  const parameters = ((bundle.entry as Json[])[0] as Json).resource as Json;
  expect(parameters.resourceType).toBe('Parameters');
  expect((parameters.meta as Json).profile).toEqual([`${BACKPORT}/backport-subscription-status-r4`]);
  expect(parameters.parameter).toEqual([
    { name: 'subscription', valueReference: { reference: subscriptionUrl } },
    { name: 'topic', valueCanonical: `${TOPIC}/patient-change` },
    { name: 'status', valueCode: status },
    { name: 'type', valueCode: 'query-status' },
    { name: 'events-since-subscription-start', valueString: events },
  ]);
}

/** A `$events` answer from event 1: a history bundle with the query-event status and the one event. */
function expectEventsBundle(bundle: Json, subscriptionUrl: string): void {
  expect(bundle.resourceType).toBe('Bundle');
  expect(bundle.type).toBe('history');
  expect((bundle.meta as Json).profile).toEqual([`${BACKPORT}/backport-subscription-notification-r4`]);
  const { params, events } = statusOf(bundle);
  expect(params.get('subscription')?.valueReference).toEqual({ reference: subscriptionUrl });
  expect(params.get('type')?.valueCode).toBe('query-event');
  expect(params.get('status')?.valueCode).toBe('active');
  expect(params.get('events-since-subscription-start')?.valueString).toBe('1');
  expect(events.map((e) => [(e.part as Json[])[0], focusOf(e)])).toEqual([
    [{ name: 'event-number', valueString: '1' }, `${HL}/Patient/${PATIENT}`],
  ]);
  expect(((bundle.entry as Json[]).slice(1) as Json[]).map((e) => e.fullUrl)).toEqual([`${HL}/Patient/${PATIENT}`]);
}

/** Starts a receiver and a broker process, and posts the change events once the subscription is active. */
function brokerAndReceiver(): {
  broker: () => BrokerProcess;
  receiver: () => Receiver;
  postChanges: (label: string) => Promise<void>;
} {
  let broker: BrokerProcess;
  let receiver: Receiver;
  beforeAll(async () => {
    receiver = await Receiver.start();
    broker = await startBroker();
  });
  afterAll(async () => {
    await broker?.kill('SIGTERM');
    await receiver?.close();
  });
  return {
    broker: () => broker,
    receiver: () => receiver,
    async postChanges(label) {
      // Someone else's change first: were it matched, it would be event 1 and arrive first.
      expect(await postEvent(broker, eventLike('healthlake-update-patient', `${label}-other`, 'someone-else'))).toEqual(
        { status: 202, body: { accepted: 1, ignored: 0, duplicates: 0 } },
      );
      expect(await postEvent(broker, fixture('healthlake-update-patient'))).toEqual({
        status: 202,
        body: { accepted: 1, ignored: 0, duplicates: 0 },
      });
    },
  };
}

describe('fhir-kit-client against the broker', () => {
  const env = brokerAndReceiver();
  let alice: FhirKitClient;
  let bob: FhirKitClient;
  let created: Resource;
  let id: string;
  let subscriptionUrl: string;
  const hook = '/hook/fhir-kit';

  beforeAll(() => {
    alice = new FhirKitClient({ baseUrl: `${env.broker().url}/fhir`, bearerToken: API_KEYS.alice });
    bob = new FhirKitClient({ baseUrl: `${env.broker().url}/fhir`, bearerToken: API_KEYS.bob });
  });

  /** What the client rejected with: its error carries the HTTP status and the parsed body. */
  const rejection = async (call: Promise<unknown>): Promise<{ message: string; status: unknown; data: unknown }> => {
    const err = (await call.then(
      () => {
        throw new Error('expected the call to fail');
      },
      (e: unknown) => e,
    )) as Error & { response?: { status: number; data: unknown } };
    return { message: err.message, status: err.response?.status, data: err.response?.data };
  };

  it('reads the CapabilityStatement: Subscription with the backport profile', async () => {
    const cs = await alice.capabilityStatement();
    expectCapabilityStatement(cs, env.broker().url);
    expect(FhirKitClient.httpFor(cs).response?.headers.get('content-type')).toBe(
      'application/fhir+json; charset=utf-8',
    );
  });

  it('creates a rest-hook Subscription that the handshake makes active', async () => {
    created = await alice.create({
      resourceType: 'Subscription',
      body: patientSubscription(`${env.receiver().url}${hook}`),
    });
    id = String(created.id);
    subscriptionUrl = `${env.broker().url}/fhir/Subscription/${id}`;
    const { response } = FhirKitClient.httpFor(created);
    expect(response?.status).toBe(201);
    const versionId = String((created.meta as Json).versionId);
    expect(response?.headers.get('location')).toBe(`${subscriptionUrl}/_history/${versionId}`);
    expect(created.status).toBe('requested');
    expect((created.meta as Json).profile).toEqual([`${BACKPORT}/backport-subscription`]);
    expect(secretOf(created)).toMatch(/^whsec_/);

    await env.receiver().waitFor(() => env.receiver().on(hook).length === 1, 'handshake');
    await env.broker().waitForStatus(id, 'active');
    const read = await alice.read({ resourceType: 'Subscription', id });
    expect(read.status).toBe('active');
    expect(read.reason).toBe('test');
    expect(read.criteria).toBe(`${TOPIC}/patient-change`);
    // The secret is shown once, in the create's answer only.
    expect((read.channel as Json).extension).toBeUndefined();
    expect(FhirKitClient.httpFor(read).response?.headers.get('etag')).toBe(`W/"${(read.meta as Json).versionId}"`);
  });

  it('sees a change to the filtered patient delivered to the receiver', async () => {
    await env.postChanges('fhir-kit');
    await expectHandshakeThenNotification(env.receiver(), hook, subscriptionUrl, secretOf(created));
  });

  it('searches by status and _id', async () => {
    const active = await alice.search({ resourceType: 'Subscription', searchParams: { status: 'active', _id: id } });
    expect(active.resourceType).toBe('Bundle');
    expect(active.type).toBe('searchset');
    expect(active.total).toBe(1);
    expect(active.link).toEqual([
      { relation: 'self', url: `${env.broker().url}/fhir/Subscription?status=active&_id=${id}` },
    ]);
    expect((active.entry as Json[]).map((e) => [e.fullUrl, (e.resource as Json).id, (e.search as Json).mode])).toEqual([
      [subscriptionUrl, id, 'match'],
    ]);
    const off = await alice.search({ resourceType: 'Subscription', searchParams: { status: 'off', _id: id } });
    expect([off.total, off.entry]).toEqual([0, undefined]);
  });

  it('calls $status (GET, POST without inputs, POST with a Parameters body) and $events', async () => {
    expectStatusBundle(
      await alice.operation({ name: '$status', resourceType: 'Subscription', id, method: 'GET' }),
      subscriptionUrl,
      'active',
      '1',
    );
    // operation() POSTs by default; without inputs it sends a FHIR media type and Content-Length: 0.
    expectStatusBundle(
      await alice.operation({ name: '$status', resourceType: 'Subscription', id }),
      subscriptionUrl,
      'active',
      '1',
    );
    expectStatusBundle(
      await alice.operation({
        name: 'status',
        resourceType: 'Subscription',
        id,
        input: { resourceType: 'Parameters' },
      }),
      subscriptionUrl,
      'active',
      '1',
    );
    expectEventsBundle(
      await alice.operation({
        name: '$events',
        resourceType: 'Subscription',
        id,
        method: 'GET',
        input: { eventsSinceNumber: 1 },
      }),
      subscriptionUrl,
    );
    expectEventsBundle(
      await alice.operation({
        name: '$events',
        resourceType: 'Subscription',
        id,
        input: { resourceType: 'Parameters', parameter: [{ name: 'eventsSinceNumber', valueString: '1' }] },
      }),
      subscriptionUrl,
    );
  });

  it('updates it (PUT with If-Match) to off', async () => {
    const current = await alice.read({ resourceType: 'Subscription', id });
    const etag = String(FhirKitClient.httpFor(current).response?.headers.get('etag'));
    const updated = await alice.update({
      resourceType: 'Subscription',
      id,
      body: { ...current, status: 'off' },
      options: { headers: { 'if-match': etag } },
    });
    expect(FhirKitClient.httpFor(updated).response?.status).toBe(200);
    expect(updated.status).toBe('off');
    expect((updated.meta as Json).versionId).not.toBe((current.meta as Json).versionId);
    expect((await alice.read({ resourceType: 'Subscription', id })).status).toBe('off');
    expectStatusBundle(
      await alice.operation({ name: '$status', resourceType: 'Subscription', id, method: 'GET' }),
      subscriptionUrl,
      'off',
      '1',
    );
    // The version read before the update is stale now.
    expect(
      await rejection(
        alice.update({
          resourceType: 'Subscription',
          id,
          body: { ...current, reason: 'stale' },
          options: { headers: { 'if-match': etag } },
        }),
      ),
    ).toMatchObject({ status: 412, data: { issue: [{ code: 'conflict' }] } });
  });

  it('surfaces refusals as its error carrying the OperationOutcome, and stores nothing', async () => {
    const sub = patientSubscription(`${env.receiver().url}/hook/refused`);
    expect(await rejection(alice.create({ resourceType: 'Subscription', body: withoutReason(sub) }))).toEqual({
      message: `HTTP 400: POST ${env.broker().url}/fhir/Subscription`,
      status: 400,
      data: MISSING_REASON,
    });
    expect(
      await rejection(alice.create({ resourceType: 'Subscription', body: withEndpoint(sub, 'https://10.1.2.3/hook') })),
    ).toEqual({ message: `HTTP 422: POST ${env.broker().url}/fhir/Subscription`, status: 422, data: PRIVATE_ENDPOINT });
    const all = await alice.search({ resourceType: 'Subscription' });
    expect(all.total).toBe(1);
    expect((all.entry as Json[]).map((e) => (e.resource as Json).id)).toEqual([id]);
  });

  it('cannot read it with another API key (404)', async () => {
    expect(await rejection(bob.read({ resourceType: 'Subscription', id }))).toEqual({
      message: `HTTP 404: GET ${subscriptionUrl}`,
      status: 404,
      data: notFound(id),
    });
    expect((await bob.search({ resourceType: 'Subscription' })).total).toBe(0);
    expect((await alice.read({ resourceType: 'Subscription', id })).id).toBe(id);
  });

  it('deletes it', async () => {
    const deleted = await alice.delete({ resourceType: 'Subscription', id });
    expect(FhirKitClient.httpFor(deleted).response?.status).toBe(204);
    expect(await rejection(alice.read({ resourceType: 'Subscription', id }))).toMatchObject({
      status: 404,
      data: notFound(id),
    });
    expect((await alice.search({ resourceType: 'Subscription' })).total).toBe(0);
  });
});

describe('@medplum/core MedplumClient against the broker', () => {
  const env = brokerAndReceiver();
  type Medplum = InstanceType<typeof MedplumClient>;
  let alice: Medplum;
  let bob: Medplum;
  let created: Json;
  let id: string;
  let subscriptionUrl: string;
  const hook = '/hook/medplum';
  /** Every exchange the clients made, `METHOD path?query status`: MedplumClient's errors carry no HTTP status. */
  const exchanges: string[] = [];

  /** A client for the broker's base; `accessToken`, when given, through the constructor's option. */
  const client = (accessToken?: string): Medplum =>
    new MedplumClient({
      baseUrl: env.broker().url,
      fhirUrlPath: 'fhir',
      ...(accessToken === undefined ? {} : { accessToken }),
      // Recording only: the answer goes back to the client as fetch gave it.
      fetch: async (url: string, init?: RequestInit) => {
        const res = await fetch(url, init);
        const { pathname, search } = new URL(url);
        exchanges.push(`${init?.method ?? 'GET'} ${decodeURIComponent(pathname + search)} ${res.status}`);
        return res;
      },
      cacheTime: 0,
      extendedMode: false,
    });
  /** The exchanges `run` made. */
  const exchangesOf = async (run: () => Promise<unknown>): Promise<string[]> => {
    const before = exchanges.length;
    await run();
    return exchanges.slice(before);
  };
  const rejection = async (call: Promise<unknown>): Promise<{ message: string; outcome: unknown }> => {
    const err = (await call.then(
      () => {
        throw new Error('expected the call to fail');
      },
      (e: unknown) => e,
    )) as Error & { outcome?: unknown };
    expect(err).toBeInstanceOf(OperationOutcomeError);
    return { message: err.message, outcome: err.outcome };
  };

  beforeAll(() => {
    alice = client();
    alice.setAccessToken(API_KEYS.alice);
    bob = client(API_KEYS.bob);
  });

  it('reads the CapabilityStatement: Subscription with the backport profile', async () => {
    let cs: Json = {};
    expect(
      await exchangesOf(async () => {
        cs = await alice.get(alice.fhirUrl('metadata'));
      }),
    ).toEqual(['GET /fhir/metadata 200']);
    expectCapabilityStatement(cs, env.broker().url);
  });

  it('creates a rest-hook Subscription that the handshake makes active', async () => {
    expect(
      await exchangesOf(async () => {
        created = await alice.createResource(patientSubscription(`${env.receiver().url}${hook}`));
      }),
    ).toEqual(['POST /fhir/Subscription 201']);
    id = String(created.id);
    subscriptionUrl = `${env.broker().url}/fhir/Subscription/${id}`;
    expect(created.status).toBe('requested');
    expect((created.meta as Json).profile).toEqual([`${BACKPORT}/backport-subscription`]);
    expect(secretOf(created)).toMatch(/^whsec_/);

    await env.receiver().waitFor(() => env.receiver().on(hook).length === 1, 'handshake');
    await env.broker().waitForStatus(id, 'active');
    const read = await alice.readResource('Subscription', id);
    expect(read.status).toBe('active');
    expect(read.reason).toBe('test');
    expect(read.criteria).toBe(`${TOPIC}/patient-change`);
    expect(read.channel.extension).toBeUndefined();
  });

  it('sees a change to the filtered patient delivered to the receiver', async () => {
    await env.postChanges('medplum');
    await expectHandshakeThenNotification(env.receiver(), hook, subscriptionUrl, secretOf(created));
  });

  it('searches by status and _id', async () => {
    const active = await alice.search('Subscription', { status: 'active', _id: id });
    expect(active.type).toBe('searchset');
    expect(active.total).toBe(1);
    expect(active.link).toEqual([
      { relation: 'self', url: `${env.broker().url}/fhir/Subscription?status=active&_id=${id}` },
    ]);
    expect((active.entry as Json[]).map((e) => [e.fullUrl, (e.resource as Json).id])).toEqual([[subscriptionUrl, id]]);
    const resources = await alice.searchResources('Subscription', { status: 'active', _id: id });
    expect(resources.map((r: Json) => [r.id, r.status])).toEqual([[id, 'active']]);
    expect(resources.bundle.total).toBe(1);
    expect(await alice.searchOne('Subscription', { status: 'off', _id: id })).toBeUndefined();
  });

  it('calls $status and $events (GET, and POST with a Parameters body)', async () => {
    expectStatusBundle(await alice.get(alice.fhirUrl('Subscription', id, '$status')), subscriptionUrl, 'active', '1');
    const eventsUrl = alice.fhirUrl('Subscription', id, '$events');
    eventsUrl.searchParams.set('eventsSinceNumber', '1');
    expectEventsBundle(await alice.get(eventsUrl), subscriptionUrl);
    expectEventsBundle(
      await alice.post(alice.fhirUrl('Subscription', id, '$events'), {
        resourceType: 'Parameters',
        parameter: [{ name: 'eventsSinceNumber', valueString: '1' }],
      }),
      subscriptionUrl,
    );
  });

  it('updates it (PUT): a new reason', async () => {
    const current = await alice.readResource('Subscription', id);
    let updated: Json = {};
    expect(
      await exchangesOf(async () => {
        updated = await alice.updateResource({ ...current, reason: 'Patient changes, via Medplum' });
      }),
    ).toEqual([`PUT /fhir/Subscription/${id} 200`]);
    expect([updated.reason, updated.status]).toEqual(['Patient changes, via Medplum', 'active']);
    expect((updated.meta as Json).versionId).not.toBe(current.meta.versionId);
    expect((await alice.readResource('Subscription', id)).reason).toBe('Patient changes, via Medplum');
  });

  it('surfaces refusals as its error carrying the OperationOutcome, and stores nothing', async () => {
    const sub = patientSubscription(`${env.receiver().url}/hook/refused`);
    let missing: unknown;
    let forbidden: unknown;
    expect(
      await exchangesOf(async () => {
        missing = await rejection(alice.createResource(withoutReason(sub)));
        forbidden = await rejection(alice.createResource(withEndpoint(sub, 'https://10.1.2.3/hook')));
      }),
    ).toEqual(['POST /fhir/Subscription 400', 'POST /fhir/Subscription 422']);
    // The message is the issue's text, diagnostics and expression, as MedplumClient words any outcome.
    expect(missing).toEqual({
      message:
        'The resource does not have the required structure. (Subscription.reason is required (R4: 1..1): say what it is for) (Subscription.reason)',
      outcome: MISSING_REASON,
    });
    expect(forbidden).toEqual({
      message:
        'The channel endpoint is refused: it names or resolves to a private or reserved address, or does not resolve. (channel.endpoint 10.1.2.3: 10.1.2.3 is a private address) (Subscription.channel.endpoint)',
      outcome: PRIVATE_ENDPOINT,
    });
    const all = await alice.searchResources('Subscription');
    expect(all.map((r: Json) => r.id)).toEqual([id]);
  });

  it('cannot read it with another API key (404)', async () => {
    let refused: unknown;
    expect(
      await exchangesOf(async () => {
        refused = await rejection(bob.readResource('Subscription', id));
      }),
    ).toEqual([`GET /fhir/Subscription/${id} 404`]);
    expect(refused).toEqual({
      message: `No such resource. (Subscription/${id} not found)`,
      outcome: notFound(id),
    });
    expect((await bob.search('Subscription')).total).toBe(0);
    expect((await alice.readResource('Subscription', id)).id).toBe(id);
  });

  it('deletes it', async () => {
    expect(await exchangesOf(() => alice.deleteResource('Subscription', id))).toEqual([
      `DELETE /fhir/Subscription/${id} 204`,
    ]);
    expect(
      await exchangesOf(async () => {
        expect((await rejection(alice.readResource('Subscription', id))).outcome).toEqual(notFound(id));
      }),
    ).toEqual([`GET /fhir/Subscription/${id} 404`]);
    expect((await alice.search('Subscription')).total).toBe(0);
  });

  it("subscribeToCriteria: its subscription manager binds on Medplum's socket path and gets each change as Medplum routes it", async () => {
    // Node 20 has no global WebSocket; the manager takes the browser's, which `ws` implements.
    const globals = globalThis as { WebSocket?: unknown };
    const before = globals.WebSocket;
    globals.WebSocket = WebSocket;
    // Its default FHIR path (`fhir/R4`), as an app has it: the manager asks `fhir/R4/…` whatever it is.
    const medplum = new MedplumClient({ baseUrl: env.broker().url, cacheTime: 0, accessToken: API_KEYS.alice });
    const seen: { type: string; payload?: unknown }[] = [];
    try {
      const emitter = medplum.subscribeToCriteria(`Patient?_id=${PATIENT}`);
      for (const type of ['connect', 'message', 'error'] as const) {
        emitter.addEventListener(type, (e) => seen.push(e as { type: string; payload?: unknown }));
      }
      // The handshake of the classic websocket Subscription it created reaches this criteria's emitter.
      await until(() => seen.some((e) => e.type === 'connect'), 'connect');
      const connected = seen.find((e) => e.type === 'connect')?.payload as { subscriptionId: string } | undefined;
      const subscriptionId = connected?.subscriptionId ?? '';
      const created = await alice.readResource('Subscription', subscriptionId);
      expect([created.channel?.type, created.criteria]).toEqual(['websocket', `Patient?_id=${PATIENT}`]);
      // (An event of its own: the fixture's id was taken by the tests above, and would be a duplicate.)
      await postEvent(env.broker(), eventLike('healthlake-update-patient', 'medplum-ws', PATIENT));
      await until(() => seen.some((e) => e.type === 'message'), 'the change');
      const bundle = seen.find((e) => e.type === 'message')?.payload as Json;
      const status = (bundle.entry as Json[])[0]?.resource as Json;
      expect(status).toMatchObject({
        resourceType: 'SubscriptionStatus',
        type: 'event-notification',
        subscription: { reference: `Subscription/${subscriptionId}` },
        notificationEvent: [{ eventNumber: '1', focus: { reference: `${HL}/Patient/${PATIENT}` } }],
      });
      // Its subscription has no payload (R4's empty content); on Medplum's path it names the change,
      // as Medplum's server does, with the entry an id-only notification has.
      expect((bundle.entry as Json[]).slice(1)).toEqual([
        expect.objectContaining({
          fullUrl: `${HL}/Patient/${PATIENT}`,
          request: { method: 'PUT', url: `Patient/${PATIENT}` },
        }),
      ]);
      expect(seen.filter((e) => e.type === 'error')).toEqual([]);
      // Let go of one of two: the manager unbinds with its token, unanswered on this path as
      // Medplum's client expects (it takes any message but a pong for a bundle, and fails on it).
      const other = medplum.subscribeToCriteria('Patient?_id=someone-else');
      const connects = () => seen.filter((e) => e.type === 'connect').length;
      other.addEventListener('connect', (e) => seen.push(e as { type: string; payload?: unknown }));
      await until(() => connects() === 2, 'the second connect');
      expect(seen.filter((e) => e.type === 'error')).toEqual([]);
      const socket = medplum.getSubscriptionManager().getWebSocket();
      const after: string[] = [];
      socket.addEventListener('message', (e: { data: unknown }) => after.push(String(e.data)));
      medplum.unsubscribeFromCriteria('Patient?_id=someone-else');
      // Messages are handled in order: the answer to this comes after whatever the unbind was answered.
      socket.send(JSON.stringify({ type: 'bind-with-token', payload: { token: 'v1.not.a-token' } }));
      await until(() => after.length > 0, 'the answer to the bad bind');
      expect(after.map((m) => (JSON.parse(m) as Json).type)).toEqual(['error']);
      // As on Medplum's server, what its client made for a socket lasts as long as it holds it:
      // the one let go of is deleted (a reconnect makes them anew, so none piles up), and the other
      // once the socket closes.
      const otherId = (seen.filter((e) => e.type === 'connect')[1]?.payload as { subscriptionId?: string } | undefined)
        ?.subscriptionId;
      const gone = async (id: string) =>
        await alice.readResource('Subscription', id).then(
          () => false,
          () => true,
        );
      // (The unbind was handled, deletion included, before the bad bind was answered.)
      expect(await gone(otherId ?? '')).toBe(true);
      expect(await gone(subscriptionId)).toBe(false);
      medplum.getSubscriptionManager().closeWebSocket();
      for (let i = 0; i < 100 && !(await gone(subscriptionId)); i++) await new Promise((r) => setTimeout(r, 50));
      expect(await gone(subscriptionId)).toBe(true);
    } finally {
      medplum.getSubscriptionManager().closeWebSocket();
      globals.WebSocket = before;
    }
  });
});
