import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Webhook } from 'standardwebhooks';
import { afterEach, describe, expect, it } from 'vitest';
import type { BrokerOverrides } from '../src/broker.js';
import type { LifecycleEvent } from '../src/core/lifecycle.js';
import {
  eventLike,
  eventNumbers,
  focusOf,
  type Json,
  notifiedNumbers,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { inProcessBroker, secretOf, type TestBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * Delivery that loses nothing: retries through 503s, timeouts and refused connections; 410 turns a
 * subscription off; an endpoint that never recovers is dead-lettered without slowing its
 * neighbours; re-activation re-queues; $events fills gaps; signatures survive secret rotation.
 */

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const timeoutExt = (seconds: number) => ({
  extension: [{ url: `${BACKPORT}/backport-timeout`, valueUnsignedInt: seconds }],
});

const heartbeatEverySecond = { extension: [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 1 }] };

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(
  env: Record<string, string> = {},
  overrides: BrokerOverrides = {},
): Promise<{ t: TestBroker; receiver: Receiver }> {
  const receiver = await Receiver.start();
  const t = await inProcessBroker({ BROKER_RETRY_DELAYS: '20ms,20ms,20ms,20ms,20ms,20ms', ...env }, overrides);
  cleanups.push(
    () => receiver.close(),
    () => t.broker.close(0),
  );
  return { t, receiver };
}

/** A wall clock the test steps: the real time plus the steps made so far. */
function steppedClock(): { readonly clock: { now(): number }; step(ms: number): void } {
  let offset = 0;
  return {
    clock: { now: () => Date.now() + offset },
    step: (ms) => {
      offset += ms;
    },
  };
}

const patientEvents = (prefix: string, n: number) =>
  Array.from({ length: n }, (_, i) =>
    eventLike('healthlake-update-patient', `${prefix}-${i + 1}`, `${prefix}-p${i + 1}`),
  );

const bundlesOn = (receiver: Receiver, path: string) => receiver.on(path).map((r) => JSON.parse(r.body) as Json);
const notificationsOn = (receiver: Receiver, path: string) =>
  bundlesOn(receiver, path).filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification');

describe('retries', () => {
  it('delivers everything, in order and signed, to an endpoint that fails for a while then recovers', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/flaky`, { channel: timeoutExt(1) }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    // After the handshake: two 503s, one answer slower than the 1 s timeout, then health.
    let failures = 0;
    receiver.respond = (req) => {
      if (!req.body.includes('event-notification')) return { status: 204 };
      failures++;
      if (failures <= 2) return { status: 503 };
      if (failures === 3) return { status: 204, delayMs: 1500 };
      return { status: 204 };
    };
    await t.post(patientEvents('flaky', 5));
    await receiver.waitFor(() => notificationsOn(receiver, '/flaky').length >= 5, 'five notifications');
    // The slow answer (204 after the timeout) is recorded by the receiver too: at-least-once.
    const numbers = notifiedNumbers(receiver.on('/flaky'));
    expect([...new Set(numbers)]).toEqual([1, 2, 3, 4, 5]);
    expect(numbers).toEqual([...numbers].sort((a, b) => a - b));
    const wh = new Webhook(secretOf(sub));
    for (const r of [...receiver.requests, ...receiver.failures]) {
      expect(() => wh.verify(r.body, r.headers as Record<string, string>)).not.toThrow();
    }
    // Every attempt of one notification carries the same webhook-id.
    const ids = [...receiver.failures, ...receiver.requests]
      .filter((r) => r.body.includes('"event-number"') && eventNumbers(JSON.parse(r.body)).includes(1))
      .map((r) => r.headers['webhook-id']);
    expect(ids.length).toBeGreaterThanOrEqual(3);
    expect(new Set(ids).size).toBe(1);
    expect(t.broker.metrics.value('broker_notifications_total', { outcome: 'retried' })).toBeGreaterThanOrEqual(3);
    const status = await t.call('GET', `/fhir/Subscription/${sub.id}/$status`);
    expect(statusOf(status.body).params.get('events-since-subscription-start')?.valueString).toBe('5');
    expect(statusOf(status.body).params.get('status')?.valueCode).toBe('active');
  });

  it('retries a refused connection until the endpoint comes back', async () => {
    const { t } = await setup({ BROKER_RETRY_DELAYS: '100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms' });
    const bodies: string[] = [];
    let onBody = (): void => {};
    const listen = async (port: number) => {
      const server = createServer((req, res) => {
        const chunks: Buffer[] = [];
        req.on('data', (c: Buffer) => chunks.push(c));
        req.on('end', () => {
          bodies.push(Buffer.concat(chunks).toString('utf8'));
          res.writeHead(204).end();
          onBody();
        });
      });
      await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
      return server;
    };
    const first = await listen(0);
    const port = (first.address() as AddressInfo).port;
    const sub = await t.create(topicSubscription('patient-change', `http://127.0.0.1:${port}/back`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    first.closeAllConnections();
    await new Promise((r) => first.close(r));

    await t.post(patientEvents('refused', 3));
    await t.logger.waitFor(
      (r) => r.msg === 'delivery failed' && r.error === 'connection failed (ECONNREFUSED)',
      'a refused attempt',
    );
    const second = await listen(port);
    cleanups.push(async () => {
      second.closeAllConnections();
      second.close();
    });
    const done = () =>
      bodies.filter((b) => b.includes('event-notification')).flatMap((b) => eventNumbers(JSON.parse(b)));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('timed out waiting for three notifications')), 15_000);
      onBody = () => {
        if (done().length < 3) return;
        clearTimeout(timer);
        resolve();
      };
      onBody();
    });
    expect(done()).toEqual([1, 2, 3]);
    expect(t.broker.metrics.value('broker_notifications_total', { outcome: 'retried' })).toBeGreaterThanOrEqual(1);
  });

  it('never lets Retry-After extend the schedule or shorten a pause', async () => {
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '20ms,20ms' });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/busy`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    receiver.respond = () => ({ status: 503, headers: { 'retry-after': '0' } });
    await t.post(patientEvents('busy', 1));
    const failed = await t.logger.waitForStatus(sub.id as string, 'error');
    expect(failed.reason).toBe('delivery failed after 3 attempt(s): HTTP 503');
    expect(receiver.failures).toHaveLength(3);
  });

  it('honours Retry-After', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/later`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    receiver.answerOnce(() => true, { status: 429, headers: { 'retry-after': '1' } });
    await t.post(patientEvents('ra', 1));
    await receiver.waitFor(() => receiver.requests.length >= 2, 'the retry');
    const [refused] = receiver.failures;
    const retried = receiver.requests[1];
    expect((retried?.at ?? 0) - (refused?.at ?? 0)).toBeGreaterThanOrEqual(900);
  });
});

describe('handshake retries', () => {
  const handshakesOn = (receiver: Receiver, path: string) =>
    receiver.arrived.filter((r) => r.path === path && r.body.includes('"handshake"'));
  const retriesLogged = (t: TestBroker, id: string) =>
    t.logger.records.filter((r) => r.msg === 'handshake failed; tried again' && r.subscription === id);

  it('tries a handshake again when nobody listened yet, as a test kit that starts listening after the 201', async () => {
    // The default schedule: again after 1 s. The endpoint fails the first handshake (Inferno's
    // answers 500 until it has stored its wait, which it does once the create has returned).
    const { t, receiver } = await setup();
    receiver.respond = () => (receiver.arrived.length === 1 ? { status: 500 } : { status: 204 });
    // As the kit sends it: its sample's Authorization, then its own appended.
    const header = ['Authorization: Bearer SAMPLE_TOKEN', 'Authorization: Bearer inferno-token'];
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/late`, { channel: { header } }));
    const id = sub.id as string;
    // The last value of a header given twice is the one kept and sent.
    expect((sub.channel as Json).header).toEqual(['Authorization: Bearer inferno-token']);
    await t.logger.waitFor((r) => r.msg === 'handshake failed; tried again' && r.subscription === id, 'a retry');
    // Still `requested` while it waits, with no error to show.
    const waiting = await t.call('GET', `/fhir/Subscription/${id}`);
    expect([waiting.body.status, waiting.body.error]).toEqual(['requested', undefined]);
    await t.logger.waitForStatus(id, 'active', 5_000);
    // Two handshakes: the first answered 500, the second 204.
    expect(handshakesOn(receiver, '/late').map((r) => r.headers.authorization)).toEqual([
      'Bearer inferno-token',
      'Bearer inferno-token',
    ]);
    expect(receiver.failures.map((r) => r.path)).toEqual(['/late']);
    const [retry] = retriesLogged(t, id);
    expect(retry).toMatchObject({ level: 'warn', error: 'HTTP 500' });
    expect(retry?.retryInMs).toBeGreaterThan(0);
    expect(retry?.retryInMs).toBeLessThanOrEqual(1000);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'retried' })).toBe(1);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'ok' })).toBe(1);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'failed' })).toBe(0);
    // Then it delivers as any active subscription.
    await t.post(patientEvents('late', 1));
    await receiver.waitFor(() => notificationsOn(receiver, '/late').length === 1, 'the notification');
  });

  it('leaves a handshake due again to its timer when the dispatcher starts meanwhile, as each AWS run does', async () => {
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '600ms' });
    receiver.respond = () => (receiver.arrived.length === 1 ? { status: 500 } : { status: 204 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/owed`));
    const id = sub.id as string;
    await t.logger.waitFor((r) => r.msg === 'handshake failed; tried again' && r.subscription === id, 'a retry');
    // A start sends the handshakes still owed, but not this one: it is due at 600 ms.
    await t.broker.start();
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(handshakesOn(receiver, '/owed')).toHaveLength(1);
    await t.logger.waitForStatus(id, 'active');
    expect(handshakesOn(receiver, '/owed')).toHaveLength(2);
  });

  it('counts the schedule on the monotonic clock: a wall clock stepped back an hour neither holds nor repeats it', async () => {
    const wall = steppedClock();
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '300ms,300ms' }, { clock: wall.clock });
    receiver.respond = () => ({ status: 503 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/stepped`));
    wall.step(-3_600_000);
    // Three attempts, as without the step, then `error`: not one every 300 ms for the hour.
    const failed = await t.logger.waitForStatus(sub.id as string, 'error');
    expect(failed.reason).toBe('handshake failed: HTTP 503');
    expect(handshakesOn(receiver, '/stepped')).toHaveLength(3);
  });

  it('sends at a start a handshake whose retry is due, as a thawed AWS container’s run does', async () => {
    const wall = steppedClock();
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '5s' }, { clock: wall.clock });
    receiver.respond = () => (receiver.arrived.length === 1 ? { status: 500 } : { status: 204 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/thawed`));
    const id = sub.id as string;
    await t.logger.waitFor((r) => r.msg === 'handshake failed; tried again' && r.subscription === id, 'a retry');
    // The container was frozen past the retry's time: its timer has not fired, the run's start sends it.
    wall.step(10_000);
    await t.broker.start();
    await t.logger.waitForStatus(id, 'active', 2_000);
    expect(handshakesOn(receiver, '/thawed')).toHaveLength(2);
  });

  it('keeps to the schedule when its timers fire early (a busy event loop), one attempt per step', async () => {
    // Timers count from the event loop's cached time: after a long turn they fire early by as much.
    // Here every timer of 250–350 ms fires 120 ms early, as after a 120 ms turn.
    const real = globalThis.setTimeout;
    const early = ((fn: () => void, ms?: number) =>
      real(fn, ms !== undefined && ms >= 250 && ms <= 350 ? ms - 120 : ms)) as typeof setTimeout;
    globalThis.setTimeout = early;
    try {
      const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '300ms,300ms' });
      receiver.respond = () => ({ status: 503 });
      const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/early`));
      const failed = await t.logger.waitForStatus(sub.id as string, 'error');
      expect(failed.reason).toBe('handshake failed: HTTP 503');
      const arrivals = handshakesOn(receiver, '/early').map((r) => r.at);
      expect(arrivals).toHaveLength(3);
      // Each retry at its step (300 ms, 600 ms after the subscription was requested), not early.
      const requested = Date.parse((sub.meta as { lastUpdated: string }).lastUpdated);
      expect((arrivals[1] as number) - requested).toBeGreaterThanOrEqual(295);
      expect((arrivals[2] as number) - requested).toBeGreaterThanOrEqual(595);
    } finally {
      globalThis.setTimeout = real;
    }
  });

  it('gives up once the schedule is over: error with the last reason', async () => {
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '300ms,300ms' });
    receiver.respond = () => ({ status: 503 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/down`));
    const id = sub.id as string;
    const failed = await t.logger.waitForStatus(id, 'error');
    expect(failed.reason).toBe('handshake failed: HTTP 503');
    expect(handshakesOn(receiver, '/down')).toHaveLength(3);
    expect(retriesLogged(t, id)).toHaveLength(2);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'retried' })).toBe(2);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'failed' })).toBe(1);
    // What an operator alerts on: subscriptions in error, whoever's they are.
    const text = await t.broker.metrics.render();
    for (const [status, n] of [
      ['requested', 0],
      ['active', 0],
      ['error', 1],
      ['off', 0],
    ] as const) {
      expect(text).toContain(`broker_subscriptions_by_status{status="${status}"} ${n}\n`);
    }
    // Nothing more after the error.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(handshakesOn(receiver, '/down')).toHaveLength(3);
    expect((await t.call('DELETE', `/fhir/Subscription/${id}`)).status).toBe(204);
    expect(await t.broker.metrics.render()).toContain('broker_subscriptions_by_status{status="error"} 0\n');
  });

  it('drops the old schedule when the client moves the endpoint or deletes the subscription meanwhile', async () => {
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '400ms' });
    receiver.respond = (req) => (req.path.startsWith('/old') ? { status: 500 } : { status: 204 });
    const moved = await t.create(topicSubscription('patient-change', `${receiver.url}/old-1`));
    const deleted = await t.create(topicSubscription('patient-change', `${receiver.url}/old-2`));
    const [movedId, deletedId] = [moved.id as string, deleted.id as string];
    await t.logger.waitFor((r) => r.msg === 'handshake failed; tried again' && r.subscription === movedId, 'a retry');
    await t.logger.waitFor((r) => r.msg === 'handshake failed; tried again' && r.subscription === deletedId, 'a retry');
    const read = await t.call('GET', `/fhir/Subscription/${movedId}`);
    const put = await t.call('PUT', `/fhir/Subscription/${movedId}`, {
      ...read.body,
      channel: { ...(read.body.channel as Json), endpoint: `${receiver.url}/new` },
    });
    expect(put.status).toBe(200);
    expect((await t.call('DELETE', `/fhir/Subscription/${deletedId}`)).status).toBe(204);
    await t.logger.waitForStatus(movedId, 'active');
    // Past when the old endpoints' retries were due: neither was tried again.
    await new Promise((resolve) => setTimeout(resolve, 800));
    expect(handshakesOn(receiver, '/old-1')).toHaveLength(1);
    expect(handshakesOn(receiver, '/old-2')).toHaveLength(1);
    expect(handshakesOn(receiver, '/new')).toHaveLength(1);
  });
});

describe('a pause an origin asks for', () => {
  it('holds the client’s other subscriptions at that origin without spending their attempts, not another client’s', async () => {
    const { t, receiver } = await setup();
    const at = (path: string, id: string, token?: string) =>
      t.create(
        topicSubscription('patient-change', `${receiver.url}${path}`, { filters: [`Patient?_id=${id}`] }),
        token,
      );
    const limited = await at('/a', 'a-p');
    const neighbour = await at('/b', 'bc-p');
    const otherClient = await at('/c', 'bc-p', TOKENS.bob);
    for (const sub of [limited, neighbour, otherClient]) await t.logger.waitForStatus(sub.id as string, 'active');
    const notifications = (path: string) => receiver.on(path).filter((r) => r.body.includes('"event-notification"'));
    receiver.answerOnce((r) => r.path === '/a' && r.body.includes('"event-notification"'), {
      status: 429,
      headers: { 'retry-after': '3' },
    });

    await t.post([eventLike('healthlake-update-patient', 'pause-1', 'a-p')]);
    const paused = await t.logger.waitFor((r) => r.msg === 'endpoint origin asked for a pause', 'the pause');
    expect([paused.subscription, paused.owner, paused.origin, paused.status, paused.pauseMs]).toEqual([
      limited.id,
      'alice',
      new URL(receiver.url).origin,
      429,
      3000,
    ]);
    const refusedAt = (receiver.failures[0] as { at: number }).at;
    await t.post([eventLike('healthlake-update-patient', 'pause-2', 'bc-p')]);
    // A subscription the client creates there meanwhile: its handshake waits out the pause too.
    const late = await at('/late', 'late-p');
    // (The refused request is in `failures`, not among the 2xx ones `on` lists.)
    await receiver.waitFor(() => notifications('/a').length === 1 && notifications('/b').length === 1, 'both', 10_000);
    // The neighbour at the same origin waited out the pause, and sent once: no attempt spent on it.
    expect((notifications('/b')[0]?.at ?? 0) - refusedAt).toBeGreaterThanOrEqual(2_900);
    expect((notifications('/a')[0]?.at ?? 0) - refusedAt).toBeGreaterThanOrEqual(2_900);
    expect(receiver.failures.map((r) => r.path)).toEqual(['/a']);
    expect(t.broker.metrics.value('broker_origin_pauses_total')).toBe(1);
    // Another client's subscription at the same origin was not held.
    expect(notifications('/c')).toHaveLength(1);
    expect((notifications('/c')[0]?.at ?? 0) - refusedAt).toBeLessThan(2_900);
    await t.logger.waitForStatus(late.id as string, 'active', 10_000);
    expect((receiver.on('/late')[0]?.at ?? 0) - refusedAt).toBeGreaterThanOrEqual(2_900);
    const events = await t.call('GET', `/fhir/Subscription/${neighbour.id}/$status`);
    expect(statusOf(events.body).params.get('events-since-subscription-start')?.valueString).toBe('1');
  });

  it('holds heartbeats too, and holds neighbours at most 10 minutes however long the pause asked for', async () => {
    const { t, receiver } = await setup();
    const limited = await t.create(
      topicSubscription('patient-change', `${receiver.url}/limited`, { filters: ['Patient?_id=l-p'] }),
    );
    const beating = await t.create(
      topicSubscription('patient-change', `${receiver.url}/beating`, {
        filters: ['Patient?_id=none'],
        channel: heartbeatEverySecond,
      }),
    );
    for (const sub of [limited, beating]) await t.logger.waitForStatus(sub.id as string, 'active');
    const heartbeats = () =>
      bundlesOn(receiver, '/beating').filter((b) => statusOf(b).params.get('type')?.valueCode === 'heartbeat');
    await receiver.waitFor(() => heartbeats().length >= 1, 'a first heartbeat', 5_000);
    receiver.answerOnce((r) => r.path === '/limited' && r.body.includes('"event-notification"'), {
      status: 503,
      headers: { 'retry-after': '3600' },
    });
    await t.post([eventLike('healthlake-update-patient', 'hold-1', 'l-p')]);
    const paused = await t.logger.waitFor((r) => r.msg === 'endpoint origin asked for a pause', 'the pause');
    expect([paused.status, paused.pauseMs]).toEqual([503, 600_000]);
    // (A heartbeat already on the wire when the pause began lands first.)
    await new Promise((resolve) => setTimeout(resolve, 200));
    const before = receiver.on('/beating').length;
    // Three heartbeat periods: none goes to the paused origin.
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    expect(receiver.on('/beating').length).toBe(before);
    expect(t.broker.metrics.value('broker_origin_pauses_total')).toBe(1);
  });
});

describe('giving up', () => {
  it('turns the subscription off when the endpoint answers 410 Gone', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/gone`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    receiver.respond = () => ({ status: 410 });
    await t.post(patientEvents('gone', 1));
    await t.logger.waitForStatus(sub.id as string, 'off');
    const read = await t.call('GET', `/fhir/Subscription/${sub.id}`);
    expect([read.body.status, read.body.error]).toEqual(['off', 'endpoint answered 410 Gone']);
    expect(receiver.failures.length).toBe(1);
  });

  it('dead-letters after the schedule, sets error with the reason, and never delays a healthy neighbour', async () => {
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '100ms,100ms,100ms' });
    const bad = await t.create(topicSubscription('patient-change', `${receiver.url}/down`, { channel: timeoutExt(1) }));
    const good = await t.create(topicSubscription('patient-change', `${receiver.url}/up`));
    await t.logger.waitForStatus(bad.id as string, 'active');
    await t.logger.waitForStatus(good.id as string, 'active');
    // The bad endpoint hangs past its timeout on every notification (and then fails anyway). Its 503
    // comes 3 s late: well past the 1 s timeout even when undici's coarse timers fire it ~0.5 s late
    // on a loaded machine (at 1.5 s the 503 could win the race and change the recorded reason).
    receiver.respond = (req) => (req.path === '/down' ? { status: 503, delayMs: 3000 } : { status: 204 });
    await t.post(patientEvents('dl', 20));
    // The healthy subscriber has all twenty while the bad one is still on its first attempt.
    await receiver.waitFor(() => notificationsOn(receiver, '/up').length === 20, 'healthy subscriber');
    expect(receiver.on('/down').filter((r) => r.body.includes('event-notification'))).toEqual([]);

    const failed = await t.logger.waitForStatus(bad.id as string, 'error', 20_000);
    expect(failed.reason).toBe('delivery failed after 4 attempt(s): timeout after 1000 ms');
    const read = await t.call('GET', `/fhir/Subscription/${bad.id}`);
    expect(read.body.error).toBe('delivery failed after 4 attempt(s): timeout after 1000 ms');
    const status = await t.call('GET', `/fhir/Subscription/${bad.id}/$status`);
    expect(statusOf(status.body).params.get('status')?.valueCode).toBe('error');
    expect(statusOf(status.body).params.get('error')?.valueCodeableConcept).toEqual({ text: read.body.error });
    expect(t.broker.metrics.value('broker_notifications_total', { outcome: 'dead-lettered' })).toBe(1);

    // The client fixes its endpoint and asks for the subscription back: handshake, then everything.
    receiver.respond = () => ({ status: 204 });
    await t.call('PUT', `/fhir/Subscription/${bad.id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/down`),
      id: bad.id,
      status: 'requested',
    });
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/down')).length >= 20, 'recovered');
    // The dead letter (event 1) comes first, then the rest, each once and in order.
    expect(notifiedNumbers(receiver.on('/down'))).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
  });
});

describe('per-origin limit', () => {
  it('never has more than BROKER_MAX_IN_FLIGHT_PER_ORIGIN requests on the wire to one origin', async () => {
    const { t, receiver } = await setup({ BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '2' });
    const subs: Json[] = [];
    for (let i = 0; i < 6; i++) subs.push(await t.create(topicSubscription('patient-change', `${receiver.url}/o${i}`)));
    for (const sub of subs) await t.logger.waitForStatus(sub.id as string, 'active');
    const holdMs = 250;
    receiver.respond = () => ({ status: 204, delayMs: holdMs });
    await t.post(eventLike('healthlake-update-patient', 'origin-1', 'origin-p1'));
    const notes = () => receiver.requests.filter((r) => r.body.includes('"event-notification"'));
    await receiver.waitFor(() => notes().length === 6, 'six notifications');
    // A third request can only start once one of the two before it was answered (held 250 ms).
    const arrivals = notes()
      .map((r) => r.at)
      .sort((a, b) => a - b);
    for (let i = 0; i + 2 < arrivals.length; i++) {
      expect((arrivals[i + 2] as number) - (arrivals[i] as number)).toBeGreaterThanOrEqual(holdMs - 5);
    }
    // ...and two did run at once.
    expect((arrivals[1] as number) - (arrivals[0] as number)).toBeLessThan(holdMs);
  });
});

describe('$events', () => {
  /** Each notification-event's `delivery` extension, as { sub-extension url: value }, by event number. */
  const deliveryOf = (bundle: Json): Map<number, Record<string, unknown>> => {
    const params = (((bundle.entry as Json[])[0]?.resource as Json | undefined)?.parameter ?? []) as Json[];
    const states = new Map<number, Record<string, unknown>>();
    for (const p of params.filter((q) => q.name === 'notification-event')) {
      const n = Number(((p.part as Json[]).find((q) => q.name === 'event-number') as Json).valueString);
      const [ext] = p.extension as Json[];
      expect(ext?.url).toBe('https://fhir-subscription-broker.org/fhir/StructureDefinition/delivery');
      const fields = ((ext?.extension ?? []) as Json[]).map((e) => {
        const key = Object.keys(e).find((k) => k.startsWith('value')) as string;
        return [e.url as string, e[key]] as const;
      });
      states.set(n, Object.fromEntries(fields));
    }
    return states;
  };
  /** `$events` once `ready` holds for its delivery states (they are written behind, within ~10 ms). */
  const eventsWhen = async (t: TestBroker, id: string, ready: (s: Map<number, Record<string, unknown>>) => boolean) => {
    const deadline = Date.now() + 5_000;
    for (;;) {
      const res = await t.call('GET', `/fhir/Subscription/${id}/$events`);
      if (ready(deliveryOf(res.body)) || Date.now() > deadline) return deliveryOf(res.body);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };

  it('says how each event’s delivery stands: delivered, or waiting for its next attempt and why', async () => {
    // The second attempt's retry is an hour off: the event is caught waiting for it.
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '20ms,1h' });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/states`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    await t.post(patientEvents('st-a', 1));
    await receiver.waitFor(() => notificationsOn(receiver, '/states').length === 1, 'event 1');
    receiver.respond = () => ({ status: 500 });
    const before = Date.now();
    await t.post(patientEvents('st-b', 1));
    const states = await eventsWhen(t, id, (s) => s.get(2)?.attempts === 2);
    expect(states.get(1)).toEqual({ state: 'delivered', attempts: 1 });
    const waiting = states.get(2) as Record<string, unknown>;
    expect(waiting).toMatchObject({ state: 'pending', attempts: 2, lastError: 'HTTP 500' });
    // Due about an hour on (±20 % jitter).
    expect(Date.parse(String(waiting.due)) - before).toBeGreaterThan(0.75 * 3_600_000);
  });

  it('says which events were dead-lettered and why, and that those after wait for a re-activation', async () => {
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '20ms' });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/dead`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    receiver.respond = () => ({ status: 503 });
    await t.post(patientEvents('dead-a', 1));
    await t.logger.waitForStatus(id, 'error');
    await t.post(patientEvents('dead-b', 1));
    const states = await eventsWhen(t, id, (s) => s.get(1)?.state === 'dead' && s.has(2));
    expect(states.get(1)).toEqual({ state: 'dead', attempts: 2, lastError: 'HTTP 503' });
    // Not tried while the subscription is in error: no attempt, nothing due.
    expect(states.get(2)).toEqual({ state: 'pending', attempts: 0 });
  });

  it('returns exactly the requested range of stored notifications', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/ev`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    await t.post(patientEvents('ev', 6));
    const res = await t.call('GET', `/fhir/Subscription/${sub.id}/$events?eventsSinceNumber=2&eventsUntilNumber=4`);
    expect(res.status).toBe(200);
    const { params, events } = statusOf(res.body);
    expect(params.get('type')?.valueCode).toBe('query-event');
    expect(events.map((e) => focusOf(e)?.split('/').pop())).toEqual(['ev-p2', 'ev-p3', 'ev-p4']);
    expect(eventNumbers(res.body)).toEqual([2, 3, 4]);
    const all = await t.call('GET', `/fhir/Subscription/${sub.id}/$events`);
    expect(eventNumbers(all.body)).toEqual([1, 2, 3, 4, 5, 6]);
    const empty = await t.call('GET', `/fhir/Subscription/${sub.id}/$events?eventsSinceNumber=7`);
    expect(eventNumbers(empty.body)).toEqual([]);
  });
});

describe('signatures', () => {
  it('signs with the old and the new secret for a day after a rotation', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/rot`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    const oldSecret = secretOf(sub);
    const newSecret = `whsec_${Buffer.alloc(32, 7).toString('base64')}`;
    const put = await t.call('PUT', `/fhir/Subscription/${sub.id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/rot`, {
        channel: {
          extension: [
            {
              url: 'https://fhir-subscription-broker.org/fhir/StructureDefinition/webhook-secret',
              valueString: newSecret,
            },
          ],
        },
      }),
      id: sub.id,
      status: 'active',
    });
    expect(put.status).toBe(200);
    expect(JSON.stringify(put.body)).not.toContain(newSecret);
    expect(put.body.status).toBe('active');
    await t.post(patientEvents('rot', 1));
    await receiver.waitFor(() => notificationsOn(receiver, '/rot').length === 1, 'notification');
    const r = receiver.on('/rot').at(-1);
    expect(String(r?.headers['webhook-signature']).split(' ')).toHaveLength(2);
    for (const secret of [oldSecret, newSecret]) {
      expect(() => new Webhook(secret).verify(r?.body ?? '', r?.headers as Record<string, string>)).not.toThrow();
    }
  });
});

describe('heartbeats', () => {
  it('sends heartbeats carrying the current status when nothing else was sent', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/hb`, {
        channel: { extension: [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 1 }] },
      }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    await receiver.waitFor(
      () => bundlesOn(receiver, '/hb').some((b) => statusOf(b).params.get('type')?.valueCode === 'heartbeat'),
      'a heartbeat',
    );
    const hb = bundlesOn(receiver, '/hb').find(
      (b) => statusOf(b).params.get('type')?.valueCode === 'heartbeat',
    ) as Json;
    expect(statusOf(hb).params.get('status')?.valueCode).toBe('active');
    expect(statusOf(hb).params.get('events-since-subscription-start')?.valueString).toBe('0');
    expect(statusOf(hb).events).toEqual([]);
  });

  const typesOn = (receiver: Receiver, path: string) =>
    receiver.arrived
      .filter((r) => r.path === path)
      .map((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode);

  it('sends no heartbeat to an endpoint whose handshake failed: it never consented', async () => {
    const { t, receiver } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: '300ms' });
    receiver.respond = (req) => (req.path === '/refused' ? { status: 503 } : { status: 204 });
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/refused`, { channel: heartbeatEverySecond }),
    );
    await t.logger.waitForStatus(sub.id as string, 'error');
    await new Promise((resolve) => setTimeout(resolve, 2_500));
    // Its handshake and the one retry: no heartbeat while it was `requested`, nor after.
    expect(typesOn(receiver, '/refused')).toEqual(['handshake', 'handshake']);
  });

  it('turns a subscription off when its handshake answers 410 Gone', async () => {
    const { t, receiver } = await setup();
    receiver.respond = () => ({ status: 410 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/gone`));
    await t.logger.waitForStatus(sub.id as string, 'off');
    const read = await t.call('GET', `/fhir/Subscription/${sub.id}`);
    expect(read.body).toMatchObject({ status: 'off', error: 'endpoint answered 410 Gone' });
    // Not tried again: a 410 is the endpoint's final word.
    expect(receiver.arrived.map((r) => r.path)).toEqual(['/gone']);
  });

  it('sends a heartbeat that fell due during a notification at once when that notification fails', async () => {
    // Retries far off: after the failure nothing else goes to the endpoint but heartbeats.
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '1h' });
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/hb-run`, {
        channel: { extension: [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 3 }] },
      }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    // The notification is answered 503 3.5 s after it arrives: the 3 s boundary passes while it is on the wire.
    const holdMs = 3_500;
    receiver.respond = (req) =>
      req.body.includes('event-notification') ? { status: 503, delayMs: holdMs } : { status: 204 };
    await t.post(patientEvents('hb-run', 1));
    await receiver.waitFor(
      () => typesOn(receiver, '/hb-run').filter((type) => type === 'heartbeat').length >= 1,
      'a heartbeat',
      10_000,
    );
    const arrived = receiver.arrived.filter((r) => r.path === '/hb-run');
    expect(arrived.map((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode)).toEqual([
      'handshake',
      'event-notification',
      'heartbeat',
    ]);
    const [, note, heartbeat] = arrived as [unknown, (typeof arrived)[number], (typeof arrived)[number]];
    // Right after the failure, not a whole period later (before the fix: ~2.5 s after it).
    const afterFailure = heartbeat.at - (note.at + holdMs);
    expect(afterFailure).toBeGreaterThanOrEqual(-50);
    expect(afterFailure).toBeLessThan(1_500);
  });

  it('turns a subscription off when a heartbeat answers 410 Gone, and sends none after', async () => {
    const { t, receiver } = await setup();
    receiver.respond = (req) => (req.body.includes('"heartbeat"') ? { status: 410 } : { status: 204 });
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/hb-gone`, { channel: heartbeatEverySecond }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    await t.logger.waitForStatus(sub.id as string, 'off');
    const read = await t.call('GET', `/fhir/Subscription/${sub.id}`);
    expect(read.body).toMatchObject({ status: 'off', error: 'endpoint answered 410 Gone' });
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    expect(typesOn(receiver, '/hb-gone')).toEqual(['handshake', 'heartbeat']);
  });
});

describe('heartbeats to an endpoint the SSRF guard came to refuse', () => {
  const REFUSED = 'endpoint refused: 127.0.0.1 is a loopback address';
  const heartbeatCounts = (t: TestBroker) =>
    Object.fromEntries(
      ['ok', 'failed', 'refused'].map((outcome) => [
        outcome,
        t.broker.metrics.value('broker_heartbeats_total', { outcome }),
      ]),
    );
  const heartbeatWarnings = (t: TestBroker) => t.logger.records.filter((r) => r.msg === 'heartbeat failed');

  /**
   * One data dir, restarted with the allow-list the operator has set now: the receiver is on
   * 127.0.0.1, which the guard refuses (loopback) once the allow-list no longer names it.
   */
  async function restartable() {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-hb-refused-'));
    const receiver = await Receiver.start();
    let current: TestBroker | undefined;
    cleanups.push(
      async () => rmSync(dir, { recursive: true, force: true }),
      () => receiver.close(),
      async () => current?.broker.close(0),
    );
    const restart = async (allowlist: string, lifecycle: LifecycleEvent[] = []): Promise<TestBroker> => {
      await current?.broker.close(0);
      current = undefined;
      current = await inProcessBroker(
        { BROKER_DATA_DIR: dir, BROKER_ENDPOINT_ALLOWLIST: allowlist },
        { lifecycle: { publish: (e) => lifecycle.push(e), flush: async () => {} } },
      );
      return current;
    };
    const body = topicSubscription('patient-change', `${receiver.url}/hb`, { channel: heartbeatEverySecond });
    const first = await restart('127.0.0.1');
    const id = (await first.create(body)).id as string;
    await first.logger.waitForStatus(id, 'active');
    await receiver.waitFor(() => receiver.arrived.some((r) => r.body.includes('"heartbeat"')), 'a heartbeat');
    return { receiver, restart, id, body };
  }

  it('puts the subscription in error with the guard reason, and tries no heartbeat after, across restarts', async () => {
    const { receiver, restart, id } = await restartable();
    const lifecycle: LifecycleEvent[] = [];
    const narrowed = await restart('', lifecycle);
    const arrived = receiver.arrived.length;
    const failed = await narrowed.logger.waitForStatus(id, 'error', 5_000);
    expect(failed).toMatchObject({ from: 'active', reason: `heartbeat failed: ${REFUSED}` });
    const read = await narrowed.call('GET', `/fhir/Subscription/${id}`);
    expect(read.body).toMatchObject({ status: 'error', error: `heartbeat failed: ${REFUSED}` });
    const status = await narrowed.call('GET', `/fhir/Subscription/${id}/$status`);
    expect(statusOf(status.body).params.get('error')?.valueCodeableConcept).toEqual({ text: read.body.error });
    expect(lifecycle).toEqual([
      expect.objectContaining({
        type: 'Subscription Status Changed',
        subscriptionId: id,
        from: 'active',
        to: 'error',
        reason: `heartbeat failed: ${REFUSED}`,
      }),
    ]);
    // Three more heartbeat periods: nothing attempted, counted or logged after the refusal.
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    expect(heartbeatCounts(narrowed)).toEqual({ ok: 0, failed: 0, refused: 1 });
    expect(heartbeatWarnings(narrowed)).toEqual([expect.objectContaining({ subscription: id, error: REFUSED })]);
    expect(receiver.arrived.length).toBe(arrived);

    // Restarted again: the refusal was kept with the subscription, so its heartbeats stay stopped.
    const again = await restart('');
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    expect(heartbeatCounts(again)).toEqual({ ok: 0, failed: 0, refused: 0 });
    expect(heartbeatWarnings(again)).toEqual([]);
    expect((await again.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('error');
  });

  it('stops the heartbeats of a subscription already in error after its deliveries failed', async () => {
    const { restart, id } = await restartable();
    const narrowed = await restart('');
    // Before the first heartbeat (a period after the start): the notification is refused and dead-lettered.
    await narrowed.post(patientEvents('refused', 1));
    const dead = await narrowed.logger.waitForStatus(id, 'error', 5_000);
    expect(dead.reason).toBe(`delivery failed after 1 attempt(s): ${REFUSED}`);
    // Heartbeats still go to a subscription in error after failed deliveries: the first one is refused.
    const stopped = await narrowed.logger.waitForStatus(id, 'error', 5_000, narrowed.logger.records.indexOf(dead) + 1);
    expect(stopped).toMatchObject({ from: 'error', reason: `heartbeat failed: ${REFUSED}` });
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    expect(heartbeatCounts(narrowed)).toEqual({ ok: 0, failed: 0, refused: 1 });
    expect(narrowed.broker.metrics.value('broker_notifications_total', { outcome: 'dead-lettered' })).toBe(1);
  });

  it('comes back by re-activation: its handshake fails while still refused, heartbeats resume once allowed', async () => {
    const { receiver, restart, id, body } = await restartable();
    const narrowed = await restart('');
    await narrowed.logger.waitForStatus(id, 'error', 5_000);
    const reactivate = async (t: TestBroker) => {
      const since = t.logger.mark();
      const put = await t.call('PUT', `/fhir/Subscription/${id}`, { ...body, id, status: 'requested' });
      expect(put.status).toBe(200);
      return since;
    };
    const since = await reactivate(narrowed);
    const failed = await narrowed.logger.waitForStatus(id, 'error', 5_000, since);
    expect(failed).toMatchObject({ from: 'requested', reason: `handshake failed: ${REFUSED}` });

    const widened = await restart('127.0.0.1');
    const heartbeats = () => receiver.arrived.filter((r) => r.body.includes('"heartbeat"'));
    const before = heartbeats().length;
    await widened.logger.waitForStatus(id, 'active', 5_000, await reactivate(widened));
    await receiver.waitFor(() => heartbeats().length > before, 'a heartbeat after re-activation');
    const resumed = JSON.parse(heartbeats()[before]?.body ?? '{}') as Json;
    expect(statusOf(resumed).params.get('status')?.valueCode).toBe('active');
  });
});

describe('clock steps', () => {
  it('retries on time when the wall clock steps back an hour meanwhile', async () => {
    const wall = steppedClock();
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '300ms,300ms' }, { clock: wall.clock });
    receiver.answerOnce((req) => req.body.includes('"event-notification"'), { status: 503 });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/stepped`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    await t.post(patientEvents('stepped', 1));
    // The retry is scheduled (its due time stored) before the clock steps.
    await t.logger.waitFor((r) => r.msg === 'delivery failed', 'the refused first attempt');
    wall.step(-3_600_000);
    await t.post(patientEvents('stepped-later', 1));
    await receiver.waitFor(() => notificationsOn(receiver, '/stepped').length >= 2, 'both notifications', 5_000);
    expect(notificationsOn(receiver, '/stepped').flatMap(eventNumbers)).toEqual([1, 2]);
  });

  it('keeps the heartbeats going when the wall clock steps back an hour', async () => {
    const wall = steppedClock();
    const { t, receiver } = await setup({}, { clock: wall.clock });
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/stepped-hb`, { channel: heartbeatEverySecond }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    const heartbeats = () => receiver.on('/stepped-hb').filter((r) => r.body.includes('"heartbeat"')).length;
    await receiver.waitFor(() => heartbeats() >= 1, 'a heartbeat');
    // Answered, and the next one scheduled, before the step.
    await new Promise((resolve) => setTimeout(resolve, 300));
    wall.step(-3_600_000);
    const before = heartbeats();
    // Every second still (it had waited the hour out).
    await receiver.waitFor(() => heartbeats() >= before + 2, 'two more heartbeats', 5_000);
  });
});

describe('duplicates', () => {
  it('delivers once an event EventBridge delivered twice (one id), and each event of its own id', async () => {
    const { t, receiver } = await setup();
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/twice`));
    await t.logger.waitForStatus(sub.id as string, 'active');
    const event = eventLike('healthlake-update-patient', 'twice-1', 'twice-p');
    expect(await t.post(event)).toMatchObject({ accepted: 1, duplicates: 0 });
    // The same id again, even with another CloudTrail eventID: the same event (ARCHITECTURE.md).
    const detail = { ...(event.detail as Json), eventID: 'another-call' };
    expect(await t.post({ ...event, detail })).toMatchObject({ accepted: 0, duplicates: 1 });
    // A copy under a new id (as a sender makes events from a sample): another event, same eventID or not.
    expect(await t.post({ ...event, id: 'twice-2' })).toMatchObject({ accepted: 1, duplicates: 0 });
    await receiver.waitFor(() => notificationsOn(receiver, '/twice').length >= 2, 'the notifications');
    await t.broker.dispatcher.idle(5_000);
    expect(notificationsOn(receiver, '/twice').flatMap(eventNumbers)).toEqual([1, 2]);
  });
});

describe('Subscription.end', () => {
  it('turns the subscription off when its end passes, and sends nothing after', async () => {
    const { t, receiver } = await setup();
    const end = new Date(Date.now() + 1_500).toISOString();
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/ending`, {
        extra: { end },
        channel: { extension: [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 1 }] },
      }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    await t.logger.waitForStatus(sub.id as string, 'off');
    const read = await t.call('GET', `/fhir/Subscription/${sub.id}`);
    expect(read.body).toMatchObject({ status: 'off', error: `ended at ${end} (Subscription.end)` });
    const before = receiver.arrived.length;
    await t.post(patientEvents('ending', 1));
    await new Promise((resolve) => setTimeout(resolve, 1_200));
    expect(receiver.arrived.length).toBe(before);
  });

  it('refuses an end that has passed, unless the subscription is being turned off', async () => {
    const { t, receiver } = await setup();
    const past = { end: '2001-01-01T00:00:00Z' };
    const res = await t.call(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/x`, { extra: past }),
    );
    expect(res.status).toBe(400);
    expect(JSON.stringify(res.body)).toContain('Subscription.end 2001-01-01T00:00:00Z has passed');
    const off = await t.call(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/x`, { extra: { ...past, status: 'off' } }),
    );
    expect(off.status).toBe(201);
  });
});

describe('SSRF at delivery', () => {
  it('refuses a DNS answer that changed to a private address after registration, and records why', async () => {
    let answers = 0;
    const receiver = await Receiver.start();
    const t = await inProcessBroker(
      {},
      {
        resolver: async () => {
          answers++;
          // Registration sees a public address; the socket's own lookup sees a private one.
          return answers === 1 ? [{ address: '93.184.215.14', family: 4 }] : [{ address: '10.0.0.8', family: 4 }];
        },
      },
    );
    cleanups.push(
      () => receiver.close(),
      () => t.broker.close(0),
    );
    const sub = await t.create(topicSubscription('patient-change', 'https://rebind.example.com/hook'));
    const failed = await t.logger.waitForStatus(sub.id as string, 'error');
    expect(failed.reason).toBe('handshake failed: endpoint refused: resolves to a private address');
    expect(answers).toBe(2);
  });

  it('stops plain http to a host taken off the allow-list by a restart: refused, nothing sent in clear text', async () => {
    // hooks.example resolves to the receiver; registered over http while the allow-list named it.
    const dir = mkdtempSync(join(tmpdir(), 'fsb-plain-http-'));
    const receiver = await Receiver.start();
    const resolver = async () => [{ address: '127.0.0.1', family: 4 }];
    let current: TestBroker | undefined;
    cleanups.push(
      async () => rmSync(dir, { recursive: true, force: true }),
      () => receiver.close(),
      async () => current?.broker.close(0),
    );
    const start = async (allowlist: string) => {
      await current?.broker.close(0);
      current = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_ENDPOINT_ALLOWLIST: allowlist }, { resolver });
      return current;
    };
    const endpoint = `${receiver.url.replace('127.0.0.1', 'hooks.example')}/plain`;
    const first = await start('127.0.0.1,hooks.example');
    const id = (await first.create(topicSubscription('patient-change', endpoint))).id as string;
    await first.logger.waitForStatus(id, 'active');
    const arrived = receiver.arrived.length;
    // Its address stays allowed; the name does not: a new registration is refused, and so is delivery.
    const narrowed = await start('127.0.0.1');
    const again = await narrowed.call('POST', '/fhir/Subscription', topicSubscription('patient-change', endpoint));
    expect(again.status).toBe(422);
    await narrowed.post(patientEvents('plain', 1));
    const REFUSED = 'endpoint refused: must be https; hooks.example is not on BROKER_ENDPOINT_ALLOWLIST';
    const failed = await narrowed.logger.waitForStatus(id, 'error', 5_000);
    expect(failed.reason).toBe(`delivery failed after 1 attempt(s): ${REFUSED}`);
    // Asked to try again: the handshake is refused the same way, never sent.
    const read = await narrowed.call('GET', `/fhir/Subscription/${id}`);
    const put = await narrowed.call('PUT', `/fhir/Subscription/${id}`, { ...read.body, status: 'requested' });
    expect(put.status).toBe(200);
    const handshake = await narrowed.logger.waitForStatus(
      id,
      'error',
      5_000,
      narrowed.logger.records.indexOf(failed) + 1,
    );
    expect(handshake.reason).toBe(`handshake failed: ${REFUSED}`);
    expect(receiver.arrived.length).toBe(arrived);
  });

  it('treats a redirect as a failure and never follows it', async () => {
    const { t, receiver } = await setup({ BROKER_RETRY_DELAYS: '10ms', BROKER_HANDSHAKE_RETRY_DELAYS: '300ms' });
    receiver.respond = () => ({ status: 302, headers: { location: 'http://169.254.169.254/latest/meta-data/' } });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/redirect`));
    const failed = await t.logger.waitForStatus(sub.id as string, 'error');
    expect(failed.reason).toBe('handshake failed: HTTP 302 redirect (not followed)');
    // The handshake and its retry, neither followed.
    expect(receiver.failures.map((r) => r.path)).toEqual(['/redirect', '/redirect']);
  });
});
