import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer } from 'ws';
import type { LocalWebSocketHub } from '../delivery/local-websocket-hub.js';
import type { Logger } from '../observability/logger.js';
import type { ApiKeyAuth } from './auth.js';

/**
 * `GET /ws` upgrades on the broker's own port. An `Authorization: Bearer <API key>` header is
 * optional (binding tokens authenticate `bind-with-token`); when present it must be valid and it
 * proves the owner for the classic R4 `bind <id>`.
 */

// 16 KiB: a bind message with a token is a few hundred bytes; nothing a client sends is larger.
export const MAX_CLIENT_MESSAGE_BYTES = 16 * 1024;

export function attachWebSocket(
  server: Server,
  deps: { hub: LocalWebSocketHub; apiAuth: ApiKeyAuth; logger: Logger },
): WebSocketServer {
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_CLIENT_MESSAGE_BYTES, perMessageDeflate: false });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => socket.destroy());
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/ws') return refuse(socket, 404, 'Not Found');
    let owner: string | undefined;
    if (req.headers.authorization !== undefined) {
      try {
        owner = deps.apiAuth.authenticate(req.headers.authorization);
      } catch {
        return refuse(socket, 401, 'Unauthorized');
      }
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const id = deps.hub.accept(ws, owner);
      deps.logger.debug('websocket connected', { connection: id, owner: owner ?? null });
    });
  });
  return wss;
}

function refuse(socket: Duplex, status: number, text: string): void {
  socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}
