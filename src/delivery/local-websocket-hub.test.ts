import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, expect, it } from 'vitest';
import WebSocket from 'ws';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import { LocalWebSocketHub } from './local-websocket-hub.js';

/**
 * The in-process hub on a real server with real `ws` clients: a socket that holds no binding for
 * the bind window is let go, however much it talks. The handler stands in for the channel: `bind`
 * reports the connection bound, `unbind` reports it holds none (as a bare `unbind` does, valid with
 * no binding at all).
 */

const WINDOW_MS = 300;

let server: Server | undefined;
let hub: LocalWebSocketHub | undefined;
afterEach(async () => {
  hub?.closeAll();
  server?.closeAllConnections();
  server?.close();
});

async function start(metrics = new Metrics()): Promise<string> {
  hub = new LocalWebSocketHub({
    logger: silentLogger,
    metrics,
    limits: { pingIntervalMs: 100, firstMessageWithinMs: WINDOW_MS },
  });
  const local = hub;
  local.handle({
    onMessage: async (conn, text) => {
      if (text === 'bind') local.markBound(conn.id, true);
      if (text === 'unbind') local.markBound(conn.id, false);
      local.sendNow(conn.id, text === 'bind' ? 'bound' : 'unbound');
    },
    onClose: async () => {},
  });
  server = createServer();
  server.on('upgrade', (req, socket, head) => local.upgrade(req, socket, head, undefined));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return `ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws`;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The close of `ws`; bounded, so that a socket kept open fails the test in seconds. */
async function closeOf(ws: WebSocket, timeoutMs = 5000): Promise<{ code: number; reason: string; at: number }> {
  const [code, reason] = (await once(ws, 'close', { signal: AbortSignal.timeout(timeoutMs) })) as [number, Buffer];
  return { code, reason: reason.toString(), at: Date.now() };
}

it('closes a socket that binds nothing within the window (1008), even one that keeps talking; keeps one that bound', async () => {
  const metrics = new Metrics();
  const url = await start(metrics);
  // Before the upgrades: the window starts at each upgrade, so no close can come sooner than this
  // plus the window, however late this loaded machine runs the client's 'open' events.
  const createdAt = Date.now();
  const silent = new WebSocket(url);
  const talker = new WebSocket(url);
  const bound = new WebSocket(url);
  await Promise.all([once(silent, 'open'), once(talker, 'open'), once(bound, 'open')]);
  bound.send('bind');
  // Talking (a bare `unbind`, answered `unbound`) is not binding.
  const keep = setInterval(() => talker.readyState === WebSocket.OPEN && talker.send('unbind'), 50);
  const [silentClosed, talkerClosed] = await Promise.all([closeOf(silent), closeOf(talker)]);
  clearInterval(keep);
  for (const closed of [silentClosed, talkerClosed]) {
    expect([closed.code, closed.reason]).toEqual([1008, `no subscription bound within ${WINDOW_MS} ms`]);
    // Not a ping round early; and measured from the open, not from the last `unbind` (the talker,
    // which sends one every 50 ms, would never be closed: `closeOf` gives up after 5 s).
    expect(closed.at - createdAt).toBeGreaterThanOrEqual(WINDOW_MS - 2);
  }
  await sleep(3 * WINDOW_MS);
  expect(bound.readyState).toBe(WebSocket.OPEN);
  expect(metrics.value('broker_websocket_closed_total', { reason: 'unbound' })).toBe(2);
  bound.close();
});

it('gives a socket that loses its last binding the window again, from the loss; a new bind within it keeps it', async () => {
  const url = await start();
  const leaves = new WebSocket(url);
  const rebinds = new WebSocket(url);
  await Promise.all([once(leaves, 'open'), once(rebinds, 'open')]);
  leaves.send('bind');
  rebinds.send('bind');
  // Bound past the first window: both stay.
  await sleep(2 * WINDOW_MS);
  expect([leaves.readyState, rebinds.readyState]).toEqual([WebSocket.OPEN, WebSocket.OPEN]);

  const lostAt = Date.now();
  leaves.send('unbind');
  rebinds.send('unbind');
  await sleep(WINDOW_MS / 3);
  rebinds.send('bind');
  const closed = await closeOf(leaves);
  expect([closed.code, closed.reason]).toEqual([1008, `no subscription bound within ${WINDOW_MS} ms`]);
  expect(closed.at - lostAt).toBeGreaterThanOrEqual(WINDOW_MS - 20);
  expect(closed.at - lostAt).toBeLessThan(WINDOW_MS + 3000);
  await sleep(2 * WINDOW_MS);
  expect(rebinds.readyState).toBe(WebSocket.OPEN);
  rebinds.close();
});
