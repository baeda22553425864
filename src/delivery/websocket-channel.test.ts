import { expect, it } from 'vitest';
import { record } from '../../test/support/store-fixtures.js';
import { channelOver } from '../../test/support/ws-channel.js';
import type { Notification, SubscriptionRecord } from '../core/types.js';
import type { Store } from '../store/store.js';
import { InMemoryBindings, type SendOutcome, type WebSocketPort } from './websocket-port.js';
import { BindingTokens } from './ws-binding-token.js';

/**
 * The channel's catch-up against live delivery and the client's other messages, with the store's
 * read held open where the order matters: a live bundle of several events (max-count) that
 * straddles the end of the catch-up goes out without the events the catch-up already sent, so
 * every event reaches the client once; a connection's messages are handled one after another; a
 * connection that refuses a message of its catch-up is closed rather than left with a gap.
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
    /** The port's answer to the `count`th send (`sent` when absent). */
    outcome?: (count: number) => SendOutcome;
    /** What the port's `drained` waits for on its `count`th call (nothing when absent). */
    drained?: (count: number) => Promise<void> | undefined;
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
  let sends = 0;
  let drains = 0;
  /** What the channel told the socket layer: does the connection hold a binding. */
  const marks: boolean[] = [];
  const port: WebSocketPort = {
    markBound(_c, bound) {
      marks.push(bound);
    },
    async send(_c, text): Promise<SendOutcome> {
      sends++;
      const outcome = options.outcome?.(sends) ?? 'sent';
      if (outcome !== 'sent') return outcome;
      const numbers = numbersOf(text);
      received.push(numbers);
      await options.onSend?.(numbers, received.length);
      await new Promise((resolve) => setImmediate(resolve));
      return 'sent';
    },
    async close(_c, code) {
      received.push(`close ${code}`);
    },
    async drained() {
      await options.drained?.(++drains);
    },
    async isOpen() {
      return true;
    },
  };
  const tokens = new BindingTokens('k'.repeat(40));
  const bindings = new InMemoryBindings();
  const channel = channelOver(port, () => current(), tokens, { store, bindings });
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
  return { channel, received, bind, live, marks, bindings };
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

it('keeps live events behind a catch-up that waits for the socket to drain', async () => {
  const full = gate();
  const twoSent = gate();
  // The third message of the catch-up waits: the socket's buffer is past half its cap.
  const { received, bind, live } = channelWith([1, 2, 3, 4, 5].map(note), {
    drained: (count) => (count === 3 ? full.opened : undefined),
    onSend: (numbers) => (JSON.stringify(numbers) === '[2]' ? twoSent.open() : undefined),
  });
  const bound = bind(0);
  await twoSent.opened;
  await live(6);
  await live(7);
  full.open();
  await bound;
  await live(8);
  expect(received).toEqual([[], [1], [2], [3], [4], [5], [6], [7], [8]]);
});

it('handles an unbind and the bind sent with it one after the other: the bind catches up', async () => {
  const { channel, received, bind } = channelWith([1, 2, 3].map(note));
  // Both frames in one read: handled side by side, the unbind dropped the bind's hold on resuming.
  await Promise.all([channel.onMessage({ id: 'c1' }, 'unbind'), bind(0)]);
  expect(received).toEqual(['unbound', [], [1], [2], [3]]);
});

it('stops a catch-up when the client unbinds during it, and sends nothing for it after that', async () => {
  let unbound: Promise<void> | undefined;
  const { channel, received, bind, live } = channelWith(
    Array.from({ length: 50 }, (_, i) => note(i + 1)),
    {
      onSend: (_numbers, count) => {
        if (count === 4) unbound = channel.onMessage({ id: 'c1' }, 'unbind S');
      },
    },
  );
  await bind(0);
  await unbound;
  await live(51);
  // The catch-up ends at the message after the unbind came (not the other ~46), then the answer.
  expect(received).toEqual([[], [1], [2], [3], 'unbound S']);
});

it('stops a flush when the client unbinds and binds again during it: the new bind sends each event once', async () => {
  const reads = [gate(), gate()];
  let queued: Promise<void>[] = [];
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
    if (JSON.stringify(numbers) !== '[4]' || queued.length > 0) return;
    // The first bind is flushing its hold (4 sent): the client unbinds and binds again, having seen 4.
    queued = [channel.onMessage({ id: 'c1' }, 'unbind S'), bind(4)];
    await live(6);
  };
  for (const r of reads) r.open();
  await first;
  await Promise.all(queued);
  // The old hold stops after 4 (6, live meanwhile, waits with it and goes with the unbind); the new
  // bind catches up from 4: 5 and 6 once each.
  expect(received).toEqual([[], [1], [2], [3], [4], 'unbound S', [], [5], [6]]);
});

it('closes a connection that refuses a message of its catch-up (4001), so that it binds again and catches up', async () => {
  // The 4th send (event 3) is refused, as API Gateway refuses a throttled PostToConnection.
  const { received, bind, live, bindings } = channelWith(
    Array.from({ length: 10 }, (_, i) => note(i + 1)),
    { outcome: (count) => (count === 4 ? 'refused' : 'sent') },
  );
  await bind(0);
  await live(11);
  expect(received).toEqual([[], [1], [2], 'close 4001']);
  expect(await bindings.bindingsOf('c1')).toEqual([]);
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
