import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DeleteItemCommand, GetItemCommand, PutItemCommand, QueryCommand } from '@aws-sdk/client-dynamodb';
import { App } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SKIP_BUNDLING_CONTEXT } from '../infra/lib/broker-function.js';
import { BrokerStack } from '../infra/lib/broker-stack.js';
import type { FunctionName } from '../infra/lib/function-access.js';
import { FUNCTION_ENTRIES } from '../infra/lib/functions.js';
import { parseSubscription } from '../src/core/subscription.js';
import type { SubscriptionRecord } from '../src/core/types.js';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { ensureTables, type TableNames, tableNames } from '../src/store/dynamodb/tables.js';
import { loadTopicCatalog } from '../src/store/topic-files.js';
import { EventBridgeDouble, ManagementApiDouble } from './support/aws-doubles.js';
import { grantedAccess, permissionsOf, type Targets, targetsOf, unaccountedGrants } from './support/aws-permissions.js';
import { AwsRecorder } from './support/aws-recorder.js';
import { DUMMY_CREDENTIALS, type DynamoDbLocal, startDynamoDbLocal } from './support/dynamodb-local.js';
import { eventLike, fixture, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { FhirServer } from './support/fhir-server.js';
import { httpApiEvent } from './support/http-api-event.js';
import { LambdaContainer } from './support/lambda-container.js';
import { websocketSubscription as heartbeatingWebsocketSubscription } from './support/lambda-stack.js';
import { Receiver } from './support/receiver.js';
import { allows, REGION, StackIam, type TemplateJson } from './support/stack-iam.js';

/**
 * Least privilege per Lambda function, proven without a deploy. The CDK stack is synthesized;
 * each function runs in a process of its own (a Lambda container) with the environment the
 * template gives it, importing its real entry module, so its cold start is the real one. All its
 * AWS SDK clients talk to a recorder of its own, in front of DynamoDB Local and doubles of
 * EventBridge, the API Gateway management API and Secrets Manager. The functions are driven
 * through start-up and their typical and edge operations; then, per function, every recorded
 * call must be allowed by its role, and the role must grant no access the function did not use.
 */

const ALICE = 'alice-token-0123456789abcdef';
const INGEST = 'ingest-token-0123456789abcdef';
const SECRET = JSON.stringify({
  apiKeys: `alice:${ALICE}`,
  ingestToken: INGEST,
  wsTokenSecret: 'iam-ws-token-secret-0123456789abcdefghij',
});
const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const TOPICS_DIR = fileURLToPath(new URL('../subscriptions/topics', import.meta.url));
/** The marker `ensureTypeIndex` writes once the type index is built (dynamodb-store.ts). */
const TYPE_INDEX_MARKER = { resourceType: { S: '#index' }, subscriptionId: { S: '#built' } };
/** 8 days: past the default 7-day retention, so the dispatcher's purge deletes it. */
const LONG_AGO = Date.now() - 8 * 86_400_000;
const NAMES: readonly FunctionName[] = [
  'api',
  'events',
  'dispatcher',
  'wsConnect',
  'wsDisconnect',
  'wsMessage',
  'reconcile',
];

interface Running {
  readonly container: LambdaContainer;
  readonly recorder: AwsRecorder;
  /** The stack as deployed for this function (the reconcile function exists only with ReconcileEveryMinutes set). */
  readonly stack: StackIam;
  readonly functionId: string;
  readonly targets: Targets;
}

interface HttpAnswer {
  readonly status: number;
  readonly body: Json;
  readonly headers: Record<string, string>;
}

const heartbeatEvery60s = { extension: [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: 60 }] };

const websocketSubscription = (patientId: string): Json =>
  heartbeatingWebsocketSubscription(patientId, heartbeatEvery60s);

/** What a bundle the receiver got is: handshake, heartbeat or event-notification. */
function bundleType(body: string): string {
  return String(statusOf(JSON.parse(body) as Json).params.get('type')?.valueCode);
}

describe('IAM per Lambda function, against the real handlers on DynamoDB Local', () => {
  let stack: StackIam;
  /** The same template deployed with reconciliation on, searching `fhir`. */
  let reconciling: StackIam;
  let fhir: FhirServer;
  let local: DynamoDbLocal;
  let management: ManagementApiDouble;
  let eventBridge: EventBridgeDouble;
  let receiver: Receiver;
  const running = new Map<FunctionName, Running>();
  /** Set when the run below got to its end: the per-function checks judge a whole run only. */
  let ranToTheEnd = false;

  beforeAll(async () => {
    // Synthesised into a directory of its own, removed once read (CDK's default one is left in /tmp).
    const outdir = mkdtempSync(join(tmpdir(), 'broker-synth-'));
    let template: TemplateJson;
    try {
      const app = new App({ outdir, context: { [SKIP_BUNDLING_CONTEXT]: true } });
      template = Template.fromStack(new BrokerStack(app, 'Broker')).toJSON() as TemplateJson;
    } finally {
      rmSync(outdir, { recursive: true, force: true });
    }
    [local, management, eventBridge, receiver, fhir] = await Promise.all([
      startDynamoDbLocal(),
      ManagementApiDouble.start(),
      EventBridgeDouble.start(),
      Receiver.start(),
      FhirServer.start(),
    ]);
    stack = new StackIam(template);
    reconciling = new StackIam(template, { ReconcileEveryMinutes: '5', FhirRead: fhir.url });
    // The stack creates the tables; the functions never do.
    await ensureTables(local.client, prefix());
    await seed();
    receiver.respond = (req) => {
      if (req.path === '/gone-at-handshake') return { status: 410 };
      if (bundleType(req.body) !== 'event-notification') return { status: 204 };
      const attempts = receiver.arrived.filter(
        (r) => r.path === req.path && bundleType(r.body) === 'event-notification',
      ).length;
      if (req.path === '/gone') return { status: 410 };
      if (req.path === '/retry' && attempts === 1) return { status: 500 };
      if (req.path === '/dead' && attempts <= 2) return { status: 500 };
      return { status: 204 };
    };
  });

  afterAll(async () => {
    await Promise.all([...running.values()].map((r) => r.container.stop()));
    await Promise.all([...running.values()].map((r) => r.recorder.close()));
    await management?.close();
    await eventBridge?.close();
    await receiver?.close();
    await fhir?.close();
    await local?.stop();
  });

  function prefix(): string {
    return String(stack.environment(functionIdOf('api')).BROKER_TABLE_PREFIX);
  }

  function stackOf(name: FunctionName): StackIam {
    return name === 'reconcile' ? reconciling : stack;
  }

  function functionIdOf(name: FunctionName): string {
    const { handler, description } = FUNCTION_ENTRIES[name];
    return stackOf(name).functionId({ Handler: `index.${handler}`, Description: description });
  }

  /**
   * Three subscriptions whose handshakes are owed (the API function's container was frozen before
   * it sent them), from tables whose type index was never built, and a delivered notification and an event id from before the retention window.
   */
  async function seed(): Promise<void> {
    const store = new DynamoDbStore(local.client, prefix());
    const topics = loadTopicCatalog(TOPICS_DIR);
    const now = new Date().toISOString();
    for (const [id, path] of [
      ['owed-retry', 'retry'],
      ['owed-dead', 'dead'],
      ['owed-gone', 'gone-at-handshake'],
    ] as const) {
      const spec = parseSubscription(
        topicSubscription('patient-change', `${receiver.url}/${path}`, { filters: [`Patient?_id=p-${path}`] }),
        topics,
      );
      const record: SubscriptionRecord = {
        id,
        owner: 'alice',
        kind: spec.kind,
        topic: spec.topic,
        status: 'requested',
        match: spec.match,
        channel: spec.channel,
        webhookSecret: 'seeded-secret-0123456789abcdef',
        eventsSinceStart: 0,
        createdAt: now,
        updatedAt: now,
        resource: spec.resource,
      };
      await store.insertSubscription(record);
      // Written before the type index existed: the subscription is in no index item (and no
      // marker says the index was built) until a function that matches events builds it.
      await local.client.send(
        new DeleteItemCommand({
          TableName: tableNames(prefix()).subscriptionTypes,
          Key: { resourceType: { S: 'Patient' }, subscriptionId: { S: id } },
        }),
      );
    }
    const names = tableNames(prefix());
    await local.client.send(
      new PutItemCommand({
        TableName: names.notifications,
        Item: {
          subscriptionId: { S: 'long-gone' },
          eventNumber: { N: '1' },
          change: { S: '{}' },
          state: { S: 'delivered' },
          attempts: { N: '1' },
          dueAt: { N: String(LONG_AGO) },
          createdAt: { N: String(LONG_AGO) },
        },
      }),
    );
    await local.client.send(
      new PutItemCommand({
        TableName: names.eventIds,
        Item: {
          eventId: { S: 'long-ago' },
          scope: { S: '#event' },
          receivedAt: { N: String(LONG_AGO) },
          expiresAt: { N: String(Math.floor(Date.now() / 1000) + 3600) },
        },
      }),
    );
  }

  /**
   * A new container for the function. It starts as the first one after an upgrade would: on
   * tables whose type index is not built yet (no marker). Its start-up must not need the index;
   * its first match of events (the events function, the API's `POST /events`) builds it.
   */
  async function start(name: FunctionName): Promise<LambdaContainer> {
    await local.client.send(
      new DeleteItemCommand({ TableName: tableNames(prefix()).subscriptionTypes, Key: TYPE_INDEX_MARKER }),
    );
    const functionId = functionIdOf(name);
    const env = stackOf(name).environment(functionId);
    const targets = targetsOf(env, stackOf(name).failureDestinations(functionId));
    const recorder = await AwsRecorder.start({
      dynamodb: local.endpoint,
      management: management.url,
      eventBridge: eventBridge.url,
      secrets: { [targets.secretArn]: SECRET },
    });
    const { entry, handler } = FUNCTION_ENTRIES[name];
    const container = await LambdaContainer.start(`src/aws/${entry}`, handler, {
      ...env,
      // Where the template's values point at AWS, or at /var/task: the local stand-ins.
      BROKER_WS_MANAGEMENT_ENDPOINT: `${recorder.url}/${targets.stage}`,
      BROKER_TOPICS_DIR: TOPICS_DIR,
      AWS_ENDPOINT_URL: recorder.url,
      // The SQS client sends to its queue URL's host unless given an endpoint of its own.
      SQS_ENDPOINT: recorder.url,
      AWS_ACCESS_KEY_ID: DUMMY_CREDENTIALS.accessKeyId,
      AWS_SECRET_ACCESS_KEY: DUMMY_CREDENTIALS.secretAccessKey,
      AWS_REGION: REGION,
      // Test-only settings: webhooks to the local receiver, retries within the test's time.
      BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
      BROKER_RETRY_DELAYS: '100ms',
      BROKER_LOG_LEVEL: 'error',
      // Reconciliation looks for a change at once, not after the 15 minutes left to its event.
      ...(env.BROKER_RECONCILE_LAG === undefined ? {} : { BROKER_RECONCILE_LAG: '0s' }),
    });
    running.set(name, { container, recorder, stack: stackOf(name), functionId, targets });
    return container;
  }

  function fn(name: FunctionName): LambdaContainer {
    const r = running.get(name);
    if (r === undefined) throw new Error(`${name} is not running`);
    return r.container;
  }

  /** An API Gateway HTTP API (payload 2.0) request to the API function. */
  async function api(
    method: string,
    path: string,
    options: { body?: unknown; token?: string; headers?: Record<string, string> } = {},
  ): Promise<HttpAnswer> {
    const res = await fn('api').invoke<{ statusCode: number; body?: string; headers?: Record<string, string> }>(
      httpApiEvent(method, path, { ...options, token: options.token ?? ALICE }),
    );
    const text = res.body ?? '';
    const json = text.startsWith('{') ? (JSON.parse(text) as Json) : {};
    return { status: res.statusCode, body: json, headers: res.headers ?? {} };
  }

  const ws = (
    connectionId: string,
    routeKey: string,
    extra: { body?: string; headers?: Record<string, string> } = {},
  ) =>
    fn(routeKey === '$connect' ? 'wsConnect' : routeKey === '$disconnect' ? 'wsDisconnect' : 'wsMessage').invoke<{
      statusCode: number;
    }>({ requestContext: { connectionId, routeKey }, ...extra });
  const events = (event: unknown) =>
    fn('events').invoke<{ accepted: number; ignored: number; duplicates: number }>(event);
  const posted = (connectionId: string) => management.posted(connectionId);
  const notificationsTo = (path: string) =>
    receiver.on(path).filter((r) => bundleType(r.body) === 'event-notification').length;
  /** Whether the marker says the type index is built. */
  const indexBuilt = async () =>
    (
      await local.client.send(
        new GetItemCommand({ TableName: tableNames(prefix()).subscriptionTypes, Key: TYPE_INDEX_MARKER }),
      )
    ).Item !== undefined;
  /** The subscriptions the type index offers for a Patient change. */
  const indexed = async () => {
    const out = await local.client.send(
      new QueryCommand({
        TableName: tableNames(prefix()).subscriptionTypes,
        KeyConditionExpression: 'resourceType = :t',
        ExpressionAttributeValues: { ':t': { S: 'Patient' } },
      }),
    );
    return (out.Items ?? []).map((item) => String(item.subscriptionId?.S));
  };
  const storedNotifications = async (subscriptionId: string) =>
    (
      await local.client.send(
        new QueryCommand({
          TableName: tableNames(prefix()).notifications,
          KeyConditionExpression: 'subscriptionId = :s',
          ExpressionAttributeValues: { ':s': { S: subscriptionId } },
        }),
      )
    ).Items?.length ?? 0;
  /** The tables the function's recorded DynamoDB requests named, whatever its role allows. */
  const tablesReached = (name: FunctionName): (keyof TableNames)[] => {
    const r = running.get(name);
    if (r === undefined) throw new Error(`${name} never ran`);
    const roles = r.recorder.calls
      .filter((call) => call.service === 'dynamodb')
      .flatMap((call) => permissionsOf(call, r.targets))
      .map((p) => p.access.split(':')[0] as keyof TableNames);
    return [...new Set(roles)].sort();
  };

  it('runs every function through its start-up and its typical and edge operations', async () => {
    // The API function: health, subscriptions of every kind, reads, searches, operations.
    await start('api');
    expect((await api('GET', '/healthz')).status).toBe(200);
    expect((await api('GET', '/fhir/metadata')).status).toBe(200);
    expect((await api('GET', '/fhir/Subscription', { token: 'not-a-key-0123456789' })).status).toBe(401);
    expect((await api('POST', '/fhir/Subscription', { body: { resourceType: 'Patient' } })).status).toBe(400);
    const create = async (body: Json) => {
      const created = await api('POST', '/fhir/Subscription', { body });
      expect(created.status).toBe(201);
      return created.body.id as string;
    };
    const hook = await create(
      topicSubscription('patient-change', `${receiver.url}/hook`, { filters: ['Patient?_id=p-hook'] }),
    );
    const gone = await create(
      topicSubscription('patient-change', `${receiver.url}/gone`, { filters: ['Patient?_id=p-gone'] }),
    );
    const beating = await create(
      topicSubscription('patient-change', `${receiver.url}/heartbeat`, {
        filters: ['Patient?_id=p-heartbeat'],
        channel: heartbeatEvery60s,
      }),
    );
    const socket = await create(websocketSubscription('p-ws'));
    expect(receiver.on('/hook').map((r) => bundleType(r.body))).toEqual(['handshake']);
    expect((await api('GET', `/fhir/Subscription/${hook}`)).body.status).toBe('active');
    expect((await api('GET', '/fhir/Subscription')).status).toBe(200);
    expect((await api('GET', `/fhir/Subscription/${hook}/$status`)).status).toBe(200);
    const tokenParams = await api('POST', `/fhir/Subscription/${socket}/$get-ws-binding-token`);
    const token = String(((tokenParams.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString);

    // $connect: anonymous, with the owner's API key, with a bad key.
    await start('wsConnect');
    for (const id of ['conn-1', 'conn-r4', 'conn-gone', 'conn-noise']) management.live.add(id);
    expect(await ws('conn-1', '$connect')).toEqual({ statusCode: 200 });
    expect(await ws('conn-r4', '$connect', { headers: { Authorization: `Bearer ${ALICE}` } })).toEqual({
      statusCode: 200,
    });
    expect(await ws('conn-bad', '$connect', { headers: { Authorization: 'Bearer nope-nope-nope-nope' } })).toEqual({
      statusCode: 401,
      body: 'Unauthorized',
    });
    expect(await ws('conn-gone', '$connect')).toEqual({ statusCode: 200 });

    // Messages: bind with a token (and a catch-up claim above the count), R4 bind, a protocol error.
    await start('wsMessage');
    expect(await ws('conn-1', '$default', { body: `bind-with-token ${token}` })).toEqual({ statusCode: 200 });
    expect(await ws('conn-gone', '$default', { body: `bind-with-token ${token} 5` })).toEqual({ statusCode: 200 });
    expect(await ws('conn-r4', '$default', { body: `bind ${socket}` })).toEqual({ statusCode: 200 });
    expect(await ws('conn-noise', '$default', { body: 'hello' })).toEqual({ statusCode: 200 });
    expect(posted('conn-1').map(bundleType)).toEqual(['handshake']);
    expect(posted('conn-r4')).toEqual([`bound ${socket}`]);
    expect(management.live.has('conn-noise')).toBe(false);
    // The client goes away without a $disconnect.
    management.live.delete('conn-gone');
    // The WebSocket functions started and served on tables whose type index was never built, and
    // left it so: the subscriptions from before it are in no index item yet.
    expect(await indexBuilt()).toBe(false);
    expect(await indexed()).not.toContain('owed-retry');

    // The events function: ignored, delivered (webhook and sockets), 410, held for owed
    // handshakes, a duplicate, a retry of a half-finished acceptance, a malformed event.
    await start('events');
    expect(await events(fixture('healthlake-read-patient'))).toEqual({ accepted: 0, ignored: 1, duplicates: 0 });
    // Nothing to match yet, so nothing built; the first match builds the type index.
    expect(await indexBuilt()).toBe(false);
    expect(await events(eventLike('healthlake-update-patient', 'iam-hook-1', 'p-hook'))).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    expect(notificationsTo('/hook')).toBe(1);
    expect(await indexBuilt()).toBe(true);
    expect((await indexed()).sort()).toEqual(
      [beating, gone, hook, 'owed-dead', 'owed-gone', 'owed-retry', socket].sort(),
    );
    await events(eventLike('healthlake-update-patient', 'iam-ws-1', 'p-ws'));
    expect(posted('conn-1').map(bundleType)).toEqual(['handshake', 'event-notification']);
    expect(posted('conn-r4')).toEqual([`bound ${socket}`, `ping ${socket}`]);
    await events(eventLike('healthlake-update-patient', 'iam-gone-1', 'p-gone'));
    expect((await api('GET', `/fhir/Subscription/${gone}`)).body.status).toBe('off');
    expect(
      await events([
        eventLike('healthlake-update-patient', 'iam-retry-1', 'p-retry'),
        eventLike('healthlake-update-patient', 'iam-dead-1', 'p-dead'),
      ]),
    ).toEqual({ accepted: 2, ignored: 0, duplicates: 0 });
    // Matched through the index the events function built: queued, held for the owed handshakes.
    expect(await storedNotifications('owed-retry')).toBe(1);
    expect(await storedNotifications('owed-dead')).toBe(1);
    expect(receiver.on('/retry')).toEqual([]);
    expect(await events(eventLike('healthlake-update-patient', 'iam-hook-1', 'p-hook'))).toEqual({
      accepted: 0,
      ignored: 0,
      duplicates: 1,
    });
    // EventBridge retries an event whose first invocation died after queueing its notification.
    await local.client.send(
      new DeleteItemCommand({
        TableName: tableNames(prefix()).eventIds,
        Key: { eventId: { S: 'iam-hook-1' }, scope: { S: '#event' } },
      }),
    );
    expect(await events(eventLike('healthlake-update-patient', 'iam-hook-1', 'p-hook'))).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    expect(notificationsTo('/hook')).toBe(1);
    // Malformed: on the dead-letter queue at once, as a failure record, and the invocation succeeds.
    expect(await events({ detail: 'not an event' })).toEqual({ accepted: 0, ignored: 0, duplicates: 0, refused: 1 });
    const eventsRecorder = running.get('events')?.recorder;
    expect(eventsRecorder?.sqsMessages.map((m) => [m.QueueUrl, JSON.parse(m.MessageBody).requestPayload])).toEqual([
      [
        stack.environment(running.get('events')?.functionId ?? '').BROKER_DEAD_LETTER_QUEUE_URL,
        { detail: 'not an event' },
      ],
    ]);

    // A socket bound after that delivery, gone before the dispatcher's heartbeat reaches it.
    management.live.add('conn-late');
    await ws('conn-late', '$connect');
    await ws('conn-late', '$default', { body: `bind-with-token ${token}` });
    management.live.delete('conn-late');

    // $disconnect: a bound connection, and one the broker never saw.
    await start('wsDisconnect');
    expect(await ws('conn-r4', '$disconnect')).toEqual({ statusCode: 200 });
    expect(await ws('conn-unknown', '$disconnect')).toEqual({ statusCode: 200 });

    // The dispatcher: owed handshakes and the deliveries they held, a failed attempt and its
    // retry, an endpoint that fails until the schedule is exhausted, heartbeats, the purge.
    await start('dispatcher');
    expect(await fn('dispatcher').invoke({})).toEqual({ heartbeats: 2 });
    await receiver.waitFor(
      () => notificationsTo('/retry') === 1 && receiver.failures.filter((r) => r.path === '/dead').length === 2,
      'the retries the first run scheduled',
    );
    expect(await fn('dispatcher').invoke({})).toEqual({ heartbeats: 2 });
    expect(receiver.on('/retry').map((r) => bundleType(r.body))).toEqual(['handshake', 'event-notification']);
    const purged = await local.client.send(
      new GetItemCommand({
        TableName: tableNames(prefix()).eventIds,
        Key: { eventId: { S: 'long-ago' }, scope: { S: '#event' } },
      }),
    );
    expect(purged.Item).toBeUndefined();
    expect(receiver.on('/heartbeat').map((r) => bundleType(r.body))).toEqual(['handshake', 'heartbeat', 'heartbeat']);
    expect((await api('GET', '/fhir/Subscription/owed-dead')).body.status).toBe('error');
    expect(eventBridge.entries.flat().map((e) => e.DetailType)).toContain('Notification Dead-Lettered');
    // A handshake answered 410: off, and out of the type index in the same transaction.
    expect((await api('GET', '/fhir/Subscription/owed-gone')).body.status).toBe('off');
    expect(await indexed()).not.toContain('owed-gone');

    // Back to the API: $events, type-level $status, POST /events, re-activation (requeues the
    // dead letter), off, deleting a WebSocket subscription (unbinds and closes its socket), a
    // compare-and-delete, metrics.
    expect((await api('GET', `/fhir/Subscription/${socket}/$events`)).status).toBe(200);
    expect((await api('GET', '/fhir/Subscription/$status')).status).toBe(200);
    const ingested = await api('POST', '/events', {
      body: eventLike('healthlake-update-patient', 'iam-hook-2', 'p-hook'),
      token: INGEST,
    });
    expect(ingested).toMatchObject({ status: 202, body: { accepted: 1 } });
    const dead = await api('GET', '/fhir/Subscription/owed-dead');
    const reactivated = await api('PUT', '/fhir/Subscription/owed-dead', {
      body: { ...dead.body, status: 'requested' },
    });
    expect(reactivated.status).toBe(200);
    expect(notificationsTo('/dead')).toBe(1);
    const current = await api('GET', `/fhir/Subscription/${hook}`);
    expect((await api('PUT', `/fhir/Subscription/${hook}`, { body: { ...current.body, status: 'off' } })).status).toBe(
      200,
    );
    expect((await api('DELETE', `/fhir/Subscription/${socket}`)).status).toBe(204);
    expect(management.live.has('conn-1')).toBe(false);
    const toDelete = await api('GET', `/fhir/Subscription/${beating}`);
    expect(
      (await api('DELETE', `/fhir/Subscription/${beating}`, { headers: { 'if-match': String(toDelete.headers.etag) } }))
        .status,
    ).toBe(204);
    expect((await api('GET', '/metrics', { token: INGEST })).status).toBe(200);

    // An unbind, then the client's own $disconnect.
    management.live.add('conn-2');
    await ws('conn-2', '$connect');
    await ws('conn-2', '$default', { body: 'unbind' });
    expect(await ws('conn-2', '$disconnect')).toEqual({ statusCode: 200 });

    // Reconciliation: changes whose events never came, for a webhook that answers 410 (off, out of
    // the type index, a lifecycle event) and a WebSocket subscription bound to a live socket and a
    // gone one (pushed, and unbound). Its container starts on tables whose type index is not built:
    // its first match builds it, as the events function's does.
    const reconGone = await create(
      topicSubscription('patient-change', `${receiver.url}/gone`, { filters: ['Patient?_id=p-recon-gone'] }),
    );
    const reconSocket = await create(websocketSubscription('p-recon-ws'));
    const reconToken = await api('POST', `/fhir/Subscription/${reconSocket}/$get-ws-binding-token`);
    const reconBinding = String(
      ((reconToken.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString,
    );
    for (const id of ['conn-recon', 'conn-recon-gone']) {
      management.live.add(id);
      await ws(id, '$connect');
      await ws(id, '$default', { body: `bind-with-token ${reconBinding}` });
    }
    management.live.delete('conn-recon-gone');
    await start('reconcile');
    const reconcile = () => fn('reconcile').invoke<Json>({ source: 'aws.events', 'detail-type': 'Scheduled Event' });
    expect(await reconcile()).toEqual({ found: 0, notifications: 0 });
    await new Promise((resolve) => setTimeout(resolve, 5));
    for (const id of ['p-recon-gone', 'p-recon-ws']) {
      fhir.put({ resourceType: 'Patient', id, meta: { lastUpdated: new Date().toISOString() } });
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
    const goneBefore = receiver.failures.filter((r) => r.path === '/gone').length;
    expect(await reconcile()).toMatchObject({ found: 2, notifications: 2 });
    expect(receiver.failures.filter((r) => r.path === '/gone').length).toBe(goneBefore + 1);
    expect((await api('GET', `/fhir/Subscription/${reconGone}`)).body.status).toBe('off');
    expect(posted('conn-recon').map(bundleType)).toEqual(['handshake', 'event-notification']);
    expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Patient']);

    // Whatever the roles say: the WebSocket functions reached no table beyond their own paths
    // (no type index build at start-up, which would read subscriptions and subscription-types).
    expect(tablesReached('wsConnect')).toEqual(['connections']);
    expect(tablesReached('wsDisconnect')).toEqual(['connections']);
    expect(tablesReached('wsMessage')).toEqual(['connections', 'notifications', 'subscriptions']);
    ranToTheEnd = true;
  });

  it.each(NAMES)('%s: its role allows every AWS call it made, and grants nothing it did not use', (name) => {
    expect(ranToTheEnd, 'the run above got to its end').toBe(true);
    const r = running.get(name);
    if (r === undefined) throw new Error(`${name} never ran`);
    const statements = r.stack.statements(r.functionId);
    const needed = r.recorder.calls.flatMap((call) => permissionsOf(call, r.targets));
    expect(needed.length).toBeGreaterThan(0);
    const denied = needed.filter((p) => !allows(statements, p.action, p.resource));
    expect(
      [...new Set(denied.map((p) => `${p.action} on ${p.resource}`))],
      'calls the role does not allow',
    ).toStrictEqual([]);
    // The Lambda service sends failed invocations to the on-failure destination (the events function
    // sends refused events there too, recorded above): granted whether or not this run made a send.
    const configured = r.targets.failureDestinations.length > 0 ? ['failures:send'] : [];
    const used = [...new Set([...needed.map((p) => p.access), ...configured])].sort();
    expect(grantedAccess(statements, r.targets), 'granted access vs. access used').toStrictEqual(used);
    expect(unaccountedGrants(statements, r.targets)).toStrictEqual([]);
    expect(r.stack.managedPolicies(r.functionId)).toStrictEqual([
      'arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole',
    ]);
  });
});
