import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { record } from '../../test/support/store-fixtures.js';
import { channelOver } from '../../test/support/ws-channel.js';
import type { SubscriptionRecord } from '../core/types.js';
import { ApiKeyAuth } from '../http/auth.js';
import { attachWebSocket } from '../http/websocket-upgrade.js';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import { type LocalSockets, LocalWebSocketHub } from './local-websocket-hub.js';
import { SocketProcessHub } from './socket-process-hub.js';
import type { WebSocketChannel } from './websocket-channel.js';
import { BindingTokens } from './ws-binding-token.js';

/**
 * The bind window end to end below the HTTP app: real `ws` clients through the `/ws` upgrade, the
 * real channel and bindings, and each local socket layer (in process; a socket process). Anyone
 * may open a socket, so one must hold a binding to stay: a socket that binds nothing, or loses its
 * last binding and binds nothing again, is closed (1008) a window later, however much it talks.
 */

const WINDOW_MS = 400;
const REASON = `no subscription bound within ${WINDOW_MS} ms`;

const subscription = (id: string): SubscriptionRecord =>
  record(id, {
    match: { resourceTypes: '*', interactions: ['update'] },
    channel: { type: 'websocket', content: 'id-only', headers: [], maxCount: 1 },
  });

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A `ws` client that records its frames and its close. */
class Client {
  readonly messages: string[] = [];
  closed: { code: number; reason: string; at: number } | undefined;
  readonly #closing: Promise<{ code: number; reason: string; at: number }>;

  private constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => this.messages.push(String(data)));
    this.#closing = once(ws, 'close').then(([code, reason]) => {
      this.closed = { code: code as number, reason: String(reason), at: Date.now() };
      return this.closed;
    });
  }

  static async open(url: string): Promise<{ client: Client; openedAt: number }> {
    const client = new Client(new WebSocket(url));
    await once(client.ws, 'open');
    return { client, openedAt: Date.now() };
  }

  send(text: string): void {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
  }

  /** Bounded: a socket the broker keeps open fails the test in seconds, not at the test timeout. */
  waitForClose(timeoutMs = 5000): Promise<{ code: number; reason: string; at: number }> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`still open after ${timeoutMs} ms`)), timeoutMs);
    });
    return Promise.race([this.#closing, timeout]).finally(() => clearTimeout(timer));
  }

  async waitFor(predicate: () => boolean, what: string): Promise<void> {
    const until = Date.now() + 5000;
    while (!predicate()) {
      if (Date.now() > until) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.messages)}`);
      await sleep(10);
    }
  }
}

const handshakes = (c: Client) => c.messages.filter((m) => m.includes('"handshake"')).length;

describe.each([
  ['in-process hub', 0],
  ['1 socket process', 1],
])('the bind window (%s)', (_mode, processes) => {
  const subs = new Map<string, SubscriptionRecord>();
  const tokens = new BindingTokens('k'.repeat(40));
  const clients: Client[] = [];
  let hub: LocalSockets;
  let channel: WebSocketChannel;
  let server: Server;
  let url: string;
  let execArgv: string[];

  beforeAll(async () => {
    const limits = { firstMessageWithinMs: WINDOW_MS, pingIntervalMs: 60_000 };
    // The socket process is a TypeScript file here, as under `npm start`: run it with tsx.
    execArgv = process.execArgv;
    process.execArgv = [...execArgv, '--import', 'tsx'];
    hub =
      processes === 0
        ? new LocalWebSocketHub({ logger: silentLogger, metrics: new Metrics(), limits })
        : await SocketProcessHub.start({ processes, logger: silentLogger, metrics: new Metrics(), limits });
    channel = channelOver(hub, (id) => subs.get(id), tokens);
    hub.handle(channel);
    server = createServer();
    attachWebSocket(server, { hub, apiAuth: new ApiKeyAuth([]), logger: silentLogger });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws`;
  });
  afterAll(async () => {
    process.execArgv = execArgv;
    for (const c of clients) c.ws.terminate();
    hub?.closeAll();
    server?.closeAllConnections();
    server?.close();
  });

  const open = async () => {
    const opened = await Client.open(url);
    clients.push(opened.client);
    return opened;
  };
  const create = (id: string) => subs.set(id, subscription(id));
  const bindText = (...ids: string[]) =>
    `bind-with-token ${tokens.issue({ owner: 'alice', subscriptions: ids, expiresAt: Date.now() + 60_000 })}`;

  it('closes a socket that never binds, even one that keeps sending a bare unbind; keeps a bound one', async () => {
    create('kept');
    const { client: talker, openedAt } = await open();
    const { client: bound } = await open();
    bound.send(bindText('kept'));
    const keep = setInterval(() => talker.send('unbind'), 50);
    const closed = await talker.waitForClose();
    clearInterval(keep);
    // Every `unbind` was answered: talking is not binding.
    expect(talker.messages.length).toBeGreaterThan(3);
    expect(new Set(talker.messages)).toEqual(new Set(['unbound']));
    expect([closed.code, closed.reason]).toEqual([1008, REASON]);
    expect(closed.at - openedAt).toBeGreaterThanOrEqual(WINDOW_MS - 20);

    await sleep(2 * WINDOW_MS);
    expect(handshakes(bound)).toBe(1);
    expect(bound.closed).toBeUndefined();
    await channel.deliver(subs.get('kept') as SubscriptionRecord, 'heartbeat', []);
    await bound.waitFor(() => bound.messages.some((m) => m.includes('"heartbeat"')), 'a heartbeat');
  });

  it('closes a socket that unbinds its last subscription and binds nothing again, a window after the unbind', async () => {
    create('left');
    create('stays');
    const { client: leaves } = await open();
    const { client: partly } = await open();
    leaves.send(bindText('left'));
    partly.send(bindText('left', 'stays'));
    await leaves.waitFor(() => handshakes(leaves) === 1, 'the handshake');
    await partly.waitFor(() => handshakes(partly) === 2, 'two handshakes');
    // Bound past the first window.
    await sleep(WINDOW_MS + 100);

    const unboundAt = Date.now();
    leaves.send('unbind left');
    partly.send('unbind left');
    const keep = setInterval(() => leaves.send('unbind'), 50);
    const closed = await leaves.waitForClose();
    clearInterval(keep);
    expect(leaves.messages).toContain('unbound left');
    expect([closed.code, closed.reason]).toEqual([1008, REASON]);
    expect(closed.at - unboundAt).toBeGreaterThanOrEqual(WINDOW_MS - 20);
    // Still bound to one: it stays.
    await sleep(WINDOW_MS);
    expect(partly.closed).toBeUndefined();
  });

  it('lets a socket whose subscription is deleted bind again within the window, else closes it', async () => {
    create('deleted-a');
    create('deleted-b');
    create('other');
    const { client: rebinds } = await open();
    const { client: idle } = await open();
    rebinds.send(bindText('deleted-a', 'other'));
    idle.send(bindText('deleted-b', 'other'));
    await rebinds.waitFor(() => handshakes(rebinds) === 2, 'two handshakes');
    await idle.waitFor(() => handshakes(idle) === 2, 'two handshakes');
    await sleep(WINDOW_MS + 100);

    // Deleted: each socket keeps `other`, and stays.
    subs.delete('deleted-a');
    subs.delete('deleted-b');
    await channel.subscriptionChanged('deleted-a');
    await channel.subscriptionChanged('deleted-b');
    await rebinds.waitFor(() => rebinds.messages.some((m) => m.includes('"unbound"')), 'the unbound message');
    // Then `other` goes too, by the client's own unbind: the window starts.
    const lostAt = Date.now();
    rebinds.send('unbind other');
    idle.send('unbind other');
    await sleep(WINDOW_MS / 3);
    create('fresh');
    rebinds.send(bindText('fresh'));
    await rebinds.waitFor(() => handshakes(rebinds) === 3, 'the new handshake');
    const closed = await idle.waitForClose();
    expect([closed.code, closed.reason]).toEqual([1008, REASON]);
    expect(closed.at - lostAt).toBeGreaterThanOrEqual(WINDOW_MS - 20);
    await sleep(WINDOW_MS);
    expect(rebinds.closed).toBeUndefined();
  });

  it('still closes a socket left with no binding by a deleted subscription at once (4003)', async () => {
    create('doomed');
    const { client } = await open();
    client.send(bindText('doomed'));
    await client.waitFor(() => handshakes(client) === 1, 'the handshake');
    const deletedAt = Date.now();
    subs.delete('doomed');
    await channel.subscriptionChanged('doomed');
    const closed = await client.waitForClose();
    expect([closed.code, closed.reason]).toEqual([4003, 'Subscription/doomed is deleted']);
    expect(closed.at - deletedAt).toBeLessThan(WINDOW_MS);
  });
});
