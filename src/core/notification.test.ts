import { describe, expect, it } from 'vitest';
import { validateFhir } from '../../test/support/fhir-schema.js';
import { prng } from '../../test/support/prng.js';
import { BACKPORT_PROFILE } from './fhir-urls.js';
import {
  type BundleContext,
  buildNotificationBundle,
  buildStatusBundle,
  buildStatusParameters,
  type NotificationType,
  notificationBundleJson,
  type StatusSource,
  withDeliveryStates,
} from './notification.js';
import type {
  FhirResource,
  Interaction,
  Notification,
  PayloadContent,
  StoredNotification,
  SubscriptionStatus,
} from './types.js';

const BROKER = 'http://127.0.0.1:8080/fhir';
const HEALTHLAKE = 'https://healthlake.us-east-1.amazonaws.com/datastore/ds1/r4';
const TOPIC = 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change';
const NOW = '2030-01-01T00:00:00.000Z';

/** Sequential ids so the expected bundles are exact. */
function context(): BundleContext {
  let n = 0;
  return {
    fhirBase: BROKER,
    newId: () => {
      n += 1;
      return `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
    },
    timestamp: NOW,
  };
}

const ID1 = '00000000-0000-4000-8000-000000000001';
const ID2 = '00000000-0000-4000-8000-000000000002';
const ID3 = '00000000-0000-4000-8000-000000000003';

const topicSub: StatusSource = { id: 'sub1', kind: 'topic', topic: TOPIC, status: 'active', eventsSinceStart: 3 };
const classicSub: StatusSource = {
  id: 'sub2',
  kind: 'classic',
  topic: 'Patient',
  status: 'active',
  eventsSinceStart: 1,
};

function note(
  eventNumber: number,
  interaction: Interaction,
  resourceId?: string,
  resourceType = 'Patient',
): Notification {
  return {
    subscriptionId: 'sub1',
    eventNumber,
    change: {
      eventId: `ev${eventNumber}`,
      resourceType,
      ...(resourceId === undefined ? {} : { resourceId }),
      interaction,
      datastoreId: 'ds1',
      fhirBase: HEALTHLAKE,
      time: `2029-12-31T23:59:0${eventNumber}.000Z`,
    },
  };
}

function statusEntry(id: string, subId: string, parameter: unknown[]): unknown {
  return {
    fullUrl: `urn:uuid:${id}`,
    resource: { resourceType: 'Parameters', id, meta: { profile: [BACKPORT_PROFILE.status] }, parameter },
    request: { method: 'GET', url: `${BROKER}/Subscription/${subId}/$status` },
    response: { status: '200' },
  };
}

/** The status parameters before the events; `topic` only where it belongs (not in an empty payload). */
function head(sub: StatusSource, type: string, { topic = sub.kind === 'topic' } = {}): unknown[] {
  return [
    { name: 'subscription', valueReference: { reference: `${BROKER}/Subscription/${sub.id}` } },
    ...(topic ? [{ name: 'topic', valueCanonical: sub.topic }] : []),
    { name: 'status', valueCode: sub.status },
    { name: 'type', valueCode: type },
    { name: 'events-since-subscription-start', valueString: String(sub.eventsSinceStart) },
  ];
}

function statusParameters(bundle: FhirResource): { name: string }[] {
  const entry = (bundle.entry as { resource: { parameter: { name: string }[] } }[])[0];
  return entry?.resource.parameter ?? [];
}

/** Asserts the bundle is valid FHIR R4 and returns it, so every built bundle is also schema-checked. */
function valid(resource: FhirResource): FhirResource {
  expect(validateFhir(resource)).toEqual([]);
  return resource;
}

describe('buildNotificationBundle', () => {
  it('builds a handshake: a history bundle with only the status entry', () => {
    const sub: StatusSource = { ...topicSub, status: 'requested', eventsSinceStart: 0 };
    expect(valid(buildNotificationBundle(sub, 'handshake', [], 'id-only', context()))).toEqual({
      resourceType: 'Bundle',
      id: ID2,
      meta: { profile: [BACKPORT_PROFILE.notification] },
      type: 'history',
      timestamp: NOW,
      entry: [statusEntry(ID1, 'sub1', head(sub, 'handshake'))],
    });
  });

  it('builds a heartbeat with no events', () => {
    const bundle = valid(buildNotificationBundle(topicSub, 'heartbeat', [], 'id-only', context()));
    expect(bundle.entry).toEqual([statusEntry(ID1, 'sub1', head(topicSub, 'heartbeat'))]);
  });

  it.each<NotificationType>(['handshake', 'heartbeat', 'event-notification', 'query-event'])(
    'leaves the topic out of an empty %s, as the IG’s status profile says it SHOULD',
    (type) => {
      const bundle = valid(buildNotificationBundle(topicSub, type, [], 'empty', context()));
      expect(bundle.entry).toEqual([statusEntry(ID1, 'sub1', head(topicSub, type, { topic: false }))]);
    },
  );

  it('builds an id-only event notification with a focus and a request/response entry per interaction', () => {
    const events = [note(1, 'create', 'p1'), note(2, 'update', 'p2'), note(3, 'delete', 'p3')];
    expect(valid(buildNotificationBundle(topicSub, 'event-notification', events, 'id-only', context()))).toEqual({
      resourceType: 'Bundle',
      id: ID2,
      meta: { profile: [BACKPORT_PROFILE.notification] },
      type: 'history',
      timestamp: NOW,
      entry: [
        statusEntry(ID1, 'sub1', [
          ...head(topicSub, 'event-notification'),
          {
            name: 'notification-event',
            part: [
              { name: 'event-number', valueString: '1' },
              { name: 'timestamp', valueInstant: '2029-12-31T23:59:01.000Z' },
              { name: 'focus', valueReference: { reference: `${HEALTHLAKE}/Patient/p1` } },
            ],
          },
          {
            name: 'notification-event',
            part: [
              { name: 'event-number', valueString: '2' },
              { name: 'timestamp', valueInstant: '2029-12-31T23:59:02.000Z' },
              { name: 'focus', valueReference: { reference: `${HEALTHLAKE}/Patient/p2` } },
            ],
          },
          {
            name: 'notification-event',
            part: [
              { name: 'event-number', valueString: '3' },
              { name: 'timestamp', valueInstant: '2029-12-31T23:59:03.000Z' },
              { name: 'focus', valueReference: { reference: `${HEALTHLAKE}/Patient/p3` } },
            ],
          },
        ]),
        {
          fullUrl: `${HEALTHLAKE}/Patient/p1`,
          request: { method: 'POST', url: 'Patient' },
          response: { status: '201', lastModified: '2029-12-31T23:59:01.000Z' },
        },
        {
          fullUrl: `${HEALTHLAKE}/Patient/p2`,
          request: { method: 'PUT', url: 'Patient/p2' },
          response: { status: '200', lastModified: '2029-12-31T23:59:02.000Z' },
        },
        {
          fullUrl: `${HEALTHLAKE}/Patient/p3`,
          request: { method: 'DELETE', url: 'Patient/p3' },
          response: { status: '204', lastModified: '2029-12-31T23:59:03.000Z' },
        },
      ],
    });
  });

  it('names the focus of an event without a resource id by type and server, with no entry', () => {
    const events = [note(4, 'update', undefined, 'Observation')];
    const bundle = valid(buildNotificationBundle(topicSub, 'event-notification', events, 'id-only', context()));
    expect(bundle.entry).toEqual([
      statusEntry(ID1, 'sub1', [
        ...head(topicSub, 'event-notification'),
        {
          name: 'notification-event',
          part: [
            { name: 'event-number', valueString: '4' },
            { name: 'timestamp', valueInstant: '2029-12-31T23:59:04.000Z' },
            // id-only SHALL carry a focus (IG, Payloads): a Reference that names what it cannot point to.
            {
              name: 'focus',
              valueReference: {
                type: 'Observation',
                display: `Observation on ${HEALTHLAKE}; the change event names no id`,
              },
            },
          ],
        },
      ]),
    ]);
  });

  it('builds empty content with no focus and only the status entry', () => {
    const events = [note(1, 'create', 'p1'), note(2, 'delete', 'p2')];
    const bundle = valid(buildNotificationBundle(topicSub, 'event-notification', events, 'empty', context()));
    expect(bundle.entry).toEqual([
      statusEntry(ID1, 'sub1', [
        ...head(topicSub, 'event-notification', { topic: false }),
        {
          name: 'notification-event',
          part: [
            { name: 'event-number', valueString: '1' },
            { name: 'timestamp', valueInstant: '2029-12-31T23:59:01.000Z' },
          ],
        },
        {
          name: 'notification-event',
          part: [
            { name: 'event-number', valueString: '2' },
            { name: 'timestamp', valueInstant: '2029-12-31T23:59:02.000Z' },
          ],
        },
      ]),
    ]);
  });

  it('leaves out the topic parameter for a classic subscription', () => {
    const bundle = valid(
      buildNotificationBundle(classicSub, 'event-notification', [note(1, 'update', 'p1')], 'empty', context()),
    );
    expect(bundle.entry).toEqual([
      statusEntry(ID1, 'sub2', [
        { name: 'subscription', valueReference: { reference: `${BROKER}/Subscription/sub2` } },
        { name: 'status', valueCode: 'active' },
        { name: 'type', valueCode: 'event-notification' },
        { name: 'events-since-subscription-start', valueString: '1' },
        {
          name: 'notification-event',
          part: [
            { name: 'event-number', valueString: '1' },
            { name: 'timestamp', valueInstant: '2029-12-31T23:59:01.000Z' },
          ],
        },
      ]),
    ]);
  });

  it('builds a valid query-event bundle', () => {
    const events = [note(1, 'create', 'p1'), note(2, 'update')];
    const bundle = valid(buildNotificationBundle(topicSub, 'query-event', events, 'id-only', context()));
    expect(Array.isArray(bundle.entry) ? bundle.entry.length : 0).toBe(2);
  });
});

describe('buildStatusParameters', () => {
  it('carries the error parameter when the status is error', () => {
    const sub: StatusSource = { ...topicSub, status: 'error', error: 'endpoint answered 500 seven times' };
    expect(valid(buildStatusParameters(sub, 'query-status', [], 'empty', context()))).toEqual({
      resourceType: 'Parameters',
      id: ID1,
      meta: { profile: [BACKPORT_PROFILE.status] },
      parameter: [
        ...head(sub, 'query-status'),
        { name: 'error', valueCodeableConcept: { text: 'endpoint answered 500 seven times' } },
      ],
    });
  });

  it('leaves a stale error out once the subscription is no longer in error', () => {
    const sub: StatusSource = { ...topicSub, status: 'active', error: 'old failure' };
    const params = buildStatusParameters(sub, 'query-status', [], 'empty', context());
    expect(params.parameter).toEqual(head(sub, 'query-status'));
  });
});

describe('buildStatusBundle', () => {
  it('builds a searchset with one status Parameters per subscription', () => {
    const errored: StatusSource = { ...classicSub, status: 'error', error: 'gone' };
    expect(valid(buildStatusBundle([topicSub, errored], context()))).toEqual({
      resourceType: 'Bundle',
      id: ID1,
      type: 'searchset',
      timestamp: NOW,
      total: 2,
      entry: [
        {
          fullUrl: `urn:uuid:${ID2}`,
          resource: {
            resourceType: 'Parameters',
            id: ID2,
            meta: { profile: [BACKPORT_PROFILE.status] },
            parameter: head(topicSub, 'query-status'),
          },
          search: { mode: 'match' },
        },
        {
          fullUrl: `urn:uuid:${ID3}`,
          resource: {
            resourceType: 'Parameters',
            id: ID3,
            meta: { profile: [BACKPORT_PROFILE.status] },
            parameter: [...head(errored, 'query-status'), { name: 'error', valueCodeableConcept: { text: 'gone' } }],
          },
          search: { mode: 'match' },
        },
      ],
    });
  });

  it('builds an empty searchset without an entry: R4 JSON has no empty arrays', () => {
    expect(valid(buildStatusBundle([], context()))).toEqual({
      resourceType: 'Bundle',
      id: ID1,
      type: 'searchset',
      timestamp: NOW,
      total: 0,
    });
  });
});

describe('withDeliveryStates', () => {
  const DELIVERY = 'https://fhir-subscription-broker.org/fhir/StructureDefinition/delivery';
  const stored = (
    n: number,
    state: 'pending' | 'delivered' | 'dead',
    attempts: number,
    lastError?: string,
  ): StoredNotification => ({
    ...note(n, 'update', `p${n}`),
    state,
    attempts,
    dueAt: Date.parse('2030-01-01T01:00:00.000Z'),
    ...(lastError === undefined ? {} : { lastError }),
  });
  const notes = [
    stored(1, 'delivered', 2, 'HTTP 503'),
    stored(2, 'pending', 3, 'timeout after 10000 ms'),
    stored(3, 'dead', 7, 'HTTP 500'),
    stored(4, 'pending', 0),
    // Started over by a re-activation while its attempt was on the wire: that attempt's error is of before.
    stored(5, 'pending', 0, 'HTTP 500'),
  ];
  /** The extension `withDeliveryStates` should write: state, attempts, then `more` in order. */
  const expected = (state: string, attempts: number, ...more: unknown[]) => [
    {
      url: DELIVERY,
      extension: [{ url: 'state', valueCode: state }, { url: 'attempts', valueUnsignedInt: attempts }, ...more],
    },
  ];
  const lastError = (valueString: string) => ({ url: 'lastError', valueString });
  const deliveryOf = (bundle: FhirResource) =>
    statusParameters(bundle)
      .filter((p) => p.name === 'notification-event')
      .map((p) => (p as { extension?: unknown[] }).extension);

  it('adds to each notification-event its state, attempts and, while it is not delivered, the last error', () => {
    const bundle = withDeliveryStates(
      buildNotificationBundle(topicSub, 'query-event', notes, 'id-only', context()),
      notes,
      topicSub,
    );
    expect(deliveryOf(valid(bundle))).toEqual([
      expected('delivered', 2),
      expected(
        'pending',
        3,
        { url: 'due', valueInstant: '2030-01-01T01:00:00.000Z' },
        lastError('timeout after 10000 ms'),
      ),
      expected('dead', 7, lastError('HTTP 500')),
      // Not attempted yet: nothing due to say.
      expected('pending', 0),
      // Started over by a re-activation: no error of before it.
      expected('pending', 0),
    ]);
  });

  it('says no due time while the subscription is not active (nothing is tried), and works on empty content', () => {
    const errored: StatusSource = { ...topicSub, status: 'error', error: 'gone' };
    const bundle = withDeliveryStates(
      buildNotificationBundle(errored, 'query-event', notes, 'empty', context()),
      notes,
      errored,
    );
    const second = deliveryOf(valid(bundle))[1] as { extension: { url: string }[] }[];
    expect(second[0]?.extension.map((e) => e.url)).toEqual(['state', 'attempts', 'lastError']);
  });
});

describe('validateFhir', () => {
  const good = (): Record<string, unknown> => ({
    resourceType: 'Bundle',
    type: 'history',
    entry: [{ fullUrl: 'urn:uuid:x', request: { method: 'GET', url: 'Patient/1' }, response: { status: '200' } }],
  });

  it('accepts a minimal valid bundle', () => {
    expect(validateFhir(good())).toEqual([]);
  });

  it('rejects an entry.request.method that is not an HTTP verb', () => {
    const bad = { ...good(), entry: [{ request: { method: 'FOO', url: 'Patient/1' } }] };
    expect(validateFhir(bad)).toEqual([
      '/entry/0/request/method must be equal to one of the allowed values (["GET","HEAD","POST","PUT","DELETE","PATCH"])',
    ]);
  });

  it('rejects an unknown Bundle.type and an unknown property', () => {
    expect(validateFhir({ ...good(), type: 'notification' }).length).toBeGreaterThan(0);
    expect(validateFhir({ ...good(), colour: 'blue' })).toEqual([
      '(resource) must NOT have additional properties (colour)',
    ]);
  });

  it('rejects a contained resource of an unknown type and a malformed nested Parameters', () => {
    expect(validateFhir({ ...good(), entry: [{ resource: { resourceType: 'Nope' } }] })).toEqual([
      '/entry/0/resource value of tag "resourceType" must be in oneOf',
    ]);
    const badParams = { resourceType: 'Parameters', parameter: [{ name: 'x', valueInstant: 'yesterday' }] };
    expect(validateFhir({ ...good(), entry: [{ resource: badParams }] }).length).toBeGreaterThan(0);
  });

  it('rejects something that is not a resource', () => {
    expect(validateFhir({ type: 'history' }).length).toBeGreaterThan(0);
    expect(validateFhir('Bundle').length).toBeGreaterThan(0);
  });
});

describe('notificationBundleJson', () => {
  const TYPES: NotificationType[] = ['handshake', 'heartbeat', 'event-notification', 'query-status', 'query-event'];
  const STATUSES: SubscriptionStatus[] = ['requested', 'active', 'error', 'off'];
  const CONTENTS: PayloadContent[] = ['empty', 'id-only', 'full-resource'];
  const INTERACTIONS: Interaction[] = ['create', 'update', 'delete'];
  // Strings that JSON must escape, or that look like JSON themselves.
  const AWKWARD = [
    'plain',
    'with "quotes"',
    'back\\slash',
    'line\nbreak',
    'tab\t',
    'ctl\u0001',
    'sep\u2028',
    'ünï 😀',
    '},{"x":1',
  ];

  it('writes the same bytes as JSON.stringify(buildNotificationBundle(...)), over random inputs', () => {
    const random = prng(20261126);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)] as T;
    for (let i = 0; i < 3000; i++) {
      const status = pick(STATUSES);
      const sub: StatusSource = {
        id: `sub-${pick(AWKWARD)}`,
        kind: random() < 0.5 ? 'topic' : 'classic',
        topic: pick(AWKWARD),
        status,
        eventsSinceStart: Math.floor(random() * 1e9),
        ...(random() < 0.5 ? { error: pick(AWKWARD) } : {}),
      };
      const events: Notification[] = Array.from({ length: Math.floor(random() * 4) }, (_, k) => {
        const resourceId = random() < 0.8 ? pick(AWKWARD) : undefined;
        return {
          subscriptionId: sub.id,
          eventNumber: k + 1 + Math.floor(random() * 1000),
          change: {
            eventId: `e${k}`,
            resourceType: pick(['Patient', 'Observation', pick(AWKWARD)]),
            ...(resourceId === undefined ? {} : { resourceId }),
            interaction: pick(INTERACTIONS),
            datastoreId: 'ds',
            fhirBase: pick([HEALTHLAKE, `https://h.example/${pick(AWKWARD)}`]),
            time: pick(['2030-01-01T00:00:00Z', pick(AWKWARD)]),
            ...(random() < 0.5
              ? {
                  resource: JSON.stringify({
                    resourceType: 'Patient',
                    id: pick(AWKWARD),
                    name: [{ text: pick(AWKWARD) }],
                  }),
                }
              : {}),
          },
        };
      });
      const type = pick(TYPES);
      const content = pick(CONTENTS);
      // Each side gets its own context with the same id sequence: ids must be drawn in the same order.
      const base = random() < 0.5 ? BROKER : `http://b/${pick(AWKWARD)}`;
      const expected = JSON.stringify(
        buildNotificationBundle(sub, type, events, content, { ...context(), fhirBase: base }),
      );
      expect(notificationBundleJson(sub, type, events, content, { ...context(), fhirBase: base })).toBe(expected);
      // Both writers leave the topic out of an empty payload, and only there ($status keeps it).
      const topicNamed = sub.kind === 'topic' && (content !== 'empty' || type === 'query-status');
      expect(expected.includes('{"name":"topic",')).toBe(topicNamed);
    }
  });

  it.each<[NotificationType, PayloadContent, boolean]>([
    ['handshake', 'empty', false],
    ['heartbeat', 'empty', false],
    ['event-notification', 'empty', false],
    ['query-event', 'empty', false],
    ['query-status', 'empty', true],
    ['event-notification', 'id-only', true],
  ])('writes a %s with %s content with the topic: %s', (type, content, named) => {
    const json = notificationBundleJson(topicSub, type, [note(4, 'update', 'p1')], content, context());
    const status = statusParameters(JSON.parse(json) as FhirResource);
    expect(status.some((p) => p.name === 'topic')).toBe(named);
  });

  it('carries the resource in a full-resource notification, in its focus entry (not for a delete, nor for id-only)', () => {
    const patient = { resourceType: 'Patient', id: 'p1', meta: { versionId: '2' }, name: [{ family: 'Chalmers' }] };
    const carrying = (interaction: Interaction, content: PayloadContent) => {
      const n = note(4, interaction, 'p1');
      const events = [{ ...n, change: { ...n.change, resource: JSON.stringify(patient) } }];
      const bundle = JSON.parse(notificationBundleJson(topicSub, 'event-notification', events, content, context()));
      expect(validateFhir(bundle)).toEqual([]);
      return bundle.entry[1];
    };
    const update = carrying('update', 'full-resource');
    expect(Object.keys(update)).toEqual(['fullUrl', 'resource', 'request', 'response']);
    expect(update.resource).toEqual(patient);
    expect(update.fullUrl).toBe(`${HEALTHLAKE}/Patient/p1`);
    expect(carrying('create', 'full-resource').resource).toEqual(patient);
    expect(carrying('delete', 'full-resource')).not.toHaveProperty('resource');
    expect(carrying('update', 'id-only')).not.toHaveProperty('resource');
    // One that could not be read goes without, as id-only would.
    const bare = JSON.parse(
      notificationBundleJson(topicSub, 'event-notification', [note(4, 'update', 'p1')], 'full-resource', context()),
    );
    expect(bare.entry[1]).not.toHaveProperty('resource');
    expect(bare.entry[1].fullUrl).toBe(`${HEALTHLAKE}/Patient/p1`);
  });

  it('is a valid notification bundle for a typical event', () => {
    const json = notificationBundleJson(
      topicSub,
      'event-notification',
      [note(4, 'update', 'p1')],
      'id-only',
      context(),
    );
    expect(validateFhir(JSON.parse(json) as FhirResource)).toEqual([]);
  });
});
