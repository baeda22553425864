import { afterEach, describe, expect, it } from 'vitest';
import { eventLike, type Json, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, TOKENS } from './support/in-process.js';
import { Receiver } from './support/receiver.js';

/**
 * One API client's endpoints that hang cannot stall another client's deliveries by holding every
 * in-flight slot (`BROKER_MAX_IN_FLIGHT`): each client holds at most `BROKER_MAX_IN_FLIGHT_PER_CLIENT`
 * of them, however many origins its subscriptions name; and at an origin both use, a freed slot
 * goes to the client with fewer requests in flight there.
 */

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** 30 s per attempt (default): far longer than the test waits for the other client's notification. */
function hangingSubscription(endpoint: string, timeoutSeconds = 30, filters?: string[]): Json {
  return topicSubscription('patient-change', endpoint, {
    channel: { extension: [{ url: `${BACKPORT}/backport-timeout`, valueUnsignedInt: timeoutSeconds }] },
    ...(filters === undefined ? {} : { filters }),
  });
}

describe('in-flight slots per API client', () => {
  it("a client whose endpoints hang holds at most its share of the slots: another client's notification goes out at once", async () => {
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    // Handshakes are answered; alice's notifications hang until the test ends.
    receiver.respond = (req) =>
      req.body.includes('"handshake"') || req.path === '/bob' ? { status: 200 } : { status: 200, delayMs: 60_000 };
    const t = await inProcessBroker({ BROKER_MAX_IN_FLIGHT: '8', BROKER_MAX_IN_FLIGHT_PER_CLIENT: '4' });
    cleanups.push(() => t.broker.close(0));
    // Alice: as many subscriptions as there are slots in all, each at its own path.
    for (let i = 0; i < 8; i++) await t.create(hangingSubscription(`${receiver.url}/alice-${i}`), TOKENS.alice);
    await t.create(topicSubscription('patient-change', `${receiver.url}/bob`), TOKENS.bob);
    await receiver.waitFor(() => receiver.requests.length === 9, 'nine handshakes');

    await t.post(eventLike('healthlake-update-patient', 'evt-isolation', 'p-isolation'));
    // Alice's attempts take their 4 slots and hang; bob's goes out beside them.
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/bob')).length === 1, "bob's notification", 5_000);
    expect(notifiedNumbers(receiver.on('/bob'))).toEqual([1]);
    const aliceOnTheWire = () =>
      receiver.arrived.filter((r) => r.path.startsWith('/alice-') && !r.body.includes('"handshake"')).length;
    await receiver.waitFor(() => aliceOnTheWire() === 4, "alice's share of the slots on the wire");
    expect(aliceOnTheWire()).toBe(4);
  });

  it("another client's notification to the same origin waits for one of the hanging client's attempts, not all of them", async () => {
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    receiver.respond = (req) =>
      req.body.includes('"handshake"') || req.path === '/bob' ? { status: 200 } : { status: 200, delayMs: 60_000 };
    // One connection to the origin, two requests handed to the sender.
    const t = await inProcessBroker({ BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '1' });
    cleanups.push(() => t.broker.close(0));
    // Alice's eight subscriptions hang for their 1 s timeout each, one after another on the one
    // connection; bob's, created after them, is on the same host:port.
    const alice = ['Patient?_id=p-alice'];
    for (let i = 0; i < 8; i++) {
      await t.create(hangingSubscription(`${receiver.url}/alice-${i}`, 1, alice), TOKENS.alice);
    }
    await t.create(
      topicSubscription('patient-change', `${receiver.url}/bob`, { filters: ['Patient?_id=p-bob'] }),
      TOKENS.bob,
    );
    await receiver.waitFor(() => receiver.requests.length === 9, 'nine handshakes');

    // Alice's change first: her attempts hold the connection and queue behind it; then bob's.
    await t.post(eventLike('healthlake-update-patient', 'evt-shared-alice', 'p-alice'));
    await receiver.waitFor(
      () => receiver.arrived.some((r) => r.path.startsWith('/alice-') && !r.body.includes('"handshake"')),
      "alice's first notification on the wire",
    );
    await t.post(eventLike('healthlake-update-patient', 'evt-shared-bob', 'p-bob'));
    // Bob takes the first slot alice frees and goes out after the two of hers the sender had by
    // then at most (a few seconds), not after all eight of them, one timeout each.
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/bob')).length === 1, "bob's notification", 5_000);
    const notifications = receiver.arrived.filter((r) => !r.body.includes('"handshake"'));
    const bobAt = notifications.findIndex((r) => r.path === '/bob');
    expect(bobAt).toBeGreaterThan(0);
    expect(bobAt).toBeLessThanOrEqual(2);
  });
});
