import type { APIGatewayProxyStructuredResultV2, Context } from 'aws-lambda';
import { handle } from 'hono/aws-lambda';
import { BrokerError } from '../core/errors.js';
import type { AwsBroker } from './aws-broker.js';

/**
 * The Lambda entry points, as functions of one broker (built once per container). Each awaits
 * the dispatcher before returning: a frozen container sends nothing. `lambda-*.ts` bind these to
 * a broker made from the environment; tests bind them to DynamoDB Local and a management-API double.
 */

/**
 * Another instance may have changed subscriptions: re-read them when the copy is older than this.
 * Not for events: they are matched against the store's type index, and the subscriptions they
 * notify are re-read (IngestService), so another instance's subscription matches at once.
 */
const SUBSCRIPTION_CACHE_MS = 5_000;
/** How long an invocation waits for deliveries it started (retries continue in the scheduled dispatcher). */
const DELIVERY_BUDGET_MS = 20_000;

/** The parts of API Gateway WebSocket events the handlers read. */
export interface WebSocketEvent {
  readonly requestContext: { readonly connectionId?: string; readonly routeKey?: string };
  readonly headers?: Readonly<Record<string, string | undefined>>;
  readonly body?: string | null;
  readonly isBase64Encoded?: boolean;
}

export interface Handlers {
  /** EventBridge target: one event (or an array). Throws when the store fails, so EventBridge retries. */
  events(event: unknown): Promise<{ accepted: number; ignored: number; duplicates: number }>;
  api(event: Parameters<ReturnType<typeof handle>>[0], context: Context): ReturnType<ReturnType<typeof handle>>;
  connect(event: WebSocketEvent): Promise<APIGatewayProxyStructuredResultV2>;
  disconnect(event: WebSocketEvent): Promise<APIGatewayProxyStructuredResultV2>;
  message(event: WebSocketEvent): Promise<APIGatewayProxyStructuredResultV2>;
  /** Scheduled every `windowMs`: owed handshakes, retries, heartbeats, retention. */
  dispatch(windowMs?: number): Promise<{ heartbeats: number }>;
}

export function createHandlers(brokerPromise: Promise<AwsBroker>): Handlers {
  const ready = async (): Promise<AwsBroker> => {
    const broker = await brokerPromise;
    await broker.refreshSubscriptions(SUBSCRIPTION_CACHE_MS);
    return broker;
  };
  /** Before a handler returns (the container may freeze): deliveries under way, then lifecycle events. */
  const settle = async (broker: AwsBroker): Promise<void> => {
    await broker.dispatcher.idle(DELIVERY_BUDGET_MS);
    await broker.flushLifecycle();
  };
  let api: ReturnType<typeof handle> | undefined;

  return {
    async events(event) {
      const broker = await brokerPromise;
      const result = await broker.ingest.ingest(event);
      await settle(broker);
      return result;
    },

    async api(event, context) {
      const broker = await ready();
      api ??= handle(broker.app);
      const response = await api(event, context);
      await settle(broker);
      return response;
    },

    async connect(event) {
      // Only the API keys and the connections table: no subscription reload on this path.
      const broker = await brokerPromise;
      const connectionId = event.requestContext.connectionId ?? '';
      const authorization = header(event, 'authorization');
      let owner: string | undefined;
      if (authorization !== undefined) {
        try {
          owner = broker.apiAuth.authenticate(authorization);
        } catch (err) {
          if (err instanceof BrokerError) return { statusCode: 401, body: 'Unauthorized' };
          throw err;
        }
      }
      await broker.bindings.connect(connectionId, owner);
      return { statusCode: 200 };
    },

    async disconnect(event) {
      const broker = await brokerPromise;
      await broker.websocket.onClose(event.requestContext.connectionId ?? '');
      return { statusCode: 200 };
    },

    async message(event) {
      const broker = await ready();
      const connectionId = event.requestContext.connectionId ?? '';
      const raw = event.body ?? '';
      const text = event.isBase64Encoded === true ? Buffer.from(raw, 'base64').toString('utf8') : raw;
      const owner = await broker.bindings.ownerOf(connectionId);
      await broker.websocket.onMessage({ id: connectionId, ...(owner === undefined ? {} : { apiOwner: owner }) }, text);
      await settle(broker);
      return { statusCode: 200 };
    },

    async dispatch(windowMs = 60_000) {
      const broker = await ready();
      await broker.start();
      const heartbeats = await broker.dispatcher.sendDueHeartbeats(windowMs);
      await settle(broker);
      return { heartbeats };
    },
  };
}

function header(event: WebSocketEvent, name: string): string | undefined {
  for (const [k, v] of Object.entries(event.headers ?? {})) if (k.toLowerCase() === name) return v;
  return undefined;
}
