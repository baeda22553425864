import { randomUUID } from 'node:crypto';
import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AwsBroker, createAwsBroker } from '../src/aws/aws-broker.js';
import { createHandlers, type Handlers, type InvocationContext } from '../src/aws/handlers.js';
import { loadConfig } from '../src/config.js';
import { ensureTables } from '../src/store/dynamodb/tables.js';
import { ManagementApiDouble } from './support/aws-doubles.js';
import { DUMMY_CREDENTIALS, type DynamoDbLocal, LOCAL_REGION, startDynamoDbLocal } from './support/dynamodb-local.js';
import { eventLike, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { httpApiEvent } from './support/http-api-event.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * An endpoint that answers late (within its own `backport-timeout`) cannot hold a Lambda
 * invocation past its timeout: the real handlers on DynamoDB Local, given a Lambda context double
 * with little time left, return within it, record the attempt as failed, and a later run retries it.
 */

const ALICE = 'alice-token-0123456789abcdef';
const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
/**
 * The context double's time left: handlers keep 5 s of it for writing states (FLUSH_MARGIN_MS in
 * src/aws/handlers.ts), so attempts get about 2 s.
 */
const REMAINING_MS = 7_000;
/** How late the slow endpoint answers: well past the attempts' 2 s, well within its 60 s timeout. */
const LATE_MS = 9_000;

/** A Lambda context double: `remainingMs` left when made, counting down. */
function lambdaContext(remainingMs: number): InvocationContext {
  const start = Date.now();
  return { getRemainingTimeInMillis: () => remainingMs - (Date.now() - start) };
}

/** A slow subscriber: heartbeats every minute, 60 s per attempt (the largest backport-timeout allowed). */
function slowSubscription(endpoint: string): Json {
  return topicSubscription('patient-change', endpoint, {
    filters: [`Patient?_id=${endpoint.split('/').pop()}`],
    channel: {
      extension: [
        { url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 60 },
        { url: `${BACKPORT}/backport-timeout`, valueUnsignedInt: 60 },
      ],
    },
  });
}

const typeOf = (body: string) => statusOf(JSON.parse(body) as Json).params.get('type')?.valueCode;

describe('Lambda invocations against a slow subscriber endpoint', () => {
  let local: DynamoDbLocal;
  let management: ManagementApiDouble;
  let receiver: Receiver;
  let broker: AwsBroker;
  let handlers: Handlers;
  const logger = new RecordingLogger();

  beforeAll(async () => {
    local = await startDynamoDbLocal();
    management = await ManagementApiDouble.start();
    receiver = await Receiver.start();
    const prefix = `budget-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    const config = loadConfig({
      BROKER_STORE: 'dynamodb',
      BROKER_TABLE_PREFIX: prefix,
      BROKER_API_KEYS: `alice:${ALICE}`,
      BROKER_INGEST_TOKEN: 'ingest-token-0123456789abcdef',
      BROKER_WS_TOKEN_SECRET: 'lambda-ws-secret-0123456789abcdefghijkl',
      BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
      BROKER_PUBLIC_URL: 'https://api.example.com',
      BROKER_WEBSOCKET_URL: 'wss://ws.example.com/prod',
      AWS_REGION: LOCAL_REGION,
    });
    broker = await createAwsBroker({
      // The first retry 300 ms (±20%) after a failure, so the next scheduled run finds it due.
      config: { ...config, retryDelaysMs: [300, 60_000] },
      dynamodb: local.client,
      management: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      }),
      overrides: { logger },
    });
    handlers = createHandlers(Promise.resolve(broker));
  });

  afterAll(async () => {
    await broker?.close(0);
    await management?.close();
    await receiver?.close();
    await local?.stop();
  });

  async function createSubscription(endpoint: string): Promise<string> {
    const res = await handlers.api(
      httpApiEvent('POST', '/fhir/Subscription', {
        token: ALICE,
        body: slowSubscription(endpoint),
      }) as unknown as Parameters<Handlers['api']>[0],
      lambdaContext(29_000) as Context,
    );
    expect(res.statusCode).toBe(201);
    const id = (JSON.parse(String('body' in res ? res.body : '')) as Json).id as string;
    // Answered at once: active.
    expect(receiver.on(new URL(endpoint).pathname).map((r) => typeOf(r.body))).toEqual(['handshake']);
    return id;
  }

  it('events: returns within the time left, records the unanswered attempt as failed, and the dispatcher retries it', async () => {
    const path = '/slow-events';
    const id = await createSubscription(`${receiver.url}${path}`);
    receiver.respond = (r) =>
      r.path === path && typeOf(r.body) === 'event-notification' ? { status: 204, delayMs: LATE_MS } : { status: 204 };

    const started = Date.now();
    const result = await handlers.events(
      eventLike('healthlake-update-patient', 'budget-1', 'slow-events'),
      lambdaContext(REMAINING_MS),
    );
    const took = Date.now() - started;
    expect(result).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    expect(took).toBeLessThan(REMAINING_MS);
    expect(receiver.arrived.filter((r) => r.path === path).map((r) => typeOf(r.body))).toEqual([
      'handshake',
      'event-notification',
    ]);
    // Recorded before the handler returned: failed once, due again.
    const [stored] = await broker.store.notificationsInRange(id, 1, 1, 10);
    expect(stored).toMatchObject({ eventNumber: 1, state: 'pending', attempts: 1 });
    expect(stored?.lastError).toContain('timeout');

    // The endpoint answers at once now: the next scheduled run retries it.
    receiver.respond = () => ({ status: 204 });
    await new Promise((resolve) => setTimeout(resolve, 400));
    await handlers.dispatch(60_000, lambdaContext(REMAINING_MS));
    const [after] = await broker.store.notificationsInRange(id, 1, 1, 10);
    expect(after).toMatchObject({ eventNumber: 1, state: 'delivered', attempts: 2 });
    expect(receiver.arrived.filter((r) => r.path === path && typeOf(r.body) === 'event-notification').length).toBe(2);
  }, 30_000);

  it('dispatcher: a heartbeat answered late does not hold the run past its time; the next run sends one again', async () => {
    const path = '/slow-heartbeat';
    await createSubscription(`${receiver.url}${path}`);
    receiver.respond = (r) =>
      r.path === path && typeOf(r.body) === 'heartbeat' ? { status: 200, delayMs: LATE_MS } : { status: 204 };
    const heartbeats = () => receiver.arrived.filter((r) => r.path === path && typeOf(r.body) === 'heartbeat');
    const failed = () =>
      logger.records.filter((r) => r.msg === 'heartbeat failed' && String(r.error).includes('timeout'));

    const started = Date.now();
    const result = await handlers.dispatch(60_000, lambdaContext(REMAINING_MS));
    const took = Date.now() - started;
    // Every subscription with a one-minute period is due in every one-minute window.
    expect(result.heartbeats).toBeGreaterThanOrEqual(1);
    expect(took).toBeLessThan(REMAINING_MS);
    expect(heartbeats()).toHaveLength(1);
    expect(failed()).toHaveLength(1);

    receiver.respond = () => ({ status: 204 });
    await handlers.dispatch(60_000, lambdaContext(REMAINING_MS));
    expect(heartbeats()).toHaveLength(2);
    expect(failed()).toHaveLength(1);
  }, 30_000);
});
