import { afterEach, expect, it } from 'vitest';
import type { Sender, SendResult, WebhookRequest } from '../src/delivery/rest-hook-sender.js';
import { topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';

/**
 * A Lambda invocation's time for attempts (`Dispatcher.endAttemptsWithin`) can end while an
 * attempt still waits for a slot to its origin: it was never sent, so nothing about it may be
 * recorded (a handshake stays owed, a notification keeps its attempts), unlike one on the wire,
 * which counts as failed (test/aws-invocation-budget.test.ts).
 */

let t: TestBroker | undefined;
afterEach(async () => {
  await t?.broker.close(0);
  t = undefined;
});

it('records nothing for a handshake the time for attempts ended before it had a slot: it stays owed', async () => {
  const sent: string[] = [];
  // Endpoints under /busy never answer (a slow origin); the others answer 200 at once.
  const sender: Sender = {
    send(req: WebhookRequest): Promise<SendResult> {
      sent.push(new URL(req.endpoint).pathname);
      return req.endpoint.includes('/busy')
        ? new Promise<SendResult>(() => undefined)
        : Promise.resolve({ ok: true, status: 200 });
    },
    sendInOrder(reqs) {
      return Promise.all(reqs.map((r) => this.send(r)));
    },
    stop() {},
    async close() {},
  };
  // One connection to the origin: two requests handed over hold its slots.
  t = await inProcessBroker({ BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '1' }, { sender: () => sender });
  const origin = 'http://127.0.0.1:9';
  await t.create(topicSubscription('patient-change', `${origin}/busy1`));
  await t.create(topicSubscription('patient-change', `${origin}/busy2`));
  const deadline = Date.now() + 5_000;
  while (sent.length < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
  t.broker.dispatcher.endAttemptsWithin(300);
  const sub = await t.create(topicSubscription('patient-change', `${origin}/owed`));
  const id = sub.id as string;
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  expect(sent).toEqual(['/busy1', '/busy2']);
  expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('requested');
  expect(t.logger.records.filter((r) => r.msg === 'handshake failed' && r.subscription === id)).toEqual([]);
});
