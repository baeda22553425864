import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { GetSecretValueCommand, SecretsManagerClient } from '@aws-sdk/client-secrets-manager';
import type { SQSClient } from '@aws-sdk/client-sqs';
import { type Broker, type BrokerOverrides, createBroker, sqsClientFor } from '../broker.js';
import { type Config, loadConfigWith } from '../config.js';
import { systemClock } from '../core/types.js';
import { createLogger } from '../observability/logger.js';
import { DynamoDbBindings } from '../store/dynamodb/dynamodb-bindings.js';
import { DynamoDbStore } from '../store/dynamodb/dynamodb-store.js';
import type { MatchCandidate } from '../store/store.js';
import { ApiGatewayWebSocketPort } from './apigw-websocket-port.js';
import { RefusedEventQueue } from './refused-events.js';

/**
 * The broker as Lambda functions see it: DynamoDB store and bindings, API Gateway as the
 * WebSocket port, credentials from Secrets Manager. Built once per container (module top level
 * of each handler) and reused across invocations.
 */

/** How long one SendMessage of a refused event may take (the SDK retries a failed one within its attempts). */
const DEAD_LETTER_SEND_TIMEOUT_MS = 5_000;

export interface AwsBroker extends Broker {
  readonly bindings: DynamoDbBindings;
  /**
   * Reads the credentials secret again once the last read is `maxAgeMs` old (no secret configured:
   * nothing to do): the API keys, the ingest token and the binding-token key (see
   * `Broker.setCredentials`). A warm container kept those it started with, so a key removed from
   * the secret went on working until every container was recycled. A failed read keeps what it has
   * (logged), and is tried again after `maxAgeMs`.
   */
  refreshCredentials(maxAgeMs: number): Promise<void>;
  /** Where the events function puts an event it refuses (BROKER_DEAD_LETTER_QUEUE_URL); none without it. */
  readonly refusedEvents?: RefusedEventQueue;
  /**
   * Which broker this is among those of one account: its table prefix (BROKER_TABLE_PREFIX), the
   * `Broker` dimension of its CloudWatch metrics, so that two brokers' metrics and alarms stay apart.
   */
  readonly name: string;
}

/**
 * The Secrets Manager secret: `{"apiKeys": "client:token,...", "ingestToken": "...", "wsTokenSecret": "..."}`,
 * and, for a FHIR server read with a bearer token, `"fhirReadToken": "..."` (`BROKER_FHIR_READ_TOKEN`).
 */
interface BrokerSecret {
  apiKeys?: unknown;
  ingestToken?: unknown;
  wsTokenSecret?: unknown;
  fhirReadToken?: unknown;
}

export async function secretEnv(secretArn: string, client: SecretsManagerClient): Promise<Record<string, string>> {
  const out = await client.send(new GetSecretValueCommand({ SecretId: secretArn }));
  let secret: BrokerSecret;
  try {
    secret = JSON.parse(out.SecretString ?? '') as BrokerSecret;
  } catch {
    throw new Error(`secret ${secretArn} is not JSON`);
  }
  const env: Record<string, string> = {};
  if (typeof secret.apiKeys === 'string') env.BROKER_API_KEYS = secret.apiKeys;
  if (typeof secret.ingestToken === 'string') env.BROKER_INGEST_TOKEN = secret.ingestToken;
  if (typeof secret.wsTokenSecret === 'string') env.BROKER_WS_TOKEN_SECRET = secret.wsTokenSecret;
  for (const key of ['BROKER_API_KEYS', 'BROKER_INGEST_TOKEN', 'BROKER_WS_TOKEN_SECRET']) {
    if (env[key] === undefined) throw new Error(`secret ${secretArn} lacks ${key}`);
  }
  if (secret.fhirReadToken !== undefined) {
    if (typeof secret.fhirReadToken !== 'string') throw new Error(`secret ${secretArn}: fhirReadToken is no string`);
    env.BROKER_FHIR_READ_TOKEN = secret.fhirReadToken;
  }
  return env;
}

/**
 * The DynamoDB store whose type index is made complete (`ensureTypeIndex`: on tables from a version
 * without it, a scan of `subscriptions` and writes to `subscription-types`; a marker read after
 * that) before the first match that reads it, once per container, and not at start-up. So only a
 * container that matches events (the events function, the API's `POST /events`) reads the
 * subscriptions for it or writes the index; the WebSocket and dispatcher functions never call
 * `candidatesFor`, and their roles need neither (infra/lib/function-access.ts).
 */
export class MatchIndexedStore extends DynamoDbStore {
  #indexed: Promise<unknown> | undefined;

  override async candidatesFor(resourceType: string): Promise<readonly MatchCandidate[]> {
    // A failed build is tried again by the next match (the failed one is retried by its sender).
    this.#indexed ??= this.ensureTypeIndex().catch((err: unknown) => {
      this.#indexed = undefined;
      throw err;
    });
    await this.#indexed;
    return super.candidatesFor(resourceType);
  }
}

/** Clients are injectable for tests (DynamoDB Local, a management API double); by default made here, once. */
export async function createAwsBroker(
  options: {
    config?: Config;
    dynamodb?: DynamoDBClient;
    management?: ApiGatewayManagementApiClient;
    secrets?: SecretsManagerClient;
    /** The client for BROKER_DEAD_LETTER_QUEUE_URL (made from the config when absent). */
    sqs?: SQSClient;
    overrides?: BrokerOverrides;
  } = {},
): Promise<AwsBroker> {
  let config = options.config;
  let secrets = options.secrets;
  // Lambda's file system is read-only outside /tmp.
  const configFrom = (fromSecret: Record<string, string>): Config =>
    loadConfigWith({ BROKER_STORE: 'dynamodb', BROKER_DATA_DIR: '/tmp/fhir-broker', ...fromSecret });
  if (config === undefined) {
    const base = loadConfigWith({ BROKER_STORE: 'dynamodb' });
    secrets ??= new SecretsManagerClient({ region: base.awsRegion });
    config = configFrom(base.secretArn === undefined ? {} : await secretEnv(base.secretArn, secrets));
  }
  const secretArn = config.secretArn;
  const dynamodb =
    options.dynamodb ??
    new DynamoDBClient({
      region: config.awsRegion,
      ...(config.dynamodbEndpoint === undefined ? {} : { endpoint: config.dynamodbEndpoint }),
    });
  if (config.wsManagementEndpoint === undefined && options.management === undefined) {
    throw new Error('BROKER_WS_MANAGEMENT_ENDPOINT is required on AWS (the WebSocket API stage URL)');
  }
  const management =
    options.management ??
    new ApiGatewayManagementApiClient({ region: config.awsRegion, endpoint: config.wsManagementEndpoint });
  const logger = options.overrides?.logger ?? createLogger(config.logLevel);
  const bindings = new DynamoDbBindings({ client: dynamodb, tablePrefix: config.tablePrefix });
  // Tables from a version without the type index get it filled by the first match (see above).
  const store = new MatchIndexedStore(dynamodb, config.tablePrefix, { eventTtlMs: config.eventRetentionMs });
  const broker = await createBroker(config, {
    store,
    bindings,
    // The events function matches through the type index and never reads them all.
    deferSubscriptionLoad: true,
    ...options.overrides,
    logger,
    websocketPort: new ApiGatewayWebSocketPort({ client: management, logger }),
  });
  const clock = options.overrides?.clock ?? systemClock;
  let keysReadAt = clock.now();
  let reading: Promise<void> | undefined;
  const readKeys = async (arn: string, client: SecretsManagerClient): Promise<void> => {
    try {
      // Checked as at start-up (entries, lengths, no key equal to an operator token).
      const next = configFrom(await secretEnv(arn, client));
      broker.setCredentials({
        apiClients: next.apiClients,
        // (secretEnv refuses a secret without them.)
        ingestToken: next.ingestToken as string,
        wsTokenSecret: next.wsTokenSecret as string,
        // Rotated, or added since this container started (it read without one until now). A token
        // taken out of the secret leaves the one in use: the container's next start goes without.
        ...(next.fhirRead?.token === undefined ? {} : { fhirReadToken: next.fhirRead.token }),
      });
    } catch (err) {
      logger.warn('could not read the credentials again; keeping those read before', { err: err as Error });
    } finally {
      keysReadAt = clock.now();
      reading = undefined;
    }
  };
  const deadLetterQueueUrl = config.deadLetterQueueUrl;
  const sqs =
    deadLetterQueueUrl === undefined
      ? undefined
      : // A send that stalls fails (and the invocation with it, so Lambda retries) instead of
        // holding the invocation to its timeout.
        (options.sqs ?? sqsClientFor(config, deadLetterQueueUrl, DEAD_LETTER_SEND_TIMEOUT_MS, logger));
  return {
    ...broker,
    bindings,
    name: config.tablePrefix,
    ...(sqs === undefined || deadLetterQueueUrl === undefined
      ? {}
      : { refusedEvents: new RefusedEventQueue(sqs, deadLetterQueueUrl) }),
    async close(graceMs?: number) {
      await broker.close(graceMs);
      if (options.sqs === undefined) sqs?.destroy();
    },
    async refreshCredentials(maxAgeMs: number) {
      if (secretArn === undefined || clock.now() - keysReadAt < maxAgeMs) return;
      secrets ??= new SecretsManagerClient({ region: config.awsRegion });
      reading ??= readKeys(secretArn, secrets);
      await reading;
    },
  };
}
