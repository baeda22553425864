import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { eventLike, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * A graceful shutdown gives attempts on the wire their grace, then aborts the rest. An attempt the
 * broker cut that way is not the endpoint failing: the subscription keeps its status (a handshake
 * is sent again after the restart, a last retry is not dead-lettered) and nothing is lost.
 */

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setUp(): Promise<{ dir: string; receiver: Receiver }> {
  const dir = mkdtempSync(join(tmpdir(), 'fsb-cut-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const receiver = await Receiver.start();
  cleanups.push(() => receiver.close());
  return { dir, receiver };
}

async function start(dir: string, retryDelays: string): Promise<TestBroker> {
  const t = await inProcessBroker({ BROKER_DATA_DIR: dir, BROKER_RETRY_DELAYS: retryDelays });
  cleanups.push(() => t.broker.close(0));
  return t;
}

const statusOf = async (t: TestBroker, id: string): Promise<{ status: unknown; error: unknown }> => {
  const res = await t.call('GET', `/fhir/Subscription/${id}`);
  return { status: res.body.status, error: res.body.error };
};

describe('attempts cut by a graceful shutdown', () => {
  it('a handshake on the wire at shutdown is sent again after the restart; the subscription does not go to error', async () => {
    const { dir, receiver } = await setUp();
    // The handshake hangs past the shutdown's grace.
    receiver.respond = () => ({ status: 200, delayMs: 3_000 });
    const first = await start(dir, '50ms');
    const sub = await first.create(topicSubscription('patient-change', `${receiver.url}/slow`));
    const id = String(sub.id);
    await receiver.waitFor(() => receiver.arrived.length === 1, 'the handshake on the wire');
    await first.broker.close(100);
    expect(first.logger.records.filter((r) => r.msg === 'handshake failed')).toEqual([]);

    receiver.respond = () => ({ status: 200 });
    const second = await start(dir, '50ms');
    // Still `requested` in the store: not `error` with "handshake failed: webhook sender thread stopped".
    expect((await statusOf(second, id)).error).toBeUndefined();
    await receiver.waitFor(() => receiver.requests.length >= 1, 'the handshake again, answered');
    await expect.poll(() => statusOf(second, id)).toEqual({ status: 'active', error: undefined });
  });

  it('a last retry on the wire at shutdown is not dead-lettered: delivered after the restart', async () => {
    const { dir, receiver } = await setUp();
    const first = await start(dir, '50ms');
    const sub = await first.create(topicSubscription('patient-change', `${receiver.url}/last`));
    const id = String(sub.id);
    await receiver.waitFor(() => receiver.requests.length === 1, 'the handshake');
    // The first attempt fails; the second (the last the schedule allows) hangs past the grace.
    let attempts = 0;
    receiver.respond = () => (++attempts === 1 ? { status: 500 } : { status: 204, delayMs: 3_000 });
    await first.post(eventLike('healthlake-update-patient', 'evt-last-retry', 'p-last'));
    await receiver.waitFor(() => receiver.arrived.length === 3, 'the last attempt on the wire');
    await first.broker.close(100);

    receiver.respond = () => ({ status: 204 });
    const second = await start(dir, '50ms');
    // Not dead-lettered: still active in the store, the notification still pending.
    expect(await statusOf(second, id)).toEqual({ status: 'active', error: undefined });
    await receiver.waitFor(
      () => notifiedNumbers(receiver.on('/last')).length >= 1,
      'the notification after the restart',
    );
    expect(notifiedNumbers(receiver.on('/last'))).toEqual([1]);
    expect(await statusOf(second, id)).toEqual({ status: 'active', error: undefined });
  });
});
