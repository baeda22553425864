import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { getRequestListener } from '@hono/node-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SubscriptionRecord } from '../src/core/types.js';
import { fixture, type Json, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';

/**
 * What a client sends is what it reads back, or a refusal that says why: the client's own `meta`
 * (tags, security labels, profiles) and narrative are kept per version; R4 JSON's rules (no empty
 * values; UTF-8; FHIR 4.0) are held to at the front door (`app.request`, and for `POST /events`
 * the Node ingest listener too).
 */

const BACKPORT_PROFILE = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription';
const ENDPOINT = 'http://127.0.0.1:9/hook';
const TAG = { system: 'http://example.org/tags', code: 'team-a', display: 'Team A' };
const LABEL = { system: 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality', code: 'R' };
const OURS = 'https://example.org/StructureDefinition/our-subscription';
const TEXT = { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">Patient changes for team A</div>' };

/** Off from the start: no handshake goes anywhere. */
const subscription = (extra: Json = {}): Json =>
  topicSubscription('patient-change', ENDPOINT, { extra: { status: 'off', ...extra } });

function issueOf(outcome: Json): { code: unknown; diagnostics: unknown; expression: unknown } {
  expect(outcome.resourceType).toBe('OperationOutcome');
  const issue = (outcome.issue as Json[])[0] as Json;
  const coding = ((issue.details as Json).coding as Json[])[0] as Json;
  return { code: coding.code, diagnostics: issue.diagnostics, expression: (issue.expression as unknown[])?.[0] };
}

describe('FHIR representation', () => {
  let t: TestBroker;

  beforeAll(async () => {
    t = await inProcessBroker();
  });

  afterAll(async () => t?.broker.close(0));

  const raw = (path: string, method: string, headers: Record<string, string>, body?: string | Buffer) =>
    t.broker.app.request(path, {
      method,
      headers: { authorization: `Bearer ${TOKENS.alice}`, ...headers },
      ...(body === undefined ? {} : { body }),
    });
  const snapshot = async () => JSON.stringify(await t.broker.store.listSubscriptions());

  describe("the client's meta and text", () => {
    it('keeps tags, security labels, profiles (beside the backport one) and the narrative on create and read', async () => {
      const meta = {
        versionId: 'mine',
        lastUpdated: '2020-01-01T00:00:00Z',
        profile: [OURS],
        security: [LABEL],
        tag: [TAG],
      };
      const created = await t.create(subscription({ meta, text: TEXT }));
      const read = await t.call('GET', `/fhir/Subscription/${created.id}`);
      for (const resource of [created, read.body]) {
        const { versionId, lastUpdated, ...kept } = resource.meta as Json;
        expect(kept).toEqual({ profile: [OURS, BACKPORT_PROFILE], security: [LABEL], tag: [TAG] });
        expect([versionId, lastUpdated]).not.toContain('mine');
        expect(lastUpdated).not.toBe('2020-01-01T00:00:00Z');
        expect(resource.text).toEqual(TEXT);
      }
    });

    it("replaces them as a PUT says, while history and vread show each version's own", async () => {
      const created = await t.create(subscription({ meta: { tag: [TAG] }, text: TEXT }));
      const id = created.id as string;
      const first = (created.meta as Json).versionId;
      const other = { system: 'http://example.org/tags', code: 'team-b' };
      const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
        ...created,
        meta: { tag: [other] },
        text: undefined,
      });
      expect(put.status).toBe(200);
      const read = (await t.call('GET', `/fhir/Subscription/${id}`)).body;
      expect([(read.meta as Json).tag, (read.meta as Json).profile, read.text]).toEqual([
        [other],
        [BACKPORT_PROFILE],
        undefined,
      ]);
      const vread = (await t.call('GET', `/fhir/Subscription/${id}/_history/${first}`)).body;
      expect([(vread.meta as Json).tag, vread.text]).toEqual([[TAG], TEXT]);
      const history = (await t.call('GET', `/fhir/Subscription/${id}/_history`)).body;
      const versions = (history.entry as Json[]).map((e) => e.resource as Json);
      expect(versions.map((v) => [(v.meta as Json).tag, v.text])).toEqual([
        [[other], undefined],
        [[TAG], TEXT],
      ]);
      // A PUT of what was read keeps them all.
      const again = await t.call('PUT', `/fhir/Subscription/${id}`, read);
      expect([(again.body.meta as Json).tag, (again.body.meta as Json).profile]).toEqual([[other], [BACKPORT_PROFILE]]);
    });

    it.each<[string, Json, string, string]>([
      ['a tag that is no Coding', { meta: { tag: ['team-a'] } }, 'Subscription.meta.tag[0]', 'must be object'],
      [
        'a security label with an element no Coding has',
        { meta: { security: [{ ...LABEL, label: 'R' }] } },
        'Subscription.meta.security[0].label',
        'is not an element of an R4 Coding',
      ],
      ['a profile that is no canonical', { meta: { profile: [7] } }, 'Subscription.meta.profile[0]', 'must be string'],
      [
        'a narrative without a div',
        { text: { status: 'generated' } },
        'Subscription.text',
        "must have required property 'div' (missing div)",
      ],
      [
        'a narrative that is no XHTML div',
        { text: { ...TEXT, div: 'plain' } },
        'Subscription.text.div',
        'must match pattern "^<div[\\s>]"',
      ],
    ])('refuses %s with 400 INVALID_RESOURCE naming it, storing nothing', async (_name, extra, where, problem) => {
      const before = await snapshot();
      const res = await t.call('POST', '/fhir/Subscription', subscription(extra));
      expect([res.status, issueOf(res.body)]).toEqual([
        400,
        { code: 'INVALID_RESOURCE', diagnostics: `${where} ${problem}`, expression: where },
      ]);
      expect(await snapshot()).toBe(before);
    });
  });

  describe('empty values', () => {
    it.each<[string, Json, string]>([
      ['contained []', { contained: [] }, 'Subscription.contained is empty: R4 JSON has no empty arrays'],
      ['extension []', { extension: [] }, 'Subscription.extension is empty: R4 JSON has no empty arrays'],
      ['contact [{}]', { contact: [{}] }, 'Subscription.contact[0] is empty: R4 JSON has no empty objects'],
      ['_reason {}', { _reason: {} }, 'Subscription._reason is empty: R4 JSON has no empty objects'],
      ['language ""', { language: '' }, 'Subscription.language is empty: R4 JSON has no empty strings'],
      [
        'channel.header []',
        { channel: { type: 'rest-hook', endpoint: ENDPOINT, payload: 'application/fhir+json', header: [] } },
        'Subscription.channel.header is empty: R4 JSON has no empty arrays',
      ],
    ])('refuses %s with 400 INVALID_RESOURCE naming the path, on create and update', async (_name, extra, message) => {
      const created = await t.create(subscription());
      const before = await snapshot();
      const post = await t.call('POST', '/fhir/Subscription', subscription(extra));
      const put = await t.call('PUT', `/fhir/Subscription/${created.id}`, { ...created, ...extra });
      const expected = { code: 'INVALID_RESOURCE', diagnostics: message, expression: message.split(' ')[0] };
      expect([post.status, issueOf(post.body)]).toEqual([400, expected]);
      expect([put.status, issueOf(put.body)]).toEqual([400, expected]);
      expect(await snapshot()).toBe(before);
    });

    it('takes back what it served: a subscription read is PUT as it is', async () => {
      const created = await t.create(
        subscription({ channel: { type: 'rest-hook', endpoint: ENDPOINT, header: ['X-A: b'], _header: [null] } }),
      );
      const read = (await t.call('GET', `/fhir/Subscription/${created.id}`)).body;
      expect((await t.call('PUT', `/fhir/Subscription/${created.id}`, read)).status).toBe(200);
    });

    it('serves one an older broker stored with empty values without them, so it can be PUT back (re-activated)', async () => {
      // As a broker before 2026-11-29 stored what a client sent: empties kept.
      const created = await t.create(subscription());
      const stored = (await t.broker.store.getSubscription(created.id as string)) as SubscriptionRecord;
      const resource = stored.resource as Json & { resourceType: string };
      await t.broker.store.replaceSubscription(
        {
          ...stored,
          status: 'error',
          updatedAt: new Date(Date.parse(stored.updatedAt) + 1000).toISOString(),
          resource: {
            ...resource,
            contact: [],
            modifierExtension: [],
            _reason: {},
            language: '',
            channel: { ...(resource.channel as Json), header: ['X-A: b'], _header: [{}] },
          },
        },
        { status: stored.status, updatedAt: stored.updatedAt },
      );
      await t.broker.refreshSubscriptions(0);
      const read = (await t.call('GET', `/fhir/Subscription/${created.id}`)).body;
      for (const key of ['contact', 'modifierExtension', '_reason', 'language']) expect(read).not.toHaveProperty(key);
      expect((read.channel as Json).header).toEqual(['X-A: b']);
      expect(read.channel as Json).not.toHaveProperty('_header');
      const put = await t.call('PUT', `/fhir/Subscription/${created.id}`, { ...read, status: 'requested' });
      expect(put.status).toBe(200);
    });
  });

  describe('request bodies: UTF-8 of FHIR 4.0', () => {
    const reason = 'Überwachung ✓ 𝄞';

    it('reads UTF-8 whatever the charset is spelt, and keeps every character', async () => {
      for (const type of [
        'application/fhir+json',
        'application/fhir+json; charset=UTF-8',
        'application/json;charset="utf8"',
      ]) {
        const res = await raw(
          '/fhir/Subscription',
          'POST',
          { 'content-type': type },
          JSON.stringify(subscription({ reason })),
        );
        expect([type, res.status]).toEqual([type, 201]);
        const read = await t.call('GET', `/fhir/Subscription/${((await res.json()) as Json).id}`);
        expect(read.body.reason).toBe(reason);
      }
    });

    it.each<[string, string, string]>([
      [
        'a charset other than UTF-8',
        'application/fhir+json; charset=iso-8859-1',
        'Content-Type charset iso-8859-1 is not accepted; send UTF-8 (charset=utf-8, or no charset)',
      ],
      [
        'another FHIR version',
        'application/fhir+json; fhirVersion=5.0',
        'Content-Type fhirVersion=5.0 is not accepted: the broker speaks FHIR 4.0 (R4); send fhirVersion=4.0 or none',
      ],
    ])('refuses %s with 415, storing nothing', async (_name, type, message) => {
      const before = await snapshot();
      const body = Buffer.from(JSON.stringify(subscription({ reason: 'Überwachung' })), 'latin1');
      const res = await raw('/fhir/Subscription', 'POST', { 'content-type': type }, body);
      expect([res.status, issueOf((await res.json()) as Json).diagnostics]).toEqual([415, message]);
      expect(await snapshot()).toBe(before);
    });

    it('takes fhirVersion 4.0 and 4.0.x', async () => {
      for (const type of ['application/fhir+json; fhirVersion=4.0', 'application/fhir+json; fhirVersion=4.0.1']) {
        const res = await raw('/fhir/Subscription', 'POST', { 'content-type': type }, JSON.stringify(subscription()));
        expect([type, res.status]).toEqual([type, 201]);
      }
    });

    it('refuses bytes that are not UTF-8 with 400 BAD_JSON instead of storing U+FFFD', async () => {
      const before = await snapshot();
      const latin1 = Buffer.from(JSON.stringify(subscription({ reason: 'Überwachung' })), 'latin1');
      const res = await raw('/fhir/Subscription', 'POST', { 'content-type': 'application/fhir+json' }, latin1);
      expect([res.status, issueOf((await res.json()) as Json)]).toEqual([
        400,
        {
          code: 'BAD_JSON',
          diagnostics: 'The body is not valid UTF-8, which JSON sent between systems is',
          expression: undefined,
        },
      ]);
      expect(await snapshot()).toBe(before);
    });
  });

  describe('the answer: JSON as asked, q=0 honoured', () => {
    it('answers application/json to a client that asked for that generic type, the body the same', async () => {
      const asFhir = await raw('/fhir/metadata', 'GET', { accept: 'application/fhir+json' });
      const fhirBody = JSON.parse(await asFhir.text()) as Json;
      for (const [path, accept] of [
        ['/fhir/metadata', 'application/json'],
        ['/fhir/metadata?_format=application/json', 'application/fhir+json'],
        ['/fhir/Subscription/nobody', 'application/json'],
      ] as const) {
        const res = await raw(path, 'GET', { accept });
        expect([path, res.headers.get('content-type')]).toEqual([path, 'application/json; charset=utf-8']);
        const body = JSON.parse(await res.text()) as Json;
        if (path === '/fhir/metadata') expect({ ...body, date: fhirBody.date }).toEqual(fhirBody);
      }
      for (const accept of ['application/fhir+json', '*/*', 'application/json, application/fhir+json']) {
        const res = await raw('/fhir/metadata', 'GET', { accept });
        expect([accept, res.headers.get('content-type')]).toEqual([accept, 'application/fhir+json; charset=utf-8']);
      }
    });

    it('answers 406 to Accept that gives FHIR JSON q=0 and names only XML otherwise, after the token check', async () => {
      const accept = 'application/fhir+json;q=0, application/fhir+xml';
      const res = await raw('/fhir/Subscription', 'GET', { accept });
      expect([res.status, issueOf((await res.json()) as Json).code]).toEqual([406, 'NOT_ACCEPTABLE']);
      const anonymous = await t.broker.app.request('/fhir/Subscription', { headers: { accept } });
      expect(anonymous.status).toBe(401);
      expect(
        (await raw('/fhir/Subscription', 'GET', { accept: 'application/fhir+json;q=0, */*' })).headers.get(
          'content-type',
        ),
      ).toBe('application/json; charset=utf-8');
    });
  });

  describe('POST /events, through the hono app and the Node ingest listener alike', () => {
    const servers: Server[] = [];
    const urls: string[] = [];

    beforeAll(async () => {
      const app = getRequestListener((req: Request, env: unknown) => t.broker.app.fetch(req, env));
      servers.push(createServer((req, res) => void t.broker.serveIngest(req, res)));
      servers.push(createServer((req, res) => void app(req, res)));
      for (const server of servers) {
        server.listen(0, '127.0.0.1');
        await once(server, 'listening');
        urls.push(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
      }
    });

    afterAll(() => {
      for (const server of servers) server.close();
    });

    const event = (id: string): Buffer =>
      Buffer.from(JSON.stringify({ ...fixture('healthlake-update-patient'), id, account: 'Überwachung' }), 'latin1');

    it.each<[string, string, Buffer, number, string]>([
      [
        'a charset other than UTF-8',
        'application/json; charset=windows-1252',
        event('cp1252'),
        415,
        'Content-Type charset windows-1252 is not accepted; send UTF-8 (charset=utf-8, or no charset)',
      ],
      [
        'bytes that are not UTF-8',
        'application/json',
        event('latin1'),
        400,
        'The body is not valid UTF-8, which JSON sent between systems is',
      ],
      [
        'a byte order mark (refused as before)',
        'application/json',
        Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('[]')]),
        400,
        'The body starts with a byte order mark (U+FEFF), which JSON must not; send it without',
      ],
    ])('refuses %s the same through both doors', async (_name, type, body, status, diagnostics) => {
      for (const url of urls) {
        const res = await fetch(`${url}/events`, {
          method: 'POST',
          headers: { authorization: `Bearer ${TOKENS.ingest}`, 'content-type': type },
          body,
        });
        expect([url, res.status, issueOf((await res.json()) as Json).diagnostics]).toEqual([url, status, diagnostics]);
      }
    });
  });
});
