import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import { createLogger, type LogLevel } from '../observability/logger.js';
import { type MetricName, Metrics } from '../observability/metrics.js';
import { LocalWebSocketHub } from './local-websocket-hub.js';
import type { FromSocketProcess, SocketProcessConfig, ToSocketProcess } from './socket-process-protocol.js';

/**
 * A socket process (forked by SocketProcessHub): owns the WebSocket connections the main process
 * hands it, completes their handshake with `ws`, enforces every per-socket limit of the local hub
 * (size, rate, binary, slow consumer, ping/pong, the bind window: the main process reports each
 * connection's bound state) and performs the writes, so a fan-out's one
 * syscall per socket runs on several cores. Client text messages and closes go to the main
 * process, which holds the bindings and the channel. Exits when the main process goes away.
 */

const config = JSON.parse(process.argv[2] ?? '{}') as SocketProcessConfig;

const post = (msg: FromSocketProcess): void => {
  // The channel can close between the check and the write (the main process exiting): the error
  // then goes to the callback, not out as an unhandled EPIPE; the process exits on 'disconnect'.
  if (process.connected) process.send?.(msg, undefined, undefined, () => undefined);
};

/** Counters go to the main process's metrics (the one `/metrics` serves). */
class RelayedMetrics extends Metrics {
  override inc(name: MetricName, labels: Readonly<Record<string, string>> = {}, by = 1): void {
    post({ t: 'inc', name, labels, by });
  }
}

const hub = new LocalWebSocketHub({
  logger: createLogger((config.logLevel ?? 'info') as LogLevel),
  metrics: new RelayedMetrics(),
  limits: config.limits ?? {},
});
hub.handle({
  async onMessage(conn, text) {
    post({ t: 'msg', id: conn.id, text });
  },
  async onClose(connectionId) {
    post({ t: 'closed', id: connectionId });
  },
});

process.on('message', (msg: ToSocketProcess, handle?: unknown) => {
  switch (msg.t) {
    case 'up': {
      const socket = handle as Socket | undefined;
      if (socket === undefined) {
        post({ t: 'closed', id: msg.id });
        return;
      }
      socket.on('error', () => socket.destroy());
      // Only what ws reads from an upgrade request: method, url, headers, socket.
      const req = { method: 'GET', url: msg.url, headers: msg.headers, socket } as unknown as IncomingMessage;
      let accepted = false;
      socket.once('close', () => {
        if (!accepted) post({ t: 'closed', id: msg.id });
      });
      hub.upgrade(req, socket, Buffer.from(msg.head, 'base64'), msg.owner, msg.id);
      // ws completes the handshake synchronously (no verifyClient, no compression); a refused
      // one ends the socket, and the close listener reports it.
      accepted = hub.isOpenNow(msg.id);
      return;
    }
    case 'send':
      post({ t: 're', rq: msg.rq, v: hub.sendNow(msg.id, msg.text) });
      return;
    case 'many':
      post({ t: 're', rq: msg.rq, v: hub.sendManyNow(msg.ids, msg.text) });
      return;
    case 'close':
      void hub.close(msg.id, msg.code, msg.reason);
      return;
    case 'bound':
      hub.markBound(msg.id, msg.bound);
      return;
    case 'open?':
      post({ t: 're', rq: msg.rq, v: hub.isOpenNow(msg.id) });
      return;
    case 'drained?':
      void hub.drained(msg.id).then(() => post({ t: 're', rq: msg.rq, v: true }));
      return;
    case 'closeAll':
      hub.closeAll(msg.code, msg.reason);
      return;
  }
});
// The main process is gone (or closed the channel): nothing left to serve.
process.on('disconnect', () => process.exit(0));
post({ t: 'ready' });
