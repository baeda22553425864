import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, expect, it } from 'vitest';
import WebSocket from 'ws';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import { LocalWebSocketHub } from './local-websocket-hub.js';

/** The in-process hub on a real server with real `ws` clients: a socket that never speaks is let go. */

let server: Server | undefined;
let hub: LocalWebSocketHub | undefined;
afterEach(async () => {
  hub?.closeAll();
  server?.closeAllConnections();
  server?.close();
});

it('closes a connection that sends nothing within the limit (1008), and keeps one that spoke', async () => {
  const metrics = new Metrics();
  hub = new LocalWebSocketHub({
    logger: silentLogger,
    metrics,
    limits: { pingIntervalMs: 100, firstMessageWithinMs: 250 },
  });
  const local = hub;
  local.handle({ onMessage: async () => {}, onClose: async () => {} });
  server = createServer();
  server.on('upgrade', (req, socket, head) => local.upgrade(req, socket, head, undefined));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws`;
  const silent = new WebSocket(url);
  const speaking = new WebSocket(url);
  await Promise.all([once(silent, 'open'), once(speaking, 'open')]);
  speaking.send('unbind');
  const [code, reason] = (await once(silent, 'close')) as [number, Buffer];
  expect(code).toBe(1008);
  expect(reason.toString()).toBe('no message within 0 s');
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(speaking.readyState).toBe(WebSocket.OPEN);
  expect(metrics.value('broker_websocket_closed_total', { reason: 'silent' })).toBe(1);
  speaking.close();
});
