import { createHmac, randomUUID } from 'node:crypto';
import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import { ScanCommand } from '@aws-sdk/client-dynamodb';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AwsBroker, createAwsBroker } from '../src/aws/aws-broker.js';
import {
  createHandlers,
  type Handlers,
  type InvocationContext,
  RECONCILE_STOP_MS,
  type ReconcileResult,
} from '../src/aws/handlers.js';
import type { Config } from '../src/config.js';
import type { ReconcileReport } from '../src/service/reconciler.js';
import { CHECKPOINT_ATTRIBUTE, CHECKPOINT_SCOPE } from '../src/store/dynamodb/items.js';
import { ensureTables, tableNames } from '../src/store/dynamodb/tables.js';
import { ManagementApiDouble } from './support/aws-doubles.js';
import { DUMMY_CREDENTIALS, type DynamoDbLocal, LOCAL_REGION, startDynamoDbLocal } from './support/dynamodb-local.js';
import {
  eventLike,
  eventNumbers,
  focusOf,
  type Json,
  notifiedNumbers,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { validateFhir } from './support/fhir-schema.js';
import { FhirServer } from './support/fhir-server.js';
import { httpApiEvent } from './support/http-api-event.js';
import { LAMBDA_TOKENS, lambdaConfig } from './support/lambda-stack.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * The reconcile function's handler on DynamoDB Local, against a real FHIR server (searched on
 * `_lastUpdated`) and a real webhook receiver: a scheduled invocation finds the changes whose
 * CloudTrail event never came, notifies them, and returns once they are delivered; it stops in
 * time for the function's timeout, and reports what it counted as the metric its alarm watches.
 */

const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';
const context = {} as Context;

/** A Lambda context double: `remainingMs` left when made, counting down. */
function lambdaContext(remainingMs: number): InvocationContext {
  const start = Date.now();
  return { getRemainingTimeInMillis: () => remainingMs - (Date.now() - start) };
}

/** The run's report: the invocation had a reconciler. */
function ran(result: ReconcileResult): ReconcileReport & { readonly stopped?: true } {
  if ('off' in result) throw new Error('no reconciler');
  return result;
}

/** A moment later: what is written now is after the checkpoint, and before the next run's end. */
const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

/** A Patient as the FHIR server stores it now (`meta.lastUpdated`). */
const patient = (id: string, lastUpdated = new Date().toISOString()): Json => ({
  resourceType: 'Patient',
  id,
  name: [{ family: 'Doe' }],
  meta: { lastUpdated },
});

describe('the reconcile Lambda handler on DynamoDB Local', () => {
  let local: DynamoDbLocal;
  let management: ManagementApiDouble;
  let receiver: Receiver;
  let fhir: FhirServer;
  let prefix: string;
  let config: Config;
  let broker: AwsBroker;
  let handlers: Handlers;
  const emf: string[] = [];
  const logger = new RecordingLogger();

  const container = (with_: Config = config) =>
    createAwsBroker({
      config: with_,
      dynamodb: local.client,
      management: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      }),
      overrides: { logger },
    });

  beforeAll(async () => {
    [local, management, receiver, fhir] = await Promise.all([
      startDynamoDbLocal(),
      ManagementApiDouble.start(),
      Receiver.start(),
      FhirServer.start(),
    ]);
    prefix = `reconcile-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    // As the stack configures the function, but the lag: a change is looked for at once.
    config = lambdaConfig(prefix, {
      BROKER_FHIR_READ: fhir.url,
      BROKER_RECONCILE_EVERY: '5m',
      BROKER_RECONCILE_LAG: '0s',
    });
    broker = await container();
    handlers = createHandlers(Promise.resolve(broker), { emit: (line) => emf.push(line) });
  });

  afterAll(async () => {
    await broker?.close(0);
    await management?.close();
    await receiver?.close();
    await fhir?.close();
    await local?.stop();
  });

  async function create(path: string, patientId: string): Promise<{ id: string; secret: string }> {
    const res = await handlers.api(
      httpApiEvent('POST', '/fhir/Subscription', {
        token: LAMBDA_TOKENS.alice,
        body: topicSubscription('patient-change', `${receiver.url}${path}`, { filters: [`Patient?_id=${patientId}`] }),
      }) as unknown as Parameters<Handlers['api']>[0],
      context,
    );
    const body = JSON.parse(String('body' in res ? res.body : '')) as Json;
    expect(res.statusCode).toBe(201);
    const secret = ((body.channel as Json).extension as Json[]).find((e) =>
      String(e.url).endsWith('/webhook-secret'),
    )?.valueString;
    return { id: String(body.id), secret: String(secret) };
  }

  /** The reconciliation checkpoints in the event-ids table (one per FHIR server read). */
  async function checkpoints(): Promise<number[]> {
    const out = await local.client.send(
      new ScanCommand({
        TableName: tableNames(prefix).eventIds,
        FilterExpression: '#scope = :scope',
        ExpressionAttributeNames: { '#scope': 'scope' },
        ExpressionAttributeValues: { ':scope': { S: CHECKPOINT_SCOPE } },
      }),
    );
    return (out.Items ?? []).map((item) => Number(item[CHECKPOINT_ATTRIBUTE]?.N));
  }

  const notifications = (path: string) =>
    receiver
      .on(path)
      .filter((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode === 'event-notification');

  /** The EMF lines of `metric` the invocations wrote for the reconcile function. */
  const reported = (metric: string): Json[] =>
    emf.map((line) => JSON.parse(line) as Json).filter((m) => m.Function === 'reconcile' && m[metric] !== undefined);

  it('sets the checkpoint, then notifies a change whose event never came and returns once it is delivered; then finds nothing', async () => {
    const { id, secret } = await create('/lost', 'lost-1');
    expect(receiver.on('/lost')).toHaveLength(1);
    await tick();

    // The first run starts reconciliation from now: what the server changed before is the events'.
    fhir.put(patient('lost-1', new Date(Date.now() - 60_000).toISOString()));
    const first = await handlers.reconcile(lambdaContext(240_000));
    expect(first).toEqual({ found: 0, notifications: 0 });
    const [checkpoint] = await checkpoints();
    expect(checkpoint).toBeLessThanOrEqual(Date.now());
    expect(fhir.requests).toEqual([]);
    await tick();

    // The change after it, whose CloudTrail event never came.
    const changedAt = new Date().toISOString();
    fhir.put(patient('lost-1', changedAt));
    await tick();
    const second = ran(await handlers.reconcile(lambdaContext(240_000)));
    expect(second).toEqual({ from: checkpoint, to: second.to, found: 1, notifications: 1 });
    expect(second.to).toBeGreaterThan(Date.parse(changedAt));
    // Delivered before the invocation returned: no waiting here.
    const [delivered] = notifications('/lost');
    expect(delivered).toBeDefined();
    const bundle = JSON.parse(String(delivered?.body)) as Json;
    expect(validateFhir(bundle)).toEqual([]);
    expect(bundle.type).toBe('history');
    expect(eventNumbers(bundle)).toEqual([1]);
    expect(statusOf(bundle).events.map(focusOf)).toEqual([`${fhir.url}/Patient/lost-1`]);
    expect(delivered?.method).toBe('POST');
    expect(delivered?.headers['content-type']).toBe('application/fhir+json');
    const mac = createHmac('sha256', Buffer.from(secret.replace(/^whsec_/, ''), 'base64'))
      .update(`${delivered?.headers['webhook-id']}.${delivered?.headers['webhook-timestamp']}.${delivered?.body}`)
      .digest('base64');
    expect(delivered?.headers['webhook-signature']).toBe(`v1,${mac}`);
    // The server's checkpoint and the one type's, both at the end of the window done.
    expect(await checkpoints()).toEqual([second.to, second.to]);
    // One search: the one type a subscription collects, on both bounds of the window.
    expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Patient']);
    const bounds = new URLSearchParams(fhir.requests[0]?.query).getAll('_lastUpdated');
    expect(bounds).toEqual([
      `ge${new Date(checkpoint as number).toISOString()}`,
      `lt${new Date(second.to as number).toISOString()}`,
    ]);

    await tick();
    const third = await handlers.reconcile(lambdaContext(240_000));
    expect(third).toMatchObject({ from: second.to, found: 0, notifications: 0 });
    expect(notifications('/lost')).toHaveLength(1);
    const status = await handlers.api(
      httpApiEvent('GET', `/fhir/Subscription/${id}/$status`, { token: LAMBDA_TOKENS.alice }) as unknown as Parameters<
        Handlers['api']
      >[0],
      context,
    );
    const params = statusOf(JSON.parse(String('body' in status ? status.body : '')) as Json).params;
    expect(params.get('events-since-subscription-start')?.valueString).toBe('1');
  });

  it('does not notify again a change whose event the events function accepted', async () => {
    await create('/told', 'told-1');
    await handlers.reconcile(lambdaContext(240_000));
    await tick();
    const changedAt = new Date();
    fhir.put(patient('told-1', changedAt.toISOString()));
    // Its CloudTrail event (whole seconds, as CloudTrail writes them) reaches the events function.
    const event = eventLike('healthlake-update-patient', `told-${randomUUID()}`, 'told-1');
    const eventTime = `${changedAt.toISOString().slice(0, 19)}Z`;
    expect(await handlers.events({ ...event, detail: { ...(event.detail as Json), eventTime } })).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
    expect(statusOf(JSON.parse(String(notifications('/told')[0]?.body)) as Json).events.map(focusOf)).toEqual([
      `${HL}/Patient/told-1`,
    ]);
    await tick();

    expect(await handlers.reconcile(lambdaContext(240_000))).toMatchObject({ found: 1, notifications: 0 });
    expect(notifiedNumbers(notifications('/told'))).toEqual([1]);
  });

  it('stops its run in time for the function timeout; the next invocation does the window', async () => {
    await create('/late', 'late-1');
    await handlers.reconcile(lambdaContext(240_000));
    await tick();
    fhir.put(patient('late-1'));
    await tick();
    const [before] = (await checkpoints()).sort((a, b) => b - a);
    // The search hangs; the invocation has 1.5 s before it must stop.
    const searchesBefore = fhir.requests.length;
    fhir.delayMs = 10_000;
    const started = Date.now();
    try {
      const stopped = await handlers.reconcile(lambdaContext(RECONCILE_STOP_MS + 1_500));
      expect(stopped).toMatchObject({ found: 0, notifications: 0, stopped: true });
    } finally {
      fhir.delayMs = 0;
    }
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(fhir.requests.length).toBe(searchesBefore + 1);
    expect(notifications('/late')).toEqual([]);
    expect((await checkpoints()).sort((a, b) => b - a)[0]).toBe(before);

    expect(await handlers.reconcile(lambdaContext(240_000))).toMatchObject({
      from: before,
      found: 1,
      notifications: 1,
    });
    expect(notifiedNumbers(notifications('/late'))).toEqual([1]);
  });

  it('reports each run as the metric its alarm watches: completed, or failed when the server refuses', async () => {
    emf.length = 0;
    await handlers.reconcile(lambdaContext(240_000));
    expect(reported('broker_reconcile_runs_total')).toEqual([
      expect.objectContaining({
        Broker: prefix,
        Function: 'reconcile',
        outcome: 'completed',
        broker_reconcile_runs_total: 1,
      }),
    ]);
    emf.length = 0;
    await tick();
    fhir.respond = () => 503;
    let result: ReconcileResult;
    try {
      result = await handlers.reconcile(lambdaContext(240_000));
    } finally {
      fhir.respond = () => undefined;
    }
    // The run failed and said so; the invocation did not (the next run does the window again).
    expect(result).toMatchObject({ found: 0, notifications: 0 });
    const [failed = {}] = reported('broker_reconcile_runs_total');
    expect(failed).toMatchObject({
      Broker: prefix,
      Function: 'reconcile',
      outcome: 'failed',
      broker_reconcile_runs_total: 1,
    });
    expect((failed._aws as Json | undefined)?.CloudWatchMetrics).toEqual([
      {
        Namespace: 'FhirSubscriptionBroker',
        Dimensions: [['Broker', 'Function', 'outcome']],
        Metrics: [{ Name: 'broker_reconcile_runs_total', Unit: 'Count' }],
      },
    ]);
    expect(
      logger.records.some((r) => r.msg === 'reconciliation failed; the next run starts from the last window done'),
    ).toBe(true);
  });

  it('returns without error, saying why, when no reconciler is configured', async () => {
    const { reconcile: _reconcile, ...withoutReconcile } = config;
    const off = await container(withoutReconcile);
    try {
      const since = logger.mark();
      const searches = fhir.requests.length;
      expect(await createHandlers(Promise.resolve(off)).reconcile(lambdaContext(240_000))).toEqual({ off: true });
      const said = logger.records.slice(since);
      expect(said).toEqual([
        {
          level: 'warn',
          msg: 'reconciliation is off (BROKER_RECONCILE_EVERY is not set, or BROKER_FHIR_READ is no FHIR base URL): nothing to do',
        },
      ]);
      expect(fhir.requests.length).toBe(searches);
    } finally {
      await off.close(0);
    }
  });
});
