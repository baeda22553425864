import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Json, topicSubscription } from './support/fhir-client.js';
import { request as fhirRequest, inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { record } from './support/store-fixtures.js';

/**
 * FHIR R4 REST as standard clients use it, where a review found the broker short: repeated search
 * parameters (AND), empty ones (ignored), a `status` token with its system, conditional create
 * (`If-None-Exist`), `Prefer: return=`, a DELETE of what is not there, an `If-Match` list,
 * `POST SubscriptionTopic/_search`, a `_count` above the page size, CORS for browser apps and
 * `Parameters` bodies an operation cannot read.
 */

const BASE = 'http://broker.test/fhir';

describe('FHIR interactions', () => {
  let t: TestBroker;
  let receiver: Receiver;

  beforeAll(async () => {
    receiver = await Receiver.start();
    t = await inProcessBroker({ BROKER_HANDSHAKE_RETRY_DELAYS: 'none' });
  });

  afterAll(async () => {
    await t?.broker.close(0);
    await receiver?.close();
  });

  const request = (method: string, path: string, options?: Parameters<typeof fhirRequest>[3]) =>
    fhirRequest(t, method, path, options);

  /** A subscription of alice's to its own receiver path, `active` once its handshake is answered. */
  async function created(path: string, token: string = TOKENS.alice): Promise<Json> {
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}${path}`), token);
    await t.logger.waitForStatus(sub.id as string, 'active');
    return sub;
  }

  const idsOf = (bundle: Json): string[] =>
    ((bundle.entry ?? []) as Json[]).map((e) => (e.resource as Json).id as string).sort();

  describe('search', () => {
    let a: Json;
    let b: Json;
    let off: Json;

    beforeAll(async () => {
      a = await created('/search-a');
      b = await created('/search-b');
      off = await created('/search-off');
      const put = await request('PUT', `/fhir/Subscription/${off.id}`, {
        body: { ...topicSubscription('patient-change', `${receiver.url}/search-off`), id: off.id, status: 'off' },
      });
      expect(put.status).toBe(200);
    });

    it('ANDs a repeated parameter and ORs a comma list', async () => {
      const both = await request('GET', '/fhir/Subscription?status=active&status=off');
      expect(both.status).toBe(200);
      expect(both.body.total).toBe(0);
      expect((both.body.link as Json[])[0]?.url).toBe(`${BASE}/Subscription?status=active&status=off`);
      const either = await request('GET', `/fhir/Subscription?_id=${a.id},${off.id}`);
      expect(idsOf(either.body)).toEqual([a.id, off.id].sort());
      expect((await request('GET', `/fhir/Subscription?_id=${a.id}&_id=${off.id}`)).body.total).toBe(0);
      const narrowed = await request('GET', `/fhir/Subscription?_id=${a.id},${b.id}&_id=${b.id},${off.id}`);
      expect(idsOf(narrowed.body)).toEqual([b.id]);
      // A form body (POST _search) and the query string are one set of parameters.
      const posted = await request('POST', `/fhir/Subscription/_search?_id=${a.id},${b.id}`, {
        raw: `_id=${b.id}`,
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
      });
      expect(idsOf(posted.body)).toEqual([b.id]);
      // A form is UTF-8: another charset is refused, not read garbled.
      const latin1 = await request('POST', '/fhir/Subscription/_search', {
        raw: `_id=${b.id}`,
        headers: { 'content-type': 'application/x-www-form-urlencoded; charset=iso-8859-1' },
      });
      expect(latin1.status).toBe(415);
      expect(latin1.text).toContain('UTF-8 form');
      const utf8 = await request('POST', '/fhir/Subscription/_search', {
        raw: `_id=${b.id}`,
        headers: { 'content-type': 'application/x-www-form-urlencoded; charset=UTF-8' },
      });
      expect(idsOf(utf8.body)).toEqual([b.id]);
    });

    it('ignores an empty parameter, and leaves it out of the self link', async () => {
      const all = await request('GET', '/fhir/Subscription');
      const empty = await request('GET', '/fhir/Subscription?_id=&status=');
      expect(empty.status).toBe(200);
      expect(empty.body.total).toBe(all.body.total);
      expect((empty.body.link as Json[])[0]?.url).toBe(`${BASE}/Subscription`);
    });

    it('takes status as a token with its system; another system, or none, matches nothing', async () => {
      const system = encodeURIComponent('http://hl7.org/fhir/subscription-status|off');
      expect(idsOf((await request('GET', `/fhir/Subscription?status=${system}`)).body)).toEqual([off.id]);
      const other = encodeURIComponent('http://example.org/status|off');
      expect((await request('GET', `/fhir/Subscription?status=${other}`)).body.total).toBe(0);
      expect((await request('GET', `/fhir/Subscription?status=${encodeURIComponent('|off')}`)).body.total).toBe(0);
    });

    it('answers a page of 1,000 at most to a larger _count, instead of a 400', async () => {
      // A broker of its own, with 1,001 subscriptions of alice's (written to its store: off, idle).
      const many = await inProcessBroker();
      try {
        for (let i = 0; i < 1001; i++)
          await many.broker.store.insertSubscription(record(`many-${i}`, { status: 'off' }));
        for (const count of ['1000000', '5000']) {
          const res = await fhirRequest(many, 'GET', `/fhir/Subscription?_count=${count}`);
          expect(res.status).toBe(200);
          expect(res.body.total).toBe(1001);
          expect((res.body.entry as Json[]).length).toBe(1000);
          expect((res.body.link as Json[]).map((l) => l.relation)).toEqual(['self', 'next']);
        }
        expect((await fhirRequest(many, 'GET', '/fhir/Subscription?_count=-1')).status).toBe(400);
      } finally {
        await many.broker.close(0);
      }
    });

    it('searches topics by POST as by GET, repeated parameters ANDed', async () => {
      const form = { 'content-type': 'application/x-www-form-urlencoded' };
      const found = await request('POST', '/fhir/SubscriptionTopic/_search', {
        raw: '_id=patient-change',
        headers: form,
      });
      expect(found.status).toBe(200);
      expect(found.body.resourceType).toBe('Bundle');
      expect(idsOf(found.body)).toEqual(['patient-change']);
      const none = await request('POST', '/fhir/SubscriptionTopic/_search', {
        raw: '_id=patient-change&_id=encounter-change',
        headers: form,
      });
      expect(none.body.total).toBe(0);
      expect((await request('PUT', '/fhir/SubscriptionTopic/_search')).status).toBe(405);
      expect((await request('POST', '/fhir/SubscriptionTopic/_search', { token: 'wrong' })).status).toBe(401);
    });
  });

  describe('conditional create (If-None-Exist)', () => {
    const count = async (endpoint: string): Promise<number> =>
      (await request('GET', `/fhir/Subscription?url=${encodeURIComponent(endpoint)}`)).body.total as number;

    it('creates when nothing matches, then answers 200 with the one that does, and creates nothing', async () => {
      const endpoint = `${receiver.url}/conditional`;
      const headers = { 'if-none-exist': `url=${encodeURIComponent(endpoint)}` };
      const first = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', endpoint),
        headers,
      });
      expect(first.status).toBe(201);
      expect(first.text).toContain('whsec_');
      const again = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', endpoint),
        headers,
      });
      expect(again.status).toBe(200);
      expect(again.body.id).toBe(first.body.id);
      expect(again.headers.get('location')).toBe(first.headers.get('location'));
      // The secret was shown once, at the create.
      expect(again.text).not.toContain('whsec_');
      expect(await count(endpoint)).toBe(1);
      // `Subscription?` before the parameters, as some clients write it.
      const prefixed = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', endpoint),
        headers: { 'if-none-exist': `Subscription?_id=${first.body.id}` },
      });
      expect(prefixed.status).toBe(200);
      expect(await count(endpoint)).toBe(1);
    });

    it('creates one of two racing for the same condition', async () => {
      const endpoint = `${receiver.url}/conditional-race`;
      const headers = { 'if-none-exist': `url=${encodeURIComponent(endpoint)}` };
      const answers = await Promise.all(
        [1, 2].map(() =>
          request('POST', '/fhir/Subscription', { body: topicSubscription('patient-change', endpoint), headers }),
        ),
      );
      expect(answers.map((r) => r.status).sort()).toEqual([200, 201]);
      expect(new Set(answers.map((r) => r.body.id)).size).toBe(1);
      expect(await count(endpoint)).toBe(1);
    });

    it('looks at the client’s own subscriptions only', async () => {
      const endpoint = `${receiver.url}/conditional-owner`;
      await created('/conditional-owner', TOKENS.bob);
      const mine = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', endpoint),
        headers: { 'if-none-exist': `url=${encodeURIComponent(endpoint)}` },
      });
      expect(mine.status).toBe(201);
    });

    it('is a 412 when more than one matches, and a 400 for a condition it cannot evaluate; nothing created', async () => {
      const endpoint = `${receiver.url}/conditional-two`;
      await created('/conditional-two');
      await created('/conditional-two');
      const body = topicSubscription('patient-change', endpoint);
      const two = await request('POST', '/fhir/Subscription', {
        body,
        headers: { 'if-none-exist': `url=${encodeURIComponent(endpoint)}` },
      });
      expect(two.status).toBe(412);
      expect(two.body.resourceType).toBe('OperationOutcome');
      expect(JSON.stringify(two.body)).toContain('matches 2 subscriptions');
      for (const [condition, says] of [
        ['criteria=Patient', 'not criteria'],
        ['', 'If-None-Exist takes _id, status, url'],
        ['url=', 'If-None-Exist takes _id, status, url'],
      ] as const) {
        const res = await request('POST', '/fhir/Subscription', { body, headers: { 'if-none-exist': condition } });
        expect(res.status).toBe(400);
        expect(JSON.stringify(res.body)).toContain(says);
      }
      expect(await count(endpoint)).toBe(2);
    });
  });

  describe('Prefer: return=', () => {
    const secretFree = (path: string) => ({
      ...topicSubscription('patient-change', `${receiver.url}${path}`),
      channel: {
        ...(topicSubscription('patient-change', `${receiver.url}${path}`).channel as Json),
        extension: [
          {
            url: 'https://fhir-subscription-broker.org/fhir/StructureDefinition/webhook-secret',
            valueString: 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
          },
        ],
      },
    });

    it('minimal: no body, with Location and ETag; OperationOutcome: an outcome; on create and update', async () => {
      const minimal = await request('POST', '/fhir/Subscription', {
        body: secretFree('/prefer'),
        headers: { prefer: 'return=minimal' },
      });
      expect(minimal.status).toBe(201);
      expect(minimal.text).toBe('');
      const [, id, version] = /\/fhir\/Subscription\/([^/]+)\/_history\/(\d+)$/.exec(
        minimal.headers.get('location') ?? '',
      ) as unknown as [string, string, string];
      expect(minimal.headers.get('etag')).toBe(`W/"${version}"`);
      await t.logger.waitForStatus(id, 'active');
      const read = await request('GET', `/fhir/Subscription/${id}`);
      const outcome = await request('PUT', `/fhir/Subscription/${id}`, {
        body: { ...read.body, reason: 'changed' },
        headers: { prefer: 'return=OperationOutcome' },
      });
      expect(outcome.status).toBe(200);
      expect(outcome.body).toEqual({
        resourceType: 'OperationOutcome',
        issue: [{ severity: 'information', code: 'informational', diagnostics: `Subscription/${id} updated` }],
      });
      expect(outcome.headers.get('etag')).toMatch(/^W\/"\d+"$/);
      const representation = await request('PUT', `/fhir/Subscription/${id}`, {
        body: { ...read.body, reason: 'changed again' },
        headers: { prefer: 'return=representation' },
      });
      expect(representation.body.reason).toBe('changed again');
    });

    it('shows a generated secret whatever is asked: that answer is the only time it is shown', async () => {
      const res = await request('POST', '/fhir/Subscription', {
        body: topicSubscription('patient-change', `${receiver.url}/prefer-secret`),
        headers: { prefer: 'return=minimal' },
      });
      expect(res.status).toBe(201);
      expect(res.body.resourceType).toBe('Subscription');
      expect(res.text).toContain('whsec_');
    });
  });

  describe('DELETE and If-Match', () => {
    it('answers 204 to a DELETE of what is not there (again, or another client’s, which stays)', async () => {
      const sub = await created('/delete-twice');
      expect((await request('DELETE', `/fhir/Subscription/${sub.id}`)).status).toBe(204);
      expect((await request('DELETE', `/fhir/Subscription/${sub.id}`)).status).toBe(204);
      expect((await request('DELETE', '/fhir/Subscription/nobody-has-this-id')).status).toBe(204);
      const bobs = await created('/delete-bobs', TOKENS.bob);
      expect((await request('DELETE', `/fhir/Subscription/${bobs.id}`)).status).toBe(204);
      expect((await request('GET', `/fhir/Subscription/${bobs.id}`, { token: TOKENS.bob })).status).toBe(200);
      // With If-Match there is no version to match: a 404.
      const named = await request('DELETE', `/fhir/Subscription/${sub.id}`, { headers: { 'if-match': 'W/"1"' } });
      expect(named.status).toBe(404);
    });

    it('takes an If-Match list: any one version matches', async () => {
      const sub = await created('/if-match-list');
      const read = await request('GET', `/fhir/Subscription/${sub.id}`);
      const current = String((read.body.meta as Json).versionId);
      const stale = await request('PUT', `/fhir/Subscription/${sub.id}`, {
        body: { ...read.body, reason: 'stale' },
        headers: { 'if-match': 'W/"98", W/"99"' },
      });
      expect(stale.status).toBe(412);
      const listed = await request('PUT', `/fhir/Subscription/${sub.id}`, {
        body: { ...read.body, reason: 'listed' },
        headers: { 'if-match': `W/"99", W/"${current}"` },
      });
      expect(listed.status).toBe(200);
      expect(listed.body.reason).toBe('listed');
    });
  });

  describe('CORS (BROKER_CORS_ORIGINS)', () => {
    const APP = 'https://app.example.org';
    const preflight = {
      origin: APP,
      'access-control-request-method': 'POST',
      'access-control-request-headers': 'authorization, content-type, if-none-exist',
    };

    it('answers a preflight from an allowed origin before the token check, and marks every answer for it', async () => {
      const c = await inProcessBroker({ BROKER_CORS_ORIGINS: `${APP}, http://localhost:5173` });
      try {
        const pre = await c.broker.app.request('/fhir/Subscription', { method: 'OPTIONS', headers: preflight });
        expect(pre.status).toBe(204);
        expect(pre.headers.get('access-control-allow-origin')).toBe(APP);
        expect(pre.headers.get('access-control-allow-methods')).toBe('GET,HEAD,POST,PUT,DELETE');
        expect(pre.headers.get('access-control-allow-headers')?.toLowerCase()).toContain('if-none-exist');
        expect(pre.headers.get('access-control-allow-credentials')).toBeNull();
        const read = await c.broker.app.request('/fhir/Subscription', {
          headers: { origin: APP, authorization: `Bearer ${TOKENS.alice}` },
        });
        expect(read.status).toBe(200);
        expect(read.headers.get('access-control-allow-origin')).toBe(APP);
        expect(read.headers.get('access-control-expose-headers')).toContain('ETag');
        expect(read.headers.get('vary')).toContain('Origin');
        // An error is readable by the page too (a 401 says to sign in again).
        const refused = await c.broker.app.request('/fhir/Subscription', {
          headers: { origin: APP, authorization: 'Bearer wrong' },
        });
        expect(refused.status).toBe(401);
        expect(refused.headers.get('access-control-allow-origin')).toBe(APP);
        // Another origin gets no grant: the browser keeps the answer from its page.
        const other = await c.broker.app.request('/fhir/Subscription', {
          method: 'OPTIONS',
          headers: { ...preflight, origin: 'https://evil.example' },
        });
        expect(other.headers.get('access-control-allow-origin')).toBeNull();
        // The CapabilityStatement says so (R4 rest.security.cors).
        const metadata = await fhirRequest(c, 'GET', '/fhir/metadata');
        expect((metadata.body.rest as { security: Json }[])[0]?.security.cors).toBe(true);
      } finally {
        await c.broker.close(0);
      }
    });

    it('grants no origin by default: a preflight needs the token like any request', async () => {
      const pre = await t.broker.app.request('/fhir/Subscription', { method: 'OPTIONS', headers: preflight });
      expect(pre.status).toBe(401);
      expect(pre.headers.get('access-control-allow-origin')).toBeNull();
      const read = await request('GET', '/fhir/Subscription', { headers: { origin: APP } });
      expect(read.headers.get('access-control-allow-origin')).toBeNull();
      const metadata = await request('GET', '/fhir/metadata');
      expect((metadata.body.rest as { security: Json }[])[0]?.security.cors).toBe(false);
    });
  });

  describe('operation Parameters it cannot read', () => {
    it('refuses them with 400 naming the parameter, instead of answering as if none were given', async () => {
      const sub = await created('/events-params');
      for (const [parameter, says] of [
        [{ name: 'eventsSinceNumber', valueInteger: 1 }, 'Parameters.parameter must be an array'],
        [
          [{ name: 'eventsSinceNumber', resource: { resourceType: 'Basic' } }],
          'Parameters.parameter[0] (eventsSinceNumber)',
        ],
        [[{ valueInteger: 1 }], 'Parameters.parameter[0] has no name'],
      ] as const) {
        const res = await request('POST', `/fhir/Subscription/${sub.id}/$events`, {
          body: { resourceType: 'Parameters', parameter },
        });
        expect(res.status).toBe(400);
        expect(JSON.stringify(res.body)).toContain(says);
      }
      // Read at instance level too, where the id is the URL's.
      const token = await request('POST', `/fhir/Subscription/${sub.id}/$get-ws-binding-token`, {
        body: { resourceType: 'Basic' },
      });
      expect(token.status).toBe(400);
      expect(token.text).toContain('must be a Parameters resource');
      const fine = await request('POST', `/fhir/Subscription/${sub.id}/$events`, {
        body: { resourceType: 'Parameters', parameter: [{ name: 'eventsSinceNumber', valueInteger: 1 }] },
      });
      expect(fine.status).toBe(200);
    });
  });
});
