import { randomUUID } from 'node:crypto';
import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import { type DynamoDBClient, GetItemCommand, UpdateItemCommand } from '@aws-sdk/client-dynamodb';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AwsBroker, createAwsBroker } from '../src/aws/aws-broker.js';
import { createHandlers, type Handlers } from '../src/aws/handlers.js';
import type { BrokerOverrides } from '../src/broker.js';
import type { Config } from '../src/config.js';
import { ensureTables, tableNames } from '../src/store/dynamodb/tables.js';
import { ManagementApiDouble } from './support/aws-doubles.js';
import {
  DUMMY_CREDENTIALS,
  type DynamoDbLocal,
  LOCAL_REGION,
  localClient,
  startDynamoDbLocal,
} from './support/dynamodb-local.js';
import { eventLike, type Json, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { httpApiEvent } from './support/http-api-event.js';
import { LAMBDA_TOKENS, lambdaConfig } from './support/lambda-stack.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * Several Lambda containers on one set of tables (DynamoDB Local): what one does while another is
 * mid-way. Each `container()` is a broker as a fresh container builds it (its own caches, timers
 * and sender), as the events, API and scheduled dispatcher functions run them.
 */

const ALICE = LAMBDA_TOKENS.alice;
const context = {} as Context;

describe('Lambda containers sharing the tables', () => {
  let local: DynamoDbLocal;
  let management: ManagementApiDouble;
  let receiver: Receiver;
  let config: Config;
  const brokers: AwsBroker[] = [];
  const logger = new RecordingLogger();

  const container = (
    extra: { overrides?: BrokerOverrides; dynamodb?: DynamoDBClient; config?: Partial<Config> } = {},
  ): Promise<AwsBroker> =>
    createAwsBroker({
      config: { ...config, ...extra.config },
      dynamodb: extra.dynamodb ?? local.client,
      management: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
      }),
      overrides: { logger, ...extra.overrides },
    }).then((b) => {
      brokers.push(b);
      return b;
    });

  const create = async (via: Handlers, sub: Json): Promise<string> => {
    const event = httpApiEvent('POST', '/fhir/Subscription', { token: ALICE, body: sub });
    const res = await via.api(event as unknown as Parameters<Handlers['api']>[0], context);
    const text = 'body' in res && typeof res.body === 'string' ? res.body : '';
    if (res.statusCode !== 201) throw new Error(`create: ${res.statusCode} ${text}`);
    return String((JSON.parse(text) as Json).id);
  };

  /** Event notifications that reached `path` (answered or not), as event numbers. */
  const arrivedAt = (path: string): number[] =>
    notifiedNumbers(receiver.arrived.filter((r) => r.path === path && r.body.includes('"event-notification"')));

  beforeAll(async () => {
    local = await startDynamoDbLocal();
    management = await ManagementApiDouble.start();
    receiver = await Receiver.start();
    const prefix = `containers-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    config = lambdaConfig(prefix);
  });

  afterAll(async () => {
    for (const b of brokers) await b.close(0).catch(() => undefined);
    await management?.close();
    await receiver?.close();
    await local?.stop();
  });

  it('the scheduled dispatcher leaves a first attempt that is on the wire in an events container', async () => {
    const api = createHandlers(container());
    await create(api, topicSubscription('patient-change', `${receiver.url}/slow`, { filters: ['Patient?_id=slow-p'] }));
    await receiver.waitFor(() => receiver.on('/slow').length === 1, 'the handshake');
    // The endpoint takes a while to answer event 1 (well inside its 10 s attempt timeout).
    receiver.answerOnce((r) => r.path === '/slow' && r.body.includes('"event-notification"'), {
      status: 204,
      delayMs: 1_500,
    });
    const events = createHandlers(container());
    const accepted = events.events(eventLike('healthlake-update-patient', 'slow-1', 'slow-p'));
    await receiver.waitFor(() => arrivedAt('/slow').length === 1, 'notification 1 on the wire');
    // The minute tick, in another container, while it is on the wire: nothing to send again.
    await createHandlers(container()).dispatch(60_000);
    await accepted;
    expect(arrivedAt('/slow')).toEqual([1]);
  });

  it('a handshake failed in the API container goes again with a dispatcher run; past its schedule that attempt is the last', async () => {
    const tag = randomUUID().slice(0, 8);
    // Filtered: no other test's events reach these subscriptions.
    const mine = { filters: [`Patient?_id=${tag}-p`] };
    const retried = (id: string) =>
      logger.records.filter((r) => r.msg === 'handshake failed; tried again' && r.subscription === id);
    // Due again 60 s after the create. The API container is gone after its invocation (closed: no
    // timer of its own fires), as a frozen one would be; a dispatcher run in another one sends it.
    const minute = { config: { handshakeRetryDelaysMs: [60_000] } };
    receiver.answerOnce((r) => r.path === `/${tag}-again`, { status: 500 });
    const api = container(minute);
    const again = await create(
      createHandlers(api),
      topicSubscription('patient-change', `${receiver.url}/${tag}-again`, mine),
    );
    expect(retried(again)).toHaveLength(1);
    await (await api).close(0);
    await createHandlers(container(minute)).dispatch(60_000);
    await logger.waitForStatus(again, 'active');
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-again`)).toHaveLength(2);

    // Due again 300 ms after the create; the run comes later, and its attempt fails: `error`.
    const short = { config: { handshakeRetryDelaysMs: [300] } };
    for (let i = 0; i < 2; i++) receiver.answerOnce((r) => r.path === `/${tag}-over`, { status: 503 });
    const api2 = container(short);
    const over = await create(
      createHandlers(api2),
      topicSubscription('patient-change', `${receiver.url}/${tag}-over`, mine),
    );
    expect(retried(over)).toHaveLength(1);
    await (await api2).close(0);
    await new Promise((resolve) => setTimeout(resolve, 400));
    await createHandlers(container(short)).dispatch(60_000);
    const failed = await logger.waitForStatus(over, 'error');
    expect(failed.reason).toBe('handshake failed: HTTP 503');
    expect(retried(over)).toHaveLength(1);
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-over`)).toHaveLength(2);
  });

  it('a retry of an event whose acceptance failed half-way does not send again what was delivered meanwhile', async () => {
    const api = createHandlers(container());
    const filters = ['Patient?_id=half-p'];
    const s1 = await create(api, topicSubscription('patient-change', `${receiver.url}/half-1`, { filters }));
    const s2 = await create(api, topicSubscription('patient-change', `${receiver.url}/half-2`, { filters }));
    await receiver.waitFor(
      () => receiver.on('/half-1').length === 1 && receiver.on('/half-2').length === 1,
      'the handshakes',
    );
    // In the first invocation, the transaction that queues s2's notification fails (past its
    // retries) while s1's is still on its way: the invocation fails only once s1's is written.
    const flaky = localClient(local.endpoint);
    let failed = false;
    flaky.middlewareStack.add(
      (next, ctx) => async (args) => {
        const items = (args.input as { TransactItems?: { Put?: { Item?: Record<string, { S?: string }> } }[] })
          .TransactItems;
        const subscription = items?.[0]?.Put?.Item?.subscriptionId?.S;
        const transaction = ctx.commandName === 'TransactWriteItemsCommand';
        if (transaction && subscription === s1) await new Promise((resolve) => setTimeout(resolve, 300));
        if (!failed && transaction && subscription === s2) {
          failed = true;
          throw Object.assign(new Error('We encountered an internal error. Please try again.'), {
            name: 'InternalServerError',
            $fault: 'server',
          });
        }
        return next(args);
      },
      { step: 'initialize' },
    );
    const event = eventLike('healthlake-update-patient', 'half-1', 'half-p');
    await expect(createHandlers(container({ dynamodb: flaky })).events(event)).rejects.toThrow();
    // s1's notification was committed: a dispatcher (a minute on) delivers it.
    const later = { now: () => Date.now() + 61_000 };
    await createHandlers(container({ overrides: { clock: later } })).dispatch(60_000);
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/half-1')).length === 1, "s1's notification");
    // Lambda retries the event: s2's notification is queued and sent; s1's is not sent again.
    expect(await createHandlers(container()).events(event)).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    await receiver.waitFor(() => notifiedNumbers(receiver.on('/half-2')).length === 1, "s2's notification");
    expect(arrivedAt('/half-1')).toEqual([1]);
    // Number 1 of s2 went with the transaction that failed (a gap: docs/dynamodb.md, "Caveats").
    expect(arrivedAt('/half-2')).toEqual([2]);
  });

  it('numbers committed out of order in two containers reach the endpoint in order', async () => {
    const api = createHandlers(container());
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/order`, { filters: ['Patient?_id=order-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/order').length === 1, 'the handshake');
    // Container A takes number 1, and its transaction waits until container B has taken 2 and committed it.
    let tookOne!: () => void;
    const aTook = new Promise<void>((resolve) => {
      tookOne = resolve;
    });
    let goOn!: () => void;
    const bDone = new Promise<void>((resolve) => {
      goOn = resolve;
    });
    const slow = localClient(local.endpoint);
    slow.middlewareStack.add(
      (next, ctx) => async (args) => {
        const items = (args.input as { TransactItems?: { Put?: { Item?: Record<string, { S?: string }> } }[] })
          .TransactItems;
        if (ctx.commandName === 'TransactWriteItemsCommand' && items?.[0]?.Put?.Item?.subscriptionId?.S === id) {
          tookOne();
          await bDone;
        }
        return next(args);
      },
      { step: 'initialize' },
    );
    const a = createHandlers(container({ dynamodb: slow })).events(
      eventLike('healthlake-update-patient', 'order-1', 'order-p'),
    );
    await aTook;
    await createHandlers(container()).events(eventLike('healthlake-update-patient', 'order-2', 'order-p'));
    // B committed 2, but 1 is not written yet: nothing went out.
    expect(arrivedAt('/order')).toEqual([]);
    goOn();
    await a;
    await receiver.waitFor(() => arrivedAt('/order').length === 2, 'both notifications');
    expect(arrivedAt('/order')).toEqual([1, 2]);
  });

  it('a container that finds the lane held leaves its notification to the holder, which sends it next', async () => {
    const api = createHandlers(container());
    await create(api, topicSubscription('patient-change', `${receiver.url}/held`, { filters: ['Patient?_id=held-p'] }));
    await receiver.waitFor(() => receiver.on('/held').length === 1, 'the handshake');
    receiver.answerOnce((r) => r.path === '/held' && r.body.includes('"event-notification"'), {
      status: 204,
      delayMs: 1_500,
    });
    const a = createHandlers(container()).events(eventLike('healthlake-update-patient', 'held-1', 'held-p'));
    await receiver.waitFor(() => arrivedAt('/held').length === 1, 'notification 1 on the wire');
    // Another container accepts the next event while 1 is on the wire: it sends nothing itself.
    await createHandlers(container()).events(eventLike('healthlake-update-patient', 'held-2', 'held-p'));
    expect(arrivedAt('/held')).toEqual([1]);
    // The holder reads the lane again before it lets go, and sends 2 after 1 was answered.
    await a;
    expect(arrivedAt('/held')).toEqual([1, 2]);
    const [one, two] = receiver.on('/held').filter((r) => r.body.includes('"event-notification"'));
    expect((two?.at ?? 0) - (one?.at ?? 0)).toBeGreaterThanOrEqual(1_400);
  });

  it('a number whose acceptance never wrote it is voided by a later run, and the rest goes out', async () => {
    const api = createHandlers(container());
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/void`, { filters: ['Patient?_id=void-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/void').length === 1, 'the handshake');
    // An acceptance took number 1 and its container died before writing the notification.
    await local.client.send(
      new UpdateItemCommand({
        TableName: tableNames(config.tablePrefix).subscriptions,
        Key: { id: { S: id } },
        UpdateExpression: 'ADD eventsSinceStart :one',
        ExpressionAttributeValues: { ':one': { N: '1' } },
      }),
    );
    expect(
      await createHandlers(container()).events(eventLike('healthlake-update-patient', 'void-2', 'void-p')),
    ).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    // Number 2 waits for 1; a run shortly after still waits.
    await createHandlers(container()).dispatch(60_000);
    expect(arrivedAt('/void')).toEqual([]);
    // A run a minute on voids 1 and sends 2.
    await createHandlers(container({ overrides: { clock: { now: () => Date.now() + 61_000 } } })).dispatch(60_000);
    await receiver.waitFor(() => arrivedAt('/void').length === 1, 'notification 2');
    expect(arrivedAt('/void')).toEqual([2]);
  });

  it('a lane woken while its time for attempts runs out stops (no wake loop); a later run sends', async () => {
    const api = createHandlers(container());
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/late`, { filters: ['Patient?_id=late-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/late').length === 1, 'the handshake');
    let readHeld!: () => void;
    const held = new Promise<void>((resolve) => {
      readHeld = resolve;
    });
    let reading!: () => void;
    const readStarted = new Promise<void>((resolve) => {
      reading = resolve;
    });
    let first = true;
    const hooked = leaseHooked(id, async (_input, command) => {
      if (first && command === 'QueryCommand') {
        first = false;
        reading();
        await held;
      }
    });
    const broker = await container({ dynamodb: hooked });
    const failures = () =>
      logger.records.filter((r) => r.msg === 'dispatcher task failed' || r.msg === 'dispatcher lane failed');
    const before = failures().length;
    broker.dispatcher.endAttemptsWithin(10_000);
    await broker.ingest.ingest(eventLike('healthlake-update-patient', 'late-1', 'late-p'));
    await readStarted;
    // Event 2 is committed while the lane reads, and the invocation's time for attempts runs out.
    await broker.ingest.ingest(eventLike('healthlake-update-patient', 'late-2', 'late-p'));
    broker.dispatcher.endAttemptsWithin(0);
    readHeld();
    await broker.dispatcher.idle(2_000);
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(failures().length).toBe(before);
    expect(arrivedAt('/late')).toEqual([]);
    // The next scheduled run sends both, in order.
    await createHandlers(container()).dispatch(60_000);
    await receiver.waitFor(() => arrivedAt('/late').length === 2, 'both notifications');
    expect(arrivedAt('/late')).toEqual([1, 2]);
  });

  it('each invocation reports what it counted as CloudWatch metrics (EMF lines), once', async () => {
    const lines: string[] = [];
    const emitting = (broker: Promise<AwsBroker>): Handlers => createHandlers(broker, { emit: (l) => lines.push(l) });
    await create(
      emitting(container()),
      topicSubscription('patient-change', `${receiver.url}/emf`, { filters: ['Patient?_id=emf-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/emf').length === 1, 'the handshake');
    const events = emitting(container());
    await events.events(eventLike('healthlake-update-patient', 'emf-1', 'emf-p'));
    await events.events(eventLike('healthlake-update-patient', 'emf-2', 'emf-p'));
    const reported = lines.map((l) => JSON.parse(l) as Record<string, unknown> & { _aws: EmfMeta });
    const values = (fn: string, name: string, outcome?: string): unknown[] =>
      reported
        .filter((m) => m.Function === fn && name in m && (outcome === undefined || m.outcome === outcome))
        .map((m) => m[name]);
    // The handshake went out within the API invocation that created the subscription.
    expect(values('api', 'broker_handshakes_total', 'ok')).toEqual([1]);
    // Each events invocation its own event and delivery, not the running total.
    expect(values('events', 'broker_events_total', 'accepted')).toEqual([1, 1]);
    expect(values('events', 'broker_notifications_total', 'delivered')).toEqual([1, 1]);
    const latencies = values('events', 'broker_delivery_latency_seconds') as { Values: number[]; Counts: number[] }[];
    expect(latencies.map((h) => h.Counts.reduce((a, b) => a + b, 0))).toEqual([1, 1]);
    // Every line is one metric whose dimensions are all present, the broker's table prefix among them.
    for (const m of reported) {
      const [directive] = m._aws.CloudWatchMetrics;
      expect(directive?.Namespace).toBe('FhirSubscriptionBroker');
      expect(directive?.Dimensions[0]?.slice(0, 2)).toEqual(['Broker', 'Function']);
      expect(m.Broker).toBe(config.tablePrefix);
      for (const dim of directive?.Dimensions[0] ?? []) expect(typeof m[dim]).toBe('string');
      expect(m[directive?.Metrics[0]?.Name ?? '']).toBeDefined();
    }
  });

  const call = async (via: Handlers, method: string, path: string, body?: Json) => {
    const event = httpApiEvent(method, path, { token: ALICE, ...(body === undefined ? {} : { body }) });
    const res = await via.api(event as unknown as Parameters<Handlers['api']>[0], context);
    const text = 'body' in res && typeof res.body === 'string' ? res.body : '';
    return { status: res.statusCode, body: (text === '' ? {} : JSON.parse(text)) as Json };
  };

  /**
   * `/${tag}-old` refuses event notifications: attempt 1 at once, attempt 2 after 1.5 s (`onTheWire`
   * resolves as it goes out), any later one at once. `restore` puts the receiver's answers back.
   */
  const refusingOldEndpoint = (tag: string) => {
    let second!: () => void;
    const onTheWire = new Promise<void>((resolve) => {
      second = resolve;
    });
    let attempts = 0;
    const answer = receiver.respond;
    receiver.respond = (req) => {
      if (req.path !== `/${tag}-old` || !req.body.includes('"event-notification"')) return answer(req);
      if (++attempts === 2) {
        second();
        return { status: 503, delayMs: 1_500 };
      }
      return { status: 503 };
    };
    return {
      onTheWire,
      restore: () => {
        receiver.respond = answer;
      },
    };
  };

  /**
   * Notification 1 reaches the new endpoint (the next minute tick sends it, at the latest), after
   * the old one's two attempts, and the re-activated subscription is active.
   */
  const endsAtTheNewEndpoint = async (tag: string, id: string, extra: Parameters<typeof container>[0]) => {
    await createHandlers(container(extra)).dispatch(60_000);
    await receiver.waitFor(() => arrivedAt(`/${tag}-new`).length === 1, 'notification 1 at the new endpoint');
    expect(arrivedAt(`/${tag}-new`)).toEqual([1]);
    expect(arrivedAt(`/${tag}-old`)).toEqual([1, 1]);
    const read = await call(createHandlers(container()), 'GET', `/fhir/Subscription/${id}`);
    expect(read.body.status).toBe('active');
  };

  // Another container (the lane's holder) has an attempt to the old endpoint on the wire while the
  // client moves the subscription (its re-queue resets the notification): the attempt's failure,
  // settling after the re-queue, must not undo it (dead-letter it, or put the old schedule back)
  // nor turn the re-activated subscription to `error`; the notification goes to the new endpoint.
  for (const [what, retryDelaysMs] of [
    ['its last attempt', [50]],
    ['a retry', [50, 600_000]],
  ] as const) {
    it(`an attempt on the wire elsewhere during a re-activation settles without undoing it: ${what}`, async () => {
      const tag = retryDelaysMs.length === 1 ? 'ra-last' : 'ra-retry';
      const filters = [`Patient?_id=${tag}-p`];
      const retrying = { config: { retryDelaysMs } };
      const api = createHandlers(container(retrying));
      const id = await create(api, topicSubscription('patient-change', `${receiver.url}/${tag}-old`, { filters }));
      await receiver.waitFor(() => receiver.on(`/${tag}-old`).length === 1, 'the handshake');
      const old = refusingOldEndpoint(tag);
      const events = createHandlers(container(retrying));
      const accepted = events.events(eventLike('healthlake-update-patient', `${tag}-1`, `${tag}-p`));
      await old.onTheWire;
      // The client moves the subscription through the API function meanwhile; the new endpoint
      // answers its handshake while attempt 2 is still on the wire.
      const put = await call(api, 'PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, { filters }),
        id,
      });
      expect(put.status).toBe(200);
      await receiver.waitFor(() => receiver.on(`/${tag}-new`).length >= 1, 'the new handshake');
      await accepted;
      // Attempt 2 fails after the re-activation is written and its fence lifted (the holder lost
      // its lease to the re-queue by then): it must not dead-letter nor turn the subscription to error.
      await logger.waitFor(
        (r) => r.msg === 'delivery failed' && r.subscription === id && r.attempt === 2,
        'attempt 2 failed',
      );
      old.restore();
      await endsAtTheNewEndpoint(tag, id, retrying);
      expect(
        logger.records.filter((r) => r.subscription === id && r.msg === 'subscription status changed').map((r) => r.to),
      ).not.toContain('error');
    });
  }

  it('a re-activation while another container drains a backlog leaves one sender at a time, each number once', async () => {
    const tag = 'ra-drain';
    const filters = [`Patient?_id=${tag}-p`];
    const api = createHandlers(container());
    const sub = topicSubscription('patient-change', `${receiver.url}/${tag}`, { filters });
    const id = await create(api, sub);
    await receiver.waitFor(() => receiver.on(`/${tag}`).length === 1, 'the handshake');
    let inFlight = 0;
    let maxInFlight = 0;
    const answer = receiver.respond;
    receiver.respond = (req) => {
      if (req.path !== `/${tag}` || !req.body.includes('"event-notification"')) return answer(req);
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      setTimeout(() => inFlight--, 100);
      return { status: 204, delayMs: 100 };
    };
    try {
      const events = createHandlers(container());
      const batch = Array.from({ length: 40 }, (_, i) =>
        eventLike('healthlake-update-patient', `${tag}-${i + 1}`, `${tag}-p`),
      );
      const accepted = events.events(batch);
      await receiver.waitFor(() => arrivedAt(`/${tag}`).length >= 3, 'the events container sending');
      // The client asks for a new handshake (same endpoint) in the API container meanwhile.
      expect((await call(api, 'PUT', `/fhir/Subscription/${id}`, { ...sub, id, status: 'requested' })).status).toBe(
        200,
      );
      await accepted;
      await createHandlers(container()).dispatch(60_000);
      await receiver.waitFor(() => new Set(arrivedAt(`/${tag}`)).size === 40, 'all 40', 30_000);
    } finally {
      receiver.respond = answer;
    }
    expect(maxInFlight).toBe(1);
    expect(arrivedAt(`/${tag}`)).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
  });

  // The same, with the holder learning of the re-queue in the moment between it and the write of the
  // re-activated subscription (a re-queue of many dead letters takes seconds): it read the
  // subscription as it still was, and sent the re-queued notification to the old endpoint again.
  it('a holder that learns of a re-queue before the re-activated subscription is written sends nothing to the old endpoint', async () => {
    const tag = 'ra-window';
    const filters = [`Patient?_id=${tag}-p`];
    const retrying = { config: { retryDelaysMs: [50, 600_000] } };
    // The API container's writes of the subscriptions table wait at `gate` while `holding`.
    let holding = false;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    let reached!: () => void;
    const atGate = new Promise<void>((resolve) => {
      reached = resolve;
    });
    const subscriptionsTable = tableNames(config.tablePrefix).subscriptions;
    const gated = localClient(local.endpoint);
    gated.middlewareStack.add(
      (next) => async (args) => {
        const input = args.input as { TransactItems?: { Update?: { TableName?: string } }[] };
        if (holding && input.TransactItems?.some((t) => t.Update?.TableName === subscriptionsTable) === true) {
          reached();
          await gate;
        }
        return next(args);
      },
      { step: 'initialize' },
    );
    const api = createHandlers(container({ ...retrying, dynamodb: gated }));
    const id = await create(api, topicSubscription('patient-change', `${receiver.url}/${tag}-old`, { filters }));
    await receiver.waitFor(() => receiver.on(`/${tag}-old`).length === 1, 'the handshake');
    const old = refusingOldEndpoint(tag);
    try {
      const events = createHandlers(container(retrying));
      const accepted = events.events(eventLike('healthlake-update-patient', `${tag}-1`, `${tag}-p`));
      await old.onTheWire;
      holding = true;
      const put = call(api, 'PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, { filters }),
        id,
      });
      // Re-queued; the subscription's write waits while attempt 2 fails in the events container,
      // which renews its lease before it logs the failure, then goes on (it had sent notification
      // 1 to the old endpoint again within milliseconds).
      await atGate;
      await accepted;
      const failed = (r: Record<string, unknown>) => r.msg === 'delivery failed' && r.subscription === id;
      await logger.waitFor((r) => failed(r) && r.attempt === 2, 'attempt 2 failed');
      await new Promise((resolve) => setTimeout(resolve, 500));
      expect(logger.records.filter(failed)).toHaveLength(2);
      expect(arrivedAt(`/${tag}-old`)).toEqual([1, 1]);
      release();
      expect((await put).status).toBe(200);
      await receiver.waitFor(() => receiver.on(`/${tag}-new`).length >= 1, 'the new handshake');
    } finally {
      release();
      old.restore();
    }
    await endsAtTheNewEndpoint(tag, id, retrying);
  });

  it('a container that takes a lane re-queued since it last held it reads the subscription afresh', async () => {
    const tag = 'ra-take';
    const filters = [`Patient?_id=${tag}-p`];
    const retrying = { config: { retryDelaysMs: [600_000] } };
    const api = createHandlers(container(retrying));
    const id = await create(api, topicSubscription('patient-change', `${receiver.url}/${tag}-old`, { filters }));
    await receiver.waitFor(() => receiver.on(`/${tag}-old`).length === 1, 'the handshake');
    const answer = receiver.respond;
    receiver.respond = (req) =>
      req.path === `/${tag}-old` && req.body.includes('"event-notification"') ? { status: 503 } : answer(req);
    try {
      // Notification 1 fails at the old endpoint: a retry due in 10 minutes.
      await createHandlers(container(retrying)).events(eventLike('healthlake-update-patient', `${tag}-1`, `${tag}-p`));
      await receiver.waitFor(() => arrivedAt(`/${tag}-old`).length === 1, 'attempt 1');
    } finally {
      receiver.respond = answer;
    }
    // The scheduled dispatcher reads the subscription (nothing is due).
    const ticker = createHandlers(container(retrying));
    await ticker.dispatch(60_000);
    // The client moves it, in an API container whose lanes cannot take a lease (throttled): the
    // re-queued notification is left to the next scheduled run, within its 5 s subscription cache.
    const throttled = leaseHooked(id, async (input) => {
      if (input.UpdateExpression?.startsWith('SET #holder = :me') === true) {
        throw Object.assign(new Error('Throughput exceeds the current capacity'), {
          name: 'ThrottlingException',
          $fault: 'client',
        });
      }
    });
    const put = await call(
      createHandlers(container({ ...retrying, dynamodb: throttled })),
      'PUT',
      `/fhir/Subscription/${id}`,
      {
        ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, { filters }),
        id,
      },
    );
    expect(put.status).toBe(200);
    await receiver.waitFor(() => receiver.on(`/${tag}-new`).length === 1, 'the new handshake');
    expect(arrivedAt(`/${tag}-new`)).toEqual([]);
    await ticker.dispatch(60_000);
    await receiver.waitFor(() => arrivedAt(`/${tag}-new`).length === 1, 'notification 1 at the new endpoint');
    expect(arrivedAt(`/${tag}-new`)).toEqual([1]);
    expect(arrivedAt(`/${tag}-old`)).toEqual([1]);
  });

  it('a holder draining a backlog to the old endpoint stops within about a second of the PUT that moved it', async () => {
    const tag = 'ra-moving';
    const filters = [`Patient?_id=${tag}-p`];
    const api = createHandlers(container());
    const id = await create(api, topicSubscription('patient-change', `${receiver.url}/${tag}-old`, { filters }));
    await receiver.waitFor(() => receiver.on(`/${tag}-old`).length === 1, 'the handshake');
    const answer = receiver.respond;
    receiver.respond = (req) =>
      req.path === `/${tag}-old` && req.body.includes('"event-notification"')
        ? { status: 204, delayMs: 100 }
        : answer(req);
    try {
      const events = createHandlers(container());
      const accepted = events.events(
        Array.from({ length: 150 }, (_, i) => eventLike('healthlake-update-patient', `${tag}-${i + 1}`, `${tag}-p`)),
      );
      await receiver.waitFor(() => arrivedAt(`/${tag}-old`).length >= 3, 'the events container sending');
      const put = await call(api, 'PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, { filters }),
        id,
      });
      expect(put.status).toBe(200);
      const atPut = arrivedAt(`/${tag}-old`).length;
      await accepted;
      await createHandlers(container()).dispatch(60_000);
      await receiver.waitFor(
        () => new Set([...arrivedAt(`/${tag}-old`), ...arrivedAt(`/${tag}-new`)]).size === 150,
        'all 150',
        60_000,
      );
      // About a second of 100 ms answers (and the run on the wire): it was ~150, all of the rest.
      expect(arrivedAt(`/${tag}-old`).length - atPut).toBeLessThan(40);
      const old = arrivedAt(`/${tag}-old`);
      // In order, each once, across the two endpoints.
      expect([...old, ...arrivedAt(`/${tag}-new`)]).toEqual(Array.from({ length: 150 }, (_, i) => i + 1));
    } finally {
      receiver.respond = answer;
    }
  });

  it('a last attempt whose lease renew fails after a re-activation does not turn the re-activated subscription to error', async () => {
    const tag = 'ra-renew-fails';
    const filters = [`Patient?_id=${tag}-p`];
    const last = { config: { retryDelaysMs: [] as number[] } };
    const api = createHandlers(container(last));
    const id = await create(api, topicSubscription('patient-change', `${receiver.url}/${tag}-old`, { filters }));
    await receiver.waitFor(() => receiver.on(`/${tag}-old`).length === 1, 'the handshake');
    let onTheWire!: () => void;
    const wired = new Promise<void>((resolve) => {
      onTheWire = resolve;
    });
    const answer = receiver.respond;
    receiver.respond = (req) => {
      if (req.path !== `/${tag}-old` || !req.body.includes('"event-notification"')) return answer(req);
      onTheWire();
      return { status: 503, delayMs: 2_000 };
    };
    let thrown = 0;
    const throttled = leaseHooked(id, async (input) => {
      if (thrown === 0 && input.UpdateExpression === 'SET #through = :through, #until = :until') {
        thrown++;
        throw Object.assign(new Error('Throughput exceeds the current capacity'), {
          name: 'ThrottlingException',
          $fault: 'client',
        });
      }
    });
    try {
      const accepted = createHandlers(container({ ...last, dynamodb: throttled })).events(
        eventLike('healthlake-update-patient', `${tag}-1`, `${tag}-p`),
      );
      await wired;
      const put = await call(api, 'PUT', `/fhir/Subscription/${id}`, {
        ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, { filters }),
        id,
      });
      expect(put.status).toBe(200);
      await receiver.waitFor(() => receiver.on(`/${tag}-new`).length >= 1, 'the new handshake');
      await accepted;
    } finally {
      receiver.respond = answer;
    }
    expect(thrown).toBe(1);
    await createHandlers(container(last)).dispatch(60_000);
    await receiver.waitFor(() => arrivedAt(`/${tag}-new`).length === 1, 'notification 1 at the new endpoint');
    const read = await call(createHandlers(container()), 'GET', `/fhir/Subscription/${id}`);
    expect(read.body.status).toBe('active');
    expect(logger.records.some((r) => r.subscription === id && r.to === 'error')).toBe(false);
  });

  it('records a failed attempt even when the lease renew before it fails', async () => {
    const retrying = { config: { retryDelaysMs: [600_000] } };
    const api = createHandlers(container(retrying));
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/renew-fails`, { filters: ['Patient?_id=renew-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/renew-fails').length === 1, 'the handshake');
    const answer = receiver.respond;
    let sent = false;
    receiver.respond = (req) => {
      if (req.path !== '/renew-fails' || !req.body.includes('"event-notification"')) return answer(req);
      sent = true;
      return { status: 503 };
    };
    // The renew the holder makes to learn whether a re-queue came meanwhile fails once (throttled).
    let thrown = 0;
    const hooked = leaseHooked(id, async (input) => {
      if (sent && thrown === 0 && input.UpdateExpression?.startsWith('SET #through = :through, #until = :until')) {
        thrown++;
        throw Object.assign(new Error('Throughput exceeds the current capacity'), {
          name: 'ThrottlingException',
          $fault: 'client',
        });
      }
    });
    try {
      await createHandlers(container({ ...retrying, dynamodb: hooked })).events(
        eventLike('healthlake-update-patient', 'renew-1', 'renew-p'),
      );
    } finally {
      receiver.respond = answer;
    }
    expect(thrown).toBe(1);
    // The attempt counts, and its retry waits its delay (before, nothing was written: due again at once).
    const row = await local.client.send(
      new GetItemCommand({
        TableName: tableNames(config.tablePrefix).notifications,
        Key: { subscriptionId: { S: id }, eventNumber: { N: '1' } },
        ConsistentRead: true,
      }),
    );
    expect([row.Item?.state?.S, row.Item?.attempts?.N, row.Item?.lastError?.S]).toEqual(['pending', '1', 'HTTP 503']);
  });

  it('a dead letter whose write fails is not passed by the watermark: attempted again, then dead-lettered, the subscription in error', async () => {
    const tag = 'dead-write-fails';
    const last = { config: { retryDelaysMs: [] as number[] } };
    const api = createHandlers(container(last));
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/${tag}`, { filters: [`Patient?_id=${tag}-p`] }),
    );
    await receiver.waitFor(() => receiver.on(`/${tag}`).length === 1, 'the handshake');
    const answer = receiver.respond;
    receiver.respond = (req) =>
      req.path === `/${tag}` && req.body.includes('"event-notification"') ? { status: 400 } : answer(req);
    // The one write recording the dead letter fails (throttled past the SDK's own retries, say).
    const failing = localClient(local.endpoint);
    let thrown = 0;
    failing.middlewareStack.add(
      (next, ctx) => async (args) => {
        const write = ctx.commandName === 'TransactWriteItemsCommand' && JSON.stringify(args.input).includes('"dead"');
        if (write && thrown === 0) {
          thrown++;
          throw Object.assign(new Error('Throughput exceeds the current capacity'), {
            name: 'ThrottlingException',
            $fault: 'client',
          });
        }
        return next(args);
      },
      { step: 'initialize' },
    );
    try {
      await createHandlers(container({ ...last, dynamodb: failing })).events(
        eventLike('healthlake-update-patient', `${tag}-1`, `${tag}-p`),
      );
      expect(thrown).toBe(1);
      // The next scheduled run finds it still below no watermark: one more attempt, and this time
      // the dead letter is written and the client told.
      await createHandlers(container(last)).dispatch(60_000);
      await receiver.waitFor(() => arrivedAt(`/${tag}`).length === 2, 'the attempt made again');
    } finally {
      receiver.respond = answer;
    }
    const row = await local.client.send(
      new GetItemCommand({
        TableName: tableNames(config.tablePrefix).notifications,
        Key: { subscriptionId: { S: id }, eventNumber: { N: '1' } },
        ConsistentRead: true,
      }),
    );
    expect(row.Item?.state?.S).toBe('dead');
    const read = await call(createHandlers(container()), 'GET', `/fhir/Subscription/${id}`);
    expect(read.body.status).toBe('error');
    expect(arrivedAt(`/${tag}`)).toEqual([1, 1]);
  });

  /** A client whose requests for `id`'s lane (its lease item, its lane reads) go through `hook` first. */
  const leaseHooked = (id: string, hook: (input: LeaseRequest, command: string) => Promise<void>): DynamoDBClient => {
    const hooked = localClient(local.endpoint);
    hooked.middlewareStack.add(
      (next, ctx) => async (args) => {
        const input = args.input as LeaseRequest;
        const lease = input.Key?.subscriptionId?.S === id && input.Key?.eventNumber?.N === '0';
        const laneRead =
          input.KeyConditionExpression?.includes('eventNumber > :after') === true &&
          input.ExpressionAttributeValues?.[':s']?.S === id;
        if (lease || laneRead) await hook(input, ctx.commandName ?? '');
        return next(args);
      },
      { step: 'initialize' },
    );
    return hooked;
  };

  it('an event committed in the holding container while its lane lets go is not left behind', async () => {
    const api = createHandlers(container());
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/strand`, { filters: ['Patient?_id=strand-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/strand').length === 1, 'the handshake');
    let broker!: AwsBroker;
    let committed = false;
    // While the lane lets go (after sending 1), the same process accepts event 2 (a server on the
    // DynamoDB store takes events while its lanes run).
    const hooked = leaseHooked(id, async (input) => {
      if (!committed && input.UpdateExpression?.includes('REMOVE #holder') === true) {
        committed = true;
        await broker.ingest.ingest(eventLike('healthlake-update-patient', 'strand-2', 'strand-p'));
      }
    });
    const pending = container({ dynamodb: hooked });
    broker = await pending;
    await createHandlers(pending).events(eventLike('healthlake-update-patient', 'strand-1', 'strand-p'));
    await receiver.waitFor(() => arrivedAt('/strand').length === 2, 'notification 2');
    expect(committed).toBe(true);
    expect(arrivedAt('/strand')).toEqual([1, 2]);
  });

  it('a lane that stops holds the lease until it has let go: no second sender meanwhile', async () => {
    const api = createHandlers(container());
    const id = await create(
      api,
      topicSubscription('patient-change', `${receiver.url}/twice`, { filters: ['Patient?_id=twice-p'] }),
    );
    await receiver.waitFor(() => receiver.on('/twice').length === 1, 'the handshake');
    receiver.answerOnce((r) => r.path === '/twice' && r.body.includes('"event-notification"'), {
      status: 204,
      delayMs: 1_500,
    });
    let broker!: AwsBroker;
    let throttled = false;
    let accepted = false;
    let tick: Promise<unknown> | undefined;
    const hooked = leaseHooked(id, async (input, command) => {
      // The first lane read is throttled: the lane stops with the lease held, and lets it go.
      if (!throttled && command === 'QueryCommand') {
        throttled = true;
        throw Object.assign(new Error('Throughput exceeds the current capacity'), {
          name: 'ThrottlingException',
          $fault: 'client',
        });
      }
      // While it lets go, the same process accepts event 2, and a minute tick runs elsewhere.
      if (!accepted && input.UpdateExpression?.includes('REMOVE #holder') === true) {
        accepted = true;
        await broker.ingest.ingest(eventLike('healthlake-update-patient', 'twice-2', 'twice-p'));
        tick = createHandlers(container()).dispatch(60_000);
      }
    });
    const pending = container({ dynamodb: hooked });
    broker = await pending;
    await createHandlers(pending).events(eventLike('healthlake-update-patient', 'twice-1', 'twice-p'));
    await receiver.waitFor(() => arrivedAt('/twice').length >= 2, 'both notifications');
    await tick;
    await broker.dispatcher.idle(5_000);
    expect(throttled && accepted).toBe(true);
    expect(arrivedAt('/twice')).toEqual([1, 2]);
  });

  it('a handshake retry due in one container sends nothing once another has moved or deleted the subscription', async () => {
    const tag = randomUUID().slice(0, 8);
    const mine = { filters: [`Patient?_id=${tag}-p`] };
    // Due again 3 s after the create, in the container that created them (its timer).
    const later = { config: { handshakeRetryDelaysMs: [3_000] } };
    receiver.answerOnce((r) => r.path === `/${tag}-moved`, { status: 500 });
    receiver.answerOnce((r) => r.path === `/${tag}-deleted`, { status: 500 });
    receiver.answerOnce((r) => r.path === `/${tag}-kept`, { status: 500 });
    const starting = container(later);
    const moved = await create(
      createHandlers(starting),
      topicSubscription('patient-change', `${receiver.url}/${tag}-moved`, mine),
    );
    const deleted = await create(
      createHandlers(starting),
      topicSubscription('patient-change', `${receiver.url}/${tag}-deleted`, mine),
    );
    const kept = await create(
      createHandlers(starting),
      topicSubscription('patient-change', `${receiver.url}/${tag}-kept`, mine),
    );
    const first = await starting;
    // Another API container serves the client's PUT and DELETE; the first one's cache still has both.
    const other = createHandlers(container(later));
    const put = await call(other, 'PUT', `/fhir/Subscription/${moved}`, {
      ...topicSubscription('patient-change', `${receiver.url}/${tag}-new`, mine),
      id: moved,
    });
    expect(put.status).toBe(200);
    expect((await call(other, 'DELETE', `/fhir/Subscription/${deleted}`)).status).toBe(204);
    await logger.waitForStatus(moved, 'active');
    // The first container's timers fire: it reads each afresh, and sends only the unchanged one's.
    await logger.waitForStatus(kept, 'active', 10_000);
    await first.dispatcher.idle(10_000);
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-kept`)).toHaveLength(2);
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-moved`)).toHaveLength(1);
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-deleted`)).toHaveLength(1);
    expect(receiver.arrived.filter((r) => r.path === `/${tag}-new`)).toHaveLength(1);
    expect(first.registry.get(moved)?.channel.endpoint).toBe(`${receiver.url}/${tag}-new`);
    expect(first.registry.get(deleted)).toBeUndefined();
  });
});

interface EmfMeta {
  readonly CloudWatchMetrics: readonly {
    readonly Namespace: string;
    readonly Dimensions: readonly (readonly string[])[];
    readonly Metrics: readonly { readonly Name: string }[];
  }[];
}

interface LeaseRequest {
  readonly Key?: Record<string, { N?: string; S?: string }>;
  readonly UpdateExpression?: string;
  readonly KeyConditionExpression?: string;
  readonly ExpressionAttributeValues?: Record<string, { S?: string }>;
}
