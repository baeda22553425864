import { randomUUID } from 'node:crypto';
import { afterEach, expect, it } from 'vitest';
import { eventLike, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * `broker_outbox_depth` counts every notification waiting for delivery, also those beyond what a
 * lane keeps in memory (256): the backlog an operator alerts on is exactly when a lane is full.
 */

let t: TestBroker | undefined;
let receiver: Receiver | undefined;
afterEach(async () => {
  await t?.broker.close(0);
  await receiver?.close();
  t = undefined;
});

const depth = async (broker: TestBroker): Promise<number> => {
  const res = await broker.broker.app.request('/metrics', { headers: { authorization: `Bearer ${TOKENS.ingest}` } });
  const line = (await res.text()).split('\n').find((l) => l.startsWith('broker_outbox_depth '));
  return Number(line?.split(' ')[1]);
};

it('counts the whole backlog of a failing endpoint, not just what its lane holds in memory', async () => {
  receiver = await Receiver.start();
  // The handshake is answered; every notification fails, and the next attempt is an hour away.
  receiver.respond = (r) => ({ status: r.body.includes('"event-notification"') ? 503 : 204 });
  t = await inProcessBroker({ BROKER_RETRY_DELAYS: '1h' });
  const broker = t;
  await broker.create(topicSubscription('patient-change', `${receiver.url}/down`));
  await broker.create(topicSubscription('patient-change', `${receiver.url}/down-too`));
  await receiver.waitFor(() => receiver?.requests.length === 2, 'both handshakes');
  expect(
    await broker.post(
      Array.from({ length: 600 }, (_, i) => eventLike('healthlake-update-patient', randomUUID(), `p${i}`)),
    ),
  ).toEqual({
    accepted: 600,
    ignored: 0,
    duplicates: 0,
  });
  await receiver.waitFor(() => (receiver?.failures.length ?? 0) >= 2, 'the first attempt of each');
  // 600 per subscription: more than a lane keeps in memory (256).
  expect(await depth(broker)).toBe(1200);
});
