import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, startBroker } from './broker-process.js';
import {
  Client,
  classicSubscription,
  eventLike,
  eventNumbers,
  expectSubscriptionCapability,
  fixture,
  focusOf,
  type Json,
  statusOf,
  TOPIC,
  topicSubscription,
} from './fhir-client.js';
import { validateFhir } from './fhir-schema.js';
import { FhirServer } from './fhir-server.js';
import { Receiver } from './receiver.js';

/**
 * The product's spine, end to end: the real server process on a free port, a real HTTP receiver,
 * REST subscriptions, the shared EventBridge fixtures, and the notifications that must (and must
 * not) arrive. Run once per store: `extraEnv` is resolved in `beforeAll`, after the caller's own
 * `beforeAll` (e.g. starting DynamoDB Local) has run.
 */

const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';
const PATIENT = 'a1b2c3d4-5678-90ab-cdef-EXAMPLE22222';
/** The FHIR server's token, for the content stage's reads (a secret: never logged). */
const FHIR_TOKEN = 'fhir-read-token-0123456789abcdef';

export function runEndToEndSuite(name: string, extraEnv: () => Record<string, string> = () => ({})): void {
  describe(`broker end to end (${name}, rest-hook)`, () => {
    let broker: BrokerProcess;
    let receiver: Receiver;
    let fhir: FhirServer;
    let alice: Client;
    let bob: Client;
    const subs: Record<string, Json> = {};

    beforeAll(async () => {
      receiver = await Receiver.start();
      fhir = await FhirServer.start();
      fhir.token = FHIR_TOKEN;
      broker = await startBroker({ BROKER_FHIR_READ: fhir.url, BROKER_FHIR_READ_TOKEN: FHIR_TOKEN, ...extraEnv() });
      alice = new Client(broker.url, API_KEYS.alice);
      bob = new Client(broker.url, API_KEYS.bob);
    });

    afterAll(async () => {
      await broker?.kill('SIGTERM');
      await receiver?.close();
      await fhir?.close();
    });

    const hook = (name: string) => `${receiver.url}/hook/${name}`;
    const bundles = (name: string) => receiver.on(`/hook/${name}`).map((r) => JSON.parse(r.body) as Json);
    const notifications = (name: string) =>
      bundles(name).filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification');

    it('creates subscriptions as requested and activates them by handshake', async () => {
      subs.patient = await alice.create(topicSubscription('patient-change', hook('patient')));
      subs.observations = await alice.create(
        topicSubscription('resource-change', hook('observations'), {
          filters: ['_type=Observation'],
          content: 'empty',
        }),
      );
      subs.classic = await alice.create(classicSubscription('Patient', hook('classic')));
      subs.otherPatient = await alice.create(
        topicSubscription('patient-change', hook('other'), { filters: ['Patient?_id=someone-else'] }),
      );
      subs.everything = await alice.create(topicSubscription('resource-change', hook('everything')));

      for (const s of Object.values(subs)) expect(s.status).toBe('requested');
      for (const s of Object.values(subs)) await broker.waitForStatus(s.id as string, 'active');

      for (const name of ['patient', 'observations', 'other', 'everything']) {
        const [handshake, ...rest] = bundles(name);
        expect(rest).toEqual([]);
        const { params, events } = statusOf(handshake as Json);
        expect(params.get('type')?.valueCode).toBe('handshake');
        expect(params.get('status')?.valueCode).toBe('requested');
        expect(params.get('events-since-subscription-start')?.valueString).toBe('0');
        expect(events).toEqual([]);
        expect(validateFhir(handshake as Json)).toEqual([]);
      }
      // Classic R4 subscriptions have no handshake.
      expect(receiver.on('/hook/classic')).toEqual([]);
      const read = await alice.call('GET', `/fhir/Subscription/${subs.patient?.id}`);
      expect(read.body.status).toBe('active');
    });

    it('accepts, ignores and deduplicates the HealthLake fixtures', async () => {
      const post = async (events: unknown) => {
        const res = await alice.postEvents(events, INGEST_TOKEN);
        expect(res.status).toBe(202);
        return res.body;
      };
      expect(await post(fixture('healthlake-create-patient'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      expect(await post(fixture('healthlake-update-patient'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      expect(await post(fixture('healthlake-delete-patient'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      expect(await post(fixture('healthlake-create-observation'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      expect(await post(fixture('healthlake-update-patient-no-resource-id'))).toEqual({
        accepted: 1,
        ignored: 0,
        duplicates: 0,
      });
      expect(
        await post([
          fixture('healthlake-read-patient'),
          fixture('healthlake-create-patient-failed'),
          fixture('healthlake-import-job-submitted'),
        ]),
      ).toEqual({ accepted: 0, ignored: 3, duplicates: 0 });
      // EventBridge delivers at least once: the same id again, alone and twice within one request.
      expect(await post(fixture('healthlake-create-patient'))).toEqual({ accepted: 0, ignored: 0, duplicates: 1 });
      expect(await post([fixture('healthlake-update-patient'), fixture('healthlake-update-patient')])).toEqual({
        accepted: 0,
        ignored: 0,
        duplicates: 2,
      });
    });

    it('delivers exactly the expected notifications, in order, signed and schema-valid', async () => {
      // Sentinels: every lane delivers in event-number order, so once a sentinel has arrived,
      // everything queued before it has too, and nothing else is on its way.
      await alice.postEvents(
        [
          eventLike('healthlake-update-patient', 'sentinel-1', 'someone-else'),
          eventLike('healthlake-create-observation', 'sentinel-2', 'obs-last'),
        ],
        INGEST_TOKEN,
      );
      const sentinel = (name: string, focus: string) =>
        receiver.waitFor(
          () => notifications(name).some((b) => statusOf(b).events.some((e) => focusOf(e)?.endsWith(focus))),
          `sentinel on ${name}`,
        );
      await sentinel('patient', '/Patient/someone-else');
      await sentinel('other', '/Patient/someone-else');
      await sentinel('everything', '/Observation/obs-last');
      await receiver.waitFor(() => receiver.on('/hook/classic').length >= 5, 'classic sentinel');
      await receiver.waitFor(() => notifications('observations').length >= 2, 'observation sentinel');

      // patient-change, id-only: create, update, delete, the id-less update, then the sentinel.
      const patient = notifications('patient');
      expect(patient.map(eventNumbers)).toEqual([[1], [2], [3], [4], [5]]);
      expect(patient.map((b) => statusOf(b).events.map(focusOf))).toEqual([
        [`${HL}/Patient/${PATIENT}`],
        [`${HL}/Patient/${PATIENT}`],
        [`${HL}/Patient/${PATIENT}`],
        [undefined],
        [`${HL}/Patient/someone-else`],
      ]);
      // The id-less update's focus names what it cannot point to (id-only SHALL carry a focus).
      const idless = ((statusOf(patient[3] as Json).events[0]?.part ?? []) as Json[]).find((p) => p.name === 'focus');
      expect(idless?.valueReference).toEqual({
        type: 'Patient',
        display: `Patient on ${HL}; the change event names no id`,
      });
      expect(
        patient.map((b) =>
          (b.entry as Json[])
            .slice(1)
            .map((e) => [(e.request as Json).method, (e.request as Json).url, (e.response as Json).status]),
        ),
      ).toEqual([
        [['POST', 'Patient', '201']],
        [['PUT', `Patient/${PATIENT}`, '200']],
        [['DELETE', `Patient/${PATIENT}`, '204']],
        [],
        [['PUT', 'Patient/someone-else', '200']],
      ]);
      const first = statusOf(patient[0] as Json).params;
      expect(first.get('subscription')?.valueReference).toEqual({
        reference: `${broker.url}/fhir/Subscription/${subs.patient?.id}`,
      });
      expect(first.get('topic')?.valueCanonical).toBe(`${TOPIC}/patient-change`);
      expect(first.get('status')?.valueCode).toBe('active');
      expect(first.get('events-since-subscription-start')?.valueString).toBe('1');

      // resource-change filtered to Observation, empty content: no focus, only the status entry.
      const observations = notifications('observations');
      expect(observations.map(eventNumbers)).toEqual([[1], [2]]);
      expect(observations.map((b) => (b.entry as Json[]).length)).toEqual([1, 1]);
      expect(observations.flatMap((b) => statusOf(b).events.map(focusOf))).toEqual([undefined, undefined]);

      // The Patient filter for someone else saw only the sentinel; the catch-all saw all seven.
      expect(notifications('other').map(eventNumbers)).toEqual([[1]]);
      expect(notifications('everything').map(eventNumbers)).toEqual([[1], [2], [3], [4], [5], [6], [7]]);

      // Classic criteria without payload: an empty-body POST per Patient change.
      const classic = receiver.on('/hook/classic');
      expect(classic.map((r) => [r.method, r.body, r.headers['content-type']])).toEqual(
        Array.from({ length: 5 }, () => ['POST', '', undefined]),
      );

      // Every request is Standard Webhooks signed with the secret the create response showed once.
      for (const [name, sub] of Object.entries({
        patient: subs.patient,
        classic: subs.classic,
        everything: subs.everything,
      })) {
        const extensions = ((sub?.channel as Json | undefined)?.extension ?? []) as Json[];
        const ext = extensions.find((e) => String(e.url).endsWith('/webhook-secret'));
        expect(ext?.valueString).toMatch(/^whsec_/);
        const wh = new Webhook(String(ext?.valueString));
        expect(receiver.on(`/hook/${name}`).length).toBeGreaterThan(0);
        for (const r of receiver.on(`/hook/${name}`)) {
          expect(() => wh.verify(r.body, r.headers as Record<string, string>)).not.toThrow();
        }
      }
      for (const b of [...patient, ...observations]) expect(validateFhir(b)).toEqual([]);
      expect(receiver.failures).toEqual([]);
    });

    it('reports event counts through $status, per subscription and for the type', async () => {
      const one = await alice.call('GET', `/fhir/Subscription/${subs.patient?.id}/$status`);
      expect(one.status).toBe(200);
      expect(validateFhir(one.body)).toEqual([]);
      expect(one.body.type).toBe('searchset');
      const params = statusOf(one.body).params;
      expect(params.get('type')?.valueCode).toBe('query-status');
      expect(params.get('status')?.valueCode).toBe('active');
      expect(params.get('events-since-subscription-start')?.valueString).toBe('5');

      const all = await alice.call('GET', '/fhir/Subscription/$status');
      const counts = Object.fromEntries(
        (all.body.entry as Json[]).map((e) => {
          const p = ((e.resource as Json).parameter as Json[]) ?? [];
          const ref = ((p.find((x) => x.name === 'subscription') as Json).valueReference as Json).reference as string;
          const n = (p.find((x) => x.name === 'events-since-subscription-start') as Json).valueString;
          return [ref.split('/').pop(), n];
        }),
      );
      expect(counts).toEqual({
        [subs.patient?.id as string]: '5',
        [subs.observations?.id as string]: '2',
        [subs.classic?.id as string]: '5',
        [subs.otherPatient?.id as string]: '1',
        [subs.everything?.id as string]: '7',
      });
      expect(validateFhir(all.body)).toEqual([]);
    });

    it('never shows one client another client’s subscriptions', async () => {
      const id = subs.patient?.id as string;
      for (const [method, path] of [
        ['GET', `/fhir/Subscription/${id}`],
        ['GET', `/fhir/Subscription/${id}/$status`],
        ['GET', `/fhir/Subscription/${id}/$events`],
      ] as const) {
        const res = await bob.call(method, path);
        expect([method, path, res.status]).toEqual([method, path, 404]);
        expect(res.body.resourceType).toBe('OperationOutcome');
      }
      // A DELETE of what is not there is a 204 (R4 http.html#delete): the same for alice's (which
      // stays, as checked below) as for an id that is nobody's.
      for (const path of [`/fhir/Subscription/${id}`, '/fhir/Subscription/nobody-has-this-id']) {
        const res = await bob.call('DELETE', path);
        expect([path, res.status, res.body]).toEqual([path, 204, {}]);
      }
      const put = await bob.call('PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', hook('x')),
        id,
      });
      expect(put.status).toBe(404);
      const search = await bob.call('GET', '/fhir/Subscription');
      expect(search.body.total).toBe(0);
      const mine = await alice.call('GET', '/fhir/Subscription');
      expect(mine.body.total).toBe(5);
      expect((await alice.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    });

    it('describes itself in a CapabilityStatement without authentication', async () => {
      const res = await fetch(`${broker.url}/fhir/metadata`);
      expect(res.headers.get('content-type')).toBe('application/fhir+json; charset=utf-8');
      const cs = (await res.json()) as Json;
      expect(validateFhir(cs)).toEqual([]);
      const rest = (cs.rest as Json[])[0] as Json;
      // The broker's own extension and R4's standard one name the same WebSocket URL.
      expect(rest.extension).toEqual([
        {
          url: 'https://fhir-subscription-broker.org/fhir/StructureDefinition/websocket-url',
          valueUrl: `${broker.url.replace('http', 'ws')}/ws`,
        },
        {
          url: 'http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket',
          valueUri: `${broker.url.replace('http', 'ws')}/ws`,
        },
      ]);
      // Only R4 resource types: SubscriptionTopic is R4B's, and `type` has a required binding.
      expect((rest.resource as Json[]).map((r) => r.type)).toEqual(['Subscription']);
      const subscription = (rest.resource as Json[]).find((r) => r.type === 'Subscription') as Json;
      expectSubscriptionCapability(subscription);
      expect((subscription.operation as Json[])[3]?.definition).toBe(
        'https://fhir-subscription-broker.org/fhir/OperationDefinition/Subscription-expunge',
      );
      const topics = await alice.call('GET', '/fhir/SubscriptionTopic');
      expect(topics.body.total).toBe(4);
      expect((await alice.call('GET', '/fhir/SubscriptionTopic/patient-change')).body.url).toBe(
        `${TOPIC}/patient-change`,
      );
      expect((await alice.call('GET', '/fhir/SubscriptionTopic/nope')).status).toBe(404);
    });

    it('serves health and metrics, and never writes a secret to its log', async () => {
      expect(await (await fetch(`${broker.url}/healthz`)).json()).toEqual({ status: 'ok' });
      expect((await fetch(`${broker.url}/metrics`)).status).toBe(401);
      // The totals of every client: the operator's (ingest token), not an API client's.
      const asClient = await fetch(`${broker.url}/metrics`, { headers: { authorization: `Bearer ${API_KEYS.alice}` } });
      expect(asClient.status).toBe(401);
      const metrics = await (
        await fetch(`${broker.url}/metrics`, { headers: { authorization: `Bearer ${INGEST_TOKEN}` } })
      ).text();
      expect(metrics).toContain('broker_events_total{outcome="accepted"} 7');
      expect(metrics).toContain('broker_events_total{outcome="duplicate"} 3');
      expect(metrics).toContain('broker_events_total{outcome="ignored"} 3');
      expect(metrics).toMatch(/broker_delivery_latency_seconds_count \d+/);
      const secrets = [
        API_KEYS.alice,
        API_KEYS.bob,
        INGEST_TOKEN,
        ...Object.values(subs).map((s) => JSON.stringify(s).match(/whsec_[A-Za-z0-9+/=]+/)?.[0] ?? 'none'),
      ];
      const written = JSON.stringify(broker.logs) + broker.stderr.join('\n');
      for (const secret of secrets) expect(written.includes(secret)).toBe(false);
      expect(broker.logs.length).toBeGreaterThan(10);
    });

    it('filters on content: notifies only the changes whose resource, read from the FHIR server, matches', async () => {
      for (const [id, patient] of [
        ['obs-c1', 'p-content'],
        ['obs-c2', 'p-other'],
        ['obs-c3', 'p-content'],
      ] as const) {
        fhir.put({ resourceType: 'Observation', id, status: 'final', subject: { reference: `Patient/${patient}` } });
      }
      subs.content = await alice.create(
        topicSubscription('observation-change', hook('content'), {
          filters: ['Observation?patient=Patient/p-content'],
        }),
      );
      await receiver.waitFor(() => bundles('content').length === 1, 'the content subscription handshake');
      const res = await alice.postEvents(
        ['obs-c1', 'obs-c2', 'obs-c3'].map((id) => eventLike('healthlake-create-observation', `content-${id}`, id)),
        INGEST_TOKEN,
      );
      expect(res.body).toEqual({ accepted: 3, ignored: 0, duplicates: 0 });
      await receiver.waitFor(() => notifications('content').length === 2, 'the two matching notifications');
      const delivered = notifications('content').map((b) => [
        eventNumbers(b),
        statusOf(b).events.map((e) => focusOf(e)?.split('/').slice(-2).join('/')),
      ]);
      expect(delivered).toEqual([
        [[1], ['Observation/obs-c1']],
        [[2], ['Observation/obs-c3']],
      ]);
      // Three reads at once, on their own connections: in any order.
      expect(fhir.requests.map((r) => `${r.path} ${r.headers.authorization}`).sort()).toEqual(
        ['obs-c1', 'obs-c2', 'obs-c3'].map((id) => `/fhir/Observation/${id} Bearer ${FHIR_TOKEN}`),
      );
      const written = JSON.stringify(broker.logs) + broker.stderr.join('\n');
      expect(written.includes(FHIR_TOKEN)).toBe(false);
    });

    it('stops cleanly on SIGTERM', async () => {
      expect(await broker.kill('SIGTERM')).toBe(0);
      expect(broker.logs.some((r) => r.msg === 'shutting down' && r.signal === 'SIGTERM')).toBe(true);
    });
  });
}
