import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StoredNotification } from '../src/core/types.js';
import { attachWebSocket } from '../src/http/websocket-upgrade.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { eventLike, eventNumbers, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { WsClient } from './support/ws-client.js';

/**
 * Catch-ups over real sockets, with the broker built in this process (SQLite, the in-process hub
 * behind a real server on port 0): the client and the catch-up share one event loop, so a
 * catch-up that never yields keeps the client from reading anything until it is over, whatever
 * its speed. The store's reads can be held open to order a catch-up against other requests.
 */

/** The SQLite store whose catch-up reads wait, while `hold()` is in force, until it is released. */
class GatedStore extends SqliteStore {
  #gate: Promise<void> | undefined;

  hold(): () => void {
    let release = (): void => undefined;
    this.#gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    return () => {
      this.#gate = undefined;
      release();
    };
  }

  override async notificationsInRange(
    subscriptionId: string,
    from: number,
    to: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    const page = await super.notificationsInRange(subscriptionId, from, to, limit);
    await this.#gate;
    return page;
  }
}

const wsSubscription = (patientId: string): Json => {
  const sub = topicSubscription('patient-change', 'unused', { filters: [`Patient?_id=${patientId}`] });
  const { endpoint: _endpoint, ...channel } = sub.channel as Json;
  return { ...sub, channel: { ...channel, type: 'websocket' } };
};

const typeOf = (bundle: Json) => statusOf(bundle).params.get('type')?.valueCode;
const subscriptionOf = (bundle: Json) =>
  String((statusOf(bundle).params.get('subscription')?.valueReference as Json | undefined)?.reference)
    .split('/')
    .pop();

describe('catch-up over a real socket (in-process broker)', () => {
  let tb: TestBroker;
  let store: GatedStore;
  let storeDir: string;
  let server: Server;
  let url: string;
  let counter = 0;
  const sockets: WsClient[] = [];

  beforeAll(async () => {
    storeDir = mkdtempSync(join(tmpdir(), 'fsb-catch-up-'));
    store = new GatedStore(storeDir);
    tb = await inProcessBroker({}, { store });
    server = createServer();
    attachWebSocket(server, { hub: tb.broker.websocketHub, apiAuth: tb.broker.apiAuth, logger: tb.logger });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws`;
  });
  afterAll(async () => {
    for (const s of sockets) s.close();
    server?.closeAllConnections();
    server?.close();
    await tb?.broker.close(0);
    rmSync(storeDir, { recursive: true, force: true });
  });

  const connect = async () => {
    const c = await WsClient.connect(url);
    sockets.push(c);
    return c;
  };
  const token = async (ids: string[]) => {
    const res = await tb.call('GET', `/fhir/Subscription/$get-ws-binding-token?${ids.map((i) => `id=${i}`).join('&')}`);
    expect(res.status).toBe(200);
    return ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
  };
  /** `n` changes of `patientId`, ingested in requests of 1,000. */
  const changes = async (patientId: string, n: number) => {
    for (let done = 0; done < n; done += 1000) {
      const batch = Array.from({ length: Math.min(1000, n - done) }, () =>
        eventLike('healthlake-update-patient', `cu-${++counter}`, patientId),
      );
      await tb.post(batch);
    }
  };
  const bindFrom = (c: WsClient, tok: string, lastEventNumber: number) =>
    c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: tok, lastEventNumber } }));

  it('sends a fast reader a catch-up of 10,000 events in full, then the live ones that came meanwhile, in order', async () => {
    const id = (await tb.create(wsSubscription('big'))).id as string;
    await changes('big', 10_000);
    const c = await connect();
    bindFrom(c, await token([id]), 0);
    // Frames are counted, not parsed: parsing them all on every frame would be quadratic.
    await c.waitFor(() => c.messages.length > 100 || c.closed !== undefined, 'the catch-up under way');
    await changes('big', 100);
    // The handshake, then 10,100 notifications.
    await c.waitFor(() => c.messages.length === 10_101 || c.closed !== undefined, 'the whole catch-up', 50_000);
    expect(c.closed).toBeUndefined();
    const bundles = c.messages.map((m) => JSON.parse(m) as Json);
    expect(typeOf(bundles[0] as Json)).toBe('handshake');
    expect(bundles.slice(1).flatMap(eventNumbers)).toEqual(Array.from({ length: 10_100 }, (_, i) => i + 1));
  });

  it('still closes a reader that stops reading during a catch-up (4001) once what it is owed passes the cap', async () => {
    const id = (await tb.create(wsSubscription('stalled'))).id as string;
    await changes('stalled', 3_000);
    const c = await connect();
    bindFrom(c, await token([id]), 0);
    c.socket.pause();
    // Live events meanwhile are held behind the catch-up: the reader is owed more and more.
    const slow = () => tb.broker.metrics.value('broker_websocket_closed_total', { reason: 'slow-consumer' });
    const before = slow();
    for (let n = 0; n < 20 && slow() === before; n++) await changes('stalled', 200);
    c.socket.resume();
    expect((await c.waitForClose()).code).toBe(4001);
  });

  it('lets go of a subscription deleted while a bind of several is under way, and keeps the others', async () => {
    const a = (await tb.create(wsSubscription('multi-a'))).id as string;
    const b = (await tb.create(wsSubscription('multi-b'))).id as string;
    await changes('multi-a', 3);
    const tok = await token([a, b]);
    const c = await connect();
    // A's catch-up waits on its read (as a long one would be under way) while B is deleted.
    const release = store.hold();
    bindFrom(c, tok, 0);
    await c.waitFor(() => c.messages.length === 1, "A's handshake");
    expect((await tb.call('DELETE', `/fhir/Subscription/${b}`)).status).toBe(204);
    release();
    await c.waitFor(() => c.messages.length === 5, "A's catch-up and B's end");
    const [handshake, ...rest] = c.messages.map((m) => JSON.parse(m) as Json);
    expect([typeOf(handshake as Json), subscriptionOf(handshake as Json)]).toEqual(['handshake', a]);
    expect(rest.slice(0, 3).flatMap(eventNumbers)).toEqual([1, 2, 3]);
    expect(rest[3]).toEqual({
      type: 'unbound',
      payload: { subscription: b, reason: `Subscription/${b} is deleted` },
    });
    // A stays bound: its next event arrives, and the socket is open.
    await changes('multi-a', 1);
    await c.waitFor(() => c.messages.length === 6, "A's live event");
    expect(eventNumbers(JSON.parse(c.messages[5] as string) as Json)).toEqual([4]);
    expect(c.closed).toBeUndefined();
  });
});
