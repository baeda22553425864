import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { eventLike, eventNumbers, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { withMethod } from './support/store-fixtures.js';

/**
 * FHIR operations and searches as standard clients call them: every operation by GET or by POST
 * with a `Parameters` body (FHIR: servers SHALL support POST for all operations; HAPI's generic
 * client uses it), search by `POST _search` with a form body, `_count` paging with a `next` link,
 * `_summary=count`, and a `self` link that shows the parameters applied.
 */

const TOPIC = 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic';

describe('FHIR operations and search', () => {
  let t: TestBroker;
  let receiver: Receiver;
  let ids: string[];

  const parameters = (...params: Json[]): Json => ({ resourceType: 'Parameters', parameter: params });

  beforeAll(async () => {
    receiver = await Receiver.start();
    t = await inProcessBroker();
    ids = [];
    for (let i = 0; i < 3; i++) {
      const sub = await t.create(
        topicSubscription('patient-change', `${receiver.url}/ops-${i}`, { filters: [`Patient?_id=ops-${i}`] }),
      );
      ids.push(String(sub.id));
    }
    for (let n = 1; n <= 3; n++) await t.post(eventLike('healthlake-update-patient', `ops-event-${n}`, 'ops-0'));
  });

  afterAll(async () => {
    await t?.broker.close(0);
    await receiver?.close();
  });

  it('answers $status by POST, with or without a Parameters body, as by GET', async () => {
    const [a, b] = ids as [string, string];
    const byGet = await t.call('GET', `/fhir/Subscription/${a}/$status`);
    const byPost = await t.call('POST', `/fhir/Subscription/${a}/$status`, parameters());
    expect(byPost.status).toBe(200);
    expect(statusOf(byPost.body).params.get('subscription')).toEqual(statusOf(byGet.body).params.get('subscription'));
    // A POST with a FHIR media type and Content-Length: 0 (fhir-kit-client's operation() without
    // inputs) has no body: answered as by GET, not refused as empty JSON.
    const empty = await t.broker.app.request(`/fhir/Subscription/${a}/$status`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${TOKENS.alice}`,
        'content-type': 'application/fhir+json',
        'content-length': '0',
      },
      body: '',
    });
    expect(empty.status).toBe(200);
    expect(statusOf((await empty.json()) as Json).params.get('subscription')).toEqual(
      statusOf(byGet.body).params.get('subscription'),
    );

    const typeLevel = await t.call(
      'POST',
      '/fhir/Subscription/$status',
      parameters({ name: 'id', valueString: a }, { name: 'id', valueString: b }),
    );
    expect(typeLevel.status).toBe(200);
    const refs = (typeLevel.body.entry as Json[]).map(
      (e) => statusOf({ entry: [e] }).params.get('subscription')?.valueReference as Json,
    );
    expect(refs.map((r) => String(r.reference).split('/').pop()).sort()).toEqual([a, b].sort());
  });

  it('answers $events by POST with the range in a Parameters body', async () => {
    const sub = ids[0] as string;
    const res = await t.call(
      'POST',
      `/fhir/Subscription/${sub}/$events`,
      parameters({ name: 'eventsSinceNumber', valueInteger64: 2 }, { name: 'eventsUntilNumber', valueString: '3' }),
    );
    expect(res.status).toBe(200);
    expect(statusOf(res.body).params.get('type')?.valueCode).toBe('query-event');
    expect(eventNumbers(res.body)).toEqual([2, 3]);
    const bad = await t.call(
      'POST',
      `/fhir/Subscription/${sub}/$events`,
      parameters({ name: 'eventsSinceNumber', valueString: 'two' }),
    );
    expect(bad.status).toBe(400);
    // content: empty drops the focus; an unknown level is refused, full-resource (a hint) is ignored.
    const empty = await t.call(
      'POST',
      `/fhir/Subscription/${sub}/$events`,
      parameters({ name: 'content', valueCode: 'empty' }),
    );
    expect(eventNumbers(empty.body)).toEqual([1, 2, 3]);
    expect(statusOf(empty.body).events.every((e) => (e.part as Json[]).every((p) => p.name !== 'focus'))).toBe(true);
    expect((empty.body.entry as Json[]).length).toBe(1);
    expect((await t.call('GET', `/fhir/Subscription/${sub}/$events?content=bogus`)).status).toBe(400);
    const full = await t.call('GET', `/fhir/Subscription/${sub}/$events?content=full-resource`);
    expect(full.status).toBe(200);
    expect(eventNumbers(full.body)).toEqual([1, 2, 3]);
  });

  it('pages $events past 1,000 notifications with a next link, and refuses an empty or doubled range', async () => {
    const sub = String(
      (
        await t.create(
          topicSubscription('patient-change', `${receiver.url}/ops-many`, { filters: ['Patient?_id=ops-many'] }),
          TOKENS.bob,
        )
      ).id,
    );
    // Bob's: alice's searches below count her three.
    const get = (path: string) => t.call('GET', path, undefined, TOKENS.bob);
    for (let from = 0; from < 1_005; from += 335) {
      const batch = Array.from({ length: 335 }, (_, i) =>
        eventLike('healthlake-update-patient', `ops-many-${from + i}`, 'ops-many'),
      );
      await t.post(batch);
    }
    const first = await get(`/fhir/Subscription/${sub}/$events?eventsSinceNumber=2&content=empty`);
    expect(first.status).toBe(200);
    expect(eventNumbers(first.body)).toEqual(Array.from({ length: 1_000 }, (_, i) => i + 2));
    const link = first.body.link as Json[];
    expect(link).toEqual([
      {
        relation: 'next',
        url: `http://broker.test/fhir/Subscription/${sub}/$events?eventsSinceNumber=1002&eventsUntilNumber=1005&content=empty`,
      },
    ]);
    const next = await get(String(link[0]?.url).slice('http://broker.test'.length));
    expect(eventNumbers(next.body)).toEqual([1002, 1003, 1004, 1005]);
    expect(next.body.link).toBeUndefined();
    // A whole page that reaches the end of the range has no link either.
    const exact = await get(`/fhir/Subscription/${sub}/$events?eventsSinceNumber=6&eventsUntilNumber=1005`);
    expect(eventNumbers(exact.body)).toHaveLength(1_000);
    expect(exact.body.link).toBeUndefined();
    for (const query of [
      'eventsSinceNumber=10&eventsUntilNumber=5',
      'eventsSinceNumber=3,1',
      'eventsSinceNumber=2&eventsSinceNumber=4',
    ]) {
      const refused = await get(`/fhir/Subscription/${sub}/$events?${query}`);
      expect([query, refused.status, refused.body.resourceType]).toEqual([query, 400, 'OperationOutcome']);
    }
  });

  it('refuses an operation body that is not Parameters, and keeps other clients out by POST too', async () => {
    const sub = ids[0] as string;
    const notParameters = await t.call('POST', `/fhir/Subscription/${sub}/$status`, { resourceType: 'Patient' });
    expect(notParameters.status).toBe(400);
    expect(notParameters.body.resourceType).toBe('OperationOutcome');
    for (const op of ['$status', '$events']) {
      const res = await t.call('POST', `/fhir/Subscription/${sub}/${op}`, parameters(), TOKENS.bob);
      expect(res.status, op).toBe(404);
    }
    const typeLevel = await t.call(
      'POST',
      '/fhir/Subscription/$status',
      parameters({ name: 'id', valueString: sub }),
      TOKENS.bob,
    );
    expect(typeLevel.body.entry ?? []).toEqual([]);
  });

  it('takes up to 1,000 values of one parameter, and refuses more without matching them', async () => {
    const search = (count: number) =>
      t.broker.app.request('/fhir/Subscription/_search', {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/x-www-form-urlencoded' },
        body: `_id=${[ids[2], ...Array.from({ length: count - 1 }, (_, i) => `other-${i}`)].join(',')}`,
      });
    const most = await search(1_000);
    expect(most.status).toBe(200);
    expect(((await most.json()) as Json).total).toBe(1);
    const over = await search(1_001);
    expect(over.status).toBe(400);
    expect(JSON.stringify(await over.json())).toContain('At most 1000 values of _id per request');
    // The same for an operation's parameters.
    const status = await t.call(
      'POST',
      '/fhir/Subscription/$status',
      parameters(...Array.from({ length: 1_001 }, (_, i) => ({ name: 'id', valueString: `s-${i}` }))),
    );
    expect(status.status).toBe(400);
  });

  it('searches by POST _search with a form body', async () => {
    const res = await t.broker.app.request('/fhir/Subscription/_search', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/x-www-form-urlencoded' },
      body: `_id=${ids[1]}`,
    });
    expect(res.status).toBe(200);
    const bundle = (await res.json()) as Json;
    expect(bundle.total).toBe(1);
    expect((bundle.entry as Json[]).map((e) => (e.resource as Json).id)).toEqual([ids[1]]);
    expect((bundle.link as Json[])[0]).toEqual({
      relation: 'self',
      url: `http://broker.test/fhir/Subscription?_id=${ids[1]}`,
    });
    // A chunked form body past the cap is cut off at the cap, not read whole first.
    let sent = 0;
    const endless = new ReadableStream<Uint8Array>({
      pull(controller) {
        sent += 65_536;
        controller.enqueue(new TextEncoder().encode(`_id=${'x'.repeat(65_532)}`));
        if (sent > 64 * 1024 * 1024) controller.close();
      },
    });
    const huge = await t.broker.app.request('/fhir/Subscription/_search', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/x-www-form-urlencoded' },
      body: endless,
      duplex: 'half',
    } as RequestInit);
    expect(huge.status).toBe(413);
    expect(sent).toBeLessThan(4 * 1024 * 1024);
    const json = await t.broker.app.request('/fhir/Subscription/_search', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/json' },
      body: '{}',
    });
    expect(json.status).toBe(415);
  });

  it('pages with _count and a next link, counts with _summary=count, and shows what was applied', async () => {
    const first = await t.call('GET', '/fhir/Subscription?_count=2&unknown=1');
    expect(first.body.total).toBe(3);
    expect(first.body.entry as Json[]).toHaveLength(2);
    const links = new Map((first.body.link as Json[]).map((l) => [l.relation, String(l.url)]));
    expect(links.get('self')).toBe('http://broker.test/fhir/Subscription?_count=2');
    expect(links.get('next')).toBe('http://broker.test/fhir/Subscription?_count=2&_offset=2');
    const next = await t.call('GET', '/fhir/Subscription?_count=2&_offset=2');
    expect(next.body.entry as Json[]).toHaveLength(1);
    expect((next.body.link as Json[]).map((l) => l.relation)).toEqual(['self']);
    const seen = [...(first.body.entry as Json[]), ...(next.body.entry as Json[])].map((e) => (e.resource as Json).id);
    expect(seen.sort()).toEqual([...ids].sort());

    for (const totalOnly of ['_summary=count', '_count=0']) {
      const count = await t.call('GET', `/fhir/Subscription?${totalOnly}`);
      expect(count.body, totalOnly).toMatchObject({ total: 3 });
      expect(count.body.entry, totalOnly).toBeUndefined();
      expect((count.body.link as Json[]).map((l) => l.relation)).toEqual(['self']);
    }
    expect((await t.call('GET', '/fhir/Subscription?_summary=false')).body.entry as Json[]).toHaveLength(3);
    expect((await t.call('GET', '/fhir/Subscription?_count=abc')).status).toBe(400);
  });

  it.each([
    ['$status', 'POST', '/fhir/Subscription/$status?id=none'],
    ['a Subscription search', 'GET', '/fhir/Subscription?_id=none'],
    ['a Subscription search past the last page', 'GET', '/fhir/Subscription?_offset=10'],
    ['a SubscriptionTopic search', 'GET', `/fhir/SubscriptionTopic?url=${encodeURIComponent('http://x')}`],
  ])('answers %s with no match without an entry (R4 JSON has no empty arrays)', async (_name, method, path) => {
    const res = await t.call(method, path);
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ resourceType: 'Bundle', type: 'searchset' });
    expect(res.body).not.toHaveProperty('entry');
  });

  it('refuses unknown search parameters under Prefer: handling=strict', async () => {
    const res = await t.broker.app.request('/fhir/Subscription?status:not=off', {
      headers: { authorization: `Bearer ${TOKENS.alice}`, prefer: 'handling=strict' },
    });
    expect(res.status).toBe(400);
    expect(JSON.stringify(await res.json())).toContain('status:not');
    // The general parameters are not search parameters to refuse.
    const general = await t.broker.app.request('/fhir/Subscription?_format=json&_pretty=true', {
      headers: { authorization: `Bearer ${TOKENS.alice}`, prefer: 'handling=strict' },
    });
    expect(general.status).toBe(200);
  });

  it('answers 406 to a request that accepts only XML, and JSON to anything else', async () => {
    const get = (path: string, accept?: string) =>
      t.broker.app.request(path, {
        headers: { authorization: `Bearer ${TOKENS.alice}`, ...(accept === undefined ? {} : { accept }) },
      });
    const xml = await get('/fhir/Subscription', 'application/fhir+xml');
    expect(xml.status).toBe(406);
    expect(((await xml.json()) as Json).resourceType).toBe('OperationOutcome');
    expect((await get('/fhir/metadata?_format=xml')).status).toBe(406);
    expect((await get('/fhir/metadata?_format=json', 'application/fhir+xml')).status).toBe(200);
    // An unencoded + (a space once decoded) still names FHIR JSON.
    expect((await get('/fhir/metadata?_format=application/fhir+json')).status).toBe(200);
    expect((await get('/fhir/Subscription', 'application/fhir+xml, application/fhir+json;q=0.9')).status).toBe(200);
    expect((await get('/fhir/Subscription', '*/*')).status).toBe(200);
    // Without a token: 401 first, whatever it accepts (the metadata, open to all, still says 406).
    for (const path of ['/fhir/Subscription', '/fhir/Subscription/any-id', '/fhir/SubscriptionTopic']) {
      const anonymous = await t.broker.app.request(path, { headers: { accept: 'application/fhir+xml' } });
      expect([path, anonymous.status]).toEqual([path, 401]);
    }
    const openXml = await t.broker.app.request('/fhir/metadata', { headers: { accept: 'application/fhir+xml' } });
    expect(openXml.status).toBe(406);
  });

  it('answers 406 to a request that accepts only another FHIR version than R4', async () => {
    const get = (path: string, accept: string) =>
      t.broker.app.request(path, { headers: { authorization: `Bearer ${TOKENS.alice}`, accept } });
    const r5 = await get('/fhir/Subscription', 'application/fhir+json; fhirVersion=5.0');
    expect(r5.status).toBe(406);
    const outcome = (await r5.json()) as Json;
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(JSON.stringify(outcome)).toContain('fhirVersion=4.0');
    expect((await get('/fhir/metadata?_format=application/fhir%2Bjson;fhirVersion=3.0', '*/*')).status).toBe(406);
    for (const accept of [
      'application/fhir+json; fhirVersion=4.0',
      'application/fhir+json;fhirVersion="4.0"',
      'application/fhir+json; fhirVersion=4.0.1; charset=utf-8',
      'application/fhir+json; fhirVersion=5.0, application/fhir+json; fhirVersion=4.0',
      'application/fhir+json; fhirVersion=5.0, */*;q=0.1',
    ]) {
      expect((await get('/fhir/metadata', accept)).status, accept).toBe(200);
    }
  });

  it('takes application/json+fhir, the DSTU2 media type older clients send', async () => {
    const res = await t.broker.app.request('/fhir/Subscription', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/json+fhir' },
      body: JSON.stringify(topicSubscription('patient-change', `${receiver.url}/legacy`)),
    });
    expect(res.status).toBe(201);
    await t.call('DELETE', `/fhir/Subscription/${((await res.json()) as Json).id}`);
  });

  it('versions a subscription (meta.versionId, ETag) and refuses a PUT or DELETE of an older version with 412', async () => {
    const created = await t.broker.app.request('/fhir/Subscription', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'content-type': 'application/fhir+json' },
      body: JSON.stringify(
        topicSubscription('patient-change', `${receiver.url}/versioned`, { extra: { status: 'off' } }),
      ),
    });
    const sub = (await created.json()) as Json;
    const v1 = String((sub.meta as Json).versionId);
    expect(created.headers.get('etag')).toBe(`W/"${v1}"`);
    const put = (ifMatch: string, reason: string) =>
      t.broker.app.request(`/fhir/Subscription/${sub.id}`, {
        method: 'PUT',
        headers: {
          authorization: `Bearer ${TOKENS.alice}`,
          'content-type': 'application/fhir+json',
          'if-match': ifMatch,
        },
        body: JSON.stringify({ ...sub, reason }),
      });
    const updated = await put(`W/"${v1}"`, 'first');
    expect(updated.status).toBe(200);
    const v2 = String((((await updated.json()) as Json).meta as Json).versionId);
    expect(v2).not.toBe(v1);
    expect(updated.headers.get('etag')).toBe(`W/"${v2}"`);
    // A lost update: the second writer still holds version 1.
    const stale = await put(`W/"${v1}"`, 'second');
    expect(stale.status).toBe(412);
    expect((await t.call('GET', `/fhir/Subscription/${sub.id}`)).body.reason).toBe('first');
    const del = (ifMatch: string) =>
      t.broker.app.request(`/fhir/Subscription/${sub.id}`, {
        method: 'DELETE',
        headers: { authorization: `Bearer ${TOKENS.alice}`, 'if-match': ifMatch },
      });
    expect((await del(`"${v1}"`)).status).toBe(412);
    expect((await del('*')).status).toBe(204);
    // With If-Match (even `*`) a Subscription not there is a 404; without, a 204 (test/fhir-interactions.test.ts).
    expect((await del('*')).status).toBe(404);
  });

  it('finds a SubscriptionTopic by its canonical url', async () => {
    const res = await t.call('GET', `/fhir/SubscriptionTopic?url=${encodeURIComponent(`${TOPIC}/patient-change`)}`);
    expect(res.body.total).toBe(1);
    expect((res.body.entry as Json[]).map((e) => (e.resource as Json).url)).toEqual([`${TOPIC}/patient-change`]);
    const none = await t.call('GET', `/fhir/SubscriptionTopic?url=${encodeURIComponent(`${TOPIC}/nothing`)}`);
    expect(none.body.total).toBe(0);
  });
});

describe('DELETE with If-Match', () => {
  let t: TestBroker | undefined;
  const dir = mkdtempSync(join(tmpdir(), 'fsb-if-match-'));

  afterAll(async () => {
    await t?.broker.close(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('is a compare-and-delete: a PUT landing between the version check and the delete is a 412, and nothing is deleted', async () => {
    const real = new SqliteStore(dir);
    let interleave: (() => Promise<void>) | undefined;
    const store = withMethod(real, 'deleteSubscription', async (...args) => {
      const landing = interleave;
      interleave = undefined;
      await landing?.();
      return real.deleteSubscription(...args);
    });
    t = await inProcessBroker({}, { store });
    const broker = t;
    const sub = await broker.create(
      topicSubscription('patient-change', 'http://127.0.0.1:9/raced', { extra: { status: 'off' } }),
    );
    await broker.post(eventLike('healthlake-update-patient', 'raced-event-1'));
    const v1 = String((sub.meta as Json).versionId);
    interleave = async () => {
      const put = await broker.call('PUT', `/fhir/Subscription/${sub.id}`, { ...sub, reason: 'changed meanwhile' });
      expect(put.status).toBe(200);
    };
    const res = await broker.broker.app.request(`/fhir/Subscription/${sub.id}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'if-match': `W/"${v1}"` },
    });
    expect(interleave).toBeUndefined();
    expect(res.status).toBe(412);
    expect(JSON.stringify(await res.json())).toContain('PRECONDITION_FAILED');
    const now = await broker.call('GET', `/fhir/Subscription/${sub.id}`);
    expect(now.body.reason).toBe('changed meanwhile');
    const v2 = String((now.body.meta as Json).versionId);
    expect(v2).not.toBe(v1);
    // Deleted once the client names the version it has now read.
    const again = await broker.broker.app.request(`/fhir/Subscription/${sub.id}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${TOKENS.alice}`, 'if-match': `W/"${v2}"` },
    });
    expect(again.status).toBe(204);
    expect((await broker.call('GET', `/fhir/Subscription/${sub.id}`)).status).toBe(404);
  });
});
