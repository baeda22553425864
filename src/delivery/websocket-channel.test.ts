import { expect, it } from 'vitest';
import { record } from '../../test/support/store-fixtures.js';
import type { Notification, SubscriptionRecord } from '../core/types.js';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import type { SubscriptionRegistry } from '../service/subscription-registry.js';
import type { Store } from '../store/store.js';
import { WebSocketChannel } from './websocket-channel.js';
import { InMemoryBindings, type SendOutcome, type WebSocketPort } from './websocket-port.js';
import { BindingTokens } from './ws-binding-token.js';

/**
 * The channel's catch-up against live delivery, with the store's read held open: a live bundle of
 * several events (max-count) that straddles the end of the catch-up goes out without the events
 * the catch-up already sent, so every event reaches the client once.
 */

const note = (n: number): Notification => ({
  subscriptionId: 'S',
  eventNumber: n,
  change: {
    eventId: `e${n}`,
    resourceType: 'Patient',
    resourceId: `p${n}`,
    interaction: 'update',
    datastoreId: 'd',
    fhirBase: 'http://fhir',
    time: '2026-11-27T00:00:00Z',
  },
});

const SUB = record('S', {
  match: { resourceTypes: '*', interactions: ['update'] },
  channel: { type: 'websocket', content: 'id-only', headers: [], maxCount: 10 },
  eventsSinceStart: 6,
});

const numbersOf = (text: string): number[] | string => {
  if (!text.startsWith('{')) return text;
  const bundle = JSON.parse(text) as {
    entry?: { resource: { parameter: { name: string; part?: { valueString: string }[] }[] } }[];
  };
  return (
    bundle.entry?.[0]?.resource.parameter
      .filter((p) => p.name === 'notification-event')
      .map((p) => Number(p.part?.[0]?.valueString)) ?? text
  );
};

/**
 * The real channel over in-memory bindings, a store of `stored` notifications (each read waits for
 * the next of `reads`, when given) and a port that records what it sends (`onSend` hears each).
 */
function channelWith(
  stored: Notification[],
  options: {
    reads?: Promise<void>[];
    onSend?: (numbers: number[] | string, count: number) => Promise<void> | void;
  } = {},
) {
  let readNo = 0;
  const current = (): SubscriptionRecord => ({
    ...SUB,
    eventsSinceStart: Math.max(SUB.eventsSinceStart, stored.length),
  });
  const store = {
    async notificationsInRange(_id: string, from: number, to: number, limit: number) {
      const page = stored.filter((n) => n.eventNumber >= from && n.eventNumber <= to).slice(0, limit);
      await options.reads?.[readNo++];
      return page;
    },
    async getSubscription() {
      return current();
    },
  } as unknown as Store;
  const received: (number[] | string)[] = [];
  /** What the channel told the socket layer: does the connection hold a binding. */
  const marks: boolean[] = [];
  const port: WebSocketPort = {
    markBound(_c, bound) {
      marks.push(bound);
    },
    async send(_c, text): Promise<SendOutcome> {
      const numbers = numbersOf(text);
      received.push(numbers);
      await options.onSend?.(numbers, received.length);
      await new Promise((resolve) => setImmediate(resolve));
      return 'sent';
    },
    async close() {},
    async isOpen() {
      return true;
    },
  };
  const tokens = new BindingTokens('k'.repeat(40));
  const channel = new WebSocketChannel({
    port,
    bindings: new InMemoryBindings(),
    registry: { get: () => current() } as unknown as SubscriptionRegistry,
    store,
    tokens,
    clock: { now: () => Date.now() },
    ids: { uuid: () => 'u' },
    logger: silentLogger,
    metrics: new Metrics(),
    fhirBase: 'http://b/fhir',
  });
  const bind = (lastEventNumber: number) =>
    channel.onMessage(
      { id: 'c1' },
      JSON.stringify({
        type: 'bind-with-token',
        payload: {
          token: tokens.issue({ owner: 'alice', subscriptions: ['S'], expiresAt: Date.now() + 60_000 }),
          lastEventNumber,
        },
      }),
    );
  const live = async (n: number) => {
    stored.push(note(n));
    await channel.deliver(current(), 'event-notification', [note(n)]);
  };
  return { channel, received, bind, live, marks };
}

/** A promise and the function that resolves it. */
function gate(): { opened: Promise<void>; open: () => void } {
  let open = (): void => undefined;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { opened, open };
}

it('sends each event once when a multi-event bundle overlaps the end of a catch-up', async () => {
  const stored = [1, 2, 3, 4, 5, 6].map(note);
  const read = gate();
  const { channel, received, bind } = channelWith(stored, { reads: [read.opened] });
  // The client reconnects having seen nothing; its catch-up reads 1–6 from the store (held open).
  const bound = bind(0);
  await new Promise((resolve) => setTimeout(resolve, 10));
  // Meanwhile the lane delivers 5, 6 and 7 as one bundle.
  stored.push(note(7));
  await channel.deliver({ ...SUB, eventsSinceStart: 7 }, 'event-notification', [note(5), note(6), note(7)]);
  read.open();
  await bound;
  // The handshake (no events), 1 to 6 one by one from the catch-up, then 7 alone.
  expect(received).toEqual([[], [1], [2], [3], [4], [5], [6], [7]]);
});

it('stops a catch-up when the client unbinds during it', async () => {
  let unbind = (): void => undefined;
  const { channel, received, bind } = channelWith(
    Array.from({ length: 50 }, (_, i) => note(i + 1)),
    { onSend: (_numbers, count) => (count === 4 ? unbind() : undefined) },
  );
  unbind = () => void channel.onMessage({ id: 'c1' }, 'unbind S');
  await bind(0);
  const at = received.indexOf('unbound S');
  expect(at).toBeGreaterThan(0);
  // At most the message already on its way after the unbound answer; not the other ~45.
  expect(received.slice(at + 1).length).toBeLessThanOrEqual(1);
});

it('hands a rebind the events held for it when the client unbinds and binds again during a flush', async () => {
  const reads = [gate(), gate()];
  let second: Promise<void> | undefined;
  let onSend: (numbers: number[] | string) => Promise<void> = async () => undefined;
  const { channel, received, bind, live } = channelWith([1, 2, 3].map(note), {
    reads: reads.map((r) => r.opened),
    onSend: (numbers) => onSend(numbers),
  });
  const first = bind(0);
  await new Promise((resolve) => setTimeout(resolve, 5));
  await live(4);
  await live(5);
  onSend = async (numbers) => {
    if (JSON.stringify(numbers) !== '[4]' || second !== undefined) return;
    // The first bind is flushing its hold (4 sent): the client unbinds and binds again, having seen 4.
    await channel.onMessage({ id: 'c1' }, 'unbind S');
    second = bind(4);
    await new Promise((resolve) => setTimeout(resolve, 5));
    await live(6);
  };
  reads[0]?.open();
  await first;
  reads[1]?.open();
  await second;
  const events = (received.filter(Array.isArray) as number[][]).flat();
  expect(events.filter((n) => n === 6)).toEqual([6]);
  // After the client was told it was unbound: 5 once (the new catch-up), not again from the old hold.
  const unbound = received.indexOf('unbound S');
  expect(received.slice(unbound + 1).filter((m) => Array.isArray(m) && m.includes(5) && !m.includes(6))).toHaveLength(
    1,
  );
});

it('tells the socket layer when a connection holds a binding and when it holds none', async () => {
  const { channel, bind, marks } = channelWith([]);
  // A bare `unbind` with nothing bound: answered, and the connection still holds nothing.
  await channel.onMessage({ id: 'c1' }, 'unbind');
  expect(marks).toEqual([false]);
  await bind(6);
  expect(marks).toEqual([false, true]);
  await channel.onMessage({ id: 'c1' }, 'unbind S');
  expect(marks).toEqual([false, true, false]);
});
