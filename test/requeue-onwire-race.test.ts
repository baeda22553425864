import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
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

it('an attempt that fails for good while the re-activation is being written is re-queued with the rest', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-race-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const receiver = await Receiver.start();
  cleanups.push(() => receiver.close());
  const real = new SqliteStore(join(dir, 'store'));
  // The move is written at once, but its answer reaches the registry 1 s later (a busy writer).
  let answerLater: Promise<void> | undefined;
  const store = new Proxy(real, {
    get(target, prop) {
      if (prop === 'replaceSubscription') {
        return async (...args: Parameters<SqliteStore['replaceSubscription']>) => {
          const stored = await target.replaceSubscription(...args);
          await answerLater;
          return stored;
        };
      }
      const value = Reflect.get(target, prop, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  const t = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: '50ms' }, { store });
  cleanups.push(() => t.broker.close(0));
  const sub = await t.create(topicSubscription('patient-change', `${receiver.url}/old`));
  const id = sub.id as string;
  await t.logger.waitForStatus(id, 'active');
  let attempts = 0;
  let lastOnTheWire!: () => void;
  const onTheWire = new Promise<void>((resolve) => {
    lastOnTheWire = resolve;
  });
  receiver.respond = (req) => {
    if (req.path !== '/old' || !req.body.includes('"event-notification"')) return { status: 204 };
    // The old endpoint fails both attempts; the last one answers only after 600 ms.
    if (++attempts === 2) {
      lastOnTheWire();
      return { status: 503, delayMs: 600 };
    }
    return { status: 503 };
  };
  await t.post([eventLike('healthlake-update-patient', 'late-dead-1', 'p1')]);
  await onTheWire;
  answerLater = new Promise((resolve) => setTimeout(resolve, 1_000));
  const put = await t.call('PUT', `/fhir/Subscription/${id}`, {
    ...topicSubscription('patient-change', `${receiver.url}/new`),
    id,
  });
  answerLater = undefined;
  expect(put.status).toBe(200);
  await t.logger.waitForStatus(id, 'active');
  await t.post([eventLike('healthlake-update-patient', 'late-dead-2', 'p1')]);
  // Event 1, dead-lettered by the old endpoint's last answer during the move, goes to the new one first.
  await receiver.waitFor(() => notifiedNumbers(receiver.on('/new')).length === 2, 'both events at /new', 6_000);
  expect(notifiedNumbers(receiver.on('/new'))).toEqual([1, 2]);
  // The old endpoint had its two attempts and no more once the move began.
  expect(notifiedNumbers(receiver.arrived.filter((r) => r.path === '/old'))).toEqual([1, 1]);
}, 20_000);
