import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { type LocalSockets, remoteAddressOf } from '../delivery/local-websocket-hub.js';
import { MEDPLUM_WS_PATH } from '../delivery/medplum-dialect.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { ApiKeyAuth } from './auth.js';

/**
 * `GET /ws` upgrades on the broker's own port. An `Authorization: Bearer <API key>` header is
 * optional (binding tokens authenticate `bind-with-token`); when present it must be valid and it
 * proves the owner for the classic R4 `bind <id>`.
 */

// 30 s: the bind window (HubLimits.firstMessageWithinMs); by then each socket that held a place
// has bound or been closed.
const UNBOUND_RETRY_AFTER_S = 30;

export function attachWebSocket(
  server: Server,
  deps: {
    hub: LocalSockets;
    apiAuth: ApiKeyAuth;
    logger: Logger;
    /** Counts the refused upgrades (one log line each would let a flood fill the log). */
    metrics?: Metrics;
    maxConnections?: number;
    /** Open sockets holding no binding per remote address; absent or 0: no cap. */
    maxUnboundPerAddress?: number;
  },
): void {
  const max = deps.maxConnections ?? Number.POSITIVE_INFINITY;
  // 0 turns the per-address cap off, as absent does.
  const maxUnbound = deps.maxUnboundPerAddress || Number.POSITIVE_INFINITY;
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => socket.destroy());
    const path = (req.url ?? '/').split('?')[0];
    // `/ws`, and Medplum's path for its client's subscription manager (medplum-dialect.ts).
    if (path !== '/ws' && path !== MEDPLUM_WS_PATH) return refuse(socket, 404, 'Not Found');
    // A cap on open sockets (BROKER_WS_MAX_CONNECTIONS): past it, clients retry later.
    if (deps.hub.size >= max) {
      deps.metrics?.inc('broker_websocket_refused_total', { reason: 'max-connections' });
      return refuse(socket, 503, 'Service Unavailable');
    }
    // Anyone may open a socket, so one address could fill the cap above with sockets that never
    // bind (BROKER_WS_MAX_UNBOUND_PER_ADDRESS); a bound socket no longer counts.
    if (deps.hub.unboundFrom(remoteAddressOf(req)) >= maxUnbound) {
      deps.metrics?.inc('broker_websocket_refused_total', { reason: 'unbound-per-address' });
      return refuse(socket, 429, 'Too Many Requests', `Retry-After: ${UNBOUND_RETRY_AFTER_S}\r\n`);
    }
    let owner: string | undefined;
    if (req.headers.authorization !== undefined) {
      try {
        owner = deps.apiAuth.authenticate(req.headers.authorization);
      } catch {
        return refuse(socket, 401, 'Unauthorized');
      }
    }
    deps.hub.upgrade(req, socket, head, owner);
  });
}

function refuse(socket: Duplex, status: number, text: string, headers = ''): void {
  socket.end(`HTTP/1.1 ${status} ${text}\r\n${headers}Connection: close\r\nContent-Length: 0\r\n\r\n`);
}
