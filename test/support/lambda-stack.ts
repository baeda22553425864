import { type Config, loadConfig } from '../../src/config.js';
import { LOCAL_REGION } from './dynamodb-local.js';
import type { Json } from './fhir-client.js';

/**
 * What the Lambda tests on DynamoDB Local share: the configuration of their stack (tables under a
 * prefix, one API client, a WebSocket API behind made-up public URLs), a websocket Subscription,
 * and API Gateway WebSocket events.
 */

export const LAMBDA_TOKENS = {
  alice: 'alice-token-0123456789abcdef',
  ingest: 'ingest-token-0123456789abcdef',
} as const;

/**
 * The stack's configuration: DynamoDB tables named `<prefix>…`, alice as the API client, webhooks
 * to 127.0.0.1; `extra` adds to (or replaces) those variables.
 */
export function lambdaConfig(prefix: string, extra: Readonly<Record<string, string>> = {}): Config {
  return loadConfig({
    BROKER_STORE: 'dynamodb',
    BROKER_TABLE_PREFIX: prefix,
    BROKER_API_KEYS: `alice:${LAMBDA_TOKENS.alice}`,
    BROKER_INGEST_TOKEN: LAMBDA_TOKENS.ingest,
    BROKER_WS_TOKEN_SECRET: 'lambda-ws-secret-0123456789abcdefghijkl',
    BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
    BROKER_PUBLIC_URL: 'https://api.example.com',
    BROKER_WEBSOCKET_URL: 'wss://ws.example.com/prod',
    AWS_REGION: LOCAL_REGION,
    ...extra,
  });
}

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';

/** A websocket Subscription to one patient's changes, id-only content; `channel` adds to its channel. */
export function websocketSubscription(patientId: string, channel: Json = {}): Json {
  return {
    resourceType: 'Subscription',
    reason: 'test',
    criteria: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
    _criteria: {
      extension: [{ url: `${BACKPORT}/backport-filter-criteria`, valueString: `Patient?_id=${patientId}` }],
    },
    channel: {
      type: 'websocket',
      payload: 'application/fhir+json',
      _payload: { extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: 'id-only' }] },
      ...channel,
    },
  };
}

/** An API Gateway WebSocket event (`$connect`, `$disconnect`, `$default`) for one connection. */
export function wsEvent(
  connectionId: string,
  routeKey: string,
  extra: { body?: string; headers?: Record<string, string> } = {},
): { requestContext: { connectionId: string; routeKey: string }; body?: string; headers?: Record<string, string> } {
  return { requestContext: { connectionId, routeKey }, ...extra };
}
