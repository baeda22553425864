import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { heartbeatsAllowed } from '../src/core/status.js';
import type { SubscriptionRecord } from '../src/core/types.js';
import { operationOutcome } from '../src/http/outcome.js';
import {
  eventLike,
  eventNumbers,
  focusOf,
  type Json,
  notifiedNumbers,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { request as fhirRequest, inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * Where the broker met FHIR R4 REST and the Backport IG only in part: search by `url`, an update
 * whose body has no id, `$events` `content` as a hint, custom channel types, `_summary` values it
 * cannot apply, a versioned `Location` with vread, and a client's read-modify-write of a
 * subscription in `error`.
 */

const BASE = 'http://broker.test/fhir';
const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';
const CHANNEL_TYPE = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type';

describe('FHIR conformance', () => {
  let t: TestBroker;
  let receiver: Receiver;

  beforeAll(async () => {
    receiver = await Receiver.start();
    // /failing refuses everything (its handshake fails); /dies only notifications (its deliveries fail).
    receiver.respond = (req) =>
      req.path === '/failing' || (req.path === '/dies' && req.body.includes('"event-notification"'))
        ? { status: 500 }
        : { status: 204 };
    // Two attempts 10 ms apart: a failing delivery dead-letters at once.
    // A failed handshake fails at once here (`none`): the tests read the error it leaves.
    t = await inProcessBroker({ BROKER_RETRY_DELAYS: '10ms', BROKER_HANDSHAKE_RETRY_DELAYS: 'none' });
  });

  afterAll(async () => {
    await t?.broker.close(0);
    await receiver?.close();
  });

  const request = (method: string, path: string, options?: Parameters<typeof fhirRequest>[3]) =>
    fhirRequest(t, method, path, options);

  const off = { extra: { status: 'off' } };
  const idsOf = (bundle: Json): unknown[] =>
    ((bundle.entry as Json[] | undefined) ?? []).map((e) => (e.resource as Json).id).sort();
  const query = (params: Record<string, string>): string => new URLSearchParams(params).toString();
  const subscriptionResource = async (): Promise<Json> => {
    const metadata = await request('GET', '/fhir/metadata');
    const rest = (metadata.body.rest as Json[])[0] as Json;
    return (rest.resource as Json[])[0] as Json;
  };

  describe('search by url', () => {
    const hook = (name: string): string => `${receiver.url}/search/${name}`;

    it('finds the Subscriptions whose channel.endpoint is exactly the url, any of a comma list, with the other parameters and paging', async () => {
      const a1 = await t.create(topicSubscription('patient-change', hook('a'), off));
      const a2 = await t.create(topicSubscription('patient-change', hook('a'), off));
      const b = await t.create(topicSubscription('patient-change', hook('b'), off));
      await t.create(topicSubscription('patient-change', hook('a'), off), TOKENS.bob);

      const exact = await request('GET', `/fhir/Subscription?${query({ url: hook('a') })}`);
      expect(exact.status).toBe(200);
      expect(exact.body.total).toBe(2);
      expect(idsOf(exact.body)).toEqual([a1.id, a2.id].sort());
      expect(exact.body.link).toEqual([{ relation: 'self', url: `${BASE}/Subscription?${query({ url: hook('a') })}` }]);

      const either = await request('GET', `/fhir/Subscription?${query({ url: `${hook('a')},${hook('b')}` })}`);
      expect(idsOf(either.body)).toEqual([a1.id, a2.id, b.id].sort());

      // Exact: no prefix, no trailing slash, no case folding.
      for (const near of [`${receiver.url}/search`, `${hook('a')}/`, hook('A')]) {
        const res = await request('GET', `/fhir/Subscription?${query({ url: near })}`);
        expect([near, res.status, res.body.total]).toEqual([near, 200, 0]);
      }

      const paged = await request('GET', `/fhir/Subscription?${query({ url: hook('a'), status: 'off', _count: '1' })}`);
      expect(paged.body.total).toBe(2);
      expect(paged.body.entry as Json[]).toHaveLength(1);
      expect(paged.body.link).toEqual([
        { relation: 'self', url: `${BASE}/Subscription?${query({ url: hook('a'), status: 'off', _count: '1' })}` },
        {
          relation: 'next',
          url: `${BASE}/Subscription?${query({ url: hook('a'), status: 'off', _count: '1', _offset: '1' })}`,
        },
      ]);
      const active = await request('GET', `/fhir/Subscription?${query({ url: hook('a'), status: 'active' })}`);
      expect(active.body.total).toBe(0);

      const byPost = await t.broker.app.request('/fhir/Subscription/_search', {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/x-www-form-urlencoded' },
        body: query({ url: hook('b') }),
      });
      expect(byPost.status).toBe(200);
      expect(idsOf((await byPost.json()) as Json)).toEqual([b.id]);
    });

    it('shows another client only its own Subscriptions at the same url', async () => {
      const bobs = await t.create(topicSubscription('patient-change', hook('shared'), off), TOKENS.bob);
      await t.create(topicSubscription('patient-change', hook('shared'), off));
      const res = await request('GET', `/fhir/Subscription?${query({ url: hook('shared') })}`, { token: TOKENS.bob });
      expect(res.status).toBe(200);
      expect(res.body.total).toBe(1);
      expect(idsOf(res.body)).toEqual([bobs.id]);
    });

    it('takes an escaped comma as part of the url', async () => {
      const comma = await t.create(topicSubscription('patient-change', `${hook('c')}?x=1,2`, off));
      const escaped = await request('GET', `/fhir/Subscription?${query({ url: `${hook('c')}?x=1\\,2` })}`);
      expect(idsOf(escaped.body)).toEqual([comma.id]);
      // Unescaped, the comma separates two urls, neither of them the endpoint.
      const split = await request('GET', `/fhir/Subscription?${query({ url: `${hook('c')}?x=1,2` })}`);
      expect(split.body.total).toBe(0);
    });

    it('treats url:below as other unsupported modifiers: ignored and left out of self, refused under handling=strict', async () => {
      const all = await request('GET', '/fhir/Subscription');
      const below = await request('GET', `/fhir/Subscription?${query({ 'url:below': receiver.url })}`);
      expect(below.status).toBe(200);
      expect(below.body.total).toBe(all.body.total);
      expect(below.body.link).toEqual([{ relation: 'self', url: `${BASE}/Subscription` }]);
      const strict = await request('GET', `/fhir/Subscription?${query({ 'url:below': receiver.url })}`, {
        headers: { prefer: 'handling=strict' },
      });
      expect(strict.status).toBe(400);
      expect(strict.body).toEqual(
        operationOutcome(
          'INVALID_PARAMETER',
          'Unsupported search parameter(s): url:below (supported: _id, status, url, _count, _offset, _summary, _format, _pretty)',
        ),
      );
    });

    it('declares its search parameters in the CapabilityStatement with their definitions', async () => {
      expect((await subscriptionResource()).searchParam).toEqual([
        { name: '_id', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Resource-id' },
        { name: 'status', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Subscription-status' },
        { name: 'url', type: 'uri', definition: 'http://hl7.org/fhir/SearchParameter/Subscription-url' },
      ]);
    });
  });

  describe('update', () => {
    it('refuses a PUT whose body has no id with 400 ID_MISMATCH, and changes nothing', async () => {
      const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/no-id`, off));
      const { id: _id, ...withoutId } = sub;
      const res = await request('PUT', `/fhir/Subscription/${sub.id}`, { body: { ...withoutId, reason: 'changed' } });
      expect(res.status).toBe(400);
      expect(res.body).toEqual(
        operationOutcome(
          'ID_MISMATCH',
          `The body has no id: a PUT to Subscription/${sub.id} must carry "id": "${sub.id}"`,
          'Subscription.id',
        ),
      );
      const now = await request('GET', `/fhir/Subscription/${sub.id}`);
      expect([now.body.reason, (now.body.meta as Json).versionId]).toEqual(['test', (sub.meta as Json).versionId]);
      // With the id it is an update.
      const withId = await request('PUT', `/fhir/Subscription/${sub.id}`, { body: { ...sub, reason: 'changed' } });
      expect([withId.status, withId.body.reason]).toEqual([200, 'changed']);
    });
  });

  describe('$events', () => {
    /** A notification bundle without what differs from call to call (ids, timestamp). */
    const stable = (bundle: Json): Json =>
      JSON.parse(
        JSON.stringify(bundle)
          .replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, 'ID')
          .replace(/"timestamp":"[^"]+"/g, '"timestamp":"T"'),
      ) as Json;

    it('takes content=full-resource as the hint it is: the subscription’s own content, by GET and by POST', async () => {
      const sub = await t.create(
        topicSubscription('patient-change', `${receiver.url}/events`, { filters: ['Patient?_id=conf-p'] }),
      );
      await t.post(eventLike('healthlake-update-patient', 'conf-event-1', 'conf-p'));
      const own = await request('GET', `/fhir/Subscription/${sub.id}/$events`);
      expect(own.status).toBe(200);
      expect(eventNumbers(own.body)).toEqual([1]);
      expect(statusOf(own.body).events.map(focusOf)).toEqual([`${HL}/Patient/conf-p`]);

      const byGet = await request('GET', `/fhir/Subscription/${sub.id}/$events?content=full-resource`);
      const byPost = await request('POST', `/fhir/Subscription/${sub.id}/$events`, {
        body: { resourceType: 'Parameters', parameter: [{ name: 'content', valueCode: 'full-resource' }] },
      });
      for (const res of [byGet, byPost]) {
        expect(res.status).toBe(200);
        expect(stable(res.body)).toEqual(stable(own.body));
      }

      const unknown = await request('GET', `/fhir/Subscription/${sub.id}/$events?content=bogus`);
      expect(unknown.status).toBe(400);
      expect(unknown.body).toEqual(
        operationOutcome('INVALID_PARAMETER', 'content must be empty, id-only or full-resource, not bogus'),
      );
    });
  });

  describe('a custom channel type (backport-channel-type)', () => {
    const zulip = (extra: Json = {}): Json =>
      topicSubscription('patient-change', `${receiver.url}/zulip`, {
        channel: {
          _type: {
            extension: [
              {
                url: CHANNEL_TYPE,
                valueCoding: {
                  system: 'http://example.org/subscription-channel-type',
                  code: 'zulip',
                  display: 'Zulip Notification Channel',
                },
              },
            ],
          },
        },
        extra,
      });
    const refusal = operationOutcome(
      'UNSUPPORTED_CHANNEL',
      'Custom channel type zulip (backport-channel-type) is not supported; use rest-hook or websocket without it',
      'Subscription.channel._type',
    );

    it('is refused with 422 on create, and nothing is stored', async () => {
      const before = await request('GET', '/fhir/Subscription?_summary=count');
      const res = await request('POST', '/fhir/Subscription', { body: zulip() });
      expect(res.status).toBe(422);
      expect(res.body).toEqual(refusal);
      expect((await request('GET', '/fhir/Subscription?_summary=count')).body.total).toBe(before.body.total);
    });

    it('is refused with 422 on update, and the subscription is left as it was', async () => {
      const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/zulip`, off));
      const res = await request('PUT', `/fhir/Subscription/${sub.id}`, { body: zulip({ id: sub.id, status: 'off' }) });
      expect(res.status).toBe(422);
      expect(res.body).toEqual(refusal);
      const now = await request('GET', `/fhir/Subscription/${sub.id}`);
      expect((now.body.meta as Json).versionId).toBe((sub.meta as Json).versionId);
      expect((now.body.channel as Json)._type).toBeUndefined();
    });
  });

  describe('backport-channel-type restating the channel type', () => {
    const R5_CHANNEL_TYPES = 'http://terminology.hl7.org/CodeSystem/subscription-channel-type';
    const R4_CHANNEL_TYPES = 'http://hl7.org/fhir/subscription-channel-type';
    const restating = (code: string, system = R5_CHANNEL_TYPES): Json =>
      topicSubscription('patient-change', `${receiver.url}/restated`, {
        channel: { _type: { extension: [{ url: CHANNEL_TYPE, valueCoding: { system, code } }] } },
        extra: off.extra,
      });

    it.each([
      ['R5’s', R5_CHANNEL_TYPES],
      ['R4’s', R4_CHANNEL_TYPES],
    ])('is accepted and kept when it names the same type in %s code system', async (_, system) => {
      const res = await request('POST', '/fhir/Subscription', { body: restating('rest-hook', system) });
      expect(res.status).toBe(201);
      const read = await request('GET', `/fhir/Subscription/${res.body.id}`);
      expect((read.body.channel as Json)._type).toEqual({
        extension: [{ url: CHANNEL_TYPE, valueCoding: { system, code: 'rest-hook' } }],
      });
    });

    it('is refused when it names another type, or the same code in another system', async () => {
      const other = await request('POST', '/fhir/Subscription', { body: restating('email') });
      expect([other.status, other.body]).toEqual([
        422,
        operationOutcome(
          'UNSUPPORTED_CHANNEL',
          'Custom channel type email (backport-channel-type) is not supported; use rest-hook or websocket without it',
          'Subscription.channel._type',
        ),
      ]);
      const body = restating('rest-hook');
      const ext = ((body.channel as Json)._type as Json).extension as Json[];
      (ext[0] as Json).valueCoding = { system: 'http://example.org/channels', code: 'rest-hook' };
      const elsewhere = await request('POST', '/fhir/Subscription', { body });
      expect(elsewhere.status).toBe(422);
    });
  });

  describe('an extension the broker does not understand where it decides what is delivered', () => {
    const CROSS_VERSION_FILTER =
      'http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition/backport-filter-criteria';

    it('is refused with 422 naming it, not ignored (a cross-version filter URL would match every change)', async () => {
      const before = await request('GET', '/fhir/Subscription?_summary=count');
      const res = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', `${receiver.url}/cross-version`, {
          extra: { _criteria: { extension: [{ url: CROSS_VERSION_FILTER, valueString: 'Patient?_id=conf-only' }] } },
        }),
      });
      expect(res.status).toBe(422);
      expect(res.body).toEqual(
        operationOutcome(
          'UNSUPPORTED_FILTER',
          `Extension ${CROSS_VERSION_FILTER} on Subscription.criteria cannot be honoured: the broker does not understand it there (understood: backport-filter-criteria)`,
          'Subscription._criteria.extension',
        ),
      );
      expect((await request('GET', '/fhir/Subscription?_summary=count')).body.total).toBe(before.body.total);
    });

    it('is kept as sent where it only informs (an R5 identifier on the Subscription)', async () => {
      const identifier = {
        url: 'http://hl7.org/fhir/5.0/StructureDefinition/extension-Subscription.identifier',
        valueIdentifier: { system: 'urn:example', value: 'conf-42' },
      };
      const sub = await t.create(
        topicSubscription('patient-change', `${receiver.url}/informed`, {
          extra: { ...off.extra, extension: [identifier] },
        }),
      );
      expect((await request('GET', `/fhir/Subscription/${sub.id}`)).body.extension).toEqual([identifier]);
    });
  });

  describe('_summary', () => {
    it.each(['true', 'text', 'data'])('refuses _summary=%s with 400 instead of ignoring it', async (value) => {
      const res = await request('GET', `/fhir/Subscription?_summary=${value}`);
      expect(res.status).toBe(400);
      expect(res.body).toEqual(
        operationOutcome('INVALID_PARAMETER', `_summary=${value} is not supported; use count or false`),
      );
    });

    it('refuses _summary=true in a POST _search too', async () => {
      const res = await t.broker.app.request('/fhir/Subscription/_search', {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/x-www-form-urlencoded' },
        body: '_summary=true',
      });
      expect(res.status).toBe(400);
      expect(await res.json()).toEqual(
        operationOutcome('INVALID_PARAMETER', '_summary=true is not supported; use count or false'),
      );
    });
  });

  describe('versions', () => {
    const versionOf = (body: Json): string => String((body.meta as Json).versionId);
    // A create's answer carries the generated webhook secret, shown that once and in no version read after.
    const withoutSecret = (body: Json): Json => {
      const { extension, ...channel } = body.channel as Json;
      const rest = (extension as Json[]).filter((e) => !String(e.url).endsWith('/webhook-secret'));
      return { ...body, channel: rest.length === 0 ? channel : { ...channel, extension: rest } };
    };

    it('serves the version a create’s Location names after the handshake changed it, and earlier versions after a PUT', async () => {
      const created = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', `${receiver.url}/versioned`),
      });
      expect(created.status).toBe(201);
      const id = String(created.body.id);
      const v1 = versionOf(created.body);
      const location = `${BASE}/Subscription/${id}/_history/${v1}`;
      expect(created.headers.get('location')).toBe(location);
      // The handshake moves it to active: a new version, and the create's is still there to read.
      await t.logger.waitForStatus(id, 'active');
      const read = await request('GET', `/fhir/Subscription/${id}`);
      const v2 = versionOf(read.body);
      expect([read.body.status, v2 === v1]).toEqual(['active', false]);
      const first = await request('GET', location.slice('http://broker.test'.length));
      expect(first.status).toBe(200);
      expect(first.body).toEqual(withoutSecret(created.body));
      expect([first.body.status, first.headers.get('etag')]).toEqual(['requested', `W/"${v1}"`]);

      const updated = await request('PUT', `/fhir/Subscription/${id}`, { body: { ...read.body, reason: 'v3' } });
      const v3 = versionOf(updated.body);
      const second = await request('GET', `/fhir/Subscription/${id}/_history/${v2}`);
      expect(second.body).toEqual(read.body);
      expect([second.status, second.headers.get('etag'), second.headers.get('last-modified')]).toEqual([
        200,
        `W/"${v2}"`,
        read.headers.get('last-modified'),
      ]);
      const current = await request('GET', `/fhir/Subscription/${id}/_history/${v3}`);
      expect([current.status, current.body.reason, current.body.status]).toEqual([200, 'v3', 'active']);

      const unknown = await request('GET', `/fhir/Subscription/${id}/_history/1`);
      expect(unknown.status).toBe(404);
      expect(unknown.body).toEqual(
        operationOutcome(
          'NOT_FOUND',
          `Subscription/${id}/_history/1 not found: the broker keeps the current version of a Subscription and the last 10 before it`,
        ),
      );
      // Another client: not found, as for a read, whichever version it names.
      for (const vid of [v1, v2, v3]) {
        const bob = await request('GET', `/fhir/Subscription/${id}/_history/${vid}`, { token: TOKENS.bob });
        expect(bob.status).toBe(404);
        expect(bob.body).toEqual(operationOutcome('NOT_FOUND', `Subscription/${id} not found`));
      }
    });

    it('forgets the previous versions with $expunge (expungePreviousVersions), and only those', async () => {
      const created = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', `${receiver.url}/expunged`, off),
      });
      const id = String(created.body.id);
      const v1 = versionOf(created.body);
      const put = await request('PUT', `/fhir/Subscription/${id}`, {
        body: {
          ...withoutSecret(created.body),
          channel: { ...(withoutSecret(created.body).channel as Json), header: ['X-Api-Key: retired'] },
        },
      });
      const v2 = versionOf(put.body);
      const current = await request('PUT', `/fhir/Subscription/${id}`, {
        body: { ...put.body, channel: { ...(put.body.channel as Json), header: ['X-Api-Key: new'] } },
      });
      expect((await request('GET', `/fhir/Subscription/${id}/_history/${v2}`)).status).toBe(200);

      const bob = await request('POST', `/fhir/Subscription/${id}/$expunge?expungePreviousVersions=true`, {
        token: TOKENS.bob,
      });
      expect([bob.status, bob.body]).toEqual([404, operationOutcome('NOT_FOUND', `Subscription/${id} not found`)]);
      const without = await request('POST', `/fhir/Subscription/${id}/$expunge`);
      expect([without.status, without.body]).toEqual([
        400,
        operationOutcome(
          'INVALID_PARAMETER',
          "$expunge needs expungePreviousVersions=true: it forgets a Subscription's previous versions, and only those",
        ),
      ]);
      const everything = await request('POST', `/fhir/Subscription/${id}/$expunge?expungeEverything=true`);
      expect(everything.status).toBe(400);

      const expunged = await request('POST', `/fhir/Subscription/${id}/$expunge`, {
        body: { resourceType: 'Parameters', parameter: [{ name: 'expungePreviousVersions', valueBoolean: true }] },
      });
      expect([expunged.status, expunged.body]).toEqual([
        200,
        { resourceType: 'Parameters', parameter: [{ name: 'count', valueInteger: 2 }] },
      ]);
      for (const vid of [v1, v2])
        expect((await request('GET', `/fhir/Subscription/${id}/_history/${vid}`)).status).toBe(404);
      const history = await request('GET', `/fhir/Subscription/${id}/_history`);
      expect([history.body.total, JSON.stringify(history.body).includes('retired')]).toEqual([1, false]);
      expect((await request('GET', `/fhir/Subscription/${id}`)).body).toEqual(current.body);
    });

    it('lists the versions newest first as a history Bundle, with _count and _since', async () => {
      const created = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', `${receiver.url}/history`, off),
      });
      const id = String(created.body.id);
      let body = withoutSecret(created.body);
      const bodies = [body];
      for (const reason of ['second', 'third']) {
        body = (await request('PUT', `/fhir/Subscription/${id}`, { body: { ...body, reason } })).body;
        bodies.unshift(body);
      }
      const history = await request('GET', `/fhir/Subscription/${id}/_history`);
      expect(history.status).toBe(200);
      expect(history.body).toEqual({
        resourceType: 'Bundle',
        type: 'history',
        total: 3,
        link: [{ relation: 'self', url: `${BASE}/Subscription/${id}/_history` }],
        entry: bodies.map((b, i) => ({
          fullUrl: `${BASE}/Subscription/${id}`,
          resource: b,
          request: i === 2 ? { method: 'POST', url: 'Subscription' } : { method: 'PUT', url: `Subscription/${id}` },
          response: {
            status: i === 2 ? '201 Created' : '200 OK',
            etag: `W/"${versionOf(b)}"`,
            lastModified: (b.meta as Json).lastUpdated,
          },
        })),
      });

      const since = String(((bodies[1] as Json).meta as Json).lastUpdated);
      const recent = await request('GET', `/fhir/Subscription/${id}/_history?${query({ _since: since, _count: '1' })}`);
      expect([recent.body.total, (recent.body.entry as Json[]).map((e) => (e.resource as Json).reason)]).toEqual([
        2,
        ['third'],
      ]);
      const nextUrl = `${BASE}/Subscription/${id}/_history?${query({ _since: since, _count: '1', _offset: '1' })}`;
      expect(recent.body.link).toEqual([
        { relation: 'self', url: `${BASE}/Subscription/${id}/_history?${query({ _since: since, _count: '1' })}` },
        { relation: 'next', url: nextUrl },
      ]);
      // The next page: the other version since then, and no further link.
      const rest = await request('GET', nextUrl.slice('http://broker.test'.length));
      expect([rest.body.total, (rest.body.entry as Json[]).map((e) => (e.resource as Json).reason)]).toEqual([
        2,
        ['second'],
      ]);
      expect((rest.body.link as Json[]).map((l) => l.relation)).toEqual(['self']);
      const counted = await request('GET', `/fhir/Subscription/${id}/_history?_count=0`);
      expect([counted.body.total, counted.body.entry, (counted.body.link as Json[]).length]).toEqual([3, undefined, 1]);
      const badOffset = await request('GET', `/fhir/Subscription/${id}/_history?_offset=-1`);
      expect([badOffset.status, badOffset.body]).toEqual([
        400,
        operationOutcome('INVALID_PARAMETER', '_offset must be a non-negative integer'),
      ]);
      const none = await request('GET', `/fhir/Subscription/${id}/_history?_since=2999-01-01T00:00:00Z`);
      expect([none.status, none.body.total, none.body.entry]).toEqual([200, 0, undefined]);

      const bad = await request('GET', `/fhir/Subscription/${id}/_history?_since=yesterday`);
      expect(bad.status).toBe(400);
      expect(bad.body).toEqual(
        operationOutcome(
          'INVALID_PARAMETER',
          '_since "yesterday" is not an instant: expected YYYY-MM-DDThh:mm:ss (optionally .fff) then Z or +hh:mm / -hh:mm',
        ),
      );
      const bob = await request('GET', `/fhir/Subscription/${id}/_history`, { token: TOKENS.bob });
      expect([bob.status, bob.body]).toEqual([404, operationOutcome('NOT_FOUND', `Subscription/${id} not found`)]);
    });

    it('declares vread, history and versioned updates in the CapabilityStatement', async () => {
      const resource = await subscriptionResource();
      expect((resource.interaction as Json[]).map((i) => i.code)).toEqual([
        'create',
        'read',
        'vread',
        'update',
        'delete',
        'history-instance',
        'search-type',
      ]);
      expect([resource.versioning, resource.readHistory, resource.updateCreate, resource.conditionalCreate]).toEqual([
        'versioned-update',
        true,
        false,
        true,
      ]);
    });
  });

  describe('a subscription in error, read and PUT back', () => {
    it('stays in error with the broker’s reason, and the other changes apply', async () => {
      const created = await t.create(topicSubscription('patient-change', `${receiver.url}/failing`));
      const id = String(created.id);
      await t.logger.waitForStatus(id, 'error');
      const read = await request('GET', `/fhir/Subscription/${id}`);
      expect([read.body.status, read.body.error]).toEqual(['error', 'handshake failed: HTTP 500']);

      const since = t.logger.mark();
      const put = await request('PUT', `/fhir/Subscription/${id}`, { body: { ...read.body, reason: 'edited' } });
      expect(put.status).toBe(200);
      const v2 = String((put.body.meta as Json).versionId);
      expect(v2).not.toBe((read.body.meta as Json).versionId);
      expect(put.body).toEqual({
        ...read.body,
        reason: 'edited',
        meta: { ...(read.body.meta as Json), versionId: v2, lastUpdated: (put.body.meta as Json).lastUpdated },
      });
      expect((await request('GET', `/fhir/Subscription/${id}`)).body).toEqual(put.body);
      // No status change: nothing but the update happened to it.
      expect(t.logger.records.slice(since).filter((r) => r.subscription === id)).toEqual([
        { level: 'info', msg: 'subscription updated', subscription: id, owner: 'alice', status: 'error' },
      ]);
    });

    it('moved to another endpoint with status error is refused: the move goes with requested, which verifies it', async () => {
      const created = await t.create(
        topicSubscription('patient-change', `${receiver.url}/dies`, { filters: ['Patient?_id=dies-p'] }),
      );
      const id = String(created.id);
      await t.logger.waitForStatus(id, 'active');
      await t.post(eventLike('healthlake-update-patient', 'dies-event-1', 'dies-p'));
      await t.logger.waitForStatus(id, 'error');
      // After failed deliveries heartbeats still go to the endpoint that answered the handshake.
      expect(heartbeatsAllowed(t.broker.registry.get(id) as SubscriptionRecord)).toBe(true);

      const read = await request('GET', `/fhir/Subscription/${id}`);
      expect(read.body.error).toBe('delivery failed after 2 attempt(s): HTTP 500');
      const channel = { ...(read.body.channel as Json), endpoint: `${receiver.url}/moved` };
      const refused = await request('PUT', `/fhir/Subscription/${id}`, { body: { ...read.body, channel } });
      expect(refused.status).toBe(422);
      expect(refused.body).toEqual(
        operationOutcome(
          'INVALID_STATUS_CHANGE',
          'A new endpoint must answer a handshake first: send status requested to move the subscription and re-activate it',
          'Subscription.status',
        ),
      );
      // Nothing changed, nothing went to the new endpoint.
      expect((await request('GET', `/fhir/Subscription/${id}`)).body).toEqual(read.body);
      expect(receiver.arrived.filter((r) => r.path === '/moved')).toEqual([]);

      // With `requested` the move goes: the handshake, then the dead letter.
      const since = t.logger.mark();
      const reactivated = await request('PUT', `/fhir/Subscription/${id}`, {
        body: { ...read.body, channel, status: 'requested' },
      });
      expect([reactivated.status, reactivated.body.status, reactivated.body.error]).toEqual([
        200,
        'requested',
        undefined,
      ]);
      await t.logger.waitForStatus(id, 'active', undefined, since);
      await receiver.waitFor(() => notifiedNumbers(receiver.on('/moved')).length === 1, 'the dead letter at /moved');
      expect(notifiedNumbers(receiver.on('/moved'))).toEqual([1]);
    });

    it('still refuses error asked of a subscription in any other status', async () => {
      const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/not-in-error`, off));
      const res = await request('PUT', `/fhir/Subscription/${sub.id}`, { body: { ...sub, status: 'error' } });
      expect(res.status).toBe(422);
      expect(res.body).toEqual(
        operationOutcome(
          'INVALID_STATUS_CHANGE',
          'Only the broker sets status error; send requested to re-activate',
          'Subscription.status',
        ),
      );
    });
  });
});
