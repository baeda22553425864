import { rmSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { API_KEYS, type BrokerProcess, newDataDir, startBroker } from './support/broker-process.js';
import { Client, topicSubscription } from './support/fhir-client.js';
import { Receiver } from './support/receiver.js';

/**
 * What the broker process says at start about the subscriptions it already holds: one whose
 * endpoint the address policy now refuses (a restart without the allow-list it was registered
 * under) is named at once, not only by its first failed delivery.
 */

const WARNING = 'a subscription names an endpoint the address policy refuses: its deliveries will fail';

describe('start-up checks of stored subscriptions', () => {
  let receiver: Receiver;
  const live: BrokerProcess[] = [];
  let dir: string;

  beforeAll(async () => {
    receiver = await Receiver.start();
  });
  afterEach(async () => {
    await Promise.all(live.splice(0).map((b) => b.kill('SIGKILL')));
    rmSync(dir, { recursive: true, force: true });
  });
  afterAll(async () => {
    await receiver?.close();
  });

  it('warns of a stored subscription whose endpoint the allow-list no longer allows, and of no other', async () => {
    dir = newDataDir();
    const first = await startBroker({}, dir);
    live.push(first);
    const alice = new Client(first.url, API_KEYS.alice);
    const id = (await alice.create(topicSubscription('patient-change', `${receiver.url}/hook`))).id as string;
    await first.waitForStatus(id, 'active');
    const checked = (b: BrokerProcess) =>
      b.waitForLog((r) => r.msg === 'endpoints of stored subscriptions checked', 'the check');
    expect((await checked(first)).refused).toBe(0);
    await first.kill('SIGTERM');

    // Started again without the allow-list its endpoint was registered under.
    const second = await startBroker({ BROKER_ENDPOINT_ALLOWLIST: '' }, dir);
    live.push(second);
    expect((await checked(second)).refused).toBe(1);
    const warned = await second.waitForLog((r) => r.msg === WARNING, 'the warning');
    expect(warned).toMatchObject({
      level: 'warn',
      subscription: id,
      owner: 'alice',
      reason: 'channel.endpoint must be https; 127.0.0.1 is not on BROKER_ENDPOINT_ALLOWLIST',
    });
    // Said, not acted on: the subscription stays as it was until a delivery fails.
    expect((await new Client(second.url, API_KEYS.alice).call('GET', `/fhir/Subscription/${id}`)).body.status).toBe(
      'active',
    );
    await second.kill('SIGTERM');

    // And with it back: nothing to say.
    const third = await startBroker({}, dir);
    live.push(third);
    expect((await checked(third)).refused).toBe(0);
    expect(third.logs.filter((r) => r.msg === WARNING)).toEqual([]);
  });
});
