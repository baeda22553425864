import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { eventLike, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * The client moves a subscription while an attempt to the old endpoint is on the wire. Its failure
 * comes back after the re-activation reset the retries: it starts over with them (no attempt
 * counted, due now) instead of recording attempt 3 of the old schedule, which made the new
 * endpoint's first attempt the last one and put the subscription in `error`.
 */

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

it('an attempt on the wire to the old endpoint during the move does not count against the new one', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-race-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const receiver = await Receiver.start();
  cleanups.push(() => receiver.close());
  const t = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: '50ms,50ms,2s' });
  cleanups.push(() => t.broker.close(0));
  const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/old`));
  const id = sub.id as string;
  await t.logger.waitForStatus(id, 'active');
  let n = 0;
  const isEvent = (body: string) => body.includes('"event-notification"');
  receiver.respond = (req) => {
    // The old endpoint's third answer takes 1 s; the new one refuses its first notification once.
    if (req.path === '/old' && isEvent(req.body)) return ++n === 3 ? { status: 503, delayMs: 1000 } : { status: 503 };
    if (req.path === '/new' && isEvent(req.body)) return ++n === 4 ? { status: 503 } : { status: 204 };
    return { status: 204 };
  };
  await t.post([eventLike('healthlake-update-patient', 'race-1', 'p1')]);
  await receiver.waitFor(
    () => receiver.arrived.filter((r) => r.path === '/old' && isEvent(r.body)).length === 3,
    'the third attempt on the wire',
  );
  const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
    ...topicSubscription('patient-change', `${receiver.url}/new`),
    id,
  });
  expect(put.status).toBe(200);
  await receiver.waitFor(() => notifiedNumbers(receiver.on('/new')).length === 1, 'delivered at /new', 6_000);
  expect((await t.call('GET', `/fhir/Subscription/${id}`)).body.status).toBe('active');
  expect(notifiedNumbers(receiver.on('/new'))).toEqual([1]);
});
