import { readdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { DEFAULT_HANDSHAKE_RETRY_DELAYS_MS, DEFAULT_RETRY_DELAYS_MS, parseDurations } from './core/retry.js';
import { Allowlist } from './delivery/address-policy.js';
import { reconcileRetentionFloorMs } from './service/reconciler.js';

/**
 * Environment → validated, frozen configuration. The only module that reads `process.env`;
 * every invalid value fails start-up with a message naming the variable.
 */

export interface ApiClient {
  readonly clientId: string;
  readonly token: string;
}

export interface Config {
  readonly port: number;
  readonly host: string;
  /** `BROKER_PUBLIC_URL`, or `http://HOST:PORT` (with PORT=0, main.ts fills in the bound port). */
  readonly publicUrl: string;
  readonly publicUrlExplicit: boolean;
  /** `websocket-url` handed out with binding tokens: `BROKER_WEBSOCKET_URL`, or the public URL's ws form + `/ws`. */
  readonly websocketUrl: string;
  /** API Gateway WebSocket management endpoint (`https://{api}.execute-api.{region}.amazonaws.com/{stage}`), on AWS. */
  readonly wsManagementEndpoint?: string;
  /** Secrets Manager secret with apiKeys, ingestToken and wsTokenSecret, on AWS. */
  readonly secretArn?: string;
  readonly dataDir: string;
  /** From `BROKER_API_KEYS`; empty means "generate one and keep it in the data dir". */
  readonly apiClients: readonly ApiClient[];
  readonly ingestToken?: string;
  /** Bearer token for `GET /metrics`; without it, the ingest token (an operator's secret, not a client's). */
  readonly metricsToken?: string;
  /** HMAC key of WebSocket binding tokens (generated and kept in the data dir when unset). */
  readonly wsTokenSecret?: string;
  /** Lifetime of a binding token from `$get-ws-binding-token`. */
  readonly wsTokenTtlMs: number;
  /** Bytes queued to one WebSocket before its reader counts as too slow and is closed. */
  readonly wsSendBufferBytes: number;
  /** Open local WebSockets at most; upgrades past it get 503. */
  readonly wsMaxConnections: number;
  /** Open local WebSockets bound to one API client's subscriptions; a bind past it is refused. 0: no cap. */
  readonly wsMaxPerClient: number;
  /**
   * Open local WebSockets holding no binding, per remote address; an upgrade from an address at
   * the cap gets 429. 0: no cap.
   */
  readonly wsMaxUnboundPerAddress: number;
  /**
   * Socket processes that own the local WebSocket connections and do their writes (`npm start`
   * only); 0 keeps every socket on the main thread.
   */
  readonly wsProcesses: number;
  /** Worker threads that sign and send webhooks (`npm start` only); 0 sends from the main thread. */
  readonly webhookThreads: number;
  readonly endpointAllowlist: readonly string[];
  /** `BROKER_CORS_ORIGINS`: browser origins allowed to call the FHIR routes (`*`: any); none, no CORS. */
  readonly corsOrigins: readonly string[];
  readonly retryDelaysMs: readonly number[];
  /** `BROKER_HANDSHAKE_RETRY_DELAYS`: a failed handshake is tried again at these delays; none: it fails at once. */
  readonly handshakeRetryDelaysMs: readonly number[];
  /** Subscriptions one API client may hold: a broker must not become a request amplifier. */
  readonly maxSubscriptionsPerClient: number;
  /** Webhook requests in flight in all, and to one endpoint origin (scheme://host:port). */
  readonly maxInFlight: number;
  readonly maxInFlightPerOrigin: number;
  /** `BROKER_MAX_IN_FLIGHT_PER_CLIENT`: webhook requests in flight for one API client's subscriptions. */
  readonly maxInFlightPerClient: number;
  /** How long delivered notifications stay available to `$events`, and event ids to deduplication. */
  readonly eventRetentionMs: number;
  /**
   * `BROKER_REQUEST_TIMEOUT`: an HTTP request (headers and body) must arrive within this, or its
   * connection is closed (408): a client trickling a body cannot hold a connection for minutes.
   */
  readonly requestTimeoutMs: number;
  readonly store: 'sqlite' | 'dynamodb';
  readonly dynamodbEndpoint?: string;
  readonly tablePrefix: string;
  /** `AWS_REGION`, else `AWS_DEFAULT_REGION`, else us-east-1: where the AWS SDK clients go. */
  readonly awsRegion: string;
  readonly eventBus?: string;
  /** `BROKER_SQS_QUEUE_URL`: an SQS queue the server pulls EventBridge events from (src/aws/sqs-source.ts). */
  readonly sqsQueueUrl?: string;
  /** `SQS_ENDPOINT`: the SQS endpoint, for a local stand-in. */
  readonly sqsEndpoint?: string;
  /** `BROKER_SQS_POLLERS`: receive loops at once (batches in flight). */
  readonly sqsPollers: number;
  /**
   * `BROKER_DEAD_LETTER_QUEUE_URL` (the Lambda events function): an SQS queue the function sends an
   * event the broker refuses to, at once, instead of failing the invocation (src/aws/refused-events.ts).
   */
  readonly deadLetterQueueUrl?: string;
  readonly topicsDir: string;
  /**
   * Where the content stage reads a changed resource, for subscriptions with content filters
   * (src/service/content-stage.ts). Unset: such filters are refused at registration.
   */
  readonly fhirRead?: FhirReadConfig;
  /**
   * `BROKER_FULL_RESOURCE_CLIENTS`: the API clients whose subscriptions may ask for `full-resource`
   * content (`*`: every client). Empty: none may; their endpoints would receive the resources (PHI).
   */
  readonly fullResourceClients: readonly string[] | '*';
  /**
   * `BROKER_RECONCILE_EVERY` and `BROKER_RECONCILE_LAG`: the reconciler (src/service/reconciler.ts)
   * reads the changes of the FHIR server at `fhirRead.baseUrl`. Unset: no reconciliation.
   */
  readonly reconcile?: ReconcileConfig;
  readonly maxBodyBytes: number;
  readonly maxIngestBodyBytes: number;
  readonly logLevel: 'debug' | 'info' | 'warn' | 'error';
}

/** `BROKER_FHIR_READ*`: how the content stage reads resources from the FHIR server. */
export interface FhirReadConfig {
  /** A FHIR base URL; absent: each event's own HealthLake datastore (`BROKER_FHIR_READ=healthlake`). */
  readonly baseUrl?: string;
  readonly auth: 'sigv4' | 'bearer' | 'none';
  /** `BROKER_FHIR_READ_TOKEN`, for `bearer`. A secret: never logged. */
  readonly token?: string;
  /** The SigV4 region when the URL's host does not name one (`healthlake.<region>.amazonaws.com`). */
  readonly region: string;
  readonly timeoutMs: number;
}

/** How often the reconciler runs, and how far behind the present its windows end. */
export interface ReconcileConfig {
  readonly everyMs: number;
  /** A change younger than this is left to its CloudTrail event, which may still be on its way. */
  readonly lagMs: number;
}

export class ConfigError extends Error {
  constructor(variable: string, message: string) {
    super(`${variable}: ${message}`);
    this.name = 'ConfigError';
  }
}

type Env = Readonly<Record<string, string | undefined>>;

export function loadConfig(env: Env = process.env): Config {
  const port = int(env, 'PORT', 8080, 0, 65535);
  const host = str(env, 'HOST') ?? '127.0.0.1';
  const explicitUrl = str(env, 'BROKER_PUBLIC_URL');
  // The derived URL is not parsed: a HOST that cannot be listened on is reported by the listen.
  const publicUrl = explicitUrl === undefined ? defaultPublicUrl(host, port) : parsePublicUrl(explicitUrl);
  const storeKind = str(env, 'BROKER_STORE') ?? 'sqlite';
  if (storeKind !== 'sqlite' && storeKind !== 'dynamodb') {
    throw new ConfigError('BROKER_STORE', `must be sqlite or dynamodb, not ${storeKind}`);
  }
  const logLevel = str(env, 'BROKER_LOG_LEVEL') ?? 'info';
  if (logLevel !== 'debug' && logLevel !== 'info' && logLevel !== 'warn' && logLevel !== 'error') {
    throw new ConfigError('BROKER_LOG_LEVEL', 'must be debug, info, warn or error');
  }
  const dynamodbEndpoint = str(env, 'DYNAMODB_ENDPOINT');
  const ingestToken = bearerToken(env, 'BROKER_INGEST_TOKEN');
  const metricsToken = bearerToken(env, 'BROKER_METRICS_TOKEN');
  const eventBus = str(env, 'BROKER_EVENT_BUS');
  const sqsEndpoint = str(env, 'SQS_ENDPOINT');
  // An AWS queue URL (its region is where requests are signed for), or with SQS_ENDPOINT any queue
  // URL the endpoint names: never signed requests to a host that is neither.
  const queueUrl = (name: string): string | undefined => {
    const url = str(env, name);
    if (
      url !== undefined &&
      !(/^https?:\/\/[^/\s]+\/\S+$/.test(url) && (sqsEndpoint !== undefined || sqsQueueRegion(url)))
    ) {
      throw new ConfigError(
        name,
        'must be an Amazon SQS queue URL, such as https://sqs.us-east-1.amazonaws.com/111122223333/fhir-events (another host only with SQS_ENDPOINT)',
      );
    }
    return url;
  };
  const sqsQueueUrl = queueUrl('BROKER_SQS_QUEUE_URL');
  const deadLetterQueueUrl = queueUrl('BROKER_DEAD_LETTER_QUEUE_URL');
  const awsRegion = str(env, 'AWS_REGION') ?? str(env, 'AWS_DEFAULT_REGION') ?? 'us-east-1';
  if (!/^[a-z]{2}(-[a-z]+)+-\d+$/.test(awsRegion)) {
    throw new ConfigError(
      str(env, 'AWS_REGION') === undefined ? 'AWS_DEFAULT_REGION' : 'AWS_REGION',
      `${awsRegion} is not an AWS region`,
    );
  }
  const webhookThreads = int(env, 'BROKER_WEBHOOK_THREADS', 1, 0, 16);
  const maxInFlightPerOrigin = int(env, 'BROKER_MAX_IN_FLIGHT_PER_ORIGIN', 32, 1, 1000);
  if (webhookThreads > maxInFlightPerOrigin) {
    throw new ConfigError(
      'BROKER_WEBHOOK_THREADS',
      `must not exceed BROKER_MAX_IN_FLIGHT_PER_ORIGIN (${maxInFlightPerOrigin}): each sender thread keeps at least one connection per origin`,
    );
  }
  const wsTokenSecret = str(env, 'BROKER_WS_TOKEN_SECRET');
  if (wsTokenSecret !== undefined && wsTokenSecret.length < MIN_WS_SECRET_CHARS) {
    throw new ConfigError('BROKER_WS_TOKEN_SECRET', `must be at least ${MIN_WS_SECRET_CHARS} characters`);
  }
  const apiClients = parseApiKeys(str(env, 'BROKER_API_KEYS'));
  refuseOperatorSecretsAsApiKeys(apiClients, 'BROKER_API_KEYS', [
    { source: 'BROKER_INGEST_TOKEN', value: ingestToken },
    { source: 'BROKER_METRICS_TOKEN', value: metricsToken },
    { source: 'BROKER_WS_TOKEN_SECRET', value: wsTokenSecret },
  ]);
  const wsMaxConnections = int(env, 'BROKER_WS_MAX_CONNECTIONS', 20_000, 1, 1_000_000);
  const endpointAllowlist = list(str(env, 'BROKER_ENDPOINT_ALLOWLIST'));
  try {
    new Allowlist(endpointAllowlist);
  } catch (err) {
    throw new ConfigError('BROKER_ENDPOINT_ALLOWLIST', (err as Error).message.replace(/^allowlist /, ''));
  }
  const corsOrigins = list(str(env, 'BROKER_CORS_ORIGINS'));
  for (const origin of corsOrigins) {
    if (origin === '*' ? corsOrigins.length === 1 : isOrigin(origin)) continue;
    throw new ConfigError(
      'BROKER_CORS_ORIGINS',
      origin === '*'
        ? '* allows every origin: give it alone'
        : `${origin.slice(0, 80)} is not an origin (scheme://host[:port], no path or trailing slash)`,
    );
  }
  const topicsDir = str(env, 'BROKER_TOPICS_DIR') ?? 'subscriptions/topics';
  try {
    readdirSync(topicsDir);
  } catch (err) {
    throw new ConfigError('BROKER_TOPICS_DIR', `cannot read the directory ${resolve(topicsDir)}: ${fsReason(err)}`);
  }
  const fhirRead = fhirReadConfig(env, awsRegion);
  const eventRetentionMs = retention(str(env, 'BROKER_EVENT_RETENTION'));
  const reconcile = reconcileConfig(env, fhirRead);
  const fullResourceClients = fullResourceClientsConfig(env, fhirRead);
  if (reconcile !== undefined) {
    // The reconciler tells "already notified" from the notifications kept: purged too early, every
    // change whose event came would be notified again.
    const floor = reconcileRetentionFloorMs(reconcile.everyMs, reconcile.lagMs);
    if (eventRetentionMs < floor) {
      throw new ConfigError(
        'BROKER_EVENT_RETENTION',
        `must be at least ${Math.ceil(floor / 60_000)}m with BROKER_RECONCILE_EVERY and BROKER_RECONCILE_LAG as set (the lag, a window of at least an hour, and a minute of slack): the reconciler reads what was notified from what is kept`,
      );
    }
  }
  return Object.freeze({
    port,
    host,
    publicUrl,
    publicUrlExplicit: explicitUrl !== undefined,
    websocketUrl: str(env, 'BROKER_WEBSOCKET_URL') ?? `${publicUrl.replace(/^http/, 'ws')}/ws`,
    ...optional('wsManagementEndpoint', str(env, 'BROKER_WS_MANAGEMENT_ENDPOINT')),
    ...optional('secretArn', str(env, 'BROKER_SECRET_ARN')),
    dataDir: str(env, 'BROKER_DATA_DIR') ?? './data',
    apiClients: Object.freeze(apiClients),
    ...(ingestToken === undefined ? {} : { ingestToken }),
    ...(metricsToken === undefined ? {} : { metricsToken }),
    ...(wsTokenSecret === undefined ? {} : { wsTokenSecret }),
    wsTokenTtlMs: singleDuration(env, 'BROKER_WS_TOKEN_TTL', 10 * 60_000, 1000),
    // 60 s: a 10 MiB event batch at 170 KB/s; Node's own default is 5 minutes.
    requestTimeoutMs: singleDuration(env, 'BROKER_REQUEST_TIMEOUT', 60_000, 1000),
    // 1 MiB: dozens of bundles; a reader further behind than that is not keeping up.
    wsSendBufferBytes: int(env, 'BROKER_WS_SEND_BUFFER', 1024 * 1024, 4096, 64 * 1024 * 1024),
    // 20,000: twice the fan-out bench's 10,000 sockets, within a default 64k descriptor limit.
    wsMaxConnections,
    // A quarter of the sockets: one API client binding socket after socket (a token binds any
    // number) cannot take them all from the others.
    wsMaxPerClient: int(env, 'BROKER_WS_MAX_PER_CLIENT', Math.floor(wsMaxConnections / 4), 0, 1_000_000),
    // 64: a host running many live pages or clients, yet one address that opens sockets and never
    // binds holds 64 of the 20,000, not all of them, however fast it reconnects.
    wsMaxUnboundPerAddress: int(env, 'BROKER_WS_MAX_UNBOUND_PER_ADDRESS', 64, 0, 1_000_000),
    // 0 by default: on the 2-core bench machine the in-process hub was the faster (bench/README.md, fanout).
    wsProcesses: int(env, 'BROKER_WS_PROCESSES', 0, 0, 64),
    // 1: ~15% more outbox throughput on the 2-core bench machine than sending from the main thread.
    webhookThreads,
    endpointAllowlist: Object.freeze(endpointAllowlist),
    corsOrigins: Object.freeze(corsOrigins),
    retryDelaysMs: Object.freeze(retryDelays(str(env, 'BROKER_RETRY_DELAYS'))),
    handshakeRetryDelaysMs: Object.freeze(handshakeRetryDelays(str(env, 'BROKER_HANDSHAKE_RETRY_DELAYS'))),
    maxInFlight: int(env, 'BROKER_MAX_IN_FLIGHT', 512, 1, 10_000),
    maxSubscriptionsPerClient: int(env, 'BROKER_MAX_SUBSCRIPTIONS_PER_CLIENT', 1000, 1, 10_000_000),
    maxInFlightPerOrigin,
    maxInFlightPerClient: int(env, 'BROKER_MAX_IN_FLIGHT_PER_CLIENT', 128, 1, 10_000),
    eventRetentionMs,
    store: storeKind,
    ...(dynamodbEndpoint === undefined ? {} : { dynamodbEndpoint }),
    tablePrefix: str(env, 'BROKER_TABLE_PREFIX') ?? 'fhir-broker-',
    awsRegion,
    ...(eventBus === undefined ? {} : { eventBus }),
    ...(sqsQueueUrl === undefined ? {} : { sqsQueueUrl }),
    ...(sqsEndpoint === undefined ? {} : { sqsEndpoint }),
    sqsPollers: int(env, 'BROKER_SQS_POLLERS', 2, 1, 10),
    ...(deadLetterQueueUrl === undefined ? {} : { deadLetterQueueUrl }),
    topicsDir,
    ...(fhirRead === undefined ? {} : { fhirRead: Object.freeze(fhirRead) }),
    ...optionalObject('reconcile', reconcile),
    fullResourceClients,
    // 1 MiB: a Subscription is a few KB; anything near this is a mistake or an attack.
    maxBodyBytes: int(env, 'BROKER_MAX_BODY_BYTES', 1024 * 1024, 1024, 64 * 1024 * 1024),
    // 10 MiB: 1,000 CloudTrail events of ~3 KB each, with room to spare.
    maxIngestBodyBytes: int(env, 'BROKER_MAX_INGEST_BYTES', 10 * 1024 * 1024, 1024, 256 * 1024 * 1024),
    logLevel,
  });
}

function fhirReadConfig(env: Env, awsRegion: string): FhirReadConfig | undefined {
  const read = str(env, 'BROKER_FHIR_READ');
  const token = str(env, 'BROKER_FHIR_READ_TOKEN');
  const authRaw = str(env, 'BROKER_FHIR_READ_AUTH');
  if (read === undefined) {
    for (const name of ['BROKER_FHIR_READ_AUTH', 'BROKER_FHIR_READ_TOKEN', 'BROKER_FHIR_READ_TIMEOUT']) {
      if (str(env, name) !== undefined) throw new ConfigError(name, 'is set but BROKER_FHIR_READ is not');
    }
    return undefined;
  }
  let baseUrl: string | undefined;
  // The base URL, parsed once.
  let url: URL | undefined;
  if (read !== 'healthlake') {
    try {
      url = new URL(read);
    } catch {
      throw new ConfigError('BROKER_FHIR_READ', 'must be healthlake or an http(s) FHIR base URL');
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
      throw new ConfigError('BROKER_FHIR_READ', `must be healthlake or an http(s) FHIR base URL, not ${url.protocol}`);
    }
    if (read.includes('?') || read.includes('#')) {
      throw new ConfigError('BROKER_FHIR_READ', 'must be a FHIR base URL without query or fragment');
    }
    if (url.username !== '' || url.password !== '') {
      throw new ConfigError('BROKER_FHIR_READ', 'must not carry credentials; use BROKER_FHIR_READ_TOKEN');
    }
    // Canonical (scheme and host lower-cased, a default port dropped): later checks read it as such.
    baseUrl = url.href.replace(/\/+$/, '');
  }
  const fallback =
    url === undefined || url.hostname.endsWith('.amazonaws.com') ? 'sigv4' : token === undefined ? 'none' : 'bearer';
  const auth = authRaw ?? fallback;
  if (auth !== 'sigv4' && auth !== 'bearer' && auth !== 'none') {
    throw new ConfigError('BROKER_FHIR_READ_AUTH', 'must be sigv4, bearer or none');
  }
  if (baseUrl === undefined && auth !== 'sigv4') {
    throw new ConfigError('BROKER_FHIR_READ_AUTH', 'HealthLake (BROKER_FHIR_READ=healthlake) is read with sigv4');
  }
  if (auth === 'bearer' && token === undefined)
    throw new ConfigError('BROKER_FHIR_READ_TOKEN', 'is required with bearer');
  if (auth !== 'bearer' && token !== undefined) {
    throw new ConfigError('BROKER_FHIR_READ_TOKEN', `is set but BROKER_FHIR_READ_AUTH is ${auth}`);
  }
  if (token !== undefined && !TOKEN_CHARS.test(token)) {
    throw new ConfigError(
      'BROKER_FHIR_READ_TOKEN',
      'must be visible ASCII with no spaces (it goes in an Authorization header)',
    );
  }
  // The token and the resources (PHI) would cross the network in clear text.
  if (auth === 'bearer' && url?.protocol === 'http:' && !isLoopbackHost(url.hostname)) {
    throw new ConfigError(
      'BROKER_FHIR_READ',
      'must be https with a bearer token (plain http only to this machine: 127.0.0.1, ::1, localhost)',
    );
  }
  const region =
    (url === undefined ? undefined : /^healthlake\.([a-z0-9-]+)\.amazonaws\.com$/.exec(url.hostname)?.[1]) ?? awsRegion;
  return {
    ...(baseUrl === undefined ? {} : { baseUrl }),
    auth,
    ...(token === undefined ? {} : { token }),
    region,
    timeoutMs: fhirReadTimeout(env),
  };
}

/**
 * At most 25 s: a read holds the ingest request that waits for it, and API Gateway gives a Lambda
 * request 29 s (README, Content filters).
 */
/** A list of client ids, or `*`; it needs `BROKER_FHIR_READ` (the resources are read there). */
function fullResourceClientsConfig(env: Env, fhirRead: FhirReadConfig | undefined): readonly string[] | '*' {
  const raw = str(env, 'BROKER_FULL_RESOURCE_CLIENTS');
  if (raw === undefined) return Object.freeze([]);
  if (fhirRead === undefined) {
    throw new ConfigError(
      'BROKER_FULL_RESOURCE_CLIENTS',
      'needs BROKER_FHIR_READ: full-resource notifications carry the resource as read from the FHIR server',
    );
  }
  if (raw.trim() === '*') return '*';
  const ids = list(raw);
  const bad = ids.find((id) => !CLIENT_ID.test(id));
  if (bad !== undefined || ids.length === 0) {
    throw new ConfigError(
      'BROKER_FULL_RESOURCE_CLIENTS',
      `must be * or a comma-separated list of API client ids (letters, digits, '.', '_', '-'; at most 64)${bad === undefined ? '' : bad === '*' ? ': * stands alone' : `, not ${JSON.stringify(bad.slice(0, 64))}`}`,
    );
  }
  return Object.freeze(ids);
}

function reconcileConfig(env: Env, fhirRead: FhirReadConfig | undefined): ReconcileConfig | undefined {
  if (str(env, 'BROKER_RECONCILE_EVERY') === undefined) {
    if (str(env, 'BROKER_RECONCILE_LAG') !== undefined) {
      throw new ConfigError('BROKER_RECONCILE_LAG', 'is set but BROKER_RECONCILE_EVERY is not');
    }
    return undefined;
  }
  if (fhirRead?.baseUrl === undefined) {
    throw new ConfigError(
      'BROKER_RECONCILE_EVERY',
      'needs BROKER_FHIR_READ set to the FHIR base URL whose changes it reads (HealthLake: https://healthlake.<region>.amazonaws.com/datastore/<id>/r4)',
    );
  }
  const everyMs = singleDuration(env, 'BROKER_RECONCILE_EVERY', 0, 1000);
  if (everyMs > 86_400_000) throw new ConfigError('BROKER_RECONCILE_EVERY', 'must be at most 1d');
  const lagMs = singleDuration(env, 'BROKER_RECONCILE_LAG', DEFAULT_RECONCILE_LAG_MS, 0);
  if (lagMs > 86_400_000) throw new ConfigError('BROKER_RECONCILE_LAG', 'must be at most 1d');
  return Object.freeze({ everyMs, lagMs });
}

/**
 * 15 minutes: CloudTrail hands most events to EventBridge within a few minutes; a change younger
 * than this may still have its event on the way, and the reconciler would notify it twice.
 */
const DEFAULT_RECONCILE_LAG_MS = 15 * 60_000;

function optionalObject<K extends string, V>(key: K, value: V | undefined): { [P in K]?: V } {
  return value === undefined ? {} : ({ [key]: value } as { [P in K]?: V });
}

function fhirReadTimeout(env: Env): number {
  const ms = singleDuration(env, 'BROKER_FHIR_READ_TIMEOUT', 10_000, 100);
  if (ms > 25_000) {
    throw new ConfigError('BROKER_FHIR_READ_TIMEOUT', 'must be at most 25s: an ingest request waits for the read');
  }
  return ms;
}

function isLoopbackHost(host: string): boolean {
  return host === 'localhost' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function optional<K extends string>(key: K, value: string | undefined): { [P in K]?: string } {
  return (value === undefined ? {} : { [key]: value }) as { [P in K]?: string };
}

/** Config from the process environment with some values supplied by the caller (e.g. from a secret). */
export function loadConfigWith(overrides: Readonly<Record<string, string>>): Config {
  return loadConfig({ ...process.env, ...overrides });
}

export function defaultPublicUrl(host: string, port: number): string {
  return `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
}

function str(env: Env, name: string): string | undefined {
  const v = env[name]?.trim();
  return v === undefined || v === '' ? undefined : v;
}

function int(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = str(env, name);
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!/^\d+$/.test(raw) || n < min || n > max) throw new ConfigError(name, `must be an integer from ${min} to ${max}`);
  return n;
}

/** A browser origin as an `Origin` header carries it: `https://app.example.org` or `http://localhost:5173`. */
function isOrigin(value: string): boolean {
  try {
    const url = new URL(value);
    return (url.protocol === 'https:' || url.protocol === 'http:') && url.origin === value;
  } catch {
    return false;
  }
}

function list(raw: string | undefined): string[] {
  return raw === undefined
    ? []
    : raw
        .split(',')
        .map((s) => s.trim())
        .filter((s) => s !== '');
}

/** An API client's id: what `BROKER_API_KEYS` and a kept credentials file may name a client. */
export const CLIENT_ID = /^[A-Za-z0-9_.-]{1,64}$/;
/** The shortest API key, ingest token or metrics token taken. */
export const MIN_TOKEN_CHARS = 16;
/**
 * What a bearer token may hold: visible ASCII, no space. A space, a tab or a line break (a pasted
 * value's, say) could never come in an `Authorization` header, so the broker would start and
 * refuse every client.
 */
export const TOKEN_CHARS = /^[\x21-\x7e]+$/;

/** A bearer token variable: at least MIN_TOKEN_CHARS of TOKEN_CHARS. Its value is never quoted. */
function bearerToken(env: Env, variable: string): string | undefined {
  const token = str(env, variable);
  if (token === undefined) return undefined;
  if (token.length < MIN_TOKEN_CHARS) throw new ConfigError(variable, `must be at least ${MIN_TOKEN_CHARS} characters`);
  if (!TOKEN_CHARS.test(token)) {
    throw new ConfigError(variable, 'must be visible ASCII with no spaces (it comes in an Authorization header)');
  }
  return token;
}
/** The shortest binding-token key (`BROKER_WS_TOKEN_SECRET`) taken. */
export const MIN_WS_SECRET_CHARS = 32;

/**
 * `clientId:token,…`. Errors name an entry by its position only: an entry written the wrong way
 * round (`token:clientId`) puts the token where the clientId belongs, and config errors end up in logs.
 */
function parseApiKeys(raw: string | undefined): ApiClient[] {
  const clients = list(raw).map((pair, i) => {
    const colon = pair.indexOf(':');
    const clientId = colon === -1 ? '' : pair.slice(0, colon);
    const token = colon === -1 ? '' : pair.slice(colon + 1);
    if (!CLIENT_ID.test(clientId)) {
      throw new ConfigError(
        'BROKER_API_KEYS',
        `entry ${i + 1} is not clientId:token with a clientId of 1 to 64 letters, digits, _ . -`,
      );
    }
    if (token.length < MIN_TOKEN_CHARS) {
      throw new ConfigError(
        'BROKER_API_KEYS',
        `entry ${i + 1} has a token (after its first colon) shorter than 16 characters; entries are clientId:token`,
      );
    }
    if (!TOKEN_CHARS.test(token)) {
      throw new ConfigError(
        'BROKER_API_KEYS',
        `entry ${i + 1} has a token with a space or a character that is not visible ASCII (it comes in an Authorization header)`,
      );
    }
    return { clientId, token };
  });
  clients.forEach((c, i) => {
    const first = clients.findIndex((o) => o.clientId === c.clientId);
    if (first !== i)
      throw new ConfigError('BROKER_API_KEYS', `entries ${first + 1} and ${i + 1} have the same clientId`);
    const same = clients.findIndex((o) => o.token === c.token);
    if (same !== i) throw new ConfigError('BROKER_API_KEYS', `entries ${same + 1} and ${i + 1} share a token`);
  });
  return clients;
}

/** An operator's secret, by the variable it comes from (or where it is kept when generated). */
export interface OperatorSecret {
  readonly source: string;
  readonly value: string | undefined;
}

/**
 * README: an API key cannot post events or read `/metrics` (every client's totals), and binding
 * tokens are the broker's to sign. An API client whose token is also the ingest token, the
 * metrics token or the binding-token key could do all that, so the start is refused. Neither
 * token is ever named, only where each comes from. `clientsSource` is `BROKER_API_KEYS` or where
 * the generated API key is kept.
 */
export function refuseOperatorSecretsAsApiKeys(
  clients: readonly ApiClient[],
  clientsSource: string,
  secrets: readonly OperatorSecret[],
): void {
  for (const { source, value } of secrets) {
    const i = value === undefined ? -1 : clients.findIndex((c) => c.token === value);
    if (i === -1) continue;
    const client =
      clientsSource === 'BROKER_API_KEYS' ? `the token of entry ${i + 1} of BROKER_API_KEYS` : clientsSource;
    const why = 'an API client must not hold an operator secret; give each its own';
    throw isVariable(source)
      ? new ConfigError(source, `is the same as ${client}: ${why}`)
      : new ConfigError(clientsSource, `${client} is the same as ${source}: ${why}`);
  }
}

function isVariable(name: string): boolean {
  return /^[A-Z][A-Z0-9_]*$/.test(name);
}

/**
 * The base of every `fullUrl` and reference: an absolute http(s) URL with a host and a port a
 * client can reach, no user name or password (it would be handed to every client), and no query
 * or fragment (the broker appends paths to it). Normalised: lower-case scheme and host, default
 * port left out, no trailing slash.
 */
function parsePublicUrl(raw: string): string {
  // A URL with a user name or password in it is not repeated (it ends up in logs).
  const shown = raw.includes('@') ? 'the URL' : raw;
  const refuse = (what: string) => new ConfigError('BROKER_PUBLIC_URL', `${shown} ${what}`);
  if (!/^https?:\/\/[^/\\?#]/i.test(raw)) throw refuse('is not an http(s) URL (http://host[:port][/path])');
  if (/\s/.test(raw)) throw refuse('contains white space');
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw refuse('is not a valid URL (is its host right, and its port from 1 to 65535?)');
  }
  if (url.username !== '' || url.password !== '') throw refuse('must not contain a user name or password');
  if (/[?#]/.test(raw)) throw refuse('must not have a query or fragment');
  if (url.port === '0') throw refuse('must not have port 0');
  return `${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, '')}`;
}

/** "no such file or directory (ENOENT)" from a Node file-system error, without its syscall. */
export function fsReason(err: unknown): string {
  const { code, message } = err as NodeJS.ErrnoException;
  const reason = /^[A-Z]+: ([^,]+)/.exec(message)?.[1];
  return reason === undefined || code === undefined ? message : `${reason} (${code})`;
}

// 7 days: long enough to cover a weekend outage of a subscriber, and EventBridge's 24 h retries.
const DEFAULT_RETENTION_MS = 7 * 86_400_000;

function singleDuration(env: Env, name: string, fallback: number, minMs: number): number {
  const raw = str(env, name);
  if (raw === undefined) return fallback;
  let ms: number[];
  try {
    ms = parseDurations(raw);
  } catch (err) {
    throw new ConfigError(name, (err as Error).message);
  }
  if (ms.length !== 1 || (ms[0] as number) < minMs)
    throw new ConfigError(name, `must be one duration of at least ${minMs} ms`);
  return ms[0] as number;
}

function retention(raw: string | undefined): number {
  if (raw === undefined) return DEFAULT_RETENTION_MS;
  let ms: number[];
  try {
    ms = parseDurations(raw);
  } catch (err) {
    throw new ConfigError('BROKER_EVENT_RETENTION', (err as Error).message);
  }
  if (ms.length !== 1 || (ms[0] as number) < 60_000) {
    throw new ConfigError('BROKER_EVENT_RETENTION', 'must be one duration of at least 1m, e.g. 7d');
  }
  return ms[0] as number;
}

function retryDelays(raw: string | undefined): number[] {
  if (raw === undefined) return [...DEFAULT_RETRY_DELAYS_MS];
  try {
    return parseDurations(raw);
  } catch (err) {
    throw new ConfigError('BROKER_RETRY_DELAYS', (err as Error).message);
  }
}

/**
 * `none` for a single attempt. At most an hour in all: a subscription that waits longer for its
 * endpoint shows `requested` to its client with no hint of why (the error comes at the end).
 */
function handshakeRetryDelays(raw: string | undefined): number[] {
  if (raw === undefined) return [...DEFAULT_HANDSHAKE_RETRY_DELAYS_MS];
  if (raw.trim() === 'none') return [];
  let delays: number[];
  try {
    delays = parseDurations(raw);
  } catch (err) {
    throw new ConfigError('BROKER_HANDSHAKE_RETRY_DELAYS', `${(err as Error).message}, or none`);
  }
  if (delays.reduce((a, b) => a + b, 0) > 3_600_000) {
    throw new ConfigError('BROKER_HANDSHAKE_RETRY_DELAYS', 'must add up to at most 1h');
  }
  return delays;
}

/**
 * The region of an Amazon SQS queue URL, from its host: `sqs.<region>.amazonaws.com` (`.cn`),
 * `sqs-fips.<region>…`, `sqs.<region>.api.aws`, a VPC endpoint `….sqs.<region>.vpce.amazonaws.com`,
 * the legacy `<region>.queue.amazonaws.com`, and `queue.amazonaws.com` (us-east-1). Undefined for
 * any other host.
 */
export function sqsQueueRegion(queueUrl: string): string | undefined {
  let host: string;
  try {
    const url = new URL(queueUrl);
    if (url.protocol !== 'https:') return undefined;
    host = url.hostname;
  } catch {
    return undefined;
  }
  if (host === 'queue.amazonaws.com') return 'us-east-1';
  const region = '([a-z]{2}(?:-[a-z]+)+-\\d+)';
  const forms = [
    new RegExp(`^sqs(?:-fips)?\\.${region}\\.(?:amazonaws\\.com(?:\\.cn)?|api\\.aws)$`),
    new RegExp(`^[a-z0-9-]+\\.sqs\\.${region}\\.vpce\\.amazonaws\\.com(?:\\.cn)?$`),
    new RegExp(`^${region}\\.queue\\.amazonaws\\.com(?:\\.cn)?$`),
  ];
  for (const form of forms) {
    const m = form.exec(host);
    if (m !== null) return m[1];
  }
  return undefined;
}
