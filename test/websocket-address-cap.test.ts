import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { SubscriptionRecord } from '../src/core/types.js';
import {
  type HubLimits,
  type LocalSockets,
  LocalWebSocketHub,
  remoteAddressOf,
  UnboundByAddress,
} from '../src/delivery/local-websocket-hub.js';
import { SocketProcessHub } from '../src/delivery/socket-process-hub.js';
import { BindingTokens } from '../src/delivery/ws-binding-token.js';
import { ApiKeyAuth } from '../src/http/auth.js';
import { attachWebSocket } from '../src/http/websocket-upgrade.js';
import { silentLogger } from '../src/observability/logger.js';
import { Metrics } from '../src/observability/metrics.js';
import { INGEST_TOKEN, startBroker } from './support/broker-process.js';
import { record } from './support/store-fixtures.js';
import { Waiters } from './support/waiters.js';
import { channelOver } from './support/ws-channel.js';

/**
 * The per-address cap on sockets that hold no binding (BROKER_WS_MAX_UNBOUND_PER_ADDRESS): real
 * `ws` clients through the `/ws` upgrade on port 0, the real channel and bindings, and each local
 * socket layer (in process; a socket process). Anyone may open a socket, so without it one address
 * could fill BROKER_WS_MAX_CONNECTIONS with sockets that never bind. A socket counts from its
 * upgrade until it binds, and again from losing its last binding until it closes.
 */

const ADDRESS = '127.0.0.1';
const REFUSED = { reason: 'unbound-per-address' } as const;

const subscription = (id: string): SubscriptionRecord =>
  record(id, {
    match: { resourceTypes: '*', interactions: ['update'] },
    channel: { type: 'websocket', content: 'id-only', headers: [], maxCount: 1 },
  });

type Upgrade = { status: 101; ws: WebSocket } | { status: number; retryAfter: string | undefined };

/** One upgrade request: the open socket, or the refusal's status and Retry-After. */
function upgrade(url: string): Promise<Upgrade> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.once('open', () => resolve({ status: 101, ws }));
    ws.once('unexpected-response', (_req, res) => {
      res.resume();
      resolve({ status: res.statusCode ?? 0, retryAfter: res.headers['retry-after'] });
    });
    // Every error is heard (a later one, once open, is no concern of the upgrade's).
    ws.on('error', reject);
  });
}

/** A local socket layer behind `attachWebSocket`, whose closes the test can wait for. */
interface Stack {
  readonly url: string;
  readonly hub: LocalSockets;
  readonly metrics: Metrics;
  /** An accepted socket (fails the test on a refusal). */
  open(): Promise<WebSocket>;
  /** Binds the socket to a new subscription and waits for the handshake (it was reported bound before). */
  bind(ws: WebSocket, id: string): Promise<void>;
  /** Resolves once the socket layer has let go of `n` sockets in all (reported them closed). */
  closed(n: number): Promise<void>;
  stop(): Promise<void>;
}

let execArgv: string[];
let stack: Stack | undefined;
beforeAll(() => {
  // The socket process is a TypeScript file here, as under `npm start`: run it with tsx.
  execArgv = process.execArgv;
  process.execArgv = [...execArgv, '--import', 'tsx'];
});
afterAll(() => {
  process.execArgv = execArgv;
});
afterEach(async () => {
  await stack?.stop();
  stack = undefined;
});

async function start(
  processes: number,
  options: {
    maxUnboundPerAddress: number;
    maxConnections?: number;
    limits?: Partial<HubLimits>;
  },
): Promise<Stack> {
  const limits = { pingIntervalMs: 60_000, ...options.limits };
  const metrics = new Metrics();
  const hub: LocalSockets =
    processes === 0
      ? new LocalWebSocketHub({ logger: silentLogger, metrics, limits })
      : await SocketProcessHub.start({ processes, logger: silentLogger, metrics, limits });
  const subs = new Map<string, SubscriptionRecord>();
  const tokens = new BindingTokens('k'.repeat(40));
  const channel = channelOver(hub, (id) => subs.get(id), tokens);
  // Both layers report a socket closed after it has left the unbound count.
  const waiters = new Waiters();
  let closes = 0;
  hub.handle({
    onMessage: (conn, text) => channel.onMessage(conn, text),
    async onClose(connectionId) {
      await channel.onClose(connectionId);
      closes++;
      waiters.wake();
    },
  });
  const server: Server = createServer();
  attachWebSocket(server, {
    hub,
    apiAuth: new ApiKeyAuth([]),
    logger: silentLogger,
    metrics,
    maxUnboundPerAddress: options.maxUnboundPerAddress,
    ...(options.maxConnections === undefined ? {} : { maxConnections: options.maxConnections }),
  });
  server.listen(0, ADDRESS);
  await once(server, 'listening');
  const url = `ws://${ADDRESS}:${(server.address() as AddressInfo).port}/ws`;
  const clients: WebSocket[] = [];
  return {
    url,
    hub,
    metrics,
    async open() {
      const up = await upgrade(url);
      if (up.status !== 101 || !('ws' in up)) throw new Error(`upgrade refused: ${up.status}`);
      clients.push(up.ws);
      return up.ws;
    },
    async bind(ws, id) {
      subs.set(id, subscription(id));
      const handshake = once(ws, 'message');
      ws.send(
        `bind-with-token ${tokens.issue({ owner: 'alice', subscriptions: [id], expiresAt: Date.now() + 60_000 })}`,
      );
      expect(String((await handshake)[0])).toContain('"handshake"');
    },
    async closed(n) {
      await waiters.until(() => (closes >= n ? true : undefined), `${n} sockets closed`, 10_000);
      expect(closes).toBe(n);
    },
    async stop() {
      for (const c of clients) c.terminate();
      hub.closeAll();
      server.closeAllConnections();
      server.close();
      // The socket processes this test started (closeAll keeps them from being replaced).
      if (!(hub instanceof SocketProcessHub)) return;
      for (const pid of hub.pids) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          // Already gone (the test killed it).
        }
      }
    },
  };
}

describe.each([
  ['in-process hub', 0],
  ['1 socket process', 1],
])('the per-address cap on unbound sockets (%s)', (_mode, processes) => {
  it('answers 429 with Retry-After past the cap, and takes an upgrade again once a socket binds or closes', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 3 });
    const [a, b, c] = [await stack.open(), await stack.open(), await stack.open()];
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(3);
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });

    // Bound: it no longer counts.
    await stack.bind(a, 'binds');
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(2);
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });

    // Closed by the client.
    b.close();
    await stack.closed(1);
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(2);
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });

    // Closed by the broker, for a flood of messages (4002).
    const flooded = once(c, 'close');
    for (let i = 0; i < 200; i++) c.send('unbind');
    expect((await flooded)[0]).toBe(4002);
    await stack.closed(2);
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });
    expect(stack.metrics.value('broker_websocket_refused_total', REFUSED)).toBe(4);
  });

  it('counts a socket again from losing its last binding until it closes', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 2 });
    const a = await stack.open();
    await stack.bind(a, 'left');
    const [b, c] = [await stack.open(), await stack.open()];
    const unbound = once(a, 'message');
    a.send('unbind left');
    expect(String((await unbound)[0])).toBe('unbound left');
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(3);

    b.close();
    c.close();
    await stack.closed(2);
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(1);
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });

    a.close();
    await stack.closed(3);
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(1);
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });
  });

  it('takes an upgrade again once the bind window has closed a socket that never bound', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 1, limits: { firstMessageWithinMs: 300 } });
    const idle = await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });
    const [code] = await once(idle, 'close');
    expect(code).toBe(1008);
    await stack.closed(1);
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(0);
    await stack.open();
  });

  it('does not count bound sockets: an address with bound sockets may still open its unbound ones', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 2 });
    for (let i = 0; i < 4; i++) await stack.bind(await stack.open(), `bound-${i}`);
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(0);
    await stack.open();
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });
    expect(stack.hub.size).toBe(6);
  });

  it('has no cap at 0', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 0 });
    for (let i = 0; i < 10; i++) await stack.open();
    expect(stack.hub.unboundFrom(ADDRESS)).toBe(10);
    expect(stack.metrics.value('broker_websocket_refused_total', REFUSED)).toBe(0);
  });

  it('counts the upgrades refused past BROKER_WS_MAX_CONNECTIONS too', async () => {
    stack = await start(processes, { maxUnboundPerAddress: 5, maxConnections: 1 });
    await stack.open();
    expect(await upgrade(stack.url)).toEqual({ status: 503, retryAfter: undefined });
    expect(stack.metrics.value('broker_websocket_refused_total', { reason: 'max-connections' })).toBe(1);
    expect(stack.metrics.value('broker_websocket_refused_total', REFUSED)).toBe(0);
  });
});

describe('the per-address cap over socket processes', () => {
  it('forgets the sockets of a socket process that died', async () => {
    stack = await start(1, { maxUnboundPerAddress: 2 });
    const [a, b] = [await stack.open(), await stack.open()];
    expect(await upgrade(stack.url)).toEqual({ status: 429, retryAfter: '30' });
    const gone = Promise.all([once(a, 'close'), once(b, 'close')]);
    for (const pid of (stack.hub as SocketProcessHub).pids) process.kill(pid, 'SIGKILL');
    await stack.closed(2);
    await gone;
    expect([stack.hub.size, stack.hub.unboundFrom(ADDRESS)]).toEqual([0, 0]);
  });
});

describe('the per-address cap, set by BROKER_WS_MAX_UNBOUND_PER_ADDRESS (real server process)', () => {
  it.each([
    ['in-process hub', '0'],
    ['2 socket processes', '2'],
  ])('answers 429 past it and counts the refusal in /metrics (%s)', async (_mode, wsProcesses) => {
    const broker = await startBroker({ BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '2', BROKER_WS_PROCESSES: wsProcesses });
    const url = `${broker.url.replace('http', 'ws')}/ws`;
    const open: WebSocket[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const up = await upgrade(url);
        expect(up.status).toBe(101);
        if ('ws' in up) open.push(up.ws);
      }
      expect(await upgrade(url)).toEqual({ status: 429, retryAfter: '30' });
      const res = await fetch(`${broker.url}/metrics`, { headers: { authorization: `Bearer ${INGEST_TOKEN}` } });
      expect(await res.text()).toContain('broker_websocket_refused_total{reason="unbound-per-address"} 1\n');
    } finally {
      for (const ws of open) ws.terminate();
      await broker.kill('SIGTERM');
    }
  });
});

describe('the unbound count by address', () => {
  it('keys an IPv4-mapped IPv6 peer by its IPv4 address, any other IPv6 peer by its /64', () => {
    const of = (remoteAddress: string | undefined) => remoteAddressOf({ socket: { remoteAddress } });
    expect([of('::ffff:10.0.0.7'), of('10.0.0.7'), of('::1'), of(undefined)]).toEqual([
      '10.0.0.7',
      '10.0.0.7',
      '0:0:0:0::/64',
      '',
    ]);
    // Two addresses of one /64, written differently, are one key; the next /64 is another.
    expect(of('2001:db8:0:1::ffff:1')).toBe('2001:db8:0:1::/64');
    expect(of('2001:0db8:0000:0001:abcd:1:2:3')).toBe('2001:db8:0:1::/64');
    expect(of('2001:db8:0:2::1')).toBe('2001:db8:0:2::/64');
    expect(of('2001:db8::1')).toBe('2001:db8:0:0::/64');
    expect(of('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(of('64:ff9b::192.0.2.1')).toBe('64:ff9b:0:0::/64');
  });

  it('drops an address whose count reaches 0', () => {
    const counts = new UnboundByAddress();
    counts.add('10.0.0.1');
    counts.add('10.0.0.1');
    counts.add('10.0.0.2');
    counts.remove('10.0.0.1');
    expect([counts.of('10.0.0.1'), counts.addresses]).toEqual([1, 2]);
    counts.remove('10.0.0.1');
    counts.remove('10.0.0.2');
    expect([counts.of('10.0.0.1'), counts.addresses]).toEqual([0, 0]);
  });
});
