import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadTopicCatalog } from '../store/topic-files.js';
import { BrokerError, type ErrorCode } from './errors.js';
import { BACKPORT_EXT, BACKPORT_PROFILE, BROKER_EXT } from './fhir-urls.js';
import { R4_RESOURCE_TYPES } from './resource-types.js';
import {
  isWebhookSecret,
  MAX_RESOURCE_TYPES,
  parseSubscription,
  requireReason,
  type SubscriptionSpec,
} from './subscription.js';

const topics = loadTopicCatalog(join(import.meta.dirname, '..', '..', 'subscriptions', 'topics'));

const TOPIC_BASE = 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic';
const PATIENT_TOPIC = `${TOPIC_BASE}/patient-change`;
const RESOURCE_TOPIC = `${TOPIC_BASE}/resource-change`;
const ENDPOINT = 'https://hooks.example.com/fhir';
const ALL = ['create', 'update', 'delete'];
// 32 bytes of base64: a valid Standard Webhooks secret.
const SECRET = `whsec_${Buffer.alloc(32, 7).toString('base64')}`;
/** A cross-version URL for the backport IG's extensions: not theirs, so not understood. */
const CROSS_VERSION = 'http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition';

type Json = Record<string, unknown>;

function filter(valueString: string): Json {
  return { url: BACKPORT_EXT.filterCriteria, valueString };
}

function topicSub(options: { topic?: string; filters?: string[]; channel?: Json; extra?: Json } = {}): Json {
  return {
    resourceType: 'Subscription',
    reason: 'test',
    criteria: options.topic ?? PATIENT_TOPIC,
    ...(options.filters === undefined ? {} : { _criteria: { extension: options.filters.map(filter) } }),
    channel: { type: 'rest-hook', endpoint: ENDPOINT, payload: 'application/fhir+json', ...options.channel },
    ...options.extra,
  };
}

function classicSub(criteria: string, channel: Json = {}): Json {
  return {
    resourceType: 'Subscription',
    reason: 'test',
    criteria,
    channel: { type: 'rest-hook', endpoint: ENDPOINT, ...channel },
  };
}

function parse(input: unknown): SubscriptionSpec {
  return parseSubscription(input, topics);
}

/** The BrokerError code `parse(input)` throws, or a description of what happened instead. */
function errorCode(input: unknown): ErrorCode | string {
  try {
    parse(input);
    return 'no error';
  } catch (err) {
    return err instanceof BrokerError ? err.code : `${(err as Error).name}: ${(err as Error).message}`;
  }
}

function thrown(input: unknown): BrokerError {
  try {
    parse(input);
  } catch (err) {
    if (err instanceof BrokerError) return err;
    throw err;
  }
  throw new Error('expected parseSubscription to throw');
}

describe('parseSubscription: topic-based', () => {
  it('parses a topic subscription with id-only content and keeps everything the broker needs', () => {
    const input = topicSub({
      filters: ['Patient?_id=a,b'],
      channel: {
        _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' }] },
        header: ['Authorization: Bearer abc'],
        extension: [
          { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 },
          { url: BACKPORT_EXT.timeout, valueUnsignedInt: 30 },
          { url: BACKPORT_EXT.maxCount, valuePositiveInt: 10 },
        ],
      },
      extra: { status: 'requested', end: '2030-01-01T00:00:00Z', reason: 'chart sync' },
    });
    expect(parse(input)).toEqual({
      kind: 'topic',
      topic: PATIENT_TOPIC,
      match: { resourceTypes: ['Patient'], interactions: ALL, ids: ['a', 'b'] },
      channel: {
        type: 'rest-hook',
        endpoint: ENDPOINT,
        payload: 'application/fhir+json',
        content: 'id-only',
        headers: ['Authorization: Bearer abc'],
        heartbeatPeriodSeconds: 60,
        timeoutSeconds: 30,
        maxCount: 10,
      },
      askedStatus: 'requested',
      end: '2030-01-01T00:00:00Z',
      resource: {
        resourceType: 'Subscription',
        meta: { profile: [BACKPORT_PROFILE.subscription] },
        criteria: PATIENT_TOPIC,
        _criteria: { extension: [filter('Patient?_id=a,b')] },
        end: '2030-01-01T00:00:00Z',
        reason: 'chart sync',
        channel: {
          type: 'rest-hook',
          endpoint: ENDPOINT,
          payload: 'application/fhir+json',
          _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' }] },
          header: ['Authorization: Bearer abc'],
          extension: [
            { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 },
            { url: BACKPORT_EXT.timeout, valueUnsignedInt: 30 },
            { url: BACKPORT_EXT.maxCount, valuePositiveInt: 10 },
          ],
        },
      },
    });
  });

  it('matches every type of the resource-change topic without filters', () => {
    expect(parse(topicSub({ topic: RESOURCE_TOPIC })).match).toEqual({ resourceTypes: '*', interactions: ALL });
  });

  it('narrows resource-change to the types of an unscoped _type filter', () => {
    expect(parse(topicSub({ topic: RESOURCE_TOPIC, filters: ['_type=Patient,Observation'] })).match).toEqual({
      resourceTypes: ['Patient', 'Observation'],
      interactions: ALL,
    });
  });

  it('narrows resource-change with Resource?_type=', () => {
    expect(parse(topicSub({ topic: RESOURCE_TOPIC, filters: ['Resource?_type=Patient'] })).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
    });
  });

  it('narrows resource-change to a type and ids with Patient?_id=', () => {
    expect(parse(topicSub({ topic: RESOURCE_TOPIC, filters: ['Patient?_id=p1'] })).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
      ids: ['p1'],
    });
  });

  it('applies an unscoped _id filter to a single-type topic', () => {
    expect(parse(topicSub({ filters: ['_id=1'] })).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
      ids: ['1'],
    });
  });

  it('ANDs several filters: ids are intersected', () => {
    expect(parse(topicSub({ filters: ['Patient?_id=a,b', 'Patient?_id=b,c'] })).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
      ids: ['b'],
    });
  });

  it('ANDs several filters: types are intersected', () => {
    const sub = topicSub({ topic: RESOURCE_TOPIC, filters: ['_type=Patient,Observation', '_type=Observation'] });
    expect(parse(sub).match).toEqual({ resourceTypes: ['Observation'], interactions: ALL });
  });

  it.each<[string, Json, string]>([
    ['a cross-version filter URL', topicSub({ topic: RESOURCE_TOPIC }), `${CROSS_VERSION}/backport-filter-criteria`],
    ['an unknown extension beside a filter', topicSub({ filters: ['Patient?_id=a'] }), 'https://example.org/other'],
    ['a filter on a classic Subscription', classicSub('Patient'), BACKPORT_EXT.filterCriteria],
  ])(
    'refuses %s on _criteria with UNSUPPORTED_FILTER, naming it, instead of matching every change',
    (_name, base, url) => {
      const own = ((base._criteria as Json | undefined)?.extension as Json[] | undefined) ?? [];
      const err = thrown({ ...base, _criteria: { extension: [...own, { url, valueString: 'Patient?_id=a' }] } });
      expect([err.code, err.status, err.expression]).toEqual([
        'UNSUPPORTED_FILTER',
        422,
        'Subscription._criteria.extension',
      ]);
      expect(err.message).toContain(`Extension ${url} on `);
      expect(err.message).toContain('cannot be honoured');
    },
  );

  it('resolves a versioned topic canonical', () => {
    expect(parse(topicSub({ topic: `${PATIENT_TOPIC}|1.0.0` })).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
    });
  });

  it('defaults to id-only content when a payload is given, and empty when not', () => {
    expect(parse(topicSub()).channel.content).toBe('id-only');
    const noPayload = {
      resourceType: 'Subscription',
      reason: 'test',
      criteria: PATIENT_TOPIC,
      channel: { type: 'rest-hook', endpoint: ENDPOINT },
    };
    expect(parse(noPayload).channel).toEqual({ type: 'rest-hook', endpoint: ENDPOINT, content: 'empty', headers: [] });
  });

  it('honours explicit empty content', () => {
    const sub = topicSub({
      channel: { _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'empty' }] } },
    });
    expect(parse(sub).channel.content).toBe('empty');
  });

  it('accepts a payload media type with parameters, and keeps it as given', () => {
    const payload = 'application/fhir+json;fhirVersion=4.0';
    expect(parse(topicSub({ channel: { payload } })).channel.payload).toBe(payload);
  });

  it('accepts application/json as payload', () => {
    expect(parse(topicSub({ channel: { payload: 'application/json' } })).channel.payload).toBe('application/json');
  });

  it('normalises header spacing', () => {
    expect(parse(topicSub({ channel: { header: ['  X-Api-Key :  k1  '] } })).channel.headers).toEqual([
      'X-Api-Key: k1',
    ]);
  });
});

describe('parseSubscription: the stored resource', () => {
  it('drops the webhook secret, status, id, meta.versionId and error; keeps text, its profiles beside the backport one, and other channel extensions', () => {
    const input = topicSub({
      channel: {
        extension: [
          { url: BROKER_EXT.webhookSecret, valueString: SECRET },
          { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 120 },
        ],
      },
      extra: {
        id: 'client-chosen',
        meta: { versionId: '3', profile: ['https://example.org/other'] },
        status: 'active',
        error: 'something',
        text: { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">x</div>' },
      },
    });
    const spec = parse(input);
    expect(spec.webhookSecret).toBe(SECRET);
    expect(spec.askedStatus).toBe('active');
    expect(spec.resource).toEqual({
      resourceType: 'Subscription',
      meta: { profile: ['https://example.org/other', BACKPORT_PROFILE.subscription] },
      reason: 'test',
      criteria: PATIENT_TOPIC,
      text: { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">x</div>' },
      channel: {
        type: 'rest-hook',
        endpoint: ENDPOINT,
        payload: 'application/fhir+json',
        _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' }] },
        extension: [{ url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 120 }],
      },
    });
    expect(JSON.stringify(spec.resource)).not.toContain(SECRET);
  });

  it('removes channel.extension entirely when the secret was the only one', () => {
    const spec = parse(topicSub({ channel: { extension: [{ url: BROKER_EXT.webhookSecret, valueString: SECRET }] } }));
    expect(spec.resource.channel).toEqual({
      type: 'rest-hook',
      endpoint: ENDPOINT,
      payload: 'application/fhir+json',
      _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' }] },
    });
  });

  it('writes in the payload and content a topic-based subscription left to their defaults, as the backport profile requires them', () => {
    const contentOf = (channel: Json) =>
      ((channel._payload as Json | undefined)?.extension as Json[] | undefined)?.find(
        (e) => e.url === BACKPORT_EXT.payloadContent,
      )?.valueCode;
    // No payload: empty content, in FHIR JSON bundles (what the broker sends).
    const bare = parse({
      resourceType: 'Subscription',
      reason: 'test',
      criteria: PATIENT_TOPIC,
      channel: { type: 'rest-hook', endpoint: ENDPOINT },
    });
    expect(bare.channel.content).toBe('empty');
    expect(bare.resource.channel).toMatchObject({ payload: 'application/fhir+json' });
    expect(contentOf(bare.resource.channel as Json)).toBe('empty');
    // A payload without content: id-only.
    const plain = parse(topicSub({ channel: { payload: 'application/json' } }));
    expect(plain.resource.channel).toMatchObject({
      payload: 'application/json',
      _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' }] },
    });
    // Content given: as given.
    const given = parse(
      topicSub({
        channel: { _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'empty' }] } },
      }),
    );
    expect(given.resource.channel).toMatchObject({
      _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'empty' }] },
    });
    // A classic subscription claims no profile: nothing written in.
    const classic = parse(classicSub('Patient?'));
    expect(classic.resource.channel).toEqual({ type: 'rest-hook', endpoint: ENDPOINT });
  });

  it('leaves webhookSecret and askedStatus out when the client sent none', () => {
    const spec = parse(topicSub());
    expect(Object.hasOwn(spec, 'webhookSecret')).toBe(false);
    expect(Object.hasOwn(spec, 'askedStatus')).toBe(false);
    expect(Object.hasOwn(spec, 'end')).toBe(false);
  });

  it('does not modify the input', () => {
    const input = topicSub({ channel: { extension: [{ url: BROKER_EXT.webhookSecret, valueString: SECRET }] } });
    const before = structuredClone(input);
    parse(input);
    expect(input).toEqual(before);
  });
});

describe('parseSubscription: classic criteria', () => {
  it('parses a bare resource type', () => {
    expect(parse(classicSub('Patient'))).toEqual({
      kind: 'classic',
      topic: 'Patient',
      match: { resourceTypes: ['Patient'], interactions: ALL },
      channel: { type: 'rest-hook', endpoint: ENDPOINT, content: 'empty', headers: [] },
      resource: {
        resourceType: 'Subscription',
        reason: 'test',
        criteria: 'Patient',
        channel: { type: 'rest-hook', endpoint: ENDPOINT },
      },
    });
  });

  it('parses Patient?_id=1', () => {
    expect(parse(classicSub('Patient?_id=1')).match).toEqual({
      resourceTypes: ['Patient'],
      interactions: ALL,
      ids: ['1'],
    });
  });

  it('parses a comma-separated _id list', () => {
    expect(parse(classicSub('Observation?_id=o1,o2')).match).toEqual({
      resourceTypes: ['Observation'],
      interactions: ALL,
      ids: ['o1', 'o2'],
    });
  });

  it.each([
    ['a search parameter other than _id', 'Patient?name=x'],
    ['a modifier on _id', 'Patient?_id:not=1'],
    ['a lower-case type', 'patient'],
    ['a relative URL', 'Patient/123'],
    ['an empty _id', 'Patient?_id='],
    ['an _id that is not a FHIR id', 'Patient?_id=a/b'],
  ])('refuses %s with UNSUPPORTED_CRITERIA', (_name, criteria) => {
    expect(errorCode(classicSub(criteria))).toBe('UNSUPPORTED_CRITERIA');
  });

  it('reads a classic subscription with a payload as full-resource (R4: the resource goes to the endpoint), without max-count', () => {
    expect(parse(classicSub('Patient', { payload: 'application/fhir+json' })).channel.content).toBe('full-resource');
    expect(parse(classicSub('Patient')).channel.content).toBe('empty');
    expect(errorCode(classicSub('Patient', { payload: 'application/fhir+xml' }))).toBe('UNSUPPORTED_CONTENT');
    const maxCount = { url: BACKPORT_EXT.maxCount, valuePositiveInt: 5 };
    const err = thrown(classicSub('Patient', { payload: 'application/fhir+json', extension: [maxCount] }));
    expect([err.code, err.expression]).toEqual(['UNSUPPORTED_CHANNEL', 'Subscription.channel.extension']);
    expect(err.message).toContain('backport-max-count does not apply');
  });

  it('refuses malformed percent-encoding in classic criteria as UNSUPPORTED_CRITERIA, not a URIError', () => {
    expect(errorCode(classicSub('Patient?_id=%E0%A4%A'))).toBe('UNSUPPORTED_CRITERIA');
  });
});

describe('parseSubscription: refusals', () => {
  it('refuses an unknown topic with UNKNOWN_TOPIC', () => {
    expect(errorCode(topicSub({ topic: `${TOPIC_BASE}/nope` }))).toBe('UNKNOWN_TOPIC');
    expect(errorCode(topicSub({ topic: 'http://hl7.org/SubscriptionTopic/admission' }))).toBe('UNKNOWN_TOPIC');
  });

  it.each<[string, string, string[]]>([
    ['a search parameter the topic does not offer', PATIENT_TOPIC, ['Patient?name=x']],
    ['a modifier on _id', PATIENT_TOPIC, ['Patient?_id:not=1']],
    ['a type the topic does not trigger on', PATIENT_TOPIC, ['Observation?_id=1']],
    ['_type on a topic that does not offer it', PATIENT_TOPIC, ['_type=Patient']],
    ['Resource?_type on a single-type topic', PATIENT_TOPIC, ['Resource?_type=Patient']],
    ['an _id value that is not a FHIR id', PATIENT_TOPIC, ['Patient?_id=a/b']],
    ['a filter without a value', PATIENT_TOPIC, ['Patient?_id=']],
    ['a scope that is not a resource type', RESOURCE_TOPIC, ['patient?_id=1']],
    ['a _type value that is not a resource type', RESOURCE_TOPIC, ['_type=patient']],
    ['filters that exclude every type', RESOURCE_TOPIC, ['_type=Patient', '_type=Observation']],
    ['a scope contradicting _type', RESOURCE_TOPIC, ['Patient?_type=Observation']],
    ['filters that exclude every id', PATIENT_TOPIC, ['Patient?_id=a', 'Patient?_id=b']],
  ])('refuses %s with UNSUPPORTED_FILTER', (_name, topic, filters) => {
    expect(errorCode(topicSub({ topic, filters }))).toBe('UNSUPPORTED_FILTER');
  });

  it('refuses malformed percent-encoding in a filter as UNSUPPORTED_FILTER, not a URIError', () => {
    expect(errorCode(topicSub({ filters: ['Patient?_id=%E0%A4%A'] }))).toBe('UNSUPPORTED_FILTER');
  });

  it('points UNSUPPORTED_FILTER at the filter extension and names the filter', () => {
    const err = thrown(topicSub({ filters: ['Patient?name=x'] }));
    expect(err.expression).toBe('Subscription._criteria.extension');
    expect(err.message).toContain('"Patient?name=x"');
    expect(err.status).toBe(422);
  });

  it('refuses a filter extension without a valueString', () => {
    const sub = { ...topicSub(), _criteria: { extension: [{ url: BACKPORT_EXT.filterCriteria, valueCode: 'x' }] } };
    expect(errorCode(sub)).toBe('INVALID_RESOURCE');
    expect(errorCode(topicSub({ filters: ['   '] }))).toBe('INVALID_RESOURCE');
  });

  it('accepts a websocket channel without an endpoint, topic-based and classic', () => {
    const { endpoint: _endpoint, ...channel } = topicSub().channel as Record<string, unknown>;
    const topic = parseSubscription({ ...topicSub(), channel: { ...channel, type: 'websocket' } }, topics);
    expect([topic.channel.type, topic.channel.endpoint, topic.channel.content]).toEqual([
      'websocket',
      undefined,
      'id-only',
    ]);
    const classic = parseSubscription(
      {
        resourceType: 'Subscription',
        reason: 'test',
        criteria: 'Patient',
        channel: { type: 'websocket', payload: 'application/fhir+json' },
      },
      topics,
    );
    expect([classic.kind, classic.channel.type, classic.channel.content]).toEqual(['classic', 'websocket', 'empty']);
  });

  it.each([
    ['email', 'email'],
    ['message', 'message'],
  ])('refuses channel type %s with UNSUPPORTED_CHANNEL', (_name, type) => {
    expect(errorCode(topicSub({ channel: { type } }))).toBe('UNSUPPORTED_CHANNEL');
  });

  it.each([
    ['on a rest-hook channel (the IG’s subscription-zulip)', 'rest-hook', { code: 'zulip' }, 'zulip'],
    ['on a websocket channel', 'websocket', { code: 'zulip' }, 'zulip'],
    ['without a code', 'rest-hook', undefined, '(no code)'],
  ])('refuses a custom channel type %s with UNSUPPORTED_CHANNEL, pointing at it', (_name, type, coding, named) => {
    const ext = { url: BACKPORT_EXT.channelType, ...(coding === undefined ? {} : { valueCoding: coding }) };
    const err = thrown(topicSub({ channel: { type, _type: { extension: [ext] } } }));
    expect([err.code, err.message, err.expression]).toEqual([
      'UNSUPPORTED_CHANNEL',
      `Custom channel type ${named} (backport-channel-type) is not supported; use rest-hook or websocket without it`,
      'Subscription.channel._type',
    ]);
  });

  it.each<[string, Json, ErrorCode, string]>([
    [
      'channel.type',
      { _type: { extension: [{ url: 'http://example.org/note', valueString: 'x' }] } },
      'UNSUPPORTED_CHANNEL',
      'Subscription.channel._type',
    ],
    [
      'channel.payload',
      {
        _payload: {
          extension: [
            { url: BACKPORT_EXT.payloadContent, valueCode: 'id-only' },
            { url: `${CROSS_VERSION}/backport-payload-content`, valueCode: 'empty' },
          ],
        },
      },
      'UNSUPPORTED_CONTENT',
      'Subscription.channel._payload',
    ],
    [
      'the channel',
      {
        extension: [
          { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 },
          { url: 'http://example.org/note', valueString: 'x' },
        ],
      },
      'UNSUPPORTED_CHANNEL',
      'Subscription.channel.extension',
    ],
  ])('refuses an unknown extension on %s with 422, naming it', (_name, channel, code, expression) => {
    const err = thrown(topicSub({ channel }));
    expect([err.code, err.status, err.expression]).toEqual([code, 422, expression]);
    expect(err.message).toMatch(/^Extension \S+ on \S+ cannot be honoured: the broker does not understand it there/);
  });

  it('keeps informational extensions where they only inform (Subscription, reason, end)', () => {
    const identifier = {
      url: 'http://hl7.org/fhir/5.0/StructureDefinition/extension-Subscription.identifier',
      valueIdentifier: { system: 'urn:example', value: '42' },
    };
    const note = { extension: [{ url: 'http://example.org/note', valueString: 'x' }] };
    const sub = { ...topicSub(), extension: [identifier], reason: 'why', _reason: note, _end: note };
    expect(parse(sub).resource).toMatchObject({ extension: [identifier], _reason: note, _end: note });
  });

  it('parses full-resource content (whether the client may have it is for the registry to say)', () => {
    const sub = topicSub({
      channel: { _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'full-resource' }] } },
    });
    expect(parse(sub).channel.content).toBe('full-resource');
  });

  it('refuses an unknown content code with UNSUPPORTED_CONTENT', () => {
    const sub = topicSub({
      channel: { _payload: { extension: [{ url: BACKPORT_EXT.payloadContent, valueCode: 'everything' }] } },
    });
    expect(errorCode(sub)).toBe('UNSUPPORTED_CONTENT');
  });

  it('refuses an XML payload with UNSUPPORTED_CONTENT', () => {
    expect(errorCode(topicSub({ channel: { payload: 'application/fhir+xml' } }))).toBe('UNSUPPORTED_CONTENT');
  });

  it('asks for a reason (R4 1..1): a value, or _reason extensions; an empty _reason is refused', () => {
    const { reason: _reason, ...noReason } = topicSub() as Record<string, unknown>;
    const refusal = (resource: Json) => {
      try {
        requireReason(parse(resource).resource);
      } catch (err) {
        return [(err as BrokerError).code, (err as BrokerError).expression, (err as BrokerError).message];
      }
      return 'accepted';
    };
    const REFUSED = [
      'INVALID_RESOURCE',
      'Subscription.reason',
      'Subscription.reason is required (R4: 1..1): say what it is for',
    ];
    expect(refusal(noReason)).toEqual(REFUSED);
    expect(refusal({ ...noReason, _reason: { id: 'r' } })).toEqual(REFUSED);
    // Empty, they are no R4 JSON at all.
    expect(refusal({ ...noReason, _reason: {} })).toEqual([
      'INVALID_RESOURCE',
      'Subscription._reason',
      'Subscription._reason is empty: R4 JSON has no empty objects',
    ]);
    expect(refusal({ ...noReason, _reason: { extension: [] } })).toEqual([
      'INVALID_RESOURCE',
      'Subscription._reason.extension',
      'Subscription._reason.extension is empty: R4 JSON has no empty arrays',
    ]);
    expect(errorCode({ ...noReason, reason: '' })).toBe('INVALID_RESOURCE');
    const absent = {
      extension: [{ url: 'http://hl7.org/fhir/StructureDefinition/data-absent-reason', valueCode: 'unknown' }],
    };
    expect(refusal({ ...noReason, _reason: absent })).toBe('accepted');
    expect(refusal(topicSub())).toBe('accepted');
  });

  it('refuses a rest-hook without endpoint with INVALID_ENDPOINT', () => {
    const sub = {
      resourceType: 'Subscription',
      reason: 'test',
      criteria: PATIENT_TOPIC,
      channel: { type: 'rest-hook' },
    };
    expect(errorCode(sub)).toBe('INVALID_ENDPOINT');
    expect(errorCode(topicSub({ channel: { endpoint: '' } }))).toBe('INVALID_ENDPOINT');
  });

  it.each([
    ['Host', 'Host: evil.example.com'],
    ['Transfer-Encoding', 'Transfer-Encoding: chunked'],
    ['webhook-signature', 'webhook-signature: v1,abc'],
    ['Webhook-Signature in another case', 'Webhook-Signature: v1,abc'],
    ['Content-Length', 'Content-Length: 0'],
    ['a header without a colon', 'Authorization Bearer x'],
    ['a header with an empty name', ': value'],
    ['a header name with a space', 'X Api: v'],
    ['a value smuggling a second header', 'X-A: a\r\nHost: evil'],
    ['a value with a NUL', 'X-A: a\u0000b'],
    ['a value with another control character', 'X-A: a\u0007b'],
    ['a value with DEL', 'X-A: a\u007fb'],
    ['Content-Encoding (the body the broker writes is not encoded)', 'Content-Encoding: gzip'],
    ['Content-Range', 'Content-Range: bytes 0-1/2'],
    ['a header in the Standard Webhooks namespace', 'Webhook-Version: 2'],
  ])('refuses %s with INVALID_HEADER', (_name, header) => {
    expect(errorCode(topicSub({ channel: { header: [header] } }))).toBe('INVALID_HEADER');
  });

  it('names a malformed header by its position, without quoting it (it may hold a credential)', () => {
    const header = ['X-A: 1', 'Authorization Bearer s3cret-token'];
    expect(() => parse(topicSub({ channel: { header } }))).toThrow(
      expect.objectContaining({ code: 'INVALID_HEADER', message: 'channel.header[1] is not "Name: value"' }),
    );
  });

  it('keeps the last value of a header given more than once (any case), as Inferno appends its Authorization', () => {
    const inferno = ['Authorization: Bearer SAMPLE_TOKEN', 'X-A: 1', 'authorization: Bearer inferno-token'];
    expect(parse(topicSub({ channel: { header: inferno } })).channel.headers).toEqual([
      'X-A: 1',
      'authorization: Bearer inferno-token',
    ]);
    expect(parse(topicSub({ channel: { header: ['X-A: 1', 'X-B: 2'] } })).channel.headers).toEqual([
      'X-A: 1',
      'X-B: 2',
    ]);
    // Stored as given, the ones dropped with their `_header` elements.
    const header = ['X-A:1', 'X-B: 2', 'x-a: 3'];
    const stored = parse(topicSub({ channel: { header, _header: [{ id: 'a1' }, null, { id: 'a3' }] } })).resource;
    expect(stored.channel).toMatchObject({ header: ['X-B: 2', 'x-a: 3'], _header: [null, { id: 'a3' }] });
    expect(parse(topicSub({ channel: { header: ['X-A:1'] } })).resource.channel).toMatchObject({ header: ['X-A:1'] });
    // Each one is still checked: a bad earlier one is refused, not dropped.
    expect(errorCode(topicSub({ channel: { header: ['Host: x', 'Host: y'] } }))).toBe('INVALID_HEADER');
  });

  it.each([
    ['without the whsec_ prefix', Buffer.alloc(32, 1).toString('base64')],
    ['too short', `whsec_${Buffer.alloc(8, 1).toString('base64')}`],
    ['too long', `whsec_${Buffer.alloc(65, 1).toString('base64')}`],
    ['not base64', 'whsec_not*base64*at*all*not*base64*at*all'],
  ])('refuses a webhook secret %s with INVALID_SECRET', (_name, secret) => {
    const sub = topicSub({ channel: { extension: [{ url: BROKER_EXT.webhookSecret, valueString: secret }] } });
    expect(errorCode(sub)).toBe('INVALID_SECRET');
  });

  it('refuses a webhook secret that is not a string with INVALID_SECRET', () => {
    const sub = topicSub({ channel: { extension: [{ url: BROKER_EXT.webhookSecret, valueCode: SECRET }] } });
    expect(errorCode(sub)).toBe('INVALID_SECRET');
  });

  it.each<[string, unknown]>([
    ['a string', 'not a subscription'],
    ['null', null],
    ['another resourceType', { resourceType: 'Patient', criteria: 'Patient', channel: { type: 'rest-hook' } }],
    ['no channel', { resourceType: 'Subscription', criteria: PATIENT_TOPIC }],
    ['no criteria', { resourceType: 'Subscription', channel: { type: 'rest-hook', endpoint: ENDPOINT } }],
    ['an empty criteria', classicSub('')],
    ['an unknown status', { ...classicSub('Patient'), status: 'paused' }],
    ['an id with a slash', { ...classicSub('Patient'), id: 'a/b' }],
    ['an end that is not a date-time', { ...classicSub('Patient'), end: 'tomorrow' }],
    ['headers that are not an array', classicSub('Patient', { header: 'X-A: b' })],
    ['a channel without type', { resourceType: 'Subscription', criteria: 'Patient', channel: { endpoint: ENDPOINT } }],
  ])('refuses %s with INVALID_RESOURCE', (_name, input) => {
    expect(errorCode(input)).toBe('INVALID_RESOURCE');
  });

  it('says what a body of another resourceType is, before anything else', () => {
    const err = thrown({ resourceType: 'Patient', id: 'p1' });
    expect(err.code).toBe('INVALID_RESOURCE');
    expect(err.message).toBe('resourceType must be Subscription (got Patient)');
    expect(err.expression).toBe('Subscription.resourceType');
  });

  it.each<[string, Json, string]>([
    ['an element R4 does not define', { ...classicSub('Patient'), note: 'x'.repeat(60_000) }, 'Subscription.note'],
    ['a channel element R4 does not define', classicSub('Patient', { secret: 's' }), 'Subscription.channel.secret'],
    ['a primitive sibling of a complex element', { ...classicSub('Patient'), _channel: {} }, 'Subscription._channel'],
    [
      'an unknown key in a primitive sibling',
      { ...classicSub('Patient'), _status: { x: 1 } },
      'Subscription._status.x',
    ],
    [
      'a modifierExtension on the criteria (an Element has none)',
      { ...classicSub('Patient'), _criteria: { modifierExtension: [{ url: 'urn:x', valueString: 'y' }] } },
      'Subscription._criteria.modifierExtension',
    ],
    [
      'an unknown key in a channel primitive sibling',
      classicSub('Patient', { _type: { foo: 'bar' } }),
      'Subscription.channel._type.foo',
    ],
    [
      'an unknown key in a header primitive sibling',
      classicSub('Patient', { header: ['a: b'], _header: [{ foo: 1 }] }),
      'Subscription.channel._header[0].foo',
    ],
  ])('refuses %s with INVALID_RESOURCE naming it', (_name, input, where) => {
    const err = thrown(input);
    expect(err.code).toBe('INVALID_RESOURCE');
    expect(err.expression).toBe(where);
    expect(err.message).toContain('is not an element of an R4');
  });

  it('accepts the R4 elements it does not use and the primitive siblings of those it does', () => {
    const sub = {
      ...topicSub(),
      language: 'en',
      contact: [{ system: 'email', value: 'ops@example.com' }],
      _reason: { extension: [{ url: 'http://example.org/x', valueString: 'y' }] },
      reason: 'why',
    };
    expect(parse(sub).resource).toMatchObject({ language: 'en', contact: sub.contact, _reason: sub._reason });
  });

  it.each<[string, Json]>([
    ['on the Subscription', { ...classicSub('Patient'), modifierExtension: [{ url: 'http://example.org/must' }] }],
    ['on the channel', classicSub('Patient', { modifierExtension: [{ url: 'http://example.org/must' }] })],
  ])('refuses a modifier extension %s with UNSUPPORTED_MODIFIER', (_name, input) => {
    const err = thrown(input);
    expect(err.code).toBe('UNSUPPORTED_MODIFIER');
    expect(err.status).toBe(422);
    expect(err.message).toContain('http://example.org/must');
  });

  it.each<[string, Json, ErrorCode]>([
    ['classic criteria', classicSub('Patients'), 'UNSUPPORTED_CRITERIA'],
    ['classic criteria with ids', classicSub('Foo?_id=1'), 'UNSUPPORTED_CRITERIA'],
    ['a _type filter', topicSub({ topic: RESOURCE_TOPIC, filters: ['_type=Patinet'] }), 'UNSUPPORTED_FILTER'],
    ['a scoped filter', topicSub({ topic: RESOURCE_TOPIC, filters: ['Patinet?_id=1'] }), 'UNSUPPORTED_FILTER'],
    ['an R4B-only type', classicSub('SubscriptionStatus'), 'UNSUPPORTED_CRITERIA'],
  ])('refuses a misspelt or non-R4 resource type in %s', (_name, input, code) => {
    expect(errorCode(input)).toBe(code);
  });

  it('refuses a Subscription over 64 KiB as stored with PAYLOAD_TOO_LARGE, on every store alike', () => {
    const contact = Array.from({ length: 700 }, (_, i) => ({ system: 'email', value: `ops-${i}@example.com` }));
    const err = thrown({ ...classicSub('Patient'), contact: [...contact, ...contact, ...contact] });
    expect(err.code).toBe('PAYLOAD_TOO_LARGE');
    expect(err.status).toBe(413);
    expect(errorCode({ ...classicSub('Patient'), contact })).toBe('no error');
  });

  it('refuses a Subscription nested too deeply to store with INVALID_RESOURCE, not a crash', () => {
    let deep: Json = { url: 'http://example.org/leaf', valueString: 'x' };
    for (let i = 0; i < 200_000; i++) deep = { url: 'http://example.org/nest', extension: [deep] };
    const err = thrown({ ...classicSub('Patient'), extension: [deep] });
    expect(err.code).toBe('INVALID_RESOURCE');
    expect(err.message).toContain('nested too deeply');
  });

  it('names the missing property', () => {
    const err = thrown({ resourceType: 'Subscription', criteria: PATIENT_TOPIC });
    expect(err.message).toBe("Subscription must have required property 'channel' (missing channel)");
    expect(err.status).toBe(400);
  });

  it.each<[string, string, Json]>([
    ['a heartbeat of 0', BACKPORT_EXT.heartbeatPeriod, { valueUnsignedInt: 0 }],
    ['a heartbeat over a day', BACKPORT_EXT.heartbeatPeriod, { valueUnsignedInt: 86_401 }],
    ['a fractional heartbeat', BACKPORT_EXT.heartbeatPeriod, { valueUnsignedInt: 1.5 }],
    ['a heartbeat as a string', BACKPORT_EXT.heartbeatPeriod, { valueUnsignedInt: '60' }],
    ['a heartbeat in the wrong value[x]', BACKPORT_EXT.heartbeatPeriod, { valueInteger: 60 }],
    ['a timeout over 60 s', BACKPORT_EXT.timeout, { valueUnsignedInt: 61 }],
    ['a maxCount over 1000', BACKPORT_EXT.maxCount, { valuePositiveInt: 1001 }],
    ['a maxCount of 0', BACKPORT_EXT.maxCount, { valuePositiveInt: 0 }],
  ])('refuses %s with INVALID_RESOURCE', (_name, url, value) => {
    expect(errorCode(topicSub({ channel: { extension: [{ url, ...value }] } }))).toBe('INVALID_RESOURCE');
  });

  it('accepts the heartbeat bounds 1 and 86400', () => {
    const one = topicSub({ channel: { extension: [{ url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 1 }] } });
    const day = topicSub({
      channel: { extension: [{ url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 86_400 }] },
    });
    expect(parse(one).channel.heartbeatPeriodSeconds).toBe(1);
    expect(parse(day).channel.heartbeatPeriodSeconds).toBe(86_400);
  });
});

describe('parseSubscription: what it would store without reading', () => {
  it.each<[string, Json, string]>([
    [
      'on the Subscription',
      { ...classicSub('Patient'), modifierExtension: { url: 'http://example.org/must', valueBoolean: true } },
      'Subscription.modifierExtension',
    ],
    [
      'on the channel',
      classicSub('Patient', { modifierExtension: { url: 'http://example.org/x' } }),
      'Subscription.channel.modifierExtension',
    ],
    ['as null', { ...classicSub('Patient'), modifierExtension: null }, 'Subscription.modifierExtension'],
    ['as a string', classicSub('Patient', { modifierExtension: 'x' }), 'Subscription.channel.modifierExtension'],
  ])('refuses a modifierExtension that is not an array %s with INVALID_RESOURCE naming it', (_name, input, where) => {
    const err = thrown(input);
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'INVALID_RESOURCE',
      400,
      where,
      `${where} must be an array of Extension`,
    ]);
  });

  it('refuses an empty modifierExtension, on the Subscription and on the channel, as R4 JSON has no empty arrays', () => {
    expect(thrown({ ...classicSub('Patient'), modifierExtension: [] }).message).toBe(
      'Subscription.modifierExtension is empty: R4 JSON has no empty arrays',
    );
    expect(thrown(classicSub('Patient', { modifierExtension: [] })).message).toBe(
      'Subscription.channel.modifierExtension is empty: R4 JSON has no empty arrays',
    );
  });

  it.each<[string, Json, string]>([
    ['extension as a string', { extension: 'x' }, 'Subscription.extension must be array'],
    [
      'an extension without a url',
      { extension: [{ valueString: 'x' }] },
      "Subscription.extension[0] must have required property 'url' (missing url)",
    ],
    ['contained as a string', { contained: 'x' }, 'Subscription.contained must be array'],
    [
      'a contained entry that is no resource',
      { contained: [{ id: 'x' }] },
      "Subscription.contained[0] must have required property 'resourceType' (missing resourceType)",
    ],
    ['contact as a number', { contact: 5 }, 'Subscription.contact must be array'],
    ['a contact entry as a string', { contact: ['ops@example.com'] }, 'Subscription.contact[0] must be object'],
    ['implicitRules as a number', { implicitRules: 7 }, 'Subscription.implicitRules must be string'],
    ['language as an object', { language: {} }, 'Subscription.language must be string'],
    ['meta as a string', { meta: 'x' }, 'Subscription.meta must be object'],
    ['text as a string', { text: 'x' }, 'Subscription.text must be object'],
    ['error as a number', { error: 1 }, 'Subscription.error must be string'],
    ['_status as a number', { _status: 5 }, 'Subscription._status must be object'],
    ['_end extensions as an object', { _end: { extension: {} } }, 'Subscription._end.extension must be array'],
  ])('refuses %s with INVALID_RESOURCE naming the element', (_name, extra, message) => {
    const err = thrown({ ...classicSub('Patient'), ...extra });
    expect([err.code, err.status, err.message]).toEqual(['INVALID_RESOURCE', 400, message]);
    expect(err.expression).toBe(message.split(' ')[0]);
  });

  it.each<[string, Json, string]>([
    ['an id as a number', { id: 1 }, 'Subscription.channel.id must be string'],
    ['_endpoint as a string', { _endpoint: 'x' }, 'Subscription.channel._endpoint must be object'],
    [
      '_header entries as strings',
      { header: ['X-A: b'], _header: ['x'] },
      'Subscription.channel._header[0] must be object,null',
    ],
  ])('refuses a channel with %s with INVALID_RESOURCE naming the element', (_name, channel, message) => {
    const err = thrown(classicSub('Patient', channel));
    expect([err.code, err.status, err.message]).toEqual(['INVALID_RESOURCE', 400, message]);
  });

  it('keeps the R4 elements it does not read when they have their R4 types', () => {
    const kept = {
      implicitRules: 'http://example.org/rules',
      _implicitRules: { id: 'r' },
      language: 'en',
      contained: [{ resourceType: 'Basic', id: 'b' }],
      extension: [{ url: 'http://example.org/x', valueString: 'y' }],
      _status: { extension: [{ url: 'http://example.org/x', valueString: 'y' }] },
    };
    const channel = { id: 'c', header: ['X-A: b', 'X-B: c'], _header: [null, { id: 'h' }], _endpoint: { id: 'e' } };
    const spec = parse({ ...classicSub('Patient', channel), ...kept });
    const { _status: _dropped, ...stored } = kept;
    expect(spec.resource).toMatchObject({ ...stored, channel });
  });
});

describe('parseSubscription: meta and text', () => {
  const TAG = { system: 'http://example.org/tags', code: 'team-a', display: 'Team A' };
  const LABEL = { system: 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality', code: 'R', userSelected: false };
  const TEXT = { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">Patient changes</div>' };

  it("keeps the client's tags, security labels and narrative as sent, and its profiles beside the backport one", () => {
    const meta = {
      versionId: '7',
      lastUpdated: '2024-01-01T00:00:00Z',
      source: 'urn:x',
      profile: ['https://example.org/StructureDefinition/ours', BACKPORT_PROFILE.subscription],
      security: [LABEL],
      tag: [TAG],
    };
    const stored = parse(topicSub({ extra: { meta, text: TEXT } })).resource;
    expect([stored.meta, stored.text]).toEqual([
      {
        profile: ['https://example.org/StructureDefinition/ours', BACKPORT_PROFILE.subscription],
        security: [LABEL],
        tag: [TAG],
      },
      TEXT,
    ]);
  });

  it("keeps a classic Subscription's own profiles only, and no meta when it sent none", () => {
    const ours = 'https://example.org/StructureDefinition/ours';
    const withMeta = {
      ...classicSub('Patient'),
      meta: { profile: [ours, ours, BACKPORT_PROFILE.subscription], tag: [TAG] },
    };
    expect(parse(withMeta).resource.meta).toEqual({ profile: [ours], tag: [TAG] });
    expect(parse({ ...classicSub('Patient'), meta: { versionId: '2' } }).resource).not.toHaveProperty('meta');
  });

  it.each<[string, Json, string, string]>([
    ['tag as an object', { meta: { tag: TAG } }, 'Subscription.meta.tag', 'must be array'],
    ['a tag as a string', { meta: { tag: ['team-a'] } }, 'Subscription.meta.tag[0]', 'must be object'],
    ['a tag code as a number', { meta: { tag: [{ code: 1 }] } }, 'Subscription.meta.tag[0].code', 'must be string'],
    [
      'an element no Coding has',
      { meta: { security: [{ ...LABEL, label: 'x' }] } },
      'Subscription.meta.security[0].label',
      'is not an element of an R4 Coding',
    ],
    [
      'profile as a string',
      { meta: { profile: 'https://example.org/p' } },
      'Subscription.meta.profile',
      'must be array',
    ],
    [
      'a profile with a space',
      { meta: { profile: ['https://example.org/a b'] } },
      'Subscription.meta.profile[0]',
      'must match pattern "^\\S+$"',
    ],
    [
      'text without a div',
      { text: { status: 'generated' } },
      'Subscription.text',
      "must have required property 'div' (missing div)",
    ],
    [
      'an unknown text status',
      { text: { ...TEXT, status: 'final' } },
      'Subscription.text.status',
      'must be equal to one of the allowed values',
    ],
    [
      'a div that is no div',
      { text: { ...TEXT, div: '<p>x</p>' } },
      'Subscription.text.div',
      'must match pattern "^<div[\\s>]"',
    ],
    [
      'an element no Narrative has',
      { text: { ...TEXT, lang: 'en' } },
      'Subscription.text.lang',
      'is not an element of an R4 Narrative',
    ],
  ])('refuses %s with INVALID_RESOURCE naming the element', (_name, extra, where, problem) => {
    const err = thrown({ ...classicSub('Patient'), ...extra });
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'INVALID_RESOURCE',
      400,
      where,
      `${where} ${problem}`,
    ]);
  });
});

describe('parseSubscription: nothing empty', () => {
  it.each<[string, Json, string]>([
    ['contained []', { contained: [] }, 'Subscription.contained is empty: R4 JSON has no empty arrays'],
    ['extension []', { extension: [] }, 'Subscription.extension is empty: R4 JSON has no empty arrays'],
    [
      'a contact {}',
      { contact: [{ system: 'email', value: 'a@example.org' }, {}] },
      'Subscription.contact[1] is empty: R4 JSON has no empty objects',
    ],
    ['_reason {}', { _reason: {} }, 'Subscription._reason is empty: R4 JSON has no empty objects'],
    ['meta {}', { meta: {} }, 'Subscription.meta is empty: R4 JSON has no empty objects'],
    ['meta.tag []', { meta: { tag: [] } }, 'Subscription.meta.tag is empty: R4 JSON has no empty arrays'],
    ['a language ""', { language: '' }, 'Subscription.language is empty: R4 JSON has no empty strings'],
    [
      'an empty string deep in a contained resource',
      { contained: [{ resourceType: 'Basic', code: { coding: [{ system: 'urn:x', code: '' }] } }] },
      'Subscription.contained[0].code.coding[0].code is empty: R4 JSON has no empty strings',
    ],
    [
      'channel.header []',
      { channel: { type: 'rest-hook', endpoint: ENDPOINT, header: [] } },
      'Subscription.channel.header is empty: R4 JSON has no empty arrays',
    ],
    [
      'channel.extension []',
      { channel: { type: 'rest-hook', endpoint: ENDPOINT, extension: [] } },
      'Subscription.channel.extension is empty: R4 JSON has no empty arrays',
    ],
    [
      'channel._endpoint {}',
      { channel: { type: 'rest-hook', endpoint: ENDPOINT, _endpoint: {} } },
      'Subscription.channel._endpoint is empty: R4 JSON has no empty objects',
    ],
  ])('refuses %s with INVALID_RESOURCE naming where', (_name, extra, message) => {
    const err = thrown({ ...classicSub('Patient'), ...extra });
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'INVALID_RESOURCE',
      400,
      message.split(' ')[0],
      message,
    ]);
  });

  it("takes a null in a primitive list's _name list, and a nesting deeper than the stack is refused, not a crash", () => {
    expect(errorCode(classicSub('Patient', { header: ['X-A: b', 'X-B: c'], _header: [null, { id: 'h' }] }))).toBe(
      'no error',
    );
    let deep: unknown = { url: 'urn:x', valueString: 'y' };
    for (let i = 0; i < 200_000; i++) deep = [deep];
    const err = thrown({
      ...classicSub('Patient'),
      contained: [{ resourceType: 'Basic', extension: [{ url: 'urn:x', deep }] }],
    });
    expect([err.code, err.message]).toEqual(['INVALID_RESOURCE', 'The Subscription is nested too deeply to store']);
  });
});

describe('parseSubscription: single-valued extensions', () => {
  const OTHER_SECRET = `whsec_${Buffer.alloc(32, 8).toString('base64')}`;

  it.each<[string, Json, Json]>([
    [
      'backport-heartbeat-period',
      { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 60 },
      { valueUnsignedInt: 'abc' },
    ],
    ['backport-timeout', { url: BACKPORT_EXT.timeout, valueUnsignedInt: 5 }, { valueUnsignedInt: 50 }],
    ['backport-max-count', { url: BACKPORT_EXT.maxCount, valuePositiveInt: 1 }, { valuePositiveInt: 1 }],
    ['webhook-secret', { url: BROKER_EXT.webhookSecret, valueString: SECRET }, { valueString: OTHER_SECRET }],
  ])(
    'refuses two copies of %s on the channel with 422 naming it, instead of reading the first',
    (_name, first, second) => {
      const heartbeat = { url: BACKPORT_EXT.heartbeatPeriod, valueUnsignedInt: 30 };
      const extension =
        first.url === heartbeat.url ? [first, { ...first, ...second }] : [first, heartbeat, { ...first, ...second }];
      const err = thrown(topicSub({ channel: { extension } }));
      expect([err.code, err.status, err.expression, err.message]).toEqual([
        'UNSUPPORTED_CHANNEL',
        422,
        'Subscription.channel.extension',
        `Extension ${first.url} appears more than once on Subscription.channel; it takes a single value, so send one copy`,
      ]);
      expect(err.message).not.toContain('whsec_');
    },
  );

  it('refuses two copies of backport-payload-content with UNSUPPORTED_CONTENT naming it', () => {
    const content = (valueCode: string) => ({ url: BACKPORT_EXT.payloadContent, valueCode });
    const err = thrown(
      topicSub({ channel: { _payload: { extension: [content('empty'), content('full-resource')] } } }),
    );
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'UNSUPPORTED_CONTENT',
      422,
      'Subscription.channel._payload',
      `Extension ${BACKPORT_EXT.payloadContent} appears more than once on Subscription.channel.payload; it takes a single value, so send one copy`,
    ]);
  });

  it('takes several backport-filter-criteria, which the IG lets repeat (all must hold)', () => {
    expect(parse(topicSub({ filters: ['Patient?_id=a,b', '_id=b'] })).match.ids).toEqual(['b']);
  });
});

describe('parseSubscription: topic versions', () => {
  it.each([
    ['a version the topic does not have', `${PATIENT_TOPIC}|9.9`],
    ['something that is not a version', `${PATIENT_TOPIC}|not a version at all`],
    ['an empty version', `${PATIENT_TOPIC}|`],
  ])('refuses a canonical with %s with UNKNOWN_TOPIC, saying which version is offered', (_name, criteria) => {
    const err = thrown(topicSub({ topic: criteria }));
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'UNKNOWN_TOPIC',
      422,
      'Subscription.criteria',
      `Unknown topic version ${criteria}: ${PATIENT_TOPIC} is offered at version 1.0.0 only; name it without |version to take the one offered`,
    ]);
  });

  it('takes the canonical without a version, and with the topic’s own', () => {
    expect(parse(topicSub()).topic).toBe(PATIENT_TOPIC);
    expect(parse(topicSub({ topic: `${PATIENT_TOPIC}|1.0.0` })).topic).toBe(`${PATIENT_TOPIC}|1.0.0`);
  });
});

describe('parseSubscription: end', () => {
  it.each([
    ['February 30', '2099-02-30T00:00:00Z', 'there is no day 30 in 2099-02'],
    ['February 29 of a common year', '2100-02-29T00:00:00Z', 'there is no day 29 in 2100-02'],
    ['April 31', '2099-04-31T00:00:00Z', 'there is no day 31 in 2099-04'],
    ['day 00', '2099-01-00T00:00:00Z', 'there is no day 00 in 2099-01'],
    ['month 13', '2099-13-01T00:00:00Z', 'there is no month 13'],
    ['month 00', '2099-00-01T00:00:00Z', 'there is no month 00'],
    ['year 0000', '0000-01-01T00:00:00Z', 'there is no year 0000'],
    ['hour 24', '2099-01-01T24:00:00Z', 'hour 24 is not 00–23'],
    ['minute 60', '2099-01-01T23:60:00Z', 'minute 60 is not 00–59'],
    ['second 60', '2099-01-01T23:59:60Z', 'second 60 is not 00–59'],
    ['an offset past +14:00', '2099-01-01T00:00:00+14:30', 'offset +14:30 is not between -14:00 and +14:00'],
    ['offset minutes past 59', '2099-01-01T00:00:00-01:60', 'offset -01:60 is not between -14:00 and +14:00'],
    ['no zone', '2099-01-01T00:00:00', 'expected YYYY-MM-DDThh:mm:ss (optionally .fff) then Z or +hh:mm / -hh:mm'],
    ['a date alone', '2099-01-01', 'expected YYYY-MM-DDThh:mm:ss (optionally .fff) then Z or +hh:mm / -hh:mm'],
  ])('refuses %s as an invalid value, with INVALID_RESOURCE', (_name, end, why) => {
    const err = thrown(topicSub({ extra: { end } }));
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'INVALID_RESOURCE',
      400,
      'Subscription.end',
      `Subscription.end "${end}" is not a valid instant: ${why}`,
    ]);
  });

  it.each([
    '2096-02-29T00:00:00Z',
    '2400-02-29T23:59:59.999Z',
    '2099-12-31T23:59:59+14:00',
    '2099-01-01T00:00:00-13:59',
    '2099-06-30T12:00:00.123456789-00:00',
  ])('takes %s as written', (end) => {
    expect(parse(topicSub({ extra: { end } })).end).toBe(end);
  });
});

describe('parseSubscription: payload media type', () => {
  it.each([
    ['a CR/LF after the parameters’ semicolon', 'application/fhir+json;\r\nX-Injected: yes'],
    ['a line feed at the end', 'application/fhir+json\n'],
    ['a NUL in a parameter', 'application/fhir+json; a=b\u0000'],
    ['a CR/LF inside a quoted parameter', 'application/fhir+json; a="b\r\nX: y"'],
    ['a parameter without a value', 'application/fhir+json; charset'],
    ['a parameter value with a space', 'application/fhir+json; charset=utf 8'],
    ['no subtype', 'application'],
    ['a non-ASCII character', 'application/fhir+json; a=é'],
  ])('refuses %s with UNSUPPORTED_CONTENT, showing the value escaped', (_name, payload) => {
    const err = thrown(topicSub({ channel: { payload } }));
    expect([err.code, err.status, err.expression, err.message]).toEqual([
      'UNSUPPORTED_CONTENT',
      422,
      'Subscription.channel.payload',
      `Payload ${JSON.stringify(payload)} is not a media type (type/subtype, then optional ;name=value parameters)`,
    ]);
  });

  it.each([
    'application/fhir+json; charset=utf-8',
    'application/fhir+json ; fhirVersion=4.0 ; charset="utf-8"',
    'Application/FHIR+JSON',
    'application/json;',
  ])('takes %s as given', (payload) => {
    expect(parse(topicSub({ channel: { payload } })).channel.payload).toBe(payload);
  });
});

describe('parseSubscription: how many resource types', () => {
  const types = [...R4_RESOURCE_TYPES];
  const typed = (...filters: string[]) => topicSub({ topic: RESOURCE_TOPIC, filters });

  it(`takes ${MAX_RESOURCE_TYPES} types, and the same type named twice once`, () => {
    const forty = types.slice(0, MAX_RESOURCE_TYPES);
    expect(MAX_RESOURCE_TYPES).toBe(40);
    expect(parse(typed(`_type=${forty.join(',')},${forty[0]}`)).match.resourceTypes).toHaveLength(41);
  });

  it.each([
    ['in one _type filter', [`_type=${types.slice(0, 120).join(',')}`], 120],
    ['with an _id list beside it', [`_type=${types.slice(0, 41).join(',')}`, '_id=a,b'], 41],
  ])(
    'refuses more types %s with UNSUPPORTED_FILTER, saying how many are allowed and how to watch all',
    (_name, filters, n) => {
      const err = thrown(typed(...filters));
      expect([err.code, err.status, err.expression, err.message]).toEqual([
        'UNSUPPORTED_FILTER',
        422,
        'Subscription._criteria.extension',
        `The Subscription would watch ${n} resource types; at most 40 are allowed: drop _type to watch every resource type, or name fewer`,
      ]);
    },
  );

  it('counts what the filters leave: 120 types narrowed to 3 by a second filter are taken', () => {
    const sub = typed(`_type=${types.slice(0, 120).join(',')}`, `_type=${types.slice(0, 3).join(',')}`);
    expect(parse(sub).match.resourceTypes).toEqual(types.slice(0, 3));
  });

  it('refuses many types with so many ids that a copy of the filters per type would pass 40 × 64 KiB', () => {
    // The shortest FHIR ids first (64 of one character, 4,096 of two, then three): 16,500 of
    // them are 63 KB of filters, within the size cap, and 95 KB as a list, a copy per type.
    const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.';
    const idOf = (i: number): string => (i < 64 ? '' : idOf(Math.floor(i / 64) - 1)) + alphabet[i % 64];
    const ids = `_id=${Array.from({ length: 16_500 }, (_, i) => idOf(i)).join(',')}`;
    const err = thrown(typed(`_type=${types.slice(0, 40).join(',')}`, ids));
    expect([err.code, err.status, err.expression]).toEqual([
      'UNSUPPORTED_FILTER',
      422,
      'Subscription._criteria.extension',
    ]);
    expect(err.message).toMatch(
      /^The filters come to 9\d{4} bytes as kept, once for each of the 40 resource types: more than the 2621440 bytes allowed in all; name fewer types or fewer ids$/,
    );
    expect(parse(typed('_type=Patient', ids)).match.ids).toHaveLength(16_500);
  });
});

describe('isWebhookSecret', () => {
  it('accepts 24 to 64 bytes after whsec_', () => {
    expect(isWebhookSecret(`whsec_${Buffer.alloc(24, 1).toString('base64')}`)).toBe(true);
    expect(isWebhookSecret(`whsec_${Buffer.alloc(64, 1).toString('base64')}`)).toBe(true);
    expect(isWebhookSecret(`whsec_${Buffer.alloc(23, 1).toString('base64')}`)).toBe(false);
    expect(isWebhookSecret(`whsec_${Buffer.alloc(65, 1).toString('base64')}`)).toBe(false);
    expect(isWebhookSecret('whsec_')).toBe(false);
  });
});
