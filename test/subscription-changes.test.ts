import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Webhook } from 'standardwebhooks';
import { afterEach, describe, expect, it } from 'vitest';
import type { BrokerOverrides } from '../src/broker.js';
import type { FhirResource } from '../src/core/types.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { eventLike, type Json, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, secretOf, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { record } from './support/store-fixtures.js';

/**
 * What a client's change to a subscription does to the work under way for it: nothing more goes to
 * an endpoint it left (not even a run that was being read from the store when the change came),
 * and no answer from such an endpoint (a handshake, a 410) decides the subscription's status.
 * (Runs stopped mid-way: test/delivery-runs.test.ts.)
 */

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(env: Record<string, string> = {}, overrides: BrokerOverrides = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-changes-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const receiver = await Receiver.start();
  cleanups.push(() => receiver.close());
  const t = await inProcessBroker({ BROKER_DATA_DIR: dir, ...env }, overrides);
  cleanups.push(() => t.broker.close(0));
  return { receiver, t };
}

/** Event numbers of the event notifications `path` accepted, in arrival order. */
const delivered = (receiver: Receiver, path: string): number[] => notifiedNumbers(receiver.on(path));

/** A request for `path` (with `marker` in its body) has arrived, answered or not. */
const arrivedAt = (receiver: Receiver, path: string, marker = ''): boolean =>
  receiver.arrived.some((r) => r.path === path && r.body.includes(marker));

const patientEvents = (prefix: string, n: number): Json[] =>
  Array.from({ length: n }, (_, i) => eventLike('healthlake-update-patient', `${prefix}-${i + 1}`, `p${i + 1}`));

/** The SQLite store, whose first read of a lane's backlog waits, once read, until `release`. */
class HeldStore extends SqliteStore {
  #held = false;
  #release: () => void = () => undefined;
  readonly #gate = new Promise<void>((resolve) => (this.#release = resolve));
  reading = false;

  override async pendingNotifications(...args: Parameters<SqliteStore['pendingNotifications']>) {
    const rows = await super.pendingNotifications(...args);
    if (!this.#held && rows.length > 0) {
      this.#held = true;
      this.reading = true;
      await this.#gate;
    }
    return rows;
  }

  release(): void {
    this.#release();
  }
}

/** The SQLite store, holding a subscription's replacement (a client's PUT), once written, while `hold` is set. */
class HeldWriteStore extends SqliteStore {
  hold = false;
  #release: () => void = () => undefined;

  override async replaceSubscription(...args: Parameters<SqliteStore['replaceSubscription']>) {
    const written = await super.replaceSubscription(...args);
    if (this.hold) await new Promise<void>((resolve) => (this.#release = resolve));
    return written;
  }

  release(): void {
    this.hold = false;
    this.#release();
  }
}

describe('a change while the lane reads its backlog from the store', () => {
  for (const change of ['DELETE', 'PUT status off'] as const) {
    it(`${change}: none of the backlog goes out`, async () => {
      // A broker that stops with 30 notifications pending leaves them to the next one, whose lane
      // reads them from the store when it starts; the client's change comes during that read.
      const dir = mkdtempSync(join(tmpdir(), 'fsb-changes-'));
      cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const receiver = await Receiver.start();
      cleanups.push(() => receiver.close());
      // Retries come soon: the second broker's lane finds the backlog due at once.
      const env = { BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: Array(10).fill('50ms').join(',') };
      const first = await inProcessBroker(env);
      const sub = await first.create(topicSubscription('patient-change', `${receiver.url}/held`));
      const id = sub.id as string;
      await first.logger.waitForStatus(id, 'active');
      receiver.respond = (req) => ({ status: req.body.includes('"event-notification"') ? 503 : 204 });
      await first.post(patientEvents('held', 30));
      await receiver.waitFor(() => receiver.failures.length > 0, 'a refused first attempt');
      await first.broker.close(0);
      // An attempt the first broker left on the wire still gets its 503.
      await new Promise((r) => setTimeout(r, 200));
      receiver.respond = () => ({ status: 204 });

      const store = new HeldStore(dir);
      const second = await inProcessBroker(env, { store });
      cleanups.push(() => second.broker.close(0));
      await receiver.waitFor(() => store.reading, 'the lane reading its backlog');
      const answer =
        change === 'DELETE'
          ? await second.call('DELETE', `/fhir/Subscription/${id}`)
          : await second.call('PUT', `/fhir/Subscription/${id}`, {
              ...topicSubscription('patient-change', `${receiver.url}/held`),
              id,
              status: 'off',
            });
      expect(answer.status).toBe(change === 'DELETE' ? 204 : 200);
      store.release();
      // Longer than a run of the backlog would take to arrive.
      await new Promise((r) => setTimeout(r, 500));
      expect(receiver.arrived.filter((r) => r.body.includes('"event-notification"'))).toHaveLength(
        receiver.failures.length,
      );
      expect(delivered(receiver, '/held')).toEqual([]);
    });
  }
});

/**
 * Creates a subscription at /old and, while its handshake is on the wire there (the receiver holds
 * /old's answers), moves it to /new. Answers its id.
 */
async function moveDuringHandshake(t: TestBroker, receiver: Receiver): Promise<string> {
  const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/old`));
  const id = sub.id as string;
  await receiver.waitFor(() => arrivedAt(receiver, '/old'), 'the handshake to the old endpoint on the wire');
  const moved = await t.call('PUT', `/fhir/Subscription/${id}`, {
    ...topicSubscription('patient-change', `${receiver.url}/new`),
    id,
  });
  expect(moved.status).toBe(200);
  return id;
}

describe('answers from an endpoint the client has moved away from', () => {
  it('a failed handshake of the old endpoint does not put the moved subscription in error', async () => {
    const { receiver, t } = await setup();
    // The old endpoint answers after 1 s: the move lands while its handshake is on the wire.
    receiver.respond = (req) => (req.path === '/old' ? { status: 500, delayMs: 1000 } : { status: 204, delayMs: 1200 });
    const id = await moveDuringHandshake(t, receiver);
    await t.logger.waitForStatus(id, 'active');
    expect(receiver.failures.map((r) => r.path)).toEqual(['/old']);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    expect(t.logger.records.some((r) => r.subscription === id && r.to === 'error')).toBe(false);
    // Nor is it a failed handshake to log, count or try again: the old endpoint is not the subscription's.
    await receiver.waitFor(() => receiver.failures.length === 1 && receiver.open === 0, 'the old answer out');
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(t.logger.records.filter((r) => String(r.msg).startsWith('handshake failed'))).toEqual([]);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'failed' })).toBe(0);
    expect(t.broker.metrics.value('broker_handshakes_total', { outcome: 'retried' })).toBe(0);
  });

  it('a successful handshake of the old endpoint does not activate the moved one; its own decides', async () => {
    // The new endpoint's failed handshake is its last (`none`): it decides at once.
    const { receiver, t } = await setup({ BROKER_HANDSHAKE_RETRY_DELAYS: 'none' });
    receiver.respond = (req) => (req.path === '/old' ? { status: 204, delayMs: 1000 } : { status: 500, delayMs: 1200 });
    const id = await moveDuringHandshake(t, receiver);
    await t.logger.waitForStatus(id, 'error');
    const now = await t.call('GET', `/fhir/Subscription/${id}`);
    expect(now.body.status).toBe('error');
    expect(String(now.body.error)).toContain('HTTP 500');
    expect(t.logger.records.some((r) => r.subscription === id && r.to === 'active')).toBe(false);
  });

  it('tells versions apart within one millisecond: the old handshake still decides nothing', async () => {
    // The clock stands still while the subscription is created and moved.
    let frozen: number | undefined = Date.now();
    const { receiver, t } = await setup(
      { BROKER_HANDSHAKE_RETRY_DELAYS: 'none' },
      { clock: { now: () => frozen ?? Date.now() } },
    );
    receiver.respond = (req) => (req.path === '/old' ? { status: 204, delayMs: 1000 } : { status: 500, delayMs: 1200 });
    const id = await moveDuringHandshake(t, receiver);
    frozen = undefined;
    await t.logger.waitForStatus(id, 'error');
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('error');
    expect(t.logger.records.some((r) => r.subscription === id && r.to === 'active')).toBe(false);
  });

  it('a 410 from the old endpoint turns nothing off: the notification goes to the new one', async () => {
    const { receiver, t } = await setup({ BROKER_RETRY_DELAYS: '50ms,50ms,50ms' });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/gone`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    receiver.respond = (req) =>
      req.path === '/gone' && req.body.includes('"event-notification"')
        ? { status: 410, delayMs: 1000 }
        : { status: 204 };
    await t.post(patientEvents('gone', 1));
    await receiver.waitFor(
      () => arrivedAt(receiver, '/gone', '"event-notification"'),
      'the notification on the wire to the old endpoint',
    );
    const moved = await t.call('PUT', `/fhir/Subscription/${id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/moved`),
      id,
    });
    expect(moved.status).toBe(200);
    await receiver.waitFor(() => delivered(receiver, '/moved').length === 1, 'the notification at the new endpoint');
    expect(delivered(receiver, '/moved')).toEqual([1]);
    expect(receiver.failures.map((r) => r.path)).toEqual(['/gone']);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    expect(t.logger.records.some((r) => r.subscription === id && r.to === 'off')).toBe(false);
  });

  it('a 410 after a change that kept the endpoint still turns the subscription off', async () => {
    const { receiver, t } = await setup();
    const body = topicSubscription('patient-change', `${receiver.url}/kept`);
    const sub = await t.create(body);
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    receiver.respond = (req) =>
      req.body.includes('"event-notification"') ? { status: 410, delayMs: 1000 } : { status: 204 };
    await t.post(patientEvents('kept', 1));
    await receiver.waitFor(() => arrivedAt(receiver, '/kept', '"event-notification"'), 'the notification on the wire');
    // Same channel, still active: only the subscription's version moves on.
    expect(
      (await t.call('PUT', `/fhir/Subscription/${id}`, { ...body, id, status: 'active', reason: 'edited' })).body
        .status,
    ).toBe('active');
    await t.logger.waitForStatus(id, 'off');
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('off');
    // Off at that answer, not at a retry's.
    expect(receiver.arrived.filter((r) => r.body.includes('"event-notification"'))).toHaveLength(1);
  });

  it('a 410 that loses the race with a change in the store is retried, not left stuck', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-changes-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    const store = new HeldWriteStore(dir);
    const t = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: '50ms,50ms,50ms' }, { store });
    cleanups.push(() => t.broker.close(0));
    const body = topicSubscription('patient-change', `${receiver.url}/race`);
    const sub = await t.create(body);
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    // The first attempt gets a 410 (after 300 ms); any later one a 204.
    receiver.answerOnce((req) => req.body.includes('"event-notification"'), { status: 410, delayMs: 300 });
    await t.post(patientEvents('race', 1));
    await receiver.waitFor(() => arrivedAt(receiver, '/race', '"event-notification"'), 'the notification on the wire');
    // The client's PUT is written to the store but not yet to the broker's cache when the 410 comes.
    store.hold = true;
    const put = t.call('PUT', `/fhir/Subscription/${id}`, { ...body, id, status: 'active', reason: 'edited' });
    await receiver.waitFor(() => receiver.failures.length === 1, 'the 410');
    await new Promise((r) => setTimeout(r, 100));
    store.release();
    expect((await put).status).toBe(200);
    await receiver.waitFor(() => delivered(receiver, '/race').length === 1, 'the notification retried');
    expect(delivered(receiver, '/race')).toEqual([1]);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
  });
});

describe('retries pending when the client re-activates the subscription', () => {
  /** Answers 503 to event notifications at `path` while `failing` says so, 204 to everything else. */
  const failingAt = (path: string, failing: () => boolean) => (req: { path: string; body: string }) =>
    failing() && req.path === path && req.body.includes('"event-notification"') ? { status: 503 } : { status: 204 };

  /**
   * The broker has stored notification 1's `attempts`-th failure (the receiver has only sent it):
   * the client's change then comes after that outcome, not while it is on its way back.
   */
  async function failureStored(t: TestBroker, id: string, attempts: number): Promise<void> {
    await t.logger.waitFor(
      (r) => r.msg === 'delivery failed' && r.subscription === id && r.attempt === attempts,
      `failed attempt ${attempts}`,
    );
    for (const deadline = Date.now() + 5_000; Date.now() < deadline; ) {
      await t.broker.dispatcher.flush();
      const [note] = await t.broker.store.notificationsInRange(id, 1, 1, 1);
      if (note?.attempts === attempts) return;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error(`attempt ${attempts} of Subscription/${id} was never stored`);
  }

  for (const change of ['a new endpoint', 'status requested at the same endpoint'] as const) {
    it(`${change}: the notifications go out once it is verified, not when the old retry falls due`, async () => {
      // The second attempt fails too: the next retry is 24-36 s away.
      const { receiver, t } = await setup({ BROKER_RETRY_DELAYS: '50ms,30s,30s' });
      const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/old`));
      const id = sub.id as string;
      await t.logger.waitForStatus(id, 'active');
      let failing = true;
      receiver.respond = failingAt('/old', () => failing);
      await t.post(patientEvents('backoff', 1));
      await failureStored(t, id, 2);
      await t.post(patientEvents('behind', 2));
      failing = false;
      const path = change === 'a new endpoint' ? '/new' : '/old';
      const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', `${receiver.url}${path}`),
        id,
        status: change === 'a new endpoint' ? 'active' : 'requested',
      });
      expect(put.status).toBe(200);
      // Bounded far below the old retry's due time.
      await receiver.waitFor(
        () => delivered(receiver, path).length === 3,
        'the notifications after the handshake',
        5_000,
      );
      expect(delivered(receiver, path)).toEqual([1, 2, 3]);
      expect(receiver.failures).toHaveLength(2);
    });
  }

  it('a new endpoint gets the whole retry schedule, whatever the old one used up', async () => {
    // Three of the four attempts fail at the old endpoint; the last one would be ~2 s later.
    const { receiver, t } = await setup({ BROKER_RETRY_DELAYS: '50ms,50ms,2s' });
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/old`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    receiver.respond = failingAt('/old', () => true);
    await t.post(patientEvents('used-up', 1));
    await failureStored(t, id, 3);
    // The new endpoint refuses its first notification once.
    receiver.answerOnce((req) => req.path === '/new' && req.body.includes('"event-notification"'), { status: 503 });
    const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/new`),
      id,
    });
    expect(put.status).toBe(200);
    // Bounded; if it never comes, the status below says why.
    await receiver
      .waitFor(() => delivered(receiver, '/new').length === 1, 'the notification retried at the new endpoint', 5_000)
      .catch(() => undefined);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    expect(delivered(receiver, '/new')).toEqual([1]);
    expect(receiver.failures.map((r) => r.path)).toEqual(['/old', '/old', '/old', '/new']);
    expect(t.logger.records.some((r) => r.subscription === id && r.to === 'error')).toBe(false);
  });

  it('a re-queue that takes longer than the handshake schedule leaves the handshake its retries', async () => {
    // The wall clock moves 10 minutes while the dead letters are re-queued (as a DynamoDB re-queue
    // of many of them may take); the schedule counts from the re-activated version's `updatedAt`.
    let offset = 0;
    class SlowRequeueStore extends SqliteStore {
      override async requeueDeadLetters(...args: Parameters<SqliteStore['requeueDeadLetters']>) {
        const requeued = await super.requeueDeadLetters(...args);
        offset += 600_000;
        return requeued;
      }
    }
    const dir = mkdtempSync(join(tmpdir(), 'fsb-changes-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const { receiver, t } = await setup(
      { BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: '10ms', BROKER_HANDSHAKE_RETRY_DELAYS: '300ms' },
      { store: new SlowRequeueStore(dir), clock: { now: () => Date.now() + offset } },
    );
    const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/slow`));
    const id = sub.id as string;
    await t.logger.waitForStatus(id, 'active');
    receiver.respond = failingAt('/slow', () => true);
    await t.post(patientEvents('dead', 1));
    await t.logger.waitForStatus(id, 'error');
    // The re-activation's first handshake fails; its retry 300 ms later is answered.
    let handshakes = 0;
    receiver.respond = (req) =>
      req.body.includes('"handshake"') && ++handshakes === 1 ? { status: 500 } : { status: 204 };
    const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
      ...topicSubscription('patient-change', `${receiver.url}/slow`),
      id,
      status: 'requested',
    });
    expect(put.status).toBe(200);
    await receiver.waitFor(() => delivered(receiver, '/slow').length === 1, 'the re-queued notification', 5_000);
    expect(handshakes).toBe(2);
    expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
    expect(t.logger.records.some((r) => r.msg === 'handshake failed' && r.subscription === id)).toBe(false);
  });
});

describe('sockets of a changed subscription', () => {
  it('looks for bound sockets only for a websocket subscription or a deleted one (on AWS each look is a query)', async () => {
    const { receiver, t } = await setup();
    const looked: string[] = [];
    const channel = t.broker.websocket;
    const original = channel.subscriptionChanged.bind(channel);
    channel.subscriptionChanged = async (id: string) => {
      looked.push(id);
      await original(id);
    };
    const hook = await t.create(topicSubscription('patient-change', `${receiver.url}/looked`));
    await t.logger.waitForStatus(hook.id as string, 'active');
    const hookBody = (await t.call('GET', `/fhir/Subscription/${hook.id}`)).body;
    expect((await t.call('PUT', `/fhir/Subscription/${hook.id}`, { ...hookBody, status: 'off' })).status).toBe(200);
    expect((await t.call('DELETE', `/fhir/Subscription/${hook.id}`)).status).toBe(204);
    const ws = await t.create({
      resourceType: 'Subscription',
      reason: 'test',
      criteria: 'Patient',
      channel: { type: 'websocket' },
    });
    expect((await t.call('DELETE', `/fhir/Subscription/${ws.id}`)).status).toBe(204);
    await t.broker.dispatcher.idle(2_000);
    // Not for the rest-hook one's changes; for its deletion (a bind may have raced a change of
    // channel), and for the websocket one's activation (a change) and deletion.
    expect(looked).toEqual([hook.id, ws.id, ws.id]);
  });
});

/** The first request to `path` (the handshake) verifies with `secret`, and carries no other signature. */
async function expectHandshakeSignedBy(receiver: Receiver, path: string, secret: string): Promise<void> {
  await receiver.waitFor(() => receiver.on(path).length >= 1, `the handshake to ${path}`);
  const [handshake] = receiver.on(path);
  expect(() =>
    new Webhook(secret).verify(handshake?.body ?? '', handshake?.headers as Record<string, string>),
  ).not.toThrow();
  expect(String(handshake?.headers['webhook-signature']).split(' ')).toHaveLength(1);
}

describe('the webhook secret of a channel that signs nothing', () => {
  it('is not shown for a websocket subscription; made a rest-hook, the update shows the one that signs', async () => {
    const { receiver, t } = await setup({ BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1' });
    const body = topicSubscription('patient-change', '', { channel: { type: 'websocket' } });
    delete (body.channel as Json).endpoint;
    const ws = await t.create(body);
    expect(JSON.stringify(ws)).not.toContain('webhook-secret');
    const { channel } = topicSubscription('patient-change', `${receiver.url}/now-rest`) as { channel: Json };
    const put = await t.call('PUT', `/fhir/Subscription/${ws.id}`, { ...ws, status: 'requested', channel });
    expect(put.status).toBe(200);
    const secret = secretOf(put.body);
    expect(secret).toMatch(/^whsec_/);
    // The handshake to the new endpoint is signed with it, and with it alone.
    await expectHandshakeSignedBy(receiver, '/now-rest', secret);
    // A later read, or an update that keeps the channel, does not show it.
    const read = await t.call('GET', `/fhir/Subscription/${ws.id}`);
    expect(JSON.stringify(read.body)).not.toContain('webhook-secret');
    const again = await t.call('PUT', `/fhir/Subscription/${ws.id}`, { ...read.body, reason: 'still' });
    expect(JSON.stringify(again.body)).not.toContain('webhook-secret');
  });

  it('keeps the secret a rest-hook had through a spell as a websocket: the same one signs, never replaced', async () => {
    const { receiver, t } = await setup({ BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1' });
    const hook = await t.create(topicSubscription('patient-change', `${receiver.url}/first`));
    const secret = secretOf(hook);
    await receiver.waitFor(() => receiver.on('/first').length >= 1, 'the first handshake');
    const wsChannel = { type: 'websocket', payload: 'application/fhir+json' };
    const asWs = await t.call('PUT', `/fhir/Subscription/${hook.id}`, { ...hook, channel: wsChannel });
    expect(asWs.status).toBe(200);
    const { channel } = topicSubscription('patient-change', `${receiver.url}/back`) as { channel: Json };
    const back = await t.call('PUT', `/fhir/Subscription/${hook.id}`, { ...asWs.body, status: 'requested', channel });
    expect(secretOf(back.body)).toBe(secret);
    await expectHandshakeSignedBy(receiver, '/back', secret);
  });

  it('shows the generated secret of a rest-hook at its create, as before', async () => {
    const { receiver, t } = await setup({ BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1' });
    const hook = await t.create(topicSubscription('patient-change', `${receiver.url}/hook`));
    expect(secretOf(hook)).toMatch(/^whsec_/);
  });
});

describe('Subscription.reason', () => {
  it('is required of a create, and not of an update to one stored before the broker asked for it', async () => {
    const { t } = await setup();
    const { reason: _reason, ...noReason } = topicSubscription('patient-change', 'https://hooks.example.com/r');
    const refused = await t.call('POST', '/fhir/Subscription', noReason);
    expect(refused.status).toBe(400);
    expect(JSON.stringify(refused.body)).toContain('Subscription.reason is required');
    // One kept from an earlier version of the broker, without a reason: updated as read (turned off).
    const { reason: _kept, ...resource } = record('legacy-1').resource as Json;
    await t.broker.store.insertSubscription(record('legacy-1', { resource: resource as FhirResource }));
    const read = await t.call('GET', '/fhir/Subscription/legacy-1');
    expect(read.body.reason).toBeUndefined();
    const off = await t.call('PUT', '/fhir/Subscription/legacy-1', { ...read.body, status: 'off' });
    expect([off.status, off.body.status]).toEqual([200, 'off']);
    // Once it has a reason, it keeps one.
    const given = await t.call('PUT', '/fhir/Subscription/legacy-1', { ...off.body, reason: 'now said' });
    expect(given.status).toBe(200);
    const { reason: _dropped, ...without } = given.body;
    expect((await t.call('PUT', '/fhir/Subscription/legacy-1', without)).status).toBe(400);
  });
});
