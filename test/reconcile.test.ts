import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SignatureV4 } from '@smithy/signature-v4';
import { afterEach, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { FhirReader, Sha256 } from '../src/content/fhir-reader.js';
import type { Reconciler } from '../src/service/reconciler.js';
import { eventLike, focusOf, type Json, notifiedNumbers, statusOf, topicSubscription } from './support/fhir-client.js';
import { type FhirRequest, FhirServer } from './support/fhir-server.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { readingBroker } from './support/reading-broker.js';
import { Receiver } from './support/receiver.js';
import { sigV4Signature } from './support/sigv4.js';

/**
 * Reconciliation end to end: a real FHIR server (searched on `_lastUpdated`), the in-process broker
 * on SQLite, a real receiver. Changes whose CloudTrail event never came are notified once, in the
 * subscription's event-number order; those whose event came are not notified again; content
 * filters are judged on the resource the search found; a failed run leaves its window for the next.
 */

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const setup = (env: Record<string, string> = {}) =>
  readingBroker(cleanups, { BROKER_RECONCILE_EVERY: '1h', BROKER_RECONCILE_LAG: '0s', ...env });

/**
 * A data dir, a FHIR server and a receiver that outlive the brokers a test starts one after another
 * on them (a restart, another process).
 */
async function acrossBrokers(): Promise<{ dir: string; fhir: FhirServer; receiver: Receiver }> {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-reconcile-'));
  cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
  const fhir = await FhirServer.start();
  const receiver = await Receiver.start();
  cleanups.push(
    () => fhir.close(),
    () => receiver.close(),
  );
  return { dir, fhir, receiver };
}

const reconcilerOf = (t: TestBroker): Reconciler => {
  const r = t.broker.reconciler;
  if (r === undefined) throw new Error('no reconciler');
  return r;
};

/** A moment later: what is written now is after the checkpoint, and before the next run's end. */
const tick = () => new Promise((r) => setTimeout(r, 5));

/** A resource as the FHIR server stores it now (`meta.lastUpdated`: now). */
function at(resource: Json, lastUpdated = new Date().toISOString()): Json {
  return { ...resource, meta: { lastUpdated } };
}

const patient = (id: string, family = 'Doe') => ({ resourceType: 'Patient', id, name: [{ family }] });

async function active(t: TestBroker, sub: Json): Promise<string> {
  await t.logger.waitForStatus(sub.id as string, 'active');
  return sub.id as string;
}

/**
 * `setup`, an active Patient subscriber at `/patients` (and Observation at `/observations`, when asked), and the first run done (the checkpoint set):
 * what the FHIR server is given from here on is in the next run's window.
 */
async function watching(
  options: { pageSize?: number; observations?: true } = {},
): Promise<{ t: TestBroker; fhir: FhirServer; receiver: Receiver }> {
  const s = await setup();
  if (options.pageSize !== undefined) s.fhir.pageSize = options.pageSize;
  await active(s.t, await s.t.create(topicSubscription('patient-change', `${s.receiver.url}/patients`)));
  if (options.observations === true) {
    await active(s.t, await s.t.create(topicSubscription('observation-change', `${s.receiver.url}/observations`)));
  }
  await reconcilerOf(s.t).run();
  await tick();
  return s;
}

/** The focus ids notified at `path`, in delivery order. */
const focusesOn = (receiver: Receiver, path: string) =>
  receiver
    .on(path)
    .map((r) => JSON.parse(r.body) as Json)
    .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification')
    .flatMap((b) => statusOf(b).events.map((e) => focusOf(e)));

function metric(text: string, line: string): number {
  const found = text.split('\n').find((l) => l.startsWith(`${line} `));
  return found === undefined ? Number.NaN : Number(found.slice(line.length + 1));
}

async function metrics(t: TestBroker): Promise<string> {
  const res = await t.broker.app.request('/metrics', { headers: { authorization: `Bearer ${TOKENS.ingest}` } });
  return res.text();
}

describe('reconciliation', () => {
  it('notifies the changes whose events never came, once, and not those whose events came', async () => {
    const { t, fhir, receiver } = await setup();
    const sub = await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    // The first run starts reconciliation from now: nothing before it is looked at.
    fhir.put(at(patient('before'), new Date(Date.now() - 60_000).toISOString()));
    expect(await reconcilerOf(t).run()).toEqual({ found: 0, notifications: 0 });
    await tick();

    // p2's event arrives (its CloudTrail time in whole seconds, as CloudTrail writes it); p1's and
    // p3's never do, and p3 is at its second version.
    const p2At = new Date();
    fhir.put(at(patient('p1')));
    fhir.put(at(patient('p2'), p2At.toISOString()));
    fhir.put(at(patient('p3')));
    fhir.put(at(patient('p3', 'Roe')));
    const event = eventLike('healthlake-update-patient', 'evt-p2', 'p2');
    const seconds = `${p2At.toISOString().slice(0, 19)}Z`;
    expect(await t.post({ ...event, detail: { ...(event.detail as Json), eventTime: seconds } })).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, "p2's notification");
    await tick();

    const report = await reconcilerOf(t).run();
    expect(report).toMatchObject({ found: 3, notifications: 2 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 3, 'the reconciled notifications');
    const focuses = focusesOn(receiver, '/patients');
    expect(focuses[0]).toMatch(/\/Patient\/p2$/);
    expect(focuses.slice(1).sort()).toEqual([`${fhir.url}/Patient/p1`, `${fhir.url}/Patient/p3`]);
    expect(notifiedNumbers(receiver.on('/patients'))).toEqual([1, 2, 3]);

    // Done: the next run finds nothing new in its window, and the window before is not read again.
    await tick();
    const searches = fhir.requests.length;
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 0, notifications: 0 });
    expect(fhir.requests.length).toBe(searches + 1);
    const query = new URLSearchParams(fhir.requests.at(-1)?.query);
    expect(fhir.requests.at(-1)?.path).toBe('/fhir/Patient');
    expect(query.getAll('_lastUpdated').map((v) => v.slice(0, 2))).toEqual(['ge', 'lt']);
    expect(Date.parse(query.getAll('_lastUpdated')[0]?.slice(2) ?? '')).toBe(report.to);

    const status = statusOf((await t.call('GET', `/fhir/Subscription/${sub}/$status`)).body).params;
    expect(status.get('events-since-subscription-start')?.valueString).toBe('3');
    const text = await metrics(t);
    expect(metric(text, 'broker_reconcile_resources_total{outcome="notified"}')).toBe(2);
    expect(metric(text, 'broker_reconcile_resources_total{outcome="already_notified"}')).toBe(1);
    expect(metric(text, 'broker_reconcile_runs_total{outcome="completed"}')).toBe(3);
    expect(metric(text, 'broker_reconcile_runs_total{outcome="failed"}')).toBe(0);
  });

  it('does not notify a subscription of a change made before it existed, nor a type nobody asked for', async () => {
    const { t, fhir, receiver } = await setup();
    await reconcilerOf(t).run();
    await tick();
    fhir.put(at(patient('early')));
    fhir.put(at({ resourceType: 'Observation', id: 'o1', status: 'final', code: { text: 'x' } }));
    await tick();
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/late`)));
    await tick();
    fhir.put(at(patient('later')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/late').length === 1, 'the later change');
    expect(focusesOn(receiver, '/late')).toEqual([`${fhir.url}/Patient/later`]);
    // Only the types some subscription could match are searched.
    expect(fhir.requests.filter((r) => r.path === '/fhir/Observation')).toEqual([]);
  });

  it('judges content filters on the resource found, without reading it again', async () => {
    const { t, fhir, receiver } = await setup();
    await active(
      t,
      await t.create(
        topicSubscription('observation-change', `${receiver.url}/p1`, { filters: ['Observation?patient=Patient/p1'] }),
      ),
    );
    await reconcilerOf(t).run();
    await tick();
    const obs = (id: string, p: string) => ({
      resourceType: 'Observation',
      id,
      status: 'final',
      code: { text: 'x' },
      subject: { reference: `Patient/${p}` },
    });
    fhir.put(at(obs('o1', 'p1')));
    fhir.put(at(obs('o2', 'p2')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/p1').length === 1, 'the matching observation');
    expect(focusesOn(receiver, '/p1')).toEqual([`${fhir.url}/Observation/o1`]);
    expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Observation']);
  });

  it('gives full-resource subscribers the version found, without reading it again', async () => {
    const { t, fhir, receiver } = await setup({ BROKER_FULL_RESOURCE_CLIENTS: 'alice' });
    await active(
      t,
      await t.create(topicSubscription('patient-change', `${receiver.url}/full`, { content: 'full-resource' })),
    );
    await reconcilerOf(t).run();
    await tick();
    fhir.put(at(patient('p1')));
    fhir.put(at(patient('p1', 'Roe')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 1, notifications: 1 });
    await receiver.waitFor(() => receiver.on('/full').length === 2, 'the handshake and the notification');
    const bundle = JSON.parse(receiver.on('/full')[1]?.body ?? '{}') as { entry: Json[] };
    expect(bundle.entry[1]?.resource).toEqual(fhir.current('Patient', 'p1'));
    expect(bundle.entry[1]?.resource).toMatchObject({ name: [{ family: 'Roe' }], meta: { versionId: '2' } });
    expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Patient']);
  });

  it('follows next links page by page, and refuses one that leads away from the server', async () => {
    const { t, fhir, receiver } = await watching({ pageSize: 2 });
    for (const id of ['a', 'b', 'c', 'd', 'e']) fhir.put(at(patient(id)));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 5, notifications: 5 });
    expect(fhir.requests.filter((r) => r.path === '/fhir/Patient')).toHaveLength(3);
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 5, 'five notifications');

    await tick();
    for (const id of ['f', 'g', 'h']) fhir.put(at(patient(id)));
    fhir.nextLink = (own) => own.replace('127.0.0.1', 'localhost');
    await tick();
    const failed = await reconcilerOf(t).run();
    expect(failed.notifications).toBe(2);
    const warning = t.logger.records.find(
      (r) => r.msg === 'reconciliation failed; the next run starts from the last window done',
    );
    expect(String((warning?.err as Error | undefined)?.message)).toContain('leads away from');
    // Done again by the next run, which follows the server's own links: only h is new to the subscriber.
    fhir.nextLink = undefined;
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 3, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 8, 'eight notifications');
    expect(new Set(focusesOn(receiver, '/patients')).size).toBe(8);
  });

  it('leaves a window whose search failed for the next run, and loses nothing of it', async () => {
    const { t, fhir, receiver } = await watching();
    fhir.put(at(patient('p1')));
    fhir.respond = (req) => (req.path === '/fhir/Patient' ? 503 : undefined);
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 0, notifications: 0 });
    const text = await metrics(t);
    expect(metric(text, 'broker_reconcile_runs_total{outcome="failed"}')).toBe(1);
    expect(metric(text, 'broker_reconcile_checkpoint_age_seconds')).toBeGreaterThanOrEqual(0);

    fhir.respond = () => undefined;
    fhir.put(at(patient('p2')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 2 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 2, 'both changes');
  });

  it('stops between pages when its signal aborts (a Lambda running out of time); the next run goes on', async () => {
    const { t, fhir, receiver } = await watching({ pageSize: 1 });
    fhir.put(at(patient('first')));
    fhir.put(at(patient('second')));
    await tick();
    const stop = new AbortController();
    fhir.respond = (req) => {
      if (req.query.includes('_page=2')) stop.abort();
      return undefined;
    };
    expect(await reconcilerOf(t).run({ signal: stop.signal })).toMatchObject({ found: 1, notifications: 1 });
    expect(
      t.logger.records.some((r) => r.msg === 'reconciliation stopped; the next run goes on from the last window done'),
    ).toBe(true);
    expect(metric(await metrics(t), 'broker_reconcile_runs_total{outcome="failed"}')).toBe(0);
    expect(metric(await metrics(t), 'broker_reconcile_runs_total{outcome="stopped"}')).toBe(1);
    fhir.respond = () => undefined;
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 2, 'both, once each');
    expect(focusesOn(receiver, '/patients')).toEqual([`${fhir.url}/Patient/first`, `${fhir.url}/Patient/second`]);
  });

  it('trusts nothing outside the window: a server that ignores _lastUpdated gets nothing notified twice', async () => {
    const { t, fhir, receiver } = await setup();
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    fhir.put(at(patient('old'), new Date(Date.now() - 3_600_000).toISOString()));
    fhir.put({ resourceType: 'Patient', id: 'undated' });
    await reconcilerOf(t).run();
    await tick();
    fhir.ignoreLastUpdated = true;
    fhir.put(at(patient('new')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 1, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the change in the window');
    expect(focusesOn(receiver, '/patients')).toEqual([`${fhir.url}/Patient/new`]);
    // The old one and the one without meta.lastUpdated.
    expect(metric(await metrics(t), 'broker_reconcile_resources_total{outcome="skipped"}')).toBe(2);
  });

  it('resumes from its checkpoint after a restart', async () => {
    const { dir, fhir, receiver } = await acrossBrokers();
    const env = {
      BROKER_DATA_DIR: dir,
      BROKER_FHIR_READ: fhir.url,
      BROKER_RECONCILE_EVERY: '1h',
      BROKER_RECONCILE_LAG: '0s',
    };
    const first = await inProcessBroker(env);
    await active(first, await first.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    await reconcilerOf(first).run();
    await first.broker.close(0);
    await tick();
    fhir.put(at(patient('while-down')));
    await tick();

    const again = await inProcessBroker(env);
    cleanups.push(() => again.broker.close(0));
    expect(await reconcilerOf(again).run()).toMatchObject({ found: 1, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the change made while down');
    expect(notifiedNumbers(receiver.on('/patients'))).toEqual([1]);
  });

  it('runs by itself every BROKER_RECONCILE_EVERY once the sources start, and stops on close', async () => {
    const { t, fhir, receiver } = await setup({ BROKER_RECONCILE_EVERY: '1s' });
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    t.broker.startSources();
    await t.logger.waitFor((r) => r.msg === 'reconciliation starts', 'the first run');
    await tick();
    fhir.put(at(patient('timed')));
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'a run on the timer', 10_000);
    await reconcilerOf(t).close();
    const searches = fhir.requests.length;
    await new Promise((r) => setTimeout(r, 1500));
    expect(fhir.requests.length).toBe(searches);
  });
});

describe('the change feed (FhirReader.changed)', () => {
  const credentials = { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY' };

  it('signs each search page as SigV4 with both _lastUpdated bounds; the signatures verify by hand', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    fhir.pageSize = 1;
    const from = Date.parse('2026-01-01T00:00:00Z');
    fhir.put(at(patient('a'), '2026-01-01T00:00:01.000Z'));
    fhir.put(at(patient('b'), '2026-01-01T00:00:02.000Z'));
    fhir.put(at(patient('c'), '2026-01-01T00:01:00.000Z'));
    const config = loadConfig({ BROKER_FHIR_READ: fhir.url, BROKER_FHIR_READ_AUTH: 'sigv4', AWS_REGION: 'eu-west-2' })
      .fhirRead as NonNullable<ReturnType<typeof loadConfig>['fhirRead']>;
    const signer = new SignatureV4({ service: 'healthlake', region: 'eu-west-2', credentials, sha256: Sha256 });
    const reader = new FhirReader(config, { signer });
    cleanups.push(() => reader.close());
    const pages: string[][] = [];
    for await (const page of reader.changed('Patient', from, from + 60_000, new AbortController().signal)) {
      pages.push(page.map((f) => String(f.resource.id)));
    }
    expect(pages).toEqual([['a'], ['b']]);
    expect(fhir.requests.map((r) => new URLSearchParams(r.query).getAll('_lastUpdated'))).toEqual([
      ['ge2026-01-01T00:00:00.000Z', 'lt2026-01-01T00:01:00.000Z'],
      ['ge2026-01-01T00:00:00.000Z', 'lt2026-01-01T00:01:00.000Z'],
    ]);
    for (const req of fhir.requests) {
      expect(String(req.headers.authorization).slice(-64)).toBe(
        sigV4Signature(req, credentials.secretAccessKey, 'eu-west-2'),
      );
    }
  });

  it('signs a next link as it is sent: a + is a plus, %2B and %20 as written', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    fhir.pageSize = 1;
    fhir.nextLink = (own) => `${own}&cursor=AbC+dEf%2Bg%20h`;
    const from = Date.parse('2026-01-01T00:00:00Z');
    fhir.put(at(patient('a'), '2026-01-01T00:00:01.000Z'));
    fhir.put(at(patient('b'), '2026-01-01T00:00:02.000Z'));
    const config = loadConfig({ BROKER_FHIR_READ: fhir.url, BROKER_FHIR_READ_AUTH: 'sigv4', AWS_REGION: 'eu-west-2' })
      .fhirRead as NonNullable<ReturnType<typeof loadConfig>['fhirRead']>;
    const signer = new SignatureV4({ service: 'healthlake', region: 'eu-west-2', credentials, sha256: Sha256 });
    const reader = new FhirReader(config, { signer });
    cleanups.push(() => reader.close());
    for await (const _ of reader.changed('Patient', from, from + 60_000, new AbortController().signal));
    const second = fhir.requests[1];
    expect(second?.query).toContain('cursor=AbC+dEf%2Bg%20h');
    expect(String(second?.headers.authorization).slice(-64)).toBe(
      sigV4Signature(second as FhirRequest, credentials.secretAccessKey, 'eu-west-2'),
    );
  });

  it('throws on an answer that is not a Bundle, and on a refusal, naming the server but no resource', async () => {
    const fhir = await FhirServer.start();
    cleanups.push(() => fhir.close());
    const config = loadConfig({ BROKER_FHIR_READ: fhir.url }).fhirRead as NonNullable<
      ReturnType<typeof loadConfig>['fhirRead']
    >;
    const reader = new FhirReader(config);
    cleanups.push(() => reader.close());
    const drain = async () => {
      for await (const _ of reader.changed('Patient', 0, 1000, new AbortController().signal));
    };
    fhir.body = () => JSON.stringify({ resourceType: 'Patient', id: 'p1' });
    await expect(drain()).rejects.toThrow(
      `searching the Patients changed in a window at ${fhir.url}: the answer is not a Bundle`,
    );
    fhir.body = undefined;
    fhir.respond = () => 400;
    await expect(drain()).rejects.toThrow('the server answered 400');
  });
});

describe('reconciliation against servers as they are', () => {
  it('follows a next link that is the base URL with a query (HAPI pages so)', async () => {
    const { t, fhir, receiver } = await setup();
    fhir.pageSize = 2;
    fhir.nextLink = (own) => {
      const u = new URL(own);
      if (u.searchParams.has('_getpages')) return own;
      return `${fhir.url}?_getpages=${u.pathname.split('/').pop()}&${u.searchParams}`;
    };
    await active(t, await t.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    await reconcilerOf(t).run();
    await tick();
    for (const id of ['a', 'b', 'c']) fhir.put(at(patient(id)));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 3, notifications: 3 });
    expect(
      fhir.requests.filter((r) => r.path === '/fhir').map((r) => new URLSearchParams(r.query).get('_getpages')),
    ).toEqual(['Patient']);
  });

  it('skips for one window a type the server refuses to search, and goes on with the others', async () => {
    const { t, fhir, receiver } = await setup();
    await active(t, await t.create(topicSubscription('resource-change', `${receiver.url}/all`)));
    await reconcilerOf(t).run();
    await tick();
    const p1At = Date.now();
    fhir.put(at(patient('p1'), new Date(p1At).toISOString()));
    fhir.respond = (req) => (req.path === '/fhir/Parameters' ? 404 : undefined);
    fhir.body = (req) => (req.path === '/fhir/Binary' ? '<html>proxy error</html>' : undefined);
    await tick();
    // Every R4 type is searched for a subscription that takes every type.
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 1, notifications: 1 });
    const skipped = t.logger.records.filter(
      (r) => r.msg === 'reconciliation skips a type for one window: the FHIR server refuses its search',
    );
    expect(skipped.map((r) => r.resourceType).sort()).toEqual(['Binary', 'Parameters']);
    expect(metric(await metrics(t), 'broker_reconcile_searches_refused_total')).toBe(2);
    // The window is done, the refused types' too: the next run starts after it for every type.
    await tick();
    const searched = fhir.requests.length;
    await reconcilerOf(t).run();
    const starts = fhir.requests
      .slice(searched)
      .map((r) => Date.parse(new URLSearchParams(r.query).getAll('_lastUpdated')[0]?.slice(2) ?? ''));
    expect(starts.length).toBeGreaterThan(100);
    expect(starts.every((s) => s > p1At)).toBe(true);
  });

  it('starts a search over when its window changed while it was paged, so an offset pager misses nothing', async () => {
    const { t, fhir, receiver } = await watching({ pageSize: 2 });
    for (const id of ['a', 'b', 'c', 'd', 'e']) fhir.put(at(patient(id)));
    await tick();
    let edited = false;
    fhir.respond = (req) => {
      if (!edited && req.query.includes('_page=2')) {
        edited = true;
        // `a` changes again: it leaves the window, and every later page would start one late.
        fhir.put(at(patient('a', 'Changed'), new Date(Date.now() + 60_000).toISOString()));
      }
      return undefined;
    };
    expect(await reconcilerOf(t).run()).toMatchObject({ notifications: 5 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 5, 'every change, once');
    expect(
      focusesOn(receiver, '/patients')
        .map((f) => f?.split('/').pop())
        .sort(),
    ).toEqual(['a', 'b', 'c', 'd', 'e']);
  });

  it('catches up after a long stop an hour per search, not BROKER_RECONCILE_EVERY per search', async () => {
    const { dir, fhir, receiver } = await acrossBrokers();
    const env = { BROKER_DATA_DIR: dir, BROKER_FHIR_READ: fhir.url, BROKER_RECONCILE_EVERY: '1s' };
    // A checkpoint three hours back: the first run of a broker whose lag was three hours.
    const first = await inProcessBroker({ ...env, BROKER_RECONCILE_LAG: '3h' });
    await active(first, await first.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    await reconcilerOf(first).run();
    await first.broker.close(0);
    await tick();
    fhir.put(at(patient('later')));
    await tick();
    const again = await inProcessBroker({ ...env, BROKER_RECONCILE_LAG: '0s' });
    cleanups.push(() => again.broker.close(0));
    expect(await reconcilerOf(again).run()).toMatchObject({ found: 1, notifications: 1 });
    expect(fhir.requests.filter((r) => r.path === '/fhir/Patient').length).toBeLessThanOrEqual(4);
  });

  it('does not notify a subscription of a change made while it was off, once it is active again', async () => {
    const { t, fhir, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/patients`));
    const id = await active(t, sub);
    await reconcilerOf(t).run();
    const current = (await t.call('GET', `/fhir/Subscription/${id}`)).body;
    expect((await t.call('PUT', `/fhir/Subscription/${id}`, { ...current, status: 'off' })).status).toBe(200);
    await tick();
    fhir.put(at(patient('while-off')));
    await tick();
    const off = (await t.call('GET', `/fhir/Subscription/${id}`)).body;
    const since = t.logger.records.length;
    expect((await t.call('PUT', `/fhir/Subscription/${id}`, { ...off, status: 'requested' })).status).toBe(200);
    await t.logger.waitForStatus(id, 'active', undefined, since);
    await tick();
    fhir.put(at(patient('after')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the change made after');
    expect(focusesOn(receiver, '/patients')).toEqual([`${fhir.url}/Patient/after`]);
  });

  it('sends a version that may be a create or an update (an opaque versionId) only to subscriptions that take both', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-topics-'));
    cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
    const topic = (id: string, interactions: string[]) => ({
      resourceType: 'SubscriptionTopic',
      id,
      url: `https://fhir-subscription-broker.org/fhir/SubscriptionTopic/${id}`,
      status: 'active',
      resourceTrigger: [
        { resource: 'http://hl7.org/fhir/StructureDefinition/Patient', supportedInteraction: interactions },
      ],
    });
    writeFileSync(join(dir, 'created.json'), JSON.stringify(topic('patient-created', ['create'])));
    writeFileSync(join(dir, 'written.json'), JSON.stringify(topic('patient-written', ['create', 'update'])));
    const { t, fhir, receiver } = await setup({ BROKER_TOPICS_DIR: dir });
    await active(t, await t.create(topicSubscription('patient-created', `${receiver.url}/created`)));
    await active(t, await t.create(topicSubscription('patient-written', `${receiver.url}/written`)));
    await reconcilerOf(t).run();
    await tick();
    fhir.put(at(patient('counted')));
    fhir.put({ ...patient('opaque'), meta: { versionId: 'b3f1c2d4-9e8f', lastUpdated: new Date().toISOString() } });
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 3 });
    await receiver.waitFor(() => focusesOn(receiver, '/written').length === 2, 'both to the create-and-update topic');
    await receiver.waitFor(() => focusesOn(receiver, '/created').length === 1, 'the counted create');
    expect(focusesOn(receiver, '/created')).toEqual([`${fhir.url}/Patient/counted`]);
  });

  it('keeps resource ids out of the log', async () => {
    const { t, fhir, receiver } = await watching();
    fhir.put(at(patient('mrn-0012345')));
    await tick();
    expect(await reconcilerOf(t).run()).toMatchObject({ notifications: 1 });
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the notification');
    expect(t.logger.records.filter((r) => JSON.stringify(r).includes('mrn-0012345'))).toEqual([]);
  });
});

describe('reconciliation that cannot do a window at once', () => {
  const observation = (id: string) => ({ resourceType: 'Observation', id, status: 'final', code: { text: 'x' } });

  it('keeps each type’s progress: a run stopped in one type does not search the types done again', async () => {
    const { t, fhir, receiver } = await watching({ pageSize: 1, observations: true });
    const changedAt = Date.now();
    fhir.put(at(observation('o1'), new Date(changedAt).toISOString()));
    fhir.put(at(patient('p1'), new Date(changedAt).toISOString()));
    fhir.put(at(patient('p2'), new Date(changedAt).toISOString()));
    await tick();
    const stop = new AbortController();
    fhir.respond = (req) => {
      if (req.path === '/fhir/Patient' && req.query.includes('_page=2')) stop.abort();
      return undefined;
    };
    // Observation first (types in order), then Patient, stopped on its second page.
    expect(await reconcilerOf(t).run({ signal: stop.signal })).toMatchObject({ found: 2, notifications: 2 });
    fhir.respond = () => undefined;
    const before = fhir.requests.length;
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 1 });
    const since = (path: string) =>
      fhir.requests
        .slice(before)
        .filter((r) => r.path === path)
        .map((r) => Date.parse(new URLSearchParams(r.query).getAll('_lastUpdated')[0]?.slice(2) ?? ''));
    // Observation goes on from where its window ended; Patient does its window again.
    expect(since('/fhir/Observation')).toHaveLength(1);
    expect(since('/fhir/Observation')[0]).toBeGreaterThan(changedAt);
    expect(since('/fhir/Patient').length).toBeGreaterThan(0);
    expect(since('/fhir/Patient').every((s) => s <= changedAt)).toBe(true);
    await receiver.waitFor(
      () => focusesOn(receiver, '/patients').length === 2 && focusesOn(receiver, '/observations').length === 1,
      'each change once',
    );
  });

  it('asks for smaller pages when a page is larger than 8 MiB, down to one resource a page', async () => {
    const { t, fhir, receiver } = await watching();
    fhir.put(at(patient('p1')));
    fhir.put(at(patient('p2')));
    await tick();
    fhir.body = (req) =>
      Number(new URLSearchParams(req.query).get('_count')) >= 50 ? 'x'.repeat(9 * 1024 * 1024) : undefined;
    expect(await reconcilerOf(t).run()).toMatchObject({ found: 2, notifications: 2 });
    expect(
      fhir.requests.filter((r) => r.path === '/fhir/Patient').map((r) => new URLSearchParams(r.query).get('_count')),
    ).toEqual(['100', '50', '25']);
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 2, 'both');
  });

  it('searches a window that keeps changing while it is paged in shorter windows, then skips it, and goes on with the other types', async () => {
    const { t, fhir, receiver } = await watching({ pageSize: 1, observations: true });
    for (let i = 0; i < 200; i++) fhir.put(at(observation(`o${i}`)));
    fhir.put(at(patient('p1')));
    await tick();
    let moved = 0;
    fhir.respond = (req) => {
      // Each second page of an Observation search: one of them changes again, out of the window.
      if (req.path === '/fhir/Observation' && req.query.includes('_page=2')) {
        fhir.put(at(observation(`o${moved++}`), new Date(Date.now() + 3_600_000).toISOString()));
      }
      return undefined;
    };
    const report = await reconcilerOf(t).run();
    expect(report.notifications).toBeGreaterThanOrEqual(1);
    await receiver.waitFor(() => focusesOn(receiver, '/patients').length === 1, 'the Patient');
    const text = await metrics(t);
    expect(metric(text, 'broker_reconcile_runs_total{outcome="failed"}')).toBe(0);
    expect(metric(text, 'broker_reconcile_searches_refused_total')).toBe(1);
    const skipped = t.logger.records.find(
      (r) => r.msg === 'reconciliation skips a type for one window: the FHIR server refuses its search',
    );
    expect(String(skipped?.reason)).toContain('kept changing while it was paged');
  });
});

describe('a window too large for one run', () => {
  it('is halved for the next run, in whatever process: the halving is stored with the window start', async () => {
    const { dir, fhir, receiver } = await acrossBrokers();
    fhir.pageSize = 1;
    const env = { BROKER_DATA_DIR: dir, BROKER_FHIR_READ: fhir.url, BROKER_RECONCILE_EVERY: '5m' };
    // The checkpoint three hours back (a broker with a three-hour lag ran first).
    const first = await inProcessBroker({ ...env, BROKER_RECONCILE_LAG: '3h' });
    await active(first, await first.create(topicSubscription('patient-change', `${receiver.url}/patients`)));
    await reconcilerOf(first).run();
    await first.broker.close(0);
    const checkpoint = Date.now() - 3 * 3_600_000;
    // Two changes in the first hour-long window: two pages; a run has time for one.
    fhir.put(at(patient('r1'), new Date(checkpoint + 10 * 60_000).toISOString()));
    fhir.put(at(patient('r2'), new Date(checkpoint + 40 * 60_000).toISOString()));

    const second = await inProcessBroker({ ...env, BROKER_RECONCILE_LAG: '0s' });
    const stop = new AbortController();
    fhir.respond = (req) => {
      if (req.query.includes('_page=2')) stop.abort();
      return undefined;
    };
    expect(await reconcilerOf(second).run({ signal: stop.signal })).toMatchObject({ found: 1 });
    await second.broker.close(0);

    // Another process: its first window is the half hour that holds r1 alone, then r2's.
    const third = await inProcessBroker({ ...env, BROKER_RECONCILE_LAG: '0s' });
    cleanups.push(() => third.broker.close(0));
    const before = fhir.requests.length;
    const report = await reconcilerOf(third).run({ signal: new AbortController().signal });
    expect(report).toMatchObject({ found: 2 });
    expect(fhir.requests.slice(before).some((r) => r.query.includes('_page=2'))).toBe(false);
    const bounds = fhir.requests
      .slice(before)
      .map((r) => new URLSearchParams(r.query).getAll('_lastUpdated').map((v) => Date.parse(v.slice(2))));
    expect(((bounds[0]?.[1] ?? 0) - (bounds[0]?.[0] ?? 0)) / 60_000).toBeCloseTo(30, 0);
  });
});

describe('a window stopped in every run', () => {
  it('comes down to a second, then is given up, said and counted, so its type moves on', async () => {
    const { t, fhir } = await watching({ pageSize: 1 });
    const now = new Date().toISOString();
    // Two changes in one millisecond: two pages however short the window; a run has time for one.
    for (const id of ['r1', 'r2']) fhir.put({ resourceType: 'Patient', id, meta: { lastUpdated: now } });
    await tick();
    const reports = [];
    for (let i = 0; i < 6; i++) {
      const stop = new AbortController();
      fhir.respond = (req) => {
        if (req.query.includes('_page=2')) stop.abort();
        return undefined;
      };
      reports.push(await reconcilerOf(t).run({ signal: stop.signal }));
    }
    const given = t.logger.records.filter(
      (r) => r.msg === 'reconciliation skips a type for one window: the FHIR server refuses its search',
    );
    expect(given).toHaveLength(1);
    expect(String(given[0]?.reason)).toContain('the window was not done in 3 runs');
    // The checkpoint moved past the window given up.
    expect(reports.at(-1)?.to).toBeGreaterThan(Date.parse(now));
  });
});
