import {
  type ApiGatewayManagementApiClient,
  DeleteConnectionCommand,
  GetConnectionCommand,
  GoneException,
  PostToConnectionCommand,
} from '@aws-sdk/client-apigatewaymanagementapi';
import type { SendOutcome, WebSocketPort } from '../delivery/websocket-port.js';
import type { Logger } from '../observability/logger.js';

/**
 * The WebSocket port over API Gateway's management API (`PostToConnection`). A `GoneException`
 * means the client left without a `$disconnect` (API Gateway's is best effort): the caller forgets
 * the connection. Messages over API Gateway's 128 KiB limit are replaced by a small error message
 * that points the client at `$events`, instead of failing silently.
 */

/** 128 KiB: API Gateway WebSocket's maximum message size. */
export const MAX_MESSAGE_BYTES = 128 * 1024;

export class ApiGatewayWebSocketPort implements WebSocketPort {
  readonly #client: ApiGatewayManagementApiClient;
  readonly #logger: Logger;

  constructor(deps: { client: ApiGatewayManagementApiClient; logger: Logger }) {
    this.#client = deps.client;
    this.#logger = deps.logger;
  }

  async send(connectionId: string, text: string): Promise<SendOutcome> {
    const bytes = Buffer.byteLength(text);
    const data =
      bytes <= MAX_MESSAGE_BYTES
        ? text
        : JSON.stringify({
            type: 'error',
            payload: {
              message: `notification of ${bytes} bytes exceeds API Gateway's 128 KiB message limit; fetch it with GET Subscription/{id}/$events`,
              ...eventNumbersOf(text),
            },
          });
    if (bytes > MAX_MESSAGE_BYTES)
      this.#logger.warn('websocket message too large, sent a pointer instead', { connection: connectionId, bytes });
    try {
      await this.#client.send(new PostToConnectionCommand({ ConnectionId: connectionId, Data: Buffer.from(data) }));
      return 'sent';
    } catch (err) {
      if (err instanceof GoneException || (err as { name?: string }).name === 'GoneException') return 'gone';
      this.#logger.warn('PostToConnection failed', { connection: connectionId, err: err as Error });
      return 'refused';
    }
  }

  async close(connectionId: string, _code: number, reason: string): Promise<void> {
    // API Gateway cannot send a close code or reason; the reason goes to the log.
    this.#logger.info('closing websocket', { connection: connectionId, reason });
    try {
      await this.#client.send(new DeleteConnectionCommand({ ConnectionId: connectionId }));
    } catch (err) {
      if (!(err instanceof GoneException) && (err as { name?: string }).name !== 'GoneException') throw err;
    }
  }

  async isOpen(connectionId: string): Promise<boolean> {
    try {
      await this.#client.send(new GetConnectionCommand({ ConnectionId: connectionId }));
      return true;
    } catch (err) {
      if (err instanceof GoneException || (err as { name?: string }).name === 'GoneException') return false;
      throw err;
    }
  }
}

/** The subscription and event numbers of an oversized bundle, so the client knows what to fetch. */
function eventNumbersOf(text: string): { subscription?: string; eventNumbers?: string[] } {
  try {
    const bundle = JSON.parse(text) as {
      entry?: {
        resource?: {
          parameter?: {
            name: string;
            valueReference?: { reference?: string };
            part?: { name: string; valueString?: string }[];
          }[];
        };
      }[];
    };
    const params = bundle.entry?.[0]?.resource?.parameter ?? [];
    const subscription = params.find((p) => p.name === 'subscription')?.valueReference?.reference;
    const eventNumbers = params
      .filter((p) => p.name === 'notification-event')
      .map((p) => p.part?.find((x) => x.name === 'event-number')?.valueString)
      .filter((n): n is string => n !== undefined);
    return { ...(subscription === undefined ? {} : { subscription }), eventNumbers };
  } catch {
    return {};
  }
}
