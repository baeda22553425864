import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Allowlist } from '../src/delivery/address-policy.js';
import { EndpointGuard } from '../src/delivery/endpoint-guard.js';
import { RestHookSender, type Sender, type SendResult, type WebhookRequest } from '../src/delivery/rest-hook-sender.js';
import { eventLike, eventNumbers, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * A lane with a backlog hands the sender a run of bundles (`Sender.sendInOrder`), sent one after
 * another without a trip back to the event loop: what a run delivered is never sent again, what
 * failed is retried in its place, the order holds, and a shutdown ends a run after the request
 * on the wire.
 */

/** The broker's own sender, noting the length of every run it is handed. */
class NotingSender implements Sender {
  readonly runs: number[] = [];
  readonly #inner = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
  send(req: WebhookRequest): Promise<SendResult> {
    return this.#inner.send(req);
  }
  sendInOrder(reqs: readonly WebhookRequest[], withinMs: number): Promise<SendResult[]> {
    this.runs.push(reqs.length);
    return this.#inner.sendInOrder(reqs, withinMs);
  }
  stop(): void {
    this.#inner.stop();
  }
  close(): Promise<void> {
    return this.#inner.close();
  }
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function start(dataDir: string, sender: NotingSender): Promise<TestBroker> {
  const t = await inProcessBroker(
    { BROKER_DATA_DIR: dataDir, BROKER_RETRY_DELAYS: '50ms,50ms,50ms,50ms,50ms,50ms,50ms,50ms' },
    { sender: () => sender },
  );
  cleanups.push(() => t.broker.close(0));
  return t;
}

/** Event numbers of the event notifications the receiver accepted (2xx), in arrival order. */
const delivered = (receiver: Receiver, path: string): number[] =>
  receiver
    .on(path)
    .map((r) => JSON.parse(r.body) as Json)
    .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification')
    .flatMap(eventNumbers);

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i + 1);

/** A subscription whose endpoint answers 503 until `recover`, with `events` patient changes behind it. */
async function backlog(t: TestBroker, receiver: Receiver, path: string, events: number) {
  let down = true;
  const sub = await t.create(topicSubscription('patient-change', `${receiver.url}${path}`));
  await t.logger.waitForStatus(sub.id as string, 'active');
  const answer = receiver.respond;
  receiver.respond = (req) => (down && req.body.includes('"event-notification"') ? { status: 503 } : answer(req));
  await t.post(
    Array.from({ length: events }, (_, i) => eventLike('healthlake-update-patient', `${path}-${i + 1}`, `p${i + 1}`)),
  );
  await receiver.waitFor(() => receiver.failures.length > 0, 'a refused first attempt');
  return {
    sub,
    recover: () => {
      down = false;
    },
  };
}

describe('delivery runs', () => {
  it('drains a backlog in runs: each notification delivered once, in order, a failure retried in place', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-runs-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    const sender = new NotingSender();
    const t = await start(dir, sender);
    // After the outage, the notification numbered 20 fails once more, in the middle of a run.
    let failedTwenty = false;
    receiver.respond = (req) => {
      if (!failedTwenty && req.body.includes('"valueString":"20"},{"name":"timestamp"')) {
        failedTwenty = true;
        return { status: 503 };
      }
      return { status: 204 };
    };
    const { sub, recover } = await backlog(t, receiver, '/runs', 40);
    const runsBefore = sender.runs.length;
    recover();
    await receiver.waitFor(() => delivered(receiver, '/runs').length >= 40, 'forty notifications', 10_000);
    expect(failedTwenty).toBe(true);
    expect(delivered(receiver, '/runs')).toEqual(range(40));
    // The backlog went out in runs of more than one bundle, none longer than 16.
    const runs = sender.runs.slice(runsBefore);
    expect(Math.max(...runs)).toBeGreaterThan(1);
    expect(Math.max(...runs)).toBeLessThanOrEqual(16);
    const status = await t.call('GET', `/fhir/Subscription/${sub.id}/$status`);
    expect(statusOf(status.body).params.get('events-since-subscription-start')?.valueString).toBe('40');
    // Counted as each run's results come back to the event loop, a moment after the receiver answered.
    const deliveredCount = () => t.broker.metrics.value('broker_notifications_total', { outcome: 'delivered' });
    for (let i = 0; i < 500 && deliveredCount() < 40; i++) await new Promise((r) => setTimeout(r, 10));
    expect(deliveredCount()).toBe(40);
  });

  it('ends a run after the request on the wire when shutting down; a restart sends the rest, nothing twice', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-runs-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    receiver.respond = () => ({ status: 204, delayMs: 20 });
    const first = await start(dir, new NotingSender());
    const { recover } = await backlog(first, receiver, '/stop', 30);
    recover();
    await receiver.waitFor(() => delivered(receiver, '/stop').length >= 3, 'three notifications');
    const atClose = delivered(receiver, '/stop').length;
    await first.broker.close(5000);
    // At most the request that was on the wire when close began came in after it.
    const beforeRestart = delivered(receiver, '/stop');
    expect(beforeRestart.length).toBeLessThanOrEqual(atClose + 1);
    expect(beforeRestart).toEqual(range(beforeRestart.length));

    receiver.respond = () => ({ status: 204 });
    await start(dir, new NotingSender());
    await receiver.waitFor(() => delivered(receiver, '/stop').length >= 30, 'the rest after the restart', 10_000);
    expect(delivered(receiver, '/stop')).toEqual(range(30));
  });

  it('puts a notification whose last attempt fails during a re-activation back with the re-queued ones', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-runs-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    // Two attempts in all (one retry).
    const t = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: '30ms' });
    cleanups.push(() => t.broker.close(0));
    const created = await t.create(topicSubscription('patient-change', `${receiver.url}/reactivated`));
    const id = created.id as string;
    await t.logger.waitForStatus(id, 'active');
    // First attempt: 503. The last one: the client asks for the subscription again (PUT requested)
    // while it is on the wire, then it fails too. Every later attempt succeeds.
    let attempts = 0;
    let put: Promise<unknown> | undefined;
    receiver.respond = (req) => {
      if (!req.body.includes('"event-notification"')) return { status: 204 };
      attempts++;
      if (attempts === 1) return { status: 503 };
      if (attempts === 2) {
        put = t.call('PUT', `/fhir/Subscription/${id}`, {
          ...topicSubscription('patient-change', `${receiver.url}/reactivated`),
          id,
          status: 'requested',
        });
        return { status: 503, delayMs: 300 };
      }
      return { status: 204 };
    };
    await t.post([eventLike('healthlake-update-patient', 'reactivated-1', 'p-reactivated')]);
    await receiver.waitFor(() => delivered(receiver, '/reactivated').length === 1, 'the notification', 10_000);
    expect(await put).toMatchObject({ status: 200 });
    expect(delivered(receiver, '/reactivated')).toEqual([1]);
    await t.logger.waitForStatus(id, 'active');
    expect(t.broker.metrics.value('broker_notifications_total', { outcome: 'dead-lettered' })).toBe(0);
  });
});
