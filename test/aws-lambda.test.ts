import { randomUUID } from 'node:crypto';
import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import { EventBridgeClient } from '@aws-sdk/client-eventbridge';
import { SecretsManagerClient } from '@aws-sdk/client-secrets-manager';
import { SQSClient } from '@aws-sdk/client-sqs';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApiGatewayWebSocketPort, MAX_MESSAGE_BYTES } from '../src/aws/apigw-websocket-port.js';
import { type AwsBroker, createAwsBroker, MatchIndexedStore, secretEnv } from '../src/aws/aws-broker.js';
import { EventBridgePublisher } from '../src/aws/eventbridge-publisher.js';
import { createHandlers, type Handlers } from '../src/aws/handlers.js';
import type { BrokerOverrides } from '../src/broker.js';
import type { loadConfig } from '../src/config.js';
import type { LifecycleEvent } from '../src/core/lifecycle.js';
import { ensureTables } from '../src/store/dynamodb/tables.js';
import { EventBridgeDouble, ManagementApiDouble, SecretsManagerDouble, SqsDouble } from './support/aws-doubles.js';
import { DUMMY_CREDENTIALS, type DynamoDbLocal, LOCAL_REGION, startDynamoDbLocal } from './support/dynamodb-local.js';
import {
  eventLike,
  eventNumbers,
  fixture,
  focusOf,
  type Json,
  notifiedNumbers,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { FhirServer } from './support/fhir-server.js';
import { httpApiEvent } from './support/http-api-event.js';
import { LAMBDA_TOKENS, lambdaConfig, websocketSubscription, wsEvent } from './support/lambda-stack.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * The real Lambda handlers against DynamoDB Local, a real webhook receiver, and a double of the
 * API Gateway management API that records the exact (SigV4-signed) requests the SDK sends.
 */

const ALICE = LAMBDA_TOKENS.alice;
const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';
const context = {} as Context;

describe('Lambda handlers on DynamoDB Local', () => {
  let local: DynamoDbLocal;
  let management: ManagementApiDouble;
  let receiver: Receiver;
  let broker: AwsBroker;
  let handlers: Handlers;
  let config: ReturnType<typeof loadConfig>;
  const logger = new RecordingLogger();

  /** A broker as another Lambda container builds it: same tables, its own caches. */
  const container = (
    extra: {
      config?: Partial<typeof config>;
      overrides?: BrokerOverrides;
      secrets?: SecretsManagerClient;
      sqs?: SQSClient;
    } = {},
  ) =>
    createAwsBroker({
      config: { ...config, ...extra.config },
      ...(extra.secrets === undefined ? {} : { secrets: extra.secrets }),
      ...(extra.sqs === undefined ? {} : { sqs: extra.sqs }),
      dynamodb: local.client,
      management: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      }),
      overrides: { logger, ...extra.overrides },
    });

  beforeAll(async () => {
    local = await startDynamoDbLocal();
    management = await ManagementApiDouble.start();
    receiver = await Receiver.start();
    const prefix = `lambda-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    config = lambdaConfig(prefix);
    broker = await container();
    handlers = createHandlers(Promise.resolve(broker));
  });

  afterAll(async () => {
    await broker?.close(0);
    await management?.close();
    await receiver?.close();
    await local?.stop();
  });

  /** An API Gateway HTTP API (payload v2) event, as the $default route hands it over. */
  async function api(method: string, path: string, body?: unknown, via: Handlers = handlers) {
    const res = await via.api(
      httpApiEvent(method, path, { token: ALICE, body }) as unknown as Parameters<Handlers['api']>[0],
      context,
    );
    const text = 'body' in res && typeof res.body === 'string' ? res.body : '';
    return { status: res.statusCode, body: (text === '' ? {} : JSON.parse(text)) as Json };
  }

  const ws = wsEvent;

  it('creates a subscription through the API function and activates it by handshake', async () => {
    const created = await api(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/lambda`),
    );
    expect(created.status).toBe(201);
    expect(created.body.status).toBe('requested');
    // The invocation waited for the handshake it started.
    expect(receiver.on('/lambda')).toHaveLength(1);
    const read = await api('GET', `/fhir/Subscription/${created.body.id}`);
    expect(read.body.status).toBe('active');
  });

  it('ingests the fixture events through the EventBridge function and delivers before returning', async () => {
    const results = [];
    for (const name of [
      'healthlake-create-patient',
      'healthlake-update-patient',
      'healthlake-create-observation',
      'healthlake-read-patient',
      'healthlake-create-patient-failed',
      'healthlake-import-job-submitted',
      'healthlake-create-patient',
    ]) {
      results.push(await handlers.events(fixture(name)));
    }
    expect(results).toEqual([
      { accepted: 1, ignored: 0, duplicates: 0 },
      { accepted: 1, ignored: 0, duplicates: 0 },
      { accepted: 1, ignored: 0, duplicates: 0 },
      { accepted: 0, ignored: 1, duplicates: 0 },
      { accepted: 0, ignored: 1, duplicates: 0 },
      { accepted: 0, ignored: 1, duplicates: 0 },
      { accepted: 0, ignored: 0, duplicates: 1 },
    ]);
    const bundles = receiver
      .on('/lambda')
      .slice(1)
      .map((r) => JSON.parse(r.body) as Json);
    expect(bundles.map(eventNumbers)).toEqual([[1], [2]]);
    expect(bundles.map((b) => statusOf(b).events.map(focusOf))).toEqual([
      [`${HL}/Patient/a1b2c3d4-5678-90ab-cdef-EXAMPLE22222`],
      [`${HL}/Patient/a1b2c3d4-5678-90ab-cdef-EXAMPLE22222`],
    ]);
  });

  it('keeps event-number order across containers: one left pending for a retry goes before a later one', async () => {
    // A retry 1.5 s on (±20%), sent by a scheduled run: container A is frozen (closed) after its
    // invocation, as Lambda freezes it, so its own timer never fires.
    const slow = { config: { retryDelaysMs: [1_500, 60_000] } };
    const first = await container(slow);
    const a = createHandlers(Promise.resolve(first));
    const created = await api(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/order`, { filters: ['Patient?_id=order-p'] }),
      a,
    );
    const id = created.body.id as string;
    await receiver.waitFor(() => receiver.on('/order').length === 1, 'the handshake');
    receiver.answerOnce((r) => r.path === '/order' && r.body.includes('event-notification'), { status: 503 });
    await a.events(eventLike('healthlake-update-patient', 'order-1', 'order-p'));
    await first.close(0);
    // Number 1 failed once and waits for its retry; number 2 comes to another container.
    const b = createHandlers(container(slow));
    await b.events(eventLike('healthlake-update-patient', 'order-2', 'order-p'));
    const delivered = () => notifiedNumbers(receiver.on('/order'));
    expect(delivered()).toEqual([]);
    const pending = async () =>
      (await broker.store.notificationsInRange(id, 1, 10, 10)).map((n) => `${n.eventNumber}:${n.state}`);
    expect(await pending()).toEqual(['1:pending', '2:pending']);
    // Once 1 is due, a scheduled run sends 1, then 2.
    await new Promise((resolve) => setTimeout(resolve, 1_900));
    await createHandlers(container()).dispatch();
    expect(delivered()).toEqual([1, 2]);
    expect(await pending()).toEqual(['1:delivered', '2:delivered']);
  });

  it('does not send again from another container a notification whose first attempt is on the wire', async () => {
    const a = createHandlers(container());
    const created = await api(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/in-flight`, { filters: ['Patient?_id=in-flight-p'] }),
      a,
    );
    expect(created.status).toBe(201);
    await receiver.waitFor(() => receiver.on('/in-flight').length === 1, 'the handshake');
    // Number 1 is answered only after 1.5 s: it is on the wire while number 2 comes to container B.
    receiver.answerOnce((r) => r.path === '/in-flight' && r.body.includes('event-notification'), {
      status: 204,
      delayMs: 1_500,
    });
    const first = a.events(eventLike('healthlake-update-patient', 'in-flight-1', 'in-flight-p'));
    await receiver.waitFor(() => receiver.arrived.filter((r) => r.path === '/in-flight').length === 2, '1 on the wire');
    await createHandlers(container()).events(eventLike('healthlake-update-patient', 'in-flight-2', 'in-flight-p'));
    await first;
    expect(notifiedNumbers(receiver.on('/in-flight')).sort()).toEqual([1, 2]);
  });

  it('matches an event at once against a subscription another container created (no cache reload)', async () => {
    const other = await container();
    try {
      const created = await api(
        'POST',
        '/fhir/Subscription',
        topicSubscription('patient-change', `${receiver.url}/other`, { filters: ['Patient?_id=other-p'] }),
        createHandlers(Promise.resolve(other)),
      );
      expect(created.status).toBe(201);
      const id = created.body.id as string;
      expect(receiver.on('/other')).toHaveLength(1); // the handshake, sent by the other container
      // This container has never seen it, and its last full read of subscriptions is recent.
      expect(broker.registry.get(id)).toBeUndefined();

      const result = await handlers.events(eventLike('healthlake-update-patient', 'lambda-other-1', 'other-p'));
      expect(result).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
      const [notification] = receiver
        .on('/other')
        .slice(1)
        .map((r) => JSON.parse(r.body) as Json);
      expect(eventNumbers(notification as Json)).toEqual([1]);
      expect(statusOf(notification as Json).events.map(focusOf)).toEqual([`${HL}/Patient/other-p`]);
      expect(broker.registry.get(id)?.status).toBe('active');

      // Switched off through the other container: this one stops matching it at once too.
      const off = await api(
        'PUT',
        `/fhir/Subscription/${id}`,
        {
          ...topicSubscription('patient-change', `${receiver.url}/other`, { filters: ['Patient?_id=other-p'] }),
          id,
          status: 'off',
        },
        createHandlers(Promise.resolve(other)),
      );
      expect(off.status).toBe(200);
      await handlers.events(eventLike('healthlake-update-patient', 'lambda-other-2', 'other-p'));
      expect(receiver.on('/other')).toHaveLength(2);

      // A fresh events container reads only the subscriptions it notifies, never all of them.
      const fresh = await container();
      try {
        await createHandlers(Promise.resolve(fresh)).events(
          eventLike('healthlake-update-patient', 'lambda-other-3', 'other-p'),
        );
        const cached = [...fresh.registry.all()].map((sub) => sub.id);
        expect(cached).not.toContain(id);
        expect(cached.length).toBeGreaterThan(0);
        expect(cached.length).toBeLessThan((await fresh.store.listSubscriptions()).length);
      } finally {
        await fresh.close(0);
      }
    } finally {
      await other.close(0);
    }
  });

  it('binds a WebSocket through the $connect/$default functions and pushes through the management API', async () => {
    const sub = await api('POST', '/fhir/Subscription', websocketSubscription('ws-p'));
    expect(sub.status).toBe(201);
    const id = sub.body.id as string;
    const tokenParams = await api('POST', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    const param = (name: string) => (tokenParams.body.parameter as Json[]).find((p) => p.name === name) as Json;
    expect(param('websocket-url').valueUrl).toBe('wss://ws.example.com/prod');

    management.live.add('conn-1');
    expect(await handlers.connect(ws('conn-1', '$connect'))).toEqual({ statusCode: 200 });
    expect(
      await handlers.message(ws('conn-1', '$default', { body: `bind-with-token ${param('token').valueString}` })),
    ).toEqual({ statusCode: 200 });
    const [handshake] = management.posted('conn-1').map((b) => JSON.parse(b) as Json);
    expect(statusOf(handshake as Json).params.get('type')?.valueCode).toBe('handshake');

    await handlers.events(eventLike('healthlake-update-patient', 'lambda-ws-1', 'ws-p'));
    const pushed = management.posted('conn-1').map((b) => JSON.parse(b) as Json);
    expect(pushed.map((b) => statusOf(b).params.get('type')?.valueCode)).toEqual(['handshake', 'event-notification']);
    expect(statusOf(pushed[1] as Json).events.map(focusOf)).toEqual([`${HL}/Patient/ws-p`]);

    // The SDK signed every request with SigV4 for execute-api.
    const post = management.requests.find((r) => r.method === 'POST');
    expect(post?.headers.authorization).toMatch(
      /^AWS4-HMAC-SHA256 Credential=local\/\d{8}\/us-east-1\/execute-api\/aws4_request/,
    );

    // A connection that left without $disconnect: 410 Gone → its bindings are deleted.
    management.live.add('conn-2');
    await handlers.connect(ws('conn-2', '$connect'));
    const again = await api('GET', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    const token2 = ((again.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
    await handlers.message(
      ws('conn-2', '$default', { body: JSON.stringify({ type: 'bind-with-token', payload: { token: token2 } }) }),
    );
    management.live.delete('conn-2');
    expect((await broker.bindings.bindingsFor(id)).map((b) => b.connectionId).sort()).toEqual(['conn-1', 'conn-2']);
    await handlers.events(eventLike('healthlake-update-patient', 'lambda-ws-2', 'ws-p'));
    expect((await broker.bindings.bindingsFor(id)).map((b) => b.connectionId)).toEqual(['conn-1']);
    expect(management.requests.filter((r) => r.path === '/@connections/conn-2').map((r) => r.method)).toEqual([
      'POST',
      'POST',
    ]);

    expect(await handlers.disconnect(ws('conn-1', '$disconnect'))).toEqual({ statusCode: 200 });
    expect(await broker.bindings.bindingsFor(id)).toEqual([]);
  });

  it('keeps a notification pending when every bound connection refuses the push, and delivers it on retry', async () => {
    // A container whose retries come at once, as the scheduled dispatcher would run them later.
    const retrying = createHandlers(container({ config: { retryDelaysMs: [50, 50, 50] } }));
    const sub = await api('POST', '/fhir/Subscription', websocketSubscription('denied-p'));
    const id = sub.body.id as string;
    const tokenParams = await api('POST', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    const token = ((tokenParams.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString;
    management.live.add('conn-denied');
    await handlers.connect(ws('conn-denied', '$connect'));
    await handlers.message(ws('conn-denied', '$default', { body: `bind-with-token ${String(token)}` }));
    expect(management.posted('conn-denied')).toHaveLength(1); // the handshake

    // API Gateway refuses the push (AccessDenied: the function's role lacks the grant).
    management.denied.add('conn-denied');
    await retrying.events(eventLike('healthlake-update-patient', 'lambda-denied-1', 'denied-p'));
    const [stored] = await broker.store.notificationsInRange(id, 1, 1, 10);
    expect(stored).toMatchObject({ eventNumber: 1, state: 'pending', attempts: 1 });
    expect(stored?.lastError).toBe('websocket delivery failed: all 1 bound connection(s) refused the message');

    // The grant is fixed: the scheduled dispatcher's retry reaches the client.
    management.denied.delete('conn-denied');
    await new Promise((resolve) => setTimeout(resolve, 60));
    await retrying.dispatch(60_000);
    // The double records every post: the handshake, the refused push, the retry it took.
    const pushed = management.posted('conn-denied').map((b) => JSON.parse(b) as Json);
    expect(pushed.map((b) => statusOf(b).params.get('type')?.valueCode)).toEqual([
      'handshake',
      'event-notification',
      'event-notification',
    ]);
    expect(pushed.slice(1).map((b) => eventNumbers(b))).toEqual([[1], [1]]);
    const [after] = await broker.store.notificationsInRange(id, 1, 1, 10);
    expect(after?.state).toBe('delivered');
  });

  it('runs the scheduled dispatcher to the end when every connection refuses a heartbeat', async () => {
    const body = websocketSubscription('hb-denied-p');
    const channel = body.channel as Json;
    channel.extension = [
      {
        url: 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period',
        valueUnsignedInt: 1,
      },
    ];
    const id = (await api('POST', '/fhir/Subscription', body)).body.id as string;
    const tokenParams = await api('POST', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    const token = ((tokenParams.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString;
    management.live.add('conn-hb-denied');
    await handlers.connect(ws('conn-hb-denied', '$connect'));
    await handlers.message(ws('conn-hb-denied', '$default', { body: `bind-with-token ${String(token)}` }));
    management.denied.add('conn-hb-denied');
    const result = await handlers.dispatch(60_000);
    expect(result.heartbeats).toBeGreaterThanOrEqual(1);
    expect(
      management.posted('conn-hb-denied').map((b) => statusOf(JSON.parse(b) as Json).params.get('type')?.valueCode),
    ).toContain('heartbeat');
  });

  it('hands lifecycle events to EventBridge before a handler returns (the container may freeze then)', async () => {
    const eb = await EventBridgeDouble.start();
    eb.answerDelayMs = 200;
    const client = new EventBridgeClient({ endpoint: eb.url, region: LOCAL_REGION, credentials: DUMMY_CREDENTIALS });
    try {
      const publishing = createHandlers(
        container({ overrides: { lifecycle: new EventBridgePublisher({ client, bus: 'lifecycle-bus', logger }) } }),
      );
      const created = await api(
        'POST',
        '/fhir/Subscription',
        topicSubscription('patient-change', `${receiver.url}/lifecycle`),
        publishing,
      );
      expect(created.status).toBe(201);
      // Returned: the handshake was answered, and EventBridge has taken its status change.
      const entries = eb.answered.flatMap((r) => (JSON.parse(r.body) as { Entries: (typeof eb.entries)[0] }).Entries);
      expect(entries.map((e) => [e.DetailType, e.EventBusName])).toContainEqual([
        'Subscription Status Changed',
        'lifecycle-bus',
      ]);
      expect(entries.map((e) => JSON.parse(e.Detail) as Json)).toContainEqual(
        expect.objectContaining({ subscriptionId: created.body.id, from: 'requested', to: 'active' }),
      );
    } finally {
      client.destroy();
      await eb.close();
    }
  });

  it('reads the credentials from the secret again every 5 minutes: a key removed there stops working in warm containers', async () => {
    const secrets = await SecretsManagerDouble.start();
    try {
      const arn = 'arn:aws:secretsmanager:us-east-1:123456789012:secret:broker-credentials';
      const ROTATED_INGEST = 'rotated-ingest-token-0123456789abcdef';
      const keys = (apiKeys: string, rotated = false) => ({
        apiKeys,
        ingestToken: rotated ? ROTATED_INGEST : LAMBDA_TOKENS.ingest,
        wsTokenSecret: rotated ? 'rotated-ws-secret-0123456789abcdefghijkl' : 'lambda-ws-secret-0123456789abcdefghijkl',
      });
      const BOB = 'bob-token-0123456789abcdef';
      secrets.secret = keys(`alice:${ALICE},bob:${BOB}`);
      let now = Date.now();
      const warm = createHandlers(
        container({
          config: { secretArn: arn },
          overrides: { clock: { now: () => now } },
          secrets: new SecretsManagerClient({
            endpoint: secrets.url,
            region: LOCAL_REGION,
            credentials: DUMMY_CREDENTIALS,
          }),
        }),
      );
      const search = async (token: string) => {
        const event = httpApiEvent('GET', '/fhir/Subscription', { token });
        return (await warm.api(event as unknown as Parameters<Handlers['api']>[0], context)).statusCode;
      };
      const connect = async (token: string) =>
        (
          await warm.connect(
            wsEvent(`key-${randomUUID()}`, '$connect', { headers: { Authorization: `Bearer ${token}` } }),
          )
        ).statusCode;
      const call = async (method: string, path: string, token: string, body?: Json) => {
        const event = httpApiEvent(method, path, { token, ...(body === undefined ? {} : { body }) });
        const res = await warm.api(event as unknown as Parameters<Handlers['api']>[0], context);
        const text = 'body' in res && typeof res.body === 'string' ? res.body : '';
        return { status: res.statusCode, body: (text === '' ? {} : JSON.parse(text)) as Json };
      };
      const bindingToken = async (id: string) => {
        const params = (await call('POST', `/fhir/Subscription/${id}/$get-ws-binding-token`, BOB)).body;
        return ((params.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
      };
      const bind = async (token: string) => {
        const conn = `rot-${randomUUID()}`;
        management.live.add(conn);
        await warm.connect(wsEvent(conn, '$connect'));
        await warm.message(wsEvent(conn, '$default', { body: `bind-with-token ${token}` }));
        return management.posted(conn).map((b) => statusOf(JSON.parse(b) as Json).params.get('type')?.valueCode);
      };
      // The container started with alice's key (from its config); the operator removes it.
      expect(await search(ALICE)).toBe(200);
      secrets.secret = keys(`bob:${BOB}`);
      now += 4 * 60_000;
      expect(await search(ALICE)).toBe(200);
      expect(secrets.reads).toEqual([]);
      // Five minutes after it last read them, the next request reads the credentials again.
      now += 61_000;
      expect(await search(ALICE)).toBe(401);
      expect(await connect(ALICE)).toBe(401);
      expect(await search(BOB)).toBe(200);
      expect(await connect(BOB)).toBe(200);
      expect(secrets.reads).toEqual([arn]);
      // Then it rotates the ingest token and the binding-token key.
      const sub = await call('POST', '/fhir/Subscription', BOB, websocketSubscription('rotation-p'));
      expect(sub.status).toBe(201);
      const tokenBefore = await bindingToken(sub.body.id as string);
      const ingestEvent = eventLike('healthlake-update-patient', `rot-${randomUUID()}`, 'rotation-p') as Json;
      secrets.secret = keys(`bob:${BOB}`, true);
      now += 5 * 60_000 + 1;
      expect((await call('POST', '/events', LAMBDA_TOKENS.ingest, ingestEvent)).status).toBe(401);
      expect(secrets.reads).toEqual([arn, arn]);
      expect((await call('POST', '/events', ROTATED_INGEST, ingestEvent)).status).toBe(202);
      // A binding token fetched before the rotation still binds (within its lifetime), as do new ones.
      expect(await bind(tokenBefore)).toEqual(['handshake']);
      expect(await bind(await bindingToken(sub.body.id as string))).toEqual(['handshake']);
      // A read that fails keeps the keys it has (and is tried again five minutes later).
      secrets.failing = true;
      now += 5 * 60_000 + 1;
      expect(await search(BOB)).toBe(200);
      expect(secrets.reads).toEqual([arn, arn, arn]);
      expect(
        logger.records.some((r) => r.msg === 'could not read the credentials again; keeping those read before'),
      ).toBe(true);
    } finally {
      await secrets.close();
    }
  });

  it('reads the FHIR server with the bearer token the secret holds (fhirReadToken), a rotated one within 5 minutes', async () => {
    const secrets = await SecretsManagerDouble.start();
    const fhir = await FhirServer.start();
    try {
      const arn = 'arn:aws:secretsmanager:us-east-1:123456789012:secret:broker-credentials-fhir';
      const OLD = 'fhir-read-token-old-0123456789';
      const NEW = 'fhir-read-token-new-0123456789';
      const base = {
        apiKeys: `alice:${ALICE}`,
        ingestToken: LAMBDA_TOKENS.ingest,
        wsTokenSecret: 'lambda-ws-secret-0123456789abcdefghijkl',
      };
      const client = new SecretsManagerClient({
        endpoint: secrets.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      });
      // A cold start takes it as BROKER_FHIR_READ_TOKEN (the stack's FhirRead the URL); a token that is no string stops it.
      secrets.secret = { ...base, fhirReadToken: 5 } as unknown as Record<string, string>;
      await expect(secretEnv(arn, client)).rejects.toThrow(`secret ${arn}: fhirReadToken is no string`);
      secrets.secret = { ...base, fhirReadToken: OLD };
      const env = await secretEnv(arn, client);
      expect(env.BROKER_FHIR_READ_TOKEN).toBe(OLD);
      const { fhirRead } = lambdaConfig(config.tablePrefix, { ...env, BROKER_FHIR_READ: fhir.url });
      expect(fhirRead).toMatchObject({ auth: 'bearer', token: OLD });

      // As the stack sets it in every function's environment: the credentials read again are checked with it.
      process.env.BROKER_FHIR_READ = fhir.url;
      fhir.token = OLD;
      fhir.put({ resourceType: 'Patient', id: 'tok-p', generalPractitioner: [{ reference: 'Practitioner/gp1' }] });
      let now = Date.now();
      const warm = createHandlers(
        container({
          config: { secretArn: arn, ...(fhirRead === undefined ? {} : { fhirRead }) },
          overrides: { clock: { now: () => now } },
          secrets: client,
        }),
      );
      const call = async (method: string, path: string, token: string, body: Json) => {
        const event = httpApiEvent(method, path, { token, body });
        return (await warm.api(event as unknown as Parameters<Handlers['api']>[0], context)).statusCode;
      };
      const filtered = topicSubscription('patient-change', `${receiver.url}/fhir-token`, {
        filters: ['Patient?general-practitioner=Practitioner/gp1'],
      });
      expect(await call('POST', '/fhir/Subscription', ALICE, filtered)).toBe(201);
      // As EventBridge invokes the events function.
      const post = (id: string) => warm.events(eventLike('healthlake-update-patient', id, 'tok-p'), context);
      const authorizations = () => fhir.requests.map((r) => r.headers.authorization);

      expect(await post(`tok-${randomUUID()}`)).toMatchObject({ accepted: 1 });
      expect(authorizations()).toEqual([`Bearer ${OLD}`]);
      // The operator rotates it (the server takes only the new one); within 5 minutes the old one is
      // still sent, refused: the invocation fails, and EventBridge tries it again.
      secrets.secret = { ...base, fhirReadToken: NEW };
      fhir.token = NEW;
      now += 4 * 60_000;
      await expect(post(`tok-${randomUUID()}`)).rejects.toThrow('could not be read');
      expect(secrets.reads).toEqual([arn, arn]);
      now += 61_000;
      expect(await post(`tok-${randomUUID()}`)).toMatchObject({ accepted: 1 });
      expect(secrets.reads).toEqual([arn, arn, arn]);
      expect(authorizations()).toEqual([`Bearer ${OLD}`, `Bearer ${OLD}`, `Bearer ${NEW}`]);

      // A container that started before the operator added a token (the stack makes the secret
      // without one) reads without, and takes the token once it reads the secret again.
      secrets.secret = base;
      fhir.token = undefined;
      const plain = lambdaConfig(config.tablePrefix, { BROKER_FHIR_READ: fhir.url }).fhirRead;
      expect(plain).toMatchObject({ auth: 'none' });
      const started = now;
      const earlier = createHandlers(
        container({
          config: { secretArn: arn, ...(plain === undefined ? {} : { fhirRead: plain }) },
          overrides: { clock: { now: () => now } },
          secrets: client,
        }),
      );
      const postTo = (id: string) => earlier.events(eventLike('healthlake-update-patient', id, 'tok-p'), context);
      expect(await postTo(`tok-${randomUUID()}`)).toMatchObject({ accepted: 1 });
      secrets.secret = { ...base, fhirReadToken: NEW };
      fhir.token = NEW;
      now = started + 5 * 60_000 + 1;
      expect(await postTo(`tok-${randomUUID()}`)).toMatchObject({ accepted: 1 });
      expect(authorizations().slice(3)).toEqual([undefined, `Bearer ${NEW}`]);
      // The token is in no log line.
      expect(JSON.stringify(logger.records)).not.toContain(NEW);
      expect(JSON.stringify(logger.records)).not.toContain(OLD);
    } finally {
      delete process.env.BROKER_FHIR_READ;
      await fhir.close();
      await secrets.close();
    }
  });

  it('refuses a $connect with a bad API key, and lets the owner use R4 bind', async () => {
    expect(
      await handlers.connect(ws('conn-bad', '$connect', { headers: { Authorization: 'Bearer nope-nope-nope-nope' } })),
    ).toEqual({
      statusCode: 401,
      body: 'Unauthorized',
    });
    const sub = await api('POST', '/fhir/Subscription', {
      resourceType: 'Subscription',
      reason: 'test',
      criteria: 'Patient?_id=r4-lambda',
      channel: { type: 'websocket' },
    });
    management.live.add('conn-r4');
    await handlers.connect(ws('conn-r4', '$connect', { headers: { Authorization: `Bearer ${ALICE}` } }));
    await handlers.message(ws('conn-r4', '$default', { body: `bind ${sub.body.id}` }));
    await handlers.events(eventLike('healthlake-update-patient', 'lambda-r4-1', 'r4-lambda'));
    expect(management.posted('conn-r4')).toEqual([`bound ${sub.body.id}`, `ping ${sub.body.id}`]);
  });

  it('replaces a message over 128 KiB with a pointer to $events', async () => {
    management.live.add('conn-big');
    const huge = JSON.stringify({ resourceType: 'Bundle', padding: 'x'.repeat(MAX_MESSAGE_BYTES) });
    const direct = new ApiGatewayWebSocketPort({
      client: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      }),
      logger,
    });
    expect(await direct.send('conn-big', huge)).toBe('sent');
    const [sent] = management.posted('conn-big').map((b) => JSON.parse(b) as Json);
    expect(sent?.type).toBe('error');
    expect(String(((sent as Json).payload as Json).message)).toContain('exceeds API Gateway');
    expect(await direct.send('conn-unknown', 'hello')).toBe('gone');
  });

  it('runs the scheduled dispatcher: owed handshakes and heartbeats', async () => {
    const created = await api(
      'POST',
      '/fhir/Subscription',
      topicSubscription('patient-change', `${receiver.url}/heartbeat`, {
        channel: {
          extension: [
            {
              url: 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period',
              valueUnsignedInt: 1,
            },
          ],
        },
      }),
    );
    expect(created.status).toBe(201);
    // A one-minute window spans sixty one-second periods: one heartbeat per run.
    const result = await handlers.dispatch(60_000);
    expect(result.heartbeats).toBeGreaterThanOrEqual(1);
    const types = receiver
      .on('/heartbeat')
      .map((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode);
    expect(types).toEqual(['handshake', 'heartbeat']);
  });

  it('puts a subscription in error once the SSRF guard refuses its heartbeat; no scheduled run after tries again', async () => {
    // Tables of its own: the narrowed allow-list would refuse the other tests' receivers too.
    const tablePrefix = `lambda-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, tablePrefix);
    const log = new RecordingLogger();
    const allowed = await container({ config: { tablePrefix }, overrides: { logger: log } });
    let id: string;
    try {
      const viaAllowed = createHandlers(Promise.resolve(allowed));
      const created = await api(
        'POST',
        '/fhir/Subscription',
        topicSubscription('patient-change', `${receiver.url}/hb-refused`, {
          channel: {
            extension: [
              {
                url: 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period',
                valueUnsignedInt: 1,
              },
            ],
          },
        }),
        viaAllowed,
      );
      id = created.body.id as string;
      expect(await viaAllowed.dispatch(60_000)).toEqual({ heartbeats: 1 });
    } finally {
      await allowed.close(0);
    }

    // The operator took 127.0.0.1 off BROKER_ENDPOINT_ALLOWLIST: new containers refuse it (loopback).
    const lifecycle: LifecycleEvent[] = [];
    const narrowed = {
      config: { tablePrefix, endpointAllowlist: [] },
      overrides: {
        logger: log,
        lifecycle: { publish: (e: LifecycleEvent) => lifecycle.push(e), flush: async () => {} },
      },
    };
    const first = await container(narrowed);
    const second = await container(narrowed);
    try {
      const viaFirst = createHandlers(Promise.resolve(first));
      const viaSecond = createHandlers(Promise.resolve(second));
      // Scheduled runs on one container and on another one that read the subscription afterwards.
      const runs: number[] = [];
      for (const via of [viaFirst, viaFirst, viaSecond, viaFirst]) runs.push((await via.dispatch(60_000)).heartbeats);
      expect(runs).toEqual([1, 0, 0, 0]);

      const reason = 'heartbeat failed: endpoint refused: 127.0.0.1 is a loopback address';
      const read = await api('GET', `/fhir/Subscription/${id}`, undefined, viaSecond);
      expect(read.body).toMatchObject({ status: 'error', error: reason });
      expect(lifecycle).toEqual([
        expect.objectContaining({
          type: 'Subscription Status Changed',
          subscriptionId: id,
          from: 'active',
          to: 'error',
          reason,
        }),
      ]);
      const heartbeats = (b: AwsBroker) =>
        ['ok', 'failed', 'refused'].map((outcome) => b.metrics.value('broker_heartbeats_total', { outcome }));
      expect([heartbeats(first), heartbeats(second)]).toEqual([
        [0, 0, 1],
        [0, 0, 0],
      ]);
      expect(log.records.filter((r) => r.msg === 'heartbeat failed')).toEqual([
        expect.objectContaining({ subscription: id, error: 'endpoint refused: 127.0.0.1 is a loopback address' }),
      ]);
      const types = receiver
        .on('/hb-refused')
        .map((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode);
      expect(types).toEqual(['handshake', 'heartbeat']);
    } finally {
      await first.close(0);
      await second.close(0);
    }
  });

  describe('an event the broker refuses, with BROKER_DEAD_LETTER_QUEUE_URL', () => {
    const QUEUE = 'https://sqs.us-east-1.amazonaws.com/111122223333/broker-dead-letters';
    const invocation = {
      awsRequestId: 'c0ffee00-0000-4000-8000-000000000001',
      invokedFunctionArn: 'arn:aws:lambda:us-east-1:111122223333:function:broker-events',
    };

    /** A container whose dead-letter queue is a stand-in (SQS does not run here); its log and EMF lines. */
    async function refusing() {
      const sqs = await SqsDouble.start();
      const client = new SQSClient({ region: LOCAL_REGION, endpoint: sqs.url, credentials: DUMMY_CREDENTIALS });
      const log = new RecordingLogger();
      const b = await container({ config: { deadLetterQueueUrl: QUEUE }, sqs: client, overrides: { logger: log } });
      const lines: string[] = [];
      const h = createHandlers(Promise.resolve(b), { emit: (line) => lines.push(line) });
      const close = async () => {
        await b.close(0);
        client.destroy();
        await sqs.close();
      };
      return { sqs, log, b, h, lines, close };
    }

    const refusedCount = (lines: readonly string[]): number[] =>
      lines
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .filter((m) => m.outcome === 'refused' && 'broker_events_total' in m)
        .map((m) => m.broker_events_total as number);

    it('puts it on the queue at once, as a failure record names it, and the invocation succeeds: counted once', async () => {
      const { sqs, log, h, lines, close } = await refusing();
      try {
        const notAnEvent = { detail: 'not an event' };
        expect(await h.events(notAnEvent, invocation)).toEqual({ accepted: 0, ignored: 0, duplicates: 0, refused: 1 });
        // One request, exactly: SendMessage to the queue, the record as its body.
        expect(sqs.calls.map((c) => [c.target, Object.keys(c.body).sort(), c.body.QueueUrl])).toEqual([
          ['AmazonSQS.SendMessage', ['MessageBody', 'QueueUrl'], QUEUE],
        ]);
        const record = JSON.parse(String(sqs.calls[0]?.body.MessageBody)) as Json;
        expect(record).toEqual({
          version: '1.0',
          timestamp: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
          requestContext: {
            condition: 'Refused',
            requestId: invocation.awsRequestId,
            functionArn: invocation.invokedFunctionArn,
          },
          requestPayload: notAnEvent,
          responsePayload: { errorType: 'INVALID_EVENT', errorMessage: expect.stringMatching(/^event: .*'id'/) },
        });
        expect(refusedCount(lines)).toEqual([1]);
        const messageId = sqs.undeleted[0]?.MessageId;
        expect(log.records.filter((r) => String(r.msg).includes('dead-letter'))).toEqual([
          expect.objectContaining({ level: 'warn', code: 'INVALID_EVENT', messageId }),
        ]);

        // Too many events in one call: the whole call is refused, each event counted once. The
        // record would not fit in a message (~950 KB against 256 KiB): the events are left out
        // and named instead, so the refusal still reaches the queue.
        const many = Array.from({ length: 1001 }, (_, i) =>
          eventLike('healthlake-update-patient', `too-many-${i}`, 'p'),
        );
        lines.length = 0;
        expect(await h.events(many, {})).toEqual({ accepted: 0, ignored: 0, duplicates: 0, refused: 1001 });
        const second = JSON.parse(String(sqs.calls[1]?.body.MessageBody)) as Json;
        expect(second).toEqual({
          version: '1.0',
          timestamp: expect.any(String),
          requestContext: { condition: 'Refused' },
          requestPayloadOmitted: {
            bytes: expect.any(Number),
            events: 1001,
            ids: Array.from({ length: 100 }, (_, i) => `too-many-${i}`),
          },
          responsePayload: {
            errorType: 'TOO_MANY_EVENTS',
            errorMessage: '1001 events in one request; the limit is 1000',
          },
        });
        expect((second.requestPayloadOmitted as Json).bytes).toBeGreaterThan(256 * 1024);
        expect(refusedCount(lines)).toEqual([1001]);
        // Characters SQS refuses in a message (U+FFFE, U+FFFF) go escaped, and read back the same.
        const odd = { id: 'odd\uffff', detail: 'x\ufffe' };
        expect(await h.events(odd, {})).toMatchObject({ refused: 1 });
        expect((JSON.parse(String(sqs.calls[2]?.body.MessageBody)) as Json).requestPayload).toEqual(odd);
        // Nothing of either was stored: the next good event is number 1 of nothing, and no duplicate.
        expect(await h.events(eventLike('healthlake-update-patient', 'too-many-0', 'p'))).toEqual({
          accepted: 1,
          ignored: 0,
          duplicates: 0,
        });
      } finally {
        await close();
      }
    });

    it('fails the invocation as before when the queue does not take it (Lambda retries, then its own record)', async () => {
      const { sqs, log, h, close } = await refusing();
      try {
        sqs.failSends = true;
        await expect(h.events({ detail: 'not an event' }, invocation)).rejects.toThrow(/^event: .*'id'/);
        expect(sqs.calls.map((c) => c.target)).toEqual(['AmazonSQS.SendMessage']);
        expect(log.records.filter((r) => String(r.msg).includes('dead-letter'))).toEqual([
          expect.objectContaining({
            level: 'error',
            msg: 'could not send a refused event to the dead-letter queue; the invocation fails',
          }),
        ]);
        // A store failure is no refusal: it fails the invocation without a message (Lambda retries it).
        sqs.failSends = false;
        const broken = await refusing();
        try {
          broken.b.store.acceptChanges = async () => {
            throw new Error('throttled');
          };
          await expect(broken.h.events(eventLike('healthlake-update-patient', 'store-down', 'p'))).rejects.toThrow();
          expect(broken.sqs.calls).toEqual([]);
        } finally {
          await broken.close();
        }
      } finally {
        await close();
      }
    });
  });

  it('builds the type index before the first match only, and again after a build that failed', async () => {
    const store = new MatchIndexedStore(local.client, config.tablePrefix);
    const build = store.ensureTypeIndex.bind(store);
    let builds = 0;
    store.ensureTypeIndex = async () => {
      builds++;
      if (builds === 1) throw new Error('throttled');
      return build();
    };
    await expect(store.candidatesFor('Patient')).rejects.toThrow('throttled');
    await Promise.all([store.candidatesFor('Patient'), store.candidatesFor('Observation')]);
    await store.candidatesFor('Patient');
    expect(builds).toBe(2);
  });
});
