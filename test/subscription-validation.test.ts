import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKPORT_EXT, BROKER_EXT } from '../src/core/fhir-urls.js';
import { R4_RESOURCE_TYPES } from '../src/core/resource-types.js';
import { classicSubscription, type Json, statusOf, TOPIC, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';

/**
 * Subscriptions the broker had stored although it could not honour them as sent (a modifier that
 * is not a list, a second heartbeat read as the first, a topic version it does not have, a day
 * that does not exist, a payload no request can carry, more types than DynamoDB writes in one
 * transaction): each is refused at the front door, on create and on update, and nothing changes.
 */

const HOOK = 'http://127.0.0.1:9/hook';
const TYPES = [...R4_RESOURCE_TYPES];
const secret = (fill: number) => `whsec_${Buffer.alloc(32, fill).toString('base64')}`;
// `off`: no handshake goes out; what is checked here is what is stored.
const base = topicSubscription('patient-change', HOOK, { extra: { status: 'off' } });
const baseChannel = base.channel as Json;
const withChannel = (channel: Json): Json => ({ ...base, channel: { ...baseChannel, ...channel } });
const resourceChange = (...filters: string[]): Json =>
  topicSubscription('resource-change', HOOK, { filters, extra: { status: 'off' } });

describe('Subscription validation', () => {
  let t: TestBroker;
  let existing: Json;

  beforeAll(async () => {
    t = await inProcessBroker();
    existing = await t.create(base);
  });

  afterAll(async () => t?.broker.close(0));

  const issueOf = (body: Json) => {
    const issue = (body.issue as Json[])[0] as Json;
    const coding = ((issue.details as Json).coding as Json[])[0] as Json;
    return {
      code: coding.code,
      expression: (issue.expression as string[] | undefined)?.[0],
      diagnostics: issue.diagnostics,
    };
  };

  it.each<[string, Json, number, string, string]>([
    [
      'a modifierExtension that is an object',
      { ...base, modifierExtension: { url: 'http://example.org/must-understand', valueBoolean: true } },
      400,
      'INVALID_RESOURCE',
      'Subscription.modifierExtension',
    ],
    [
      'a channel modifierExtension that is an object',
      withChannel({ modifierExtension: { url: 'http://example.org/x' } }),
      400,
      'INVALID_RESOURCE',
      'Subscription.channel.modifierExtension',
    ],
    ['extension as a string', { ...base, extension: 'x' }, 400, 'INVALID_RESOURCE', 'Subscription.extension'],
    ['contained as a string', { ...base, contained: 'x' }, 400, 'INVALID_RESOURCE', 'Subscription.contained'],
    ['contact as a number', { ...base, contact: 5 }, 400, 'INVALID_RESOURCE', 'Subscription.contact'],
    ['implicitRules as a number', { ...base, implicitRules: 7 }, 400, 'INVALID_RESOURCE', 'Subscription.implicitRules'],
    ['language as an object', { ...base, language: {} }, 400, 'INVALID_RESOURCE', 'Subscription.language'],
    ['_status as a number', { ...base, _status: 5 }, 400, 'INVALID_RESOURCE', 'Subscription._status'],
    [
      'two backport-heartbeat-period extensions',
      withChannel({
        extension: [
          { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 },
          { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 'abc' },
        ],
      }),
      422,
      'UNSUPPORTED_CHANNEL',
      'Subscription.channel.extension',
    ],
    [
      'two webhook secrets',
      withChannel({
        extension: [
          { url: BROKER_EXT.webhookSecret, valueString: secret(1) },
          { url: BROKER_EXT.webhookSecret, valueString: secret(2) },
        ],
      }),
      422,
      'UNSUPPORTED_CHANNEL',
      'Subscription.channel.extension',
    ],
    [
      'two backport-payload-content extensions',
      withChannel({
        _payload: {
          extension: [
            { url: BACKPORT_EXT.payloadContent, valueCode: 'empty' },
            { url: BACKPORT_EXT.payloadContent, valueCode: 'full-resource' },
          ],
        },
      }),
      422,
      'UNSUPPORTED_CONTENT',
      'Subscription.channel._payload',
    ],
    [
      'a topic version the broker does not offer',
      { ...base, criteria: `${TOPIC}/patient-change|9.9` },
      422,
      'UNKNOWN_TOPIC',
      'Subscription.criteria',
    ],
    [
      'a topic version that is no version',
      { ...base, criteria: `${TOPIC}/patient-change|not a version at all` },
      422,
      'UNKNOWN_TOPIC',
      'Subscription.criteria',
    ],
    ['an end on February 30', { ...base, end: '2099-02-30T00:00:00Z' }, 400, 'INVALID_RESOURCE', 'Subscription.end'],
    ['an end in month 13', { ...base, end: '2099-13-01T00:00:00Z' }, 400, 'INVALID_RESOURCE', 'Subscription.end'],
    [
      'a payload with a CR/LF after its semicolon',
      withChannel({ payload: 'application/fhir+json;\r\nX-Injected: yes' }),
      422,
      'UNSUPPORTED_CONTENT',
      'Subscription.channel.payload',
    ],
    [
      'resource-change narrowed to 120 types',
      resourceChange(`_type=${TYPES.slice(0, 120).join(',')}`),
      422,
      'UNSUPPORTED_FILTER',
      'Subscription._criteria.extension',
    ],
    [
      'resource-change narrowed to 90 types and 1,500 ids',
      resourceChange(
        `_type=${TYPES.slice(0, 90).join(',')}`,
        `_id=${Array.from({ length: 1500 }, (_, i) => `id-${String(i).padStart(36, '0')}`).join(',')}`,
      ),
      422,
      'UNSUPPORTED_FILTER',
      'Subscription._criteria.extension',
    ],
  ])(
    'refuses %s with an OperationOutcome naming it, on create and on update, and stores nothing',
    async (_name, body, status, code, expression) => {
      const before = await t.broker.store.listSubscriptions('alice');
      const created = await t.call('POST', '/fhir/Subscription', body);
      expect([created.status, issueOf(created.body).code, issueOf(created.body).expression]).toEqual([
        status,
        code,
        expression,
      ]);
      const updated = await t.call('PUT', `/fhir/Subscription/${existing.id}`, { ...body, id: existing.id });
      expect([updated.status, issueOf(updated.body).code, issueOf(updated.body).expression]).toEqual([
        status,
        code,
        expression,
      ]);
      expect(await t.broker.store.listSubscriptions('alice')).toEqual(before);
    },
  );

  it('refuses a heartbeat period on a classic Subscription: R4 has none, and its empty POST would read as a change', async () => {
    const classic = {
      ...classicSubscription('Patient', HOOK),
      status: 'off',
      channel: {
        type: 'rest-hook',
        endpoint: HOOK,
        extension: [{ url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 }],
      },
    };
    const before = await t.broker.store.listSubscriptions('alice');
    const res = await t.call('POST', '/fhir/Subscription', classic);
    expect([res.status, issueOf(res.body).code, issueOf(res.body).expression]).toEqual([
      422,
      'UNSUPPORTED_CHANNEL',
      'Subscription.channel.extension',
    ]);
    expect(await t.broker.store.listSubscriptions('alice')).toEqual(before);
    // Without it, the same classic Subscription is taken.
    const plain = await t.call('POST', '/fhir/Subscription', {
      ...classicSubscription('Patient', HOOK),
      status: 'off',
    });
    expect(plain.status).toBe(201);
  });

  it('says an end in month 13 is not a valid instant, not that it has passed', async () => {
    const res = await t.call('POST', '/fhir/Subscription', { ...base, end: '2099-13-01T00:00:00Z' });
    expect(issueOf(res.body).diagnostics).toBe(
      'Subscription.end "2099-13-01T00:00:00Z" is not a valid instant: there is no month 13',
    );
  });

  it('says how many types are allowed and how to watch them all', async () => {
    const res = await t.call('POST', '/fhir/Subscription', resourceChange(`_type=${TYPES.slice(0, 41).join(',')}`));
    expect(issueOf(res.body).diagnostics).toBe(
      'The Subscription would watch 41 resource types; at most 40 are allowed: drop _type to watch every resource type, or name fewer',
    );
  });

  it('takes the topic’s own version, and $status names it', async () => {
    const created = await t.create({ ...base, criteria: `${TOPIC}/patient-change|1.0.0` });
    const status = await t.call('GET', `/fhir/Subscription/${created.id}/$status`);
    expect(statusOf(status.body).params.get('topic')).toEqual({
      name: 'topic',
      valueCanonical: `${TOPIC}/patient-change|1.0.0`,
    });
  });

  it('takes 40 types, and an update to 40 others', async () => {
    const created = await t.create(resourceChange(`_type=${TYPES.slice(0, 40).join(',')}`));
    const next = { ...resourceChange(`_type=${TYPES.slice(40, 80).join(',')}`), id: created.id };
    expect((await t.call('PUT', `/fhir/Subscription/${created.id}`, next)).status).toBe(200);
    expect((await t.broker.store.getSubscription(created.id as string))?.match.resourceTypes).toEqual(
      TYPES.slice(40, 80),
    );
  });
});
