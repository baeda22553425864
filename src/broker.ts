import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { EventBridgeClient } from '@aws-sdk/client-eventbridge';
import { SQSClient } from '@aws-sdk/client-sqs';
import type { Hono } from 'hono';
import { EventBridgePublisher } from './aws/eventbridge-publisher.js';
import { SQS_WAIT_TIME_SECONDS, SqsEventSource } from './aws/sqs-source.js';
import { type ApiClient, type Config, sqsQueueRegion } from './config.js';
import { FhirReader, type ResourceReader } from './content/fhir-reader.js';
import { R4SearchParameters } from './content/search-parameters.js';
import type { LifecycleSink } from './core/lifecycle.js';
import { InvalidTopicError } from './core/topics.js';
import { type Clock, type IdSource, systemClock } from './core/types.js';
import { type Credentials, resolveCredentials } from './credentials.js';
import { Allowlist } from './delivery/address-policy.js';
import { Dispatcher } from './delivery/dispatcher.js';
import { defaultResolver, EndpointGuard, type Resolver } from './delivery/endpoint-guard.js';
import { type HubLimits, type LocalSockets, LocalWebSocketHub } from './delivery/local-websocket-hub.js';
import { RestHookSender, type Sender } from './delivery/rest-hook-sender.js';
import { WebSocketChannel } from './delivery/websocket-channel.js';
import { type BindingStore, InMemoryBindings, type WebSocketPort } from './delivery/websocket-port.js';
import { BindingTokens } from './delivery/ws-binding-token.js';
import { createApp } from './http/app.js';
import { ApiKeyAuth, IngestAuth } from './http/auth.js';
import { serveIngest } from './http/ingest-listener.js';
import { createLogger, type Logger } from './observability/logger.js';
import { Metrics } from './observability/metrics.js';
import { ContentStage } from './service/content-stage.js';
import { IngestService } from './service/ingest.js';
import { Reconciler } from './service/reconciler.js';
import { SubscriptionRegistry } from './service/subscription-registry.js';
import { DynamoDbStore } from './store/dynamodb/dynamodb-store.js';
import { ensureTables } from './store/dynamodb/tables.js';
import { SqliteStore } from './store/sqlite/sqlite-store.js';
import type { Store } from './store/store.js';
import { loadTopicCatalog } from './store/topic-files.js';

/**
 * Builds one broker from a config: every adapter created once and injected. `main.ts` serves it;
 * tests drive `app.request()` in-process or start the real process.
 */

export interface Broker {
  readonly app: Hono<{ Variables: { owner: string } }>;
  /** `POST /events` straight from a Node server's request (`main.ts` routes it here, ahead of `app`). */
  serveIngest(req: IncomingMessage, res: ServerResponse): Promise<void>;
  readonly store: Store;
  readonly registry: SubscriptionRegistry;
  readonly dispatcher: Dispatcher;
  /** The local WebSocket layer: `main.ts` hands it the upgrade requests on `/ws`. */
  readonly websocketHub: LocalSockets;
  readonly apiAuth: ApiKeyAuth;
  readonly ingest: IngestService;
  /** The websocket channel (binding protocol and delivery), whatever the socket layer. */
  readonly websocket: WebSocketChannel;
  readonly metrics: Metrics;
  readonly credentials: Credentials;
  readonly logger: Logger;
  /** Resume owed handshakes and pending deliveries. */
  start(): Promise<void>;
  /**
   * Reload subscriptions from the store when the in-memory copy is older than `maxAgeMs`: for
   * several stateless instances (Lambda) sharing one store, where another instance may have
   * created or changed a subscription.
   */
  refreshSubscriptions(maxAgeMs: number): Promise<void>;
  /**
   * Replace the credentials as the operator changed them (AWS: the secret, read again): from now on
   * requests and binds of only these API clients authenticate, only this ingest token (and, when no
   * BROKER_METRICS_TOKEN is set, for `/metrics` too), and binding tokens are signed with this key
   * (those signed with the one before still bind for BROKER_WS_TOKEN_TTL, their lifetime).
   */
  setCredentials(credentials: {
    readonly apiClients: readonly ApiClient[];
    readonly ingestToken: string;
    readonly wsTokenSecret: string;
    /** `BROKER_FHIR_READ_TOKEN` as read again: the reads with `bearer` use it from now on. */
    readonly fhirReadToken?: string;
  }): void;
  /**
   * Hand over every lifecycle event published so far (EventBridge PutEvents). A Lambda handler
   * awaits it before returning: the container freezes then, and an event still queued would wait
   * for its next invocation, or be lost with the container.
   */
  flushLifecycle(): Promise<void>;
  /**
   * Starts pulling events from `BROKER_SQS_QUEUE_URL` and the reconciler's timer, each when set: the
   * server does (main.ts), a Lambda function never (EventBridge invokes it).
   */
  startSources(): void;
  /**
   * The reconciler, when `BROKER_RECONCILE_EVERY` is set: `startSources` starts its timer (the
   * server); the AWS reconcile function calls `run` once per scheduled invocation.
   */
  readonly reconciler?: Reconciler;
  /** Stop pulling events, finish in-flight attempts within `graceMs`, then release the store and sockets. */
  close(graceMs?: number): Promise<void>;
}

export interface BrokerOverrides {
  readonly clock?: Clock;
  readonly ids?: IdSource;
  readonly random?: () => number;
  readonly logger?: Logger;
  readonly resolver?: Resolver;
  readonly store?: Store;
  /** Where WebSocket messages go: the local hub by default, API Gateway on AWS. */
  readonly websocketPort?: WebSocketPort;
  readonly bindings?: BindingStore;
  /**
   * Builds the local WebSocket layer instead of the in-process hub (`main.ts`: socket processes
   * when `BROKER_WS_PROCESSES` > 0).
   */
  readonly localSockets?: (deps: {
    logger: Logger;
    metrics: Metrics;
    limits: Partial<HubLimits>;
  }) => Promise<LocalSockets>;
  readonly lifecycle?: LifecycleSink;
  readonly version?: string;
  /**
   * Builds the webhook sender instead of the in-thread `RestHookSender` (`main.ts`: sender threads
   * when `BROKER_WEBHOOK_THREADS` > 0).
   */
  readonly sender?: (deps: { logger: Logger; userAgent: string; connectionsPerOrigin: number }) => Sender;
  /** The SQS client for `BROKER_SQS_QUEUE_URL` (tests: one pointed at a stand-in). */
  readonly sqs?: Pick<SQSClient, 'send' | 'destroy'>;
  /**
   * Read the subscriptions on the first `refreshSubscriptions` call instead of at creation: for
   * Lambda containers that match through the store's type index and never need them all.
   */
  readonly deferSubscriptionLoad?: boolean;
  /** Reads changed resources for content filters instead of a `FhirReader` (tests: a signer's clock). */
  readonly resourceReader?: (config: NonNullable<Config['fhirRead']>) => ResourceReader;
}

export async function createBroker(config: Config, overrides: BrokerOverrides = {}): Promise<Broker> {
  const logger = overrides.logger ?? createLogger(config.logLevel);
  const version = overrides.version ?? '0.0.0';
  const credentials = resolveCredentials(config);
  const clock = overrides.clock ?? systemClock;
  const ids = overrides.ids ?? { uuid: () => randomUUID() };
  const metrics = new Metrics();
  // What can stop the start comes before anything that would then need closing (the store).
  const topics = loadTopicCatalog(config.topicsDir);
  // Content filters: the search parameters and a reader, only when the broker may read the FHIR server.
  const search = config.fhirRead === undefined ? undefined : new R4SearchParameters();
  const topicProblems = search === undefined ? [] : topics.contentFilterProblems(search);
  if (topicProblems.length > 0) throw new InvalidTopicError(config.topicsDir, topicProblems.join('; '));
  const dynamodb = overrides.store === undefined && config.store === 'dynamodb' ? dynamoDbClient(config) : undefined;
  const store: Store =
    overrides.store ??
    (dynamodb === undefined ? new SqliteStore(config.dataDir) : await openDynamoDbStore(dynamodb, config));
  const guard = new EndpointGuard(new Allowlist(config.endpointAllowlist), overrides.resolver ?? defaultResolver);
  const userAgent = `fhir-subscription-broker/${version}`;
  const sender =
    overrides.sender?.({ logger, userAgent, connectionsPerOrigin: config.maxInFlightPerOrigin }) ??
    new RestHookSender(guard, clock, { userAgent, connections: config.maxInFlightPerOrigin });
  const lifecycle =
    overrides.lifecycle ??
    (config.eventBus === undefined
      ? undefined
      : new EventBridgePublisher({
          client: new EventBridgeClient({ region: config.awsRegion }),
          bus: config.eventBus,
          logger,
        }));
  const reader =
    config.fhirRead === undefined
      ? undefined
      : (overrides.resourceReader?.(config.fhirRead) ?? new FhirReader(config.fhirRead));
  const registry = new SubscriptionRegistry({
    maxSubscriptionsPerClient: config.maxSubscriptionsPerClient,
    store,
    topics,
    ...(search === undefined ? {} : { search }),
    fullResourceClients: config.fullResourceClients,
    guard,
    clock,
    ids,
    logger,
    ...(lifecycle === undefined ? {} : { lifecycle }),
  });
  let loadedAt = Number.NEGATIVE_INFINITY;
  if (overrides.deferSubscriptionLoad !== true) {
    try {
      await registry.load();
    } catch (err) {
      // A start refused here leaves nothing open behind it (the store's files, its threads, sockets).
      await Promise.allSettled([sender.close(), reader?.close(), store.close()]);
      dynamodb?.destroy();
      throw err;
    }
    loadedAt = clock.now();
  }
  const bindingTokens = new BindingTokens(credentials.wsTokenSecret);
  const hubLimits: Partial<HubLimits> = { maxBufferedBytes: config.wsSendBufferBytes };
  const websocketHub: LocalSockets =
    overrides.localSockets === undefined
      ? new LocalWebSocketHub({ logger, metrics, limits: hubLimits })
      : await overrides.localSockets({ logger, metrics, limits: hubLimits });
  // The API clients, as ApiKeyAuth below takes them: a binding token of any other owner binds nothing.
  let clientIds = new Set(credentials.apiClients.map((c) => c.clientId));
  const websocket = new WebSocketChannel({
    port: overrides.websocketPort ?? websocketHub,
    bindings: overrides.bindings ?? new InMemoryBindings(),
    registry,
    store,
    tokens: bindingTokens,
    clock,
    ids,
    logger,
    metrics,
    fhirBase: `${config.publicUrl}/fhir`,
    fullResourceClients: config.fullResourceClients,
    isClient: (owner) => clientIds.has(owner),
    deleteSubscription: (sub) => registry.delete(sub.owner, sub.id),
    maxHeldBytes: config.wsSendBufferBytes,
    // The broker's own sockets; on AWS API Gateway holds them, under its own quotas.
    ...(overrides.websocketPort === undefined ? { maxSocketsPerClient: config.wsMaxPerClient } : {}),
  });
  websocketHub.handle(websocket);
  const dispatcher = new Dispatcher({
    websocket,
    ...(lifecycle === undefined ? {} : { lifecycle }),
    store,
    sender,
    registry,
    clock,
    ids,
    logger,
    metrics,
    ...(overrides.random === undefined ? {} : { random: overrides.random }),
    options: {
      fhirBase: `${config.publicUrl}/fhir`,
      fullResourceClients: config.fullResourceClients,
      retryDelaysMs: config.retryDelaysMs,
      handshakeRetryDelaysMs: config.handshakeRetryDelaysMs,
      retentionMs: config.eventRetentionMs,
      maxInFlight: config.maxInFlight,
      maxInFlightPerOrigin: config.maxInFlightPerOrigin,
      maxInFlightPerClient: config.maxInFlightPerClient,
    },
  });
  const content = new ContentStage({
    ...(search === undefined ? {} : { catalog: search }),
    ...(reader === undefined ? {} : { reader }),
    fullResourceClients: config.fullResourceClients,
    logger,
    metrics,
  });
  const ingest = new IngestService({ store, registry, sink: dispatcher, clock, logger, metrics, content });
  // From the store where it counts cheaply (a lane keeps at most its buffer in memory, the rest in the store).
  metrics.gauge('broker_outbox_depth', () => store.countPending?.() ?? dispatcher.outboxDepth);
  metrics.gauge('broker_subscriptions', () => registry.size);
  // Every status, at 0 too: an alert on `error > 0` needs the series before the first one.
  metrics.labeledGauge('broker_subscriptions_by_status', 'status', () => registry.countsByStatus());
  const apiAuth = new ApiKeyAuth(credentials.apiClients);

  const ingestAuth = new IngestAuth(credentials.ingestToken);
  const metricsAuth =
    config.metricsToken === undefined
      ? new IngestAuth(
          credentials.ingestToken,
          'Send Authorization: Bearer <ingest token> (or set BROKER_METRICS_TOKEN): metrics are for the operator',
        )
      : new IngestAuth(config.metricsToken, 'Send Authorization: Bearer <BROKER_METRICS_TOKEN>');
  const app = createApp({
    metricsAuth,
    registry,
    store,
    topics,
    auth: apiAuth,
    ingestAuth,
    ingest,
    clock,
    ids,
    metrics,
    logger,
    publicUrl: config.publicUrl,
    publicUrlExplicit: config.publicUrlExplicit,
    corsOrigins: config.corsOrigins,
    contentFilters: search !== undefined,
    fullResourceClients: config.fullResourceClients,
    maxBodyBytes: config.maxBodyBytes,
    maxIngestBodyBytes: config.maxIngestBodyBytes,
    version,
    bindingTokens,
    wsTokenTtlMs: config.wsTokenTtlMs,
    websocketUrl: config.websocketUrl,
  });

  const ingestDeps = { ingest, ingestAuth, maxIngestBodyBytes: config.maxIngestBodyBytes, logger };
  const sqsClient =
    config.sqsQueueUrl === undefined
      ? undefined
      : // A long poll cut off silently (NAT, a firewall) fails after this, not the SDK's 15 min.
        (overrides.sqs ?? sqsClientFor(config, config.sqsQueueUrl, (SQS_WAIT_TIME_SECONDS + 10) * 1000, logger));
  const sqs =
    config.sqsQueueUrl === undefined || sqsClient === undefined
      ? undefined
      : new SqsEventSource({
          client: sqsClient,
          queueUrl: config.sqsQueueUrl,
          ingest: (event, opts) => ingest.ingest(event, opts),
          logger,
          metrics,
          pollers: config.sqsPollers,
        });
  const reconciler =
    config.reconcile === undefined || reader === undefined || config.fhirRead?.baseUrl === undefined
      ? undefined
      : new Reconciler({
          store,
          sink: ingest,
          feed: reader,
          now: () => clock.now(),
          logger,
          metrics,
          base: config.fhirRead.baseUrl,
          everyMs: config.reconcile.everyMs,
          lagMs: config.reconcile.lagMs,
        });
  return {
    app,
    ...(reconciler === undefined ? {} : { reconciler }),
    serveIngest: (req, res) => serveIngest(ingestDeps, req, res),
    store,
    registry,
    dispatcher,
    websocketHub,
    apiAuth,
    ingest,
    websocket,
    metrics,
    credentials,
    logger,
    start: () => dispatcher.start(),
    startSources: () => {
      sqs?.start();
      reconciler?.start();
    },
    flushLifecycle: async () => {
      await lifecycle?.flush();
    },
    async refreshSubscriptions(maxAgeMs: number) {
      if (clock.now() - loadedAt < maxAgeMs) return;
      await registry.reload();
      loadedAt = clock.now();
    },
    setCredentials(next) {
      apiAuth.replace(next.apiClients);
      clientIds = new Set(next.apiClients.map((c) => c.clientId));
      ingestAuth.replace(next.ingestToken);
      if (config.metricsToken === undefined) metricsAuth.replace(next.ingestToken);
      bindingTokens.rotate(next.wsTokenSecret, clock.now(), config.wsTokenTtlMs);
      if (next.fhirReadToken !== undefined) reader?.setToken(next.fhirReadToken);
    },
    async close(graceMs = 5000) {
      // No more events in: a long poll is cut, what it received is committed and deleted first.
      await sqs?.close(graceMs);
      if (overrides.sqs === undefined) sqsClient?.destroy();
      // A run under way stops between two pages; what it committed is delivered like any event.
      await reconciler?.close();
      websocketHub.closeAll();
      await dispatcher.close(graceMs);
      await lifecycle?.flush();
      await sender.close();
      await reader?.close();
      await store.close();
      dynamodb?.destroy();
    },
  };
}

/**
 * An SQS client for `queueUrl`: signed for the queue's region (SQS_ENDPOINT, for a local stand-in,
 * overrides where it goes), a request that takes longer than `requestTimeoutMs` fails
 * (throwOnRequestTimeout: without it the SDK only logs that the time is up, and waits on), and the
 * SDK's own warnings go to the JSON log, not to the console.
 */
export function sqsClientFor(config: Config, queueUrl: string, requestTimeoutMs: number, logger: Logger): SQSClient {
  return new SQSClient({
    region: sqsQueueRegion(queueUrl) ?? config.awsRegion,
    ...(config.sqsEndpoint === undefined ? {} : { endpoint: config.sqsEndpoint }),
    requestHandler: { requestTimeout: requestTimeoutMs, throwOnRequestTimeout: true },
    logger: sdkLogger(logger),
  });
}

/** The AWS SDK's logger interface, onto the broker's log (warnings and errors; its debug and info are noise). */
function sdkLogger(logger: Logger): {
  debug(): void;
  info(): void;
  warn(...a: unknown[]): void;
  error(...a: unknown[]): void;
} {
  // The SDK logs a failed command as `{clientName, commandName, input, error, metadata}`: its
  // `input` is never written (a dead-letter SendMessage's body is a refused event; a batch's entries
  // carry receipt handles), only which command failed and how.
  /** An error's name and message (an Error, or a thrown object that has them). */
  const failure = (e: unknown): string | undefined => {
    if (e === null || typeof e !== 'object') return undefined;
    const { name, message } = e as { name?: unknown; message?: unknown };
    const said = [name, message].filter((v) => typeof v === 'string');
    return said.length === 0 ? undefined : said.join(': ');
  };
  const part = (x: unknown): string => {
    if (typeof x === 'string') return x;
    if (x === null || typeof x !== 'object') return String(x);
    // An error handed over on its own (the SQS queue-URL check, a credentials refresh).
    if (x instanceof Error) return failure(x) as string;
    const { clientName, commandName, error } = x as { clientName?: unknown; commandName?: unknown; error?: unknown };
    return [clientName, commandName, failure(error)].filter((v) => typeof v === 'string').join(' ') || '(no detail)';
  };
  const text = (a: unknown[]) => a.map(part).join(' ').slice(0, 500);
  return {
    debug: () => undefined,
    info: () => undefined,
    warn: (...a) => logger.warn('aws sdk', { message: text(a) }),
    error: (...a) => logger.error('aws sdk', { message: text(a) }),
  };
}

function dynamoDbClient(config: Config): DynamoDBClient {
  return new DynamoDBClient({
    region: config.awsRegion,
    ...(config.dynamodbEndpoint === undefined ? {} : { endpoint: config.dynamodbEndpoint }),
  });
}

/** With an endpoint override (DynamoDB Local) the broker creates its tables; on AWS the CDK stack does. */
async function openDynamoDbStore(client: DynamoDBClient, config: Config): Promise<DynamoDbStore> {
  if (config.dynamodbEndpoint !== undefined) await ensureTables(client, config.tablePrefix);
  const store = new DynamoDbStore(client, config.tablePrefix, { eventTtlMs: config.eventRetentionMs });
  await store.ensureTypeIndex();
  return store;
}
