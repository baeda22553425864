import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import type { LocalSockets } from '../delivery/local-websocket-hub.js';
import type { Logger } from '../observability/logger.js';
import type { ApiKeyAuth } from './auth.js';

/**
 * `GET /ws` upgrades on the broker's own port. An `Authorization: Bearer <API key>` header is
 * optional (binding tokens authenticate `bind-with-token`); when present it must be valid and it
 * proves the owner for the classic R4 `bind <id>`.
 */

export function attachWebSocket(
  server: Server,
  deps: { hub: LocalSockets; apiAuth: ApiKeyAuth; logger: Logger; maxConnections?: number },
): void {
  const max = deps.maxConnections ?? Number.POSITIVE_INFINITY;
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => socket.destroy());
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/ws') return refuse(socket, 404, 'Not Found');
    // A cap on open sockets (BROKER_WS_MAX_CONNECTIONS): past it, clients retry later.
    if (deps.hub.size >= max) return refuse(socket, 503, 'Service Unavailable');
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

function refuse(socket: Duplex, status: number, text: string): void {
  socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}
