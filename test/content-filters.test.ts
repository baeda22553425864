import { once } from 'node:events';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SignatureV4 } from '@smithy/signature-v4';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { createBroker } from '../src/broker.js';
import { loadConfig } from '../src/config.js';
import { FhirReader, Sha256 } from '../src/content/fhir-reader.js';
import {
  classicSubscription,
  eventLike,
  focusOf,
  type Json,
  notifiedNumbers,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { type FhirRequest, FhirServer } from './support/fhir-server.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { readingBroker } from './support/reading-broker.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';
import { sigV4Signature } from './support/sigv4.js';

/**
 * Content filters end to end: subscriptions filtered on search parameters (`patient`, `code`...)
 * are notified only of changes whose resource, read from a real FHIR server over HTTP, matches;
 * event numbers stay gapless; a resource that cannot be read now refuses the request whole (503,
 * nothing stored) so the sender's retry delivers it once; a deleted resource is judged by its last
 * version; SigV4 requests are signed as HealthLake checks them.
 */

const LOINC_HR = 'http://loinc.org|8867-4';
const FHIR_TOKEN = 'fhir-server-token-0123456789';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function observation(id: string, patient: string, code = '8867-4', extra: Json = {}): Json {
  return {
    resourceType: 'Observation',
    id,
    status: 'final',
    subject: { reference: `Patient/${patient}` },
    code: { coding: [{ system: 'http://loinc.org', code }] },
    ...extra,
  };
}

/** A HealthLake call on an Observation (create, update or delete) as EventBridge delivers it. */
function observationEvent(eventId: string, resourceId: string, eventName = 'CreateResource'): Json {
  const event = eventLike('healthlake-create-observation', eventId, resourceId);
  return { ...event, detail: { ...(event.detail as Json), eventName } };
}

const setup = (env: Record<string, string> = {}) =>
  readingBroker(cleanups, { BROKER_RETRY_DELAYS: '20ms,20ms,20ms', ...env }, { token: FHIR_TOKEN });

async function active(t: TestBroker, sub: Json): Promise<string> {
  await t.logger.waitForStatus(sub.id as string, 'active');
  return sub.id as string;
}

/** A topic-based Subscription to Observation changes with one filter (its notifications name their focus). */
const filtered = (receiver: Receiver, path: string, filter: string) =>
  topicSubscription('observation-change', `${receiver.url}${path}`, { filters: [filter] });

async function waitUntil(done: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !done(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(done()).toBe(true);
}

const logged = (t: TestBroker, msg: string) => t.logger.records.find((r) => r.msg === msg);

const focusesOn = (receiver: Receiver, path: string) =>
  receiver
    .on(path)
    .map((r) => JSON.parse(r.body) as Json)
    .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification')
    .flatMap((b) => statusOf(b).events.map((e) => focusOf(e)?.split('/').pop()));

describe('content filters', () => {
  it('notifies only the changes whose resource matches, with gapless event numbers, reading each resource once', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(observation('o1', 'p1'));
    fhir.put(observation('o2', 'p2'));
    fhir.put(observation('o3', 'p1', '1234-5'));
    const both = await active(
      t,
      await t.create(
        topicSubscription('observation-change', `${receiver.url}/both`, {
          filters: [`Observation?patient=Patient/p1&code=${encodeURIComponent(LOINC_HR)}`],
        }),
      ),
    );
    const p1 = await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    // Classic R4 criteria: no handshake, an empty POST per notification.
    const classic = await active(
      t,
      await t.create(classicSubscription('Observation?patient=p1', `${receiver.url}/classic`)),
    );
    const all = await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));

    const answer = await t.post([
      observationEvent('e1', 'o1'),
      observationEvent('e2', 'o2'),
      observationEvent('e3', 'o3'),
    ]);
    expect(answer).toEqual({ accepted: 3, ignored: 0, duplicates: 0 });
    await receiver.waitFor(
      () =>
        focusesOn(receiver, '/all').length === 3 &&
        focusesOn(receiver, '/p1').length === 2 &&
        receiver.on('/classic').length === 2,
      'the unfiltered, filtered and classic notifications',
    );
    await receiver.waitFor(() => focusesOn(receiver, '/both').length === 1, 'the filtered notification');

    expect(focusesOn(receiver, '/both')).toEqual(['o1']);
    expect(focusesOn(receiver, '/p1')).toEqual(['o1', 'o3']);
    expect(receiver.on('/classic').map((r) => r.body)).toEqual(['', '']);
    expect(focusesOn(receiver, '/all')).toEqual(['o1', 'o2', 'o3']);
    expect(notifiedNumbers(receiver.on('/both'))).toEqual([1]);
    expect(notifiedNumbers(receiver.on('/p1'))).toEqual([1, 2]);
    // One read per resource, however many subscriptions needed it, with the configured token.
    for (const id of ['o1', 'o2', 'o3']) {
      const reads = fhir.requestsFor('Observation', id);
      expect(reads.map((r) => `${r.method} ${r.path}`)).toEqual([`GET /fhir/Observation/${id}`]);
      expect(reads[0]?.headers.authorization).toBe(`Bearer ${FHIR_TOKEN}`);
      expect(reads[0]?.headers.accept).toBe('application/fhir+json');
    }
    for (const [id, count] of [
      [both, 1],
      [p1, 2],
      [classic, 2],
      [all, 3],
    ] as const) {
      const status = await t.call('GET', `/fhir/Subscription/${id}/$status`);
      const params = statusOf(status.body).params;
      expect(params.get('events-since-subscription-start')?.valueString).toBe(String(count));
    }
  });

  it('reads nothing for an event no content-filtered subscription could match', async () => {
    const { t, fhir, receiver } = await setup();
    await active(t, await t.create(classicSubscription('Observation?patient=p1', `${receiver.url}/obs`)));
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    // Held: a read would hang this test, not answer it.
    fhir.hold = new Promise(() => undefined);
    expect(await t.post(eventLike('healthlake-update-patient', 'e-pat', 'pat-1'))).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the patient notification');
    expect(fhir.requests).toEqual([]);
  });

  it('judges a delete by the last version before it, from the instance history', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(observation('o4', 'p2'));
    fhir.put(observation('o4', 'p1'));
    fhir.delete('Observation', 'o4');
    fhir.put(observation('o5', 'p2'));
    fhir.delete('Observation', 'o5');
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=Patient/p1')));
    await t.post([observationEvent('d4', 'o4', 'DeleteResource'), observationEvent('d5', 'o5', 'DeleteResource')]);
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 1, 'the delete notification');
    expect(focusesOn(receiver, '/p1')).toEqual(['o4']);
    expect(fhir.requestsFor('Observation', 'o4').map((r) => `${r.path}${r.query}`)).toEqual([
      '/fhir/Observation/o4/_history?_count=10',
    ]);
  });

  it('an update read after the resource was deleted falls back to its history', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(observation('o6', 'p1'));
    fhir.delete('Observation', 'o6');
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await t.post(observationEvent('u6', 'o6', 'UpdateResource'));
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 1, 'the update notification');
    expect(fhir.requestsFor('Observation', 'o6').map((r) => r.path)).toEqual([
      '/fhir/Observation/o6',
      '/fhir/Observation/o6/_history',
    ]);
  });

  it('a resource the server never had matches no content filter; the event is still accepted for the others', async () => {
    const { t, fhir, receiver } = await setup();
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
    expect(await t.post(observationEvent('e-ghost', 'ghost'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    await receiver.waitFor(() => focusesOn(receiver, '/all').length === 1, 'the unfiltered notification');
    expect(focusesOn(receiver, '/p1')).toEqual([]);
    expect(fhir.requestsFor('Observation', 'ghost').map((r) => r.path)).toEqual([
      '/fhir/Observation/ghost',
      '/fhir/Observation/ghost/_history',
    ]);
    expect(
      logged(t, 'changed resource not found on the FHIR server: no content filter holds, no resource carried'),
    ).toBeDefined();
  });

  it.each([
    ['503', 503],
    ['429', 429],
    ['401 (a wrong token)', 401],
  ])(
    'a resource that cannot be read now (%s) refuses the request whole; the retry delivers it once',
    async (_n, status) => {
      const { t, fhir, receiver } = await setup();
      fhir.put(observation('o7', 'p1'));
      fhir.put(observation('o8', 'p9'));
      const p1 = await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
      const all = await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
      fhir.respond = (r) => (r.path === '/fhir/Observation/o7' ? status : undefined);
      const events = [observationEvent('e8', 'o8'), observationEvent('e7', 'o7')];

      const refused = await t.call('POST', '/events', events, TOKENS.ingest);
      expect(refused.status).toBe(503);
      expect(refused.body.resourceType).toBe('OperationOutcome');
      const issue = (refused.body.issue as Json[])[0] as Json;
      expect(issue.diagnostics).toContain('could not be read from the FHIR server');
      expect(issue.diagnostics).toContain(`answered ${status}`);
      expect(issue.diagnostics).not.toContain('o7');
      // Nothing stored: no event of the request counted for any subscription, the other event included.
      for (const id of [p1, all]) {
        const s = await t.call('GET', `/fhir/Subscription/${id}/$status`);
        const params = statusOf(s.body).params;
        expect(params.get('events-since-subscription-start')?.valueString).toBe('0');
      }

      fhir.respond = () => undefined;
      expect(await t.post(events)).toEqual({ accepted: 2, ignored: 0, duplicates: 0 });
      expect(await t.post(events)).toEqual({ accepted: 0, ignored: 0, duplicates: 2 });
      await receiver.waitFor(
        () => focusesOn(receiver, '/all').length === 2 && focusesOn(receiver, '/p1').length === 1,
        'the notifications after the retry',
      );
      expect(focusesOn(receiver, '/p1')).toEqual(['o7']);
      expect(notifiedNumbers(receiver.on('/all'))).toEqual([1, 2]);
      expect(
        logged(t, 'a changed resource could not be read (content filters, full-resource); the sender will retry'),
      ).toBeDefined();
    },
  );

  it('a server that keeps no history (405 on _history) judges no delete: accepted, matched by no content filter', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.respond = (r) => (r.path.endsWith('/_history') ? 405 : undefined);
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
    expect(await t.post(observationEvent('d-nohist', 'o-gone', 'DeleteResource'))).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    await receiver.waitFor(() => focusesOn(receiver, '/all').length === 1, 'the unfiltered notification');
    expect(focusesOn(receiver, '/p1')).toEqual([]);
    const line = logged(
      t,
      'changed resource not found on the FHIR server: no content filter holds, no resource carried',
    );
    expect(line?.reason).toContain('answered 405: the server keeps no history to read');
  });

  it('a read that does not finish within BROKER_FHIR_READ_TIMEOUT is a 503, even while bytes keep coming', async () => {
    // Headers at once, then a byte every 100 ms: each chunk within any per-chunk timeout.
    const trickle = createServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/fhir+json' });
      res.write('{');
      const timer = setInterval(() => res.write(' '), 100);
      res.on('close', () => clearInterval(timer));
    });
    trickle.listen(0, '127.0.0.1');
    await once(trickle, 'listening');
    cleanups.push(async () => {
      trickle.closeAllConnections();
      trickle.close();
    });
    const receiver = await Receiver.start();
    const t = await inProcessBroker({
      BROKER_FHIR_READ: `http://127.0.0.1:${(trickle.address() as AddressInfo).port}/fhir`,
      BROKER_FHIR_READ_TIMEOUT: '500ms',
    });
    cleanups.push(
      () => receiver.close(),
      () => t.broker.close(0),
    );
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    const res = await t.call('POST', '/events', observationEvent('e-slow', 'o-slow'), TOKENS.ingest);
    expect(res.status).toBe(503);
    expect(((res.body.issue as Json[])[0] as Json).diagnostics).toContain('could not be read from the FHIR server');
    // The trickle never ends: only the whole-read deadline could have answered.
  });

  it.each([
    [
      'another resource than the one named',
      (fhir: FhirServer) => fhir.put(observation('o10', 'p1'), 'o9'),
      'the answer is not the Observation the event names',
    ],
    [
      'a 400',
      (fhir: FhirServer) => {
        fhir.respond = () => 400;
      },
      'the server answered 400',
    ],
    [
      'an answer that is not JSON',
      (fhir: FhirServer) => {
        fhir.body = () => '<html>Patient Jane Doe, MRN 12345</html>';
      },
      'the answer is not JSON (40 characters, content-type application/fhir+json)',
    ],
  ])(
    'a server that answers %s, which a retry would not change, judges nothing: accepted, logged at warn, quoting nothing',
    async (_n, arrange, reason) => {
      const { t, fhir, receiver } = await setup();
      await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
      await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
      arrange(fhir);
      expect(await t.post(observationEvent('e-odd-answer', 'o9'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      await receiver.waitFor(() => focusesOn(receiver, '/all').length === 1, 'the unfiltered notification');
      expect(focusesOn(receiver, '/p1')).toEqual([]);
      const line = logged(
        t,
        'the FHIR server answered something other than the changed resource: no content filter holds, no resource carried',
      );
      expect(line?.level).toBe('warn');
      expect(String(line?.reason)).toContain(reason);
      const written = JSON.stringify(t.logger.records);
      for (const secret of [FHIR_TOKEN, 'Jane', '<html', 'o9']) expect(written).not.toContain(secret);
    },
  );

  it('judges a subscription changed during the read by the filters it had when the event was matched', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put(observation('o-race', 'p2'));
    const sub = await t.create(filtered(receiver, '/p1', 'Observation?patient=p1'));
    const id = await active(t, sub);
    let release: (v?: unknown) => void = () => undefined;
    fhir.hold = new Promise((r) => {
      release = r;
    });
    const posting = t.call('POST', '/events', observationEvent('e-race', 'o-race'), TOKENS.ingest);
    await waitUntil(() => fhir.requests.length === 1);
    // While the read is held, the subscription drops its filter (patient-change, every Patient).
    const changed = await t.call('PUT', `/fhir/Subscription/${id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/p1`),
      id,
    });
    expect(changed.status).toBe(200);
    release();
    expect((await posting).body).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    const s = await t.call('GET', `/fhir/Subscription/${id}/$status`);
    expect(statusOf(s.body).params.get('events-since-subscription-start')?.valueString).toBe('0');
  });

  it('a resource the FHIRPath engine cannot walk holds no content filter; the event still goes to the others', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put({ ...observation('o-odd', 'p1'), subject: { reference: 42 } });
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
    expect(await t.post(observationEvent('e-odd', 'o-odd'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    await receiver.waitFor(() => focusesOn(receiver, '/all').length === 1, 'the unfiltered notification');
    expect(focusesOn(receiver, '/p1')).toEqual([]);
    const line = logged(t, 'a changed resource could not be evaluated for a content filter: the filter does not hold');
    expect([line?.resourceType, line?.parameter]).toEqual(['Observation', 'patient']);
  });

  it('an unevaluable parameter fails only the subscriptions that filter on it, in whatever order they come', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put({ ...observation('o-half', 'p1'), subject: { reference: 42 } });
    await active(t, await t.create(filtered(receiver, '/code-first', 'Observation?code=8867-4')));
    await active(t, await t.create(filtered(receiver, '/patient', 'Observation?patient=p1')));
    await active(t, await t.create(filtered(receiver, '/code-last', 'Observation?code=8867-4')));
    await t.post(observationEvent('e-half', 'o-half'));
    await receiver.waitFor(
      () => focusesOn(receiver, '/code-first').length === 1 && focusesOn(receiver, '/code-last').length === 1,
      'both code notifications',
    );
    expect(focusesOn(receiver, '/patient')).toEqual([]);
    const metrics = await t.broker.app.request('/metrics', { headers: { authorization: `Bearer ${TOKENS.ingest}` } });
    const text = await metrics.text();
    expect(text).toContain('broker_content_matches_total{outcome="unevaluable"} 1');
    expect(text).toContain('broker_content_matches_total{outcome="matched"} 2');
  });

  it("counts a reference under BROKER_FHIR_READ's own base as local", async () => {
    const { t, fhir, receiver } = await setup();
    fhir.put({ ...observation('o-abs', 'x'), subject: { reference: `${fhir.url}/Patient/p1` } });
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await active(t, await t.create(filtered(receiver, '/typed', 'Observation?subject=Patient/p1')));
    await t.post(observationEvent('e-abs', 'o-abs'));
    await receiver.waitFor(
      () => focusesOn(receiver, '/p1').length === 1 && focusesOn(receiver, '/typed').length === 1,
      'both notifications',
    );
  });

  it('judges a delete by what it deleted, not by a version created after it', async () => {
    const { t, fhir, receiver } = await setup();
    // Deleted while about p2, then created again about p1: the delete event concerns the p2 version.
    fhir.put(observation('o-re', 'p2'));
    fhir.delete('Observation', 'o-re');
    fhir.put(observation('o-re', 'p1'));
    // The reverse: deleted while about p1, created again about p2.
    fhir.put(observation('o-re2', 'p1'));
    fhir.delete('Observation', 'o-re2');
    fhir.put(observation('o-re2', 'p2'));
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await active(t, await t.create(topicSubscription('observation-change', `${receiver.url}/all`)));
    await t.post([
      observationEvent('d-re', 'o-re', 'DeleteResource'),
      observationEvent('d-re2', 'o-re2', 'DeleteResource'),
    ]);
    await receiver.waitFor(() => focusesOn(receiver, '/all').length === 2, 'the unfiltered notifications');
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 1, 'the filtered notification');
    expect(focusesOn(receiver, '/p1')).toEqual(['o-re2']);
  });

  it('judges a delete by the version written before it, by time, whatever the history page holds after it', async () => {
    const { t, fhir, receiver } = await setup();
    // The event's time is 2024-01-05T19:30:17Z (the fixture's). Deleted while about p1; created
    // again about p2 and updated five times since: no delete marker on a page of ten newest first.
    fhir.put({ ...observation('o-t', 'p2'), meta: { lastUpdated: '2024-01-05T18:00:00Z' } });
    fhir.put({ ...observation('o-t', 'p1'), meta: { lastUpdated: '2024-01-05T19:00:00Z' } });
    fhir.delete('Observation', 'o-t');
    for (let i = 0; i < 10; i++) {
      fhir.put({ ...observation('o-t', 'p2'), meta: { lastUpdated: `2024-01-05T20:${String(10 + i)}:00Z` } });
    }
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    await t.post(observationEvent('d-t', 'o-t', 'DeleteResource'));
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 1, 'the delete notification');
  });

  it('a slow FHIR server under a burst: each read has its own deadline from its turn, so none times out waiting', async () => {
    // 64 events at once, 16 reads in flight, 200 ms a read: the last start ~0.8 s after the first,
    // past a deadline of 600 ms counted from arrival, well within one counted from each read's turn.
    const { t, fhir, receiver } = await setup({ BROKER_FHIR_READ_TIMEOUT: '600ms' });
    await active(t, await t.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    for (let i = 0; i < 64; i++) fhir.put(observation(`o-b${i}`, 'p1'));
    fhir.delayMs = 200;
    const answers = await Promise.all(
      Array.from({ length: 64 }, (_, i) =>
        t.call('POST', '/events', observationEvent(`e-b${i}`, `o-b${i}`), TOKENS.ingest),
      ),
    );
    expect(answers.map((a) => a.status)).toEqual(Array.from({ length: 64 }, () => 202));
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 64, 'the 64 notifications');
  });

  it('logs classic criteria by their resource type only (they may hold patient data)', async () => {
    const { t, receiver } = await setup();
    await t.create(classicSubscription('Patient?name:exact=Jane%20Doe&birthdate=1970-01-01', `${receiver.url}/x`));
    const created = logged(t, 'subscription created');
    expect(created?.topic).toBe('Patient?…');
    expect(JSON.stringify(t.logger.records)).not.toContain('Jane');
  });

  it('refuses filters it cannot evaluate, naming them, and stores nothing', async () => {
    const { t } = await setup();
    const cases: [Json, string][] = [
      [
        classicSubscription('Observation?value-quantity=5', 'http://127.0.0.1:9/x'),
        'value-quantity is a quantity parameter',
      ],
      [classicSubscription('Observation?patient.name=x', 'http://127.0.0.1:9/x'), 'chained parameters'],
      [
        classicSubscription('Observation?colour=red', 'http://127.0.0.1:9/x'),
        'colour is not a search parameter of Observation',
      ],
      [classicSubscription('Observation?code:in=http://vs', 'http://127.0.0.1:9/x'), 'modifier :in is not supported'],
      [classicSubscription('Observation?date=ap2024', 'http://127.0.0.1:9/x'), 'prefix ap is not supported'],
      [classicSubscription('Observation?date=2024-13', 'http://127.0.0.1:9/x'), 'not a FHIR date'],
      [
        topicSubscription('observation-change', 'http://127.0.0.1:9/x', { filters: ['Observation?value-quantity=5'] }),
        'not a filter of topic',
      ],
      [
        topicSubscription('resource-change', 'http://127.0.0.1:9/x', { filters: ['Observation?code=x'] }),
        'not a filter of topic',
      ],
    ];
    for (const [sub, text] of cases) {
      const res = await t.call('POST', '/fhir/Subscription', sub);
      expect(res.status, text).toBe(422);
      expect(((res.body.issue as Json[])[0] as Json).diagnostics).toContain(text);
    }
    const search = await t.call('GET', '/fhir/Subscription');
    expect(search.body.total).toBe(0);
  });

  it('keeps the filters on the stored resource, and offers them in the topics', async () => {
    const { t, receiver } = await setup();
    const filter = `Observation?patient=Patient/p1&code=${encodeURIComponent(LOINC_HR)}`;
    const sub = await t.create(topicSubscription('observation-change', `${receiver.url}/x`, { filters: [filter] }));
    const read = await t.call('GET', `/fhir/Subscription/${sub.id}`);
    expect(((read.body._criteria as Json).extension as Json[])[0]?.valueString).toBe(filter);
    const topic = await t.call('GET', '/fhir/SubscriptionTopic/observation-change');
    const offered = (topic.body.canFilterBy as Json[]).map((f) => f.filterParameter);
    expect(offered).toEqual(expect.arrayContaining(['_id', 'patient', 'code', 'category', 'status', 'date']));
  });
});

describe('content filters without BROKER_FHIR_READ', () => {
  it('a stored subscription with content filters gets nothing (never unfiltered); the others are notified', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'fsb-content-'));
    cleanups.push(async () => rmSync(dataDir, { recursive: true, force: true }));
    const fhir = await FhirServer.start();
    const receiver = await Receiver.start();
    cleanups.push(
      () => fhir.close(),
      () => receiver.close(),
    );
    const first = await inProcessBroker({ BROKER_DATA_DIR: dataDir, BROKER_FHIR_READ: fhir.url });
    const p1 = await active(first, await first.create(filtered(receiver, '/p1', 'Observation?patient=p1')));
    const plain = await active(
      first,
      await first.create(topicSubscription('observation-change', `${receiver.url}/all`)),
    );
    await first.broker.close(0);
    // Stored so that a broker from before content filters reads it as matching nothing.
    const db = new Database(join(dataDir, 'broker.sqlite3'), { readonly: true });
    const stored = db.prepare('SELECT match_json FROM subscriptions WHERE id = ?').get(p1) as { match_json: string };
    db.close();
    expect(JSON.parse(stored.match_json)).toMatchObject({ resourceTypes: [], contentTypes: ['Observation'] });

    const second = await inProcessBroker({ BROKER_DATA_DIR: dataDir });
    cleanups.push(() => second.broker.close(0));
    expect(await second.post(observationEvent('e1', 'o1'))).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    await receiver.waitFor(() => focusesOn(receiver, '/all').length === 1, 'the unfiltered notification');
    expect(focusesOn(receiver, '/p1')).toEqual([]);
    expect(fhir.requests).toEqual([]);
    expect(logged(second, 'subscriptions with content filters left out: BROKER_FHIR_READ is not set')).toBeDefined();
    const s = await second.call('GET', `/fhir/Subscription/${p1}/$status`);
    const params = statusOf(s.body).params;
    expect(params.get('events-since-subscription-start')?.valueString).toBe('0');
    const all = await second.call('GET', `/fhir/Subscription/${plain}/$status`);
    expect(statusOf(all.body).params.get('events-since-subscription-start')?.valueString).toBe('1');
  });

  it('offers only the filters decided on the event in its topics (a client never picks one it would be refused)', async () => {
    const t = await inProcessBroker();
    cleanups.push(() => t.broker.close(0));
    const one = await t.call('GET', '/fhir/SubscriptionTopic/observation-change');
    expect((one.body.canFilterBy as Json[]).map((f) => f.filterParameter)).toEqual(['_id']);
    const all = await t.call('GET', '/fhir/SubscriptionTopic');
    for (const entry of all.body.entry as Json[]) {
      const params = ((entry.resource as Json).canFilterBy as Json[] | undefined)?.map((f) => f.filterParameter) ?? [];
      expect(params.every((p) => p === '_id' || p === '_type')).toBe(true);
    }
  });

  it('a topic whose canFilterBy names a parameter the type does not have stops the start', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-topics-'));
    const dataDir = join(dir, 'data');
    mkdirSync(dataDir);
    cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(
      join(dir, 'bad.json'),
      JSON.stringify({
        resourceType: 'SubscriptionTopic',
        id: 'bad',
        url: 'https://example.org/SubscriptionTopic/bad',
        status: 'active',
        resourceTrigger: [{ resource: 'http://hl7.org/fhir/StructureDefinition/Patient' }],
        canFilterBy: [{ resource: 'http://hl7.org/fhir/StructureDefinition/Patient', filterParameter: 'code' }],
      }),
    );
    const config = loadConfig({
      BROKER_TOPICS_DIR: dir,
      BROKER_DATA_DIR: dataDir,
      BROKER_API_KEYS: `alice:${TOKENS.alice}`,
      BROKER_INGEST_TOKEN: TOKENS.ingest,
      BROKER_FHIR_READ: 'http://127.0.0.1:9/fhir',
    });
    await expect(createBroker(config, { logger: new RecordingLogger() })).rejects.toThrow(
      'canFilterBy code is not a search parameter of Patient',
    );
  });
});

describe('SigV4 reads (HealthLake)', () => {
  const credentials = { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY' };
  const signer = (region: string) => new SignatureV4({ service: 'healthlake', region, credentials, sha256: Sha256 });
  const change = (fhirBase: string, interaction: 'update' | 'delete' = 'update') => ({
    eventId: 'e1',
    resourceType: 'Observation',
    resourceId: 'o1',
    interaction,
    datastoreId: 'abcdef01234567890abcdef012345678',
    fhirBase,
    time: '2024-01-01T00:00:00Z',
  });

  it('signs each read (and a history read, with its query) as SigV4 for healthlake; the signature verifies by hand', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    fhir.put(observation('o1', 'p1'));
    fhir.delete('Observation', 'o1');
    const config = loadConfig({ BROKER_FHIR_READ: fhir.url, BROKER_FHIR_READ_AUTH: 'sigv4', AWS_REGION: 'eu-west-2' })
      .fhirRead as NonNullable<ReturnType<typeof loadConfig>['fhirRead']>;
    const reader = new FhirReader(config, { signer: signer('eu-west-2') });
    cleanups.push(() => reader.close());
    expect(await reader.read(change('https://unused.example', 'delete'))).toEqual({
      resource: expect.objectContaining({ id: 'o1' }),
      base: fhir.url,
    });
    const [req] = fhir.requests;
    expect(`${req?.path}${req?.query}`).toBe('/fhir/Observation/o1/_history?_count=10');
    const auth = String(req?.headers.authorization);
    const date = String(req?.headers['x-amz-date']);
    expect(auth).toMatch(
      new RegExp(
        `^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/${date.slice(0, 8)}/eu-west-2/healthlake/aws4_request, SignedHeaders=accept;host;x-amz-content-sha256;x-amz-date, Signature=([0-9a-f]{64})$`,
      ),
    );
    expect(auth.slice(-64)).toBe(sigV4Signature(req as FhirRequest, credentials.secretAccessKey, 'eu-west-2'));
  });

  it("with BROKER_FHIR_READ=healthlake, reads each event from its own datastore URL, signed for that URL's region", async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    fhir.put(observation('o1', 'p1'));
    const config = loadConfig({ BROKER_FHIR_READ: 'healthlake', AWS_REGION: 'us-east-1' }).fhirRead;
    expect(config).toEqual({ auth: 'sigv4', region: 'us-east-1', timeoutMs: 10_000 });
    const reader = new FhirReader(config as NonNullable<typeof config>, { signer: signer('us-east-1') });
    cleanups.push(() => reader.close());
    // The event's own base (a stand-in for its datastore's URL) is where the read goes.
    expect(await reader.read(change(fhir.url))).toEqual({
      resource: expect.objectContaining({ id: 'o1' }),
      base: fhir.url,
    });
    expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Observation/o1']);
  });

  it("a base URL naming one HealthLake datastore does not read another datastore's events", async () => {
    const config = loadConfig({
      BROKER_FHIR_READ: 'https://healthlake.eu-west-2.amazonaws.com/datastore/0123456789abcdef0123456789abcdef/r4',
    }).fhirRead as NonNullable<ReturnType<typeof loadConfig>['fhirRead']>;
    expect(config.region).toBe('eu-west-2');
    const reader = new FhirReader(config, { signer: signer('eu-west-2') });
    cleanups.push(() => reader.close());
    expect(await reader.read(change('https://healthlake.us-east-1.amazonaws.com/datastore/x/r4'))).toEqual({
      missing: 'the event is from another HealthLake datastore than BROKER_FHIR_READ names',
    });
  });
});
