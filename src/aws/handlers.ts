import type { APIGatewayProxyStructuredResultV2, Context } from 'aws-lambda';
import { handle } from 'hono/aws-lambda';
import { BrokerError } from '../core/errors.js';
import type { ReconcileReport } from '../service/reconciler.js';
import type { AwsBroker } from './aws-broker.js';
import { isRefusal, type RefusingInvocation } from './refused-events.js';

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
/**
 * The credentials secret (API keys, ingest token, binding-token key) is read again when the copy
 * is older than this: a key removed from the secret stops working everywhere within it. A read per
 * warm container at most every 5 minutes (Secrets Manager bills per read).
 */
const CREDENTIALS_CACHE_MS = 5 * 60_000;
/**
 * How long an invocation's attempts (deliveries, handshakes, heartbeats) may take, counted from when
 * its broker is ready: one not answered by then is recorded as failed and retried by the scheduled
 * dispatcher (a heartbeat goes out with the next run). Whatever an endpoint does, no invocation
 * waits for it longer, so none is held past its function's timeout.
 */
const DELIVERY_BUDGET_MS = 20_000;
/**
 * Kept free before the function's timeout (`context.getRemainingTimeInMillis()`): after its
 * attempts are over, an invocation applies their outcomes and writes delivery states and
 * lifecycle events. The budget shrinks to fit a function with less time left than both.
 */
const FLUSH_MARGIN_MS = 5_000;
/** After the attempts' end (and the dispatcher's cut shortly after it): time for their outcomes to be applied. */
const SETTLE_GRACE_MS = 1_000;
/**
 * What a reconciliation page still takes once the run is told to stop: its search is cut at once
 * (the signal aborts it), but a page being committed (a few DynamoDB requests) is finished.
 */
const RECONCILE_COMMIT_MS = 5_000;
/**
 * A reconcile invocation stops its run this long before the function's timeout (30 s): the page
 * under way is committed, the notifications committed last get the attempts an event's get
 * (DELIVERY_BUDGET_MS), and delivery states and lifecycle events are written (FLUSH_MARGIN_MS).
 * The windows not done are the next run's.
 */
export const RECONCILE_STOP_MS = RECONCILE_COMMIT_MS + DELIVERY_BUDGET_MS + FLUSH_MARGIN_MS;

/** The parts of API Gateway WebSocket events the handlers read. */
export interface WebSocketEvent {
  readonly requestContext: { readonly connectionId?: string; readonly routeKey?: string };
  readonly headers?: Readonly<Record<string, string | undefined>>;
  readonly body?: string | null;
  readonly isBase64Encoded?: boolean;
}

/**
 * What the handlers read of the Lambda context: the time left before the function's timeout
 * (absent, as in a test or a caller without it: only the delivery budget bounds the attempts), and
 * which invocation this is (named in a refused event's dead letter).
 */
export type InvocationContext = Partial<Pick<Context, 'getRemainingTimeInMillis'>> & RefusingInvocation;

/** What the events function did with its event(s). */
export interface EventsResult {
  readonly accepted: number;
  readonly ignored: number;
  readonly duplicates: number;
  /**
   * Events refused and put on the dead-letter queue (BROKER_DEAD_LETTER_QUEUE_URL); present only
   * then. Without the queue a refusal fails the invocation, as a store failure does.
   */
  readonly refused?: number;
}

/**
 * What the reconcile function did: the run's report, with `stopped` when the invocation's time ran
 * out first (the next run goes on from the last window done); `off` when the broker has no
 * reconciler (BROKER_RECONCILE_EVERY unset), so there was nothing to do.
 */
export type ReconcileResult = (ReconcileReport & { readonly stopped?: true }) | { readonly off: true };

export interface Handlers {
  /**
   * EventBridge target: one event (or an array). Throws when the store fails, so that Lambda
   * retries; an event the broker refuses goes to the dead-letter queue (see EventsResult.refused).
   */
  events(event: unknown, context?: InvocationContext): Promise<EventsResult>;
  api(event: Parameters<ReturnType<typeof handle>>[0], context: Context): ReturnType<ReturnType<typeof handle>>;
  connect(event: WebSocketEvent): Promise<APIGatewayProxyStructuredResultV2>;
  disconnect(event: WebSocketEvent): Promise<APIGatewayProxyStructuredResultV2>;
  message(event: WebSocketEvent, context?: InvocationContext): Promise<APIGatewayProxyStructuredResultV2>;
  /** Scheduled every `windowMs`: owed handshakes, retries, heartbeats, retention. */
  dispatch(windowMs?: number, context?: InvocationContext): Promise<{ heartbeats: number }>;
  /**
   * Scheduled every BROKER_RECONCILE_EVERY: one reconciliation run (src/service/reconciler.ts),
   * stopped RECONCILE_STOP_MS before the function's timeout; its notifications are attempted as
   * they are committed, and the invocation waits for those attempts. Never throws for a failed run
   * (the reconciler logs and counts it, and the next run does the window again).
   */
  reconcile(context?: InvocationContext): Promise<ReconcileResult>;
}

export interface HandlerOptions {
  /**
   * Where each invocation's metrics go, as CloudWatch Embedded Metric Format lines (`Metrics.emf`):
   * the entry points (lambda-*.ts) write them to the function's log (`toFunctionLog`); by default
   * (tests) nowhere.
   */
  readonly emit?: (line: string) => void;
}

/** A line to the Lambda function's log (stdout), where CloudWatch Logs extracts EMF metrics. */
export function toFunctionLog(line: string): void {
  process.stdout.write(`${line}\n`);
}

export function createHandlers(brokerPromise: Promise<AwsBroker>, options: HandlerOptions = {}): Handlers {
  const emit = options.emit ?? (() => undefined);
  /** What the invocation counted, as metrics of the function `role` (also when it failed). */
  const report = (broker: AwsBroker, role: string): void => {
    for (const line of broker.metrics.emf({ Broker: broker.name, Function: role }, Date.now())) emit(line);
  };
  /**
   * The broker with credentials no older than CREDENTIALS_CACHE_MS: for the paths that authenticate
   * clients, and those that read the FHIR server (a rotated `fhirReadToken`).
   */
  const withKeys = async (): Promise<AwsBroker> => {
    const broker = await brokerPromise;
    await broker.refreshCredentials(CREDENTIALS_CACHE_MS);
    return broker;
  };
  const ready = async (): Promise<AwsBroker> => {
    const broker = await withKeys();
    await broker.refreshSubscriptions(SUBSCRIPTION_CACHE_MS);
    return broker;
  };
  /**
   * An invocation that may make attempts: they are over within the delivery budget, and
   * FLUSH_MARGIN_MS before the function's timeout (see DELIVERY_BUDGET_MS). After `work`, before
   * the handler returns (the container may freeze): attempts under way (failed ones recorded for a
   * retry), delivery states, then lifecycle events; then, also when it failed, what the invocation
   * counted (`report`).
   */
  const within = async <T>(
    broker: AwsBroker,
    role: string,
    context: InvocationContext | undefined,
    work: () => Promise<T>,
  ) => {
    try {
      return await attemptsWithin(broker, context, work);
    } finally {
      report(broker, role);
    }
  };
  const attemptsWithin = async <T>(
    broker: AwsBroker,
    context: InvocationContext | undefined,
    work: () => Promise<T>,
  ) => {
    const remaining = remainingOf(context);
    const budget = Math.max(Math.min(DELIVERY_BUDGET_MS, remaining - FLUSH_MARGIN_MS), 0);
    broker.dispatcher.endAttemptsWithin(budget);
    const attemptsEnd = performance.now() + budget;
    const result = await work();
    await broker.dispatcher.idle(Math.max(attemptsEnd - performance.now(), 0) + SETTLE_GRACE_MS);
    await broker.flushLifecycle();
    return result;
  };
  let api: ReturnType<typeof handle> | undefined;

  return {
    async events(event, context) {
      const broker = await withKeys();
      return within(broker, 'events', context, async (): Promise<EventsResult> => {
        try {
          return await broker.ingest.ingest(event);
        } catch (err) {
          const queue = broker.refusedEvents;
          if (queue === undefined || !isRefusal(err)) throw err;
          try {
            const messageId = await queue.put(event, err, context ?? {}, new Date());
            broker.logger.warn('refused event sent to the dead-letter queue', { code: err.code, messageId });
          } catch (sendErr) {
            // Failing the invocation is the way left: Lambda retries it, then sends its own failure record.
            broker.logger.error('could not send a refused event to the dead-letter queue; the invocation fails', {
              err: sendErr as Error,
            });
            throw err;
          }
          return { accepted: 0, ignored: 0, duplicates: 0, refused: Array.isArray(event) ? event.length : 1 };
        }
      });
    },

    async api(event, context) {
      const broker = await ready();
      api ??= handle(broker.app);
      const app = api;
      return within(broker, 'api', context, () => app(event, context));
    },

    async connect(event) {
      // Only the API keys and the connections table: no subscription reload on this path.
      const broker = await withKeys();
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
      report(broker, 'connect');
      return { statusCode: 200 };
    },

    async disconnect(event) {
      const broker = await brokerPromise;
      await broker.websocket.onClose(event.requestContext.connectionId ?? '');
      report(broker, 'disconnect');
      return { statusCode: 200 };
    },

    async message(event, context) {
      const broker = await ready();
      return within(broker, 'message', context, async () => {
        const connectionId = event.requestContext.connectionId ?? '';
        const raw = event.body ?? '';
        const text = event.isBase64Encoded === true ? Buffer.from(raw, 'base64').toString('utf8') : raw;
        const owner = await broker.bindings.ownerOf(connectionId);
        const from = { id: connectionId, ...(owner === undefined ? {} : { apiOwner: owner }) };
        await broker.websocket.onMessage(from, text);
        return { statusCode: 200 };
      });
    },

    async dispatch(windowMs = 60_000, context) {
      const broker = await ready();
      return within(broker, 'dispatch', context, async () => {
        await broker.start();
        // Heartbeats, like every attempt of the run, end within its budget (see DELIVERY_BUDGET_MS).
        return { heartbeats: await broker.dispatcher.sendDueHeartbeats(windowMs) };
      });
    },

    async reconcile(context) {
      const broker = await withKeys();
      const reconciler = broker.reconciler;
      if (reconciler === undefined) {
        broker.logger.warn(
          'reconciliation is off (BROKER_RECONCILE_EVERY is not set, or BROKER_FHIR_READ is no FHIR base URL): nothing to do',
        );
        return { off: true };
      }
      try {
        const remaining = remainingOf(context);
        if (remaining === Number.POSITIVE_INFINITY) {
          // No timeout to keep to (not on Lambda): attempts unbounded while the run goes on, then
          // those it left get the delivery budget, as an event's do.
          broker.dispatcher.endAttemptsWithin(undefined);
          const done = await reconciler.run();
          return await attemptsWithin(broker, context, async () => done);
        }
        // One time for attempts, the invocation's but FLUSH_MARGIN_MS: each notification is
        // attempted as soon as its page is committed, however long the run has gone on.
        const attemptsEnd = performance.now() + Math.max(remaining - FLUSH_MARGIN_MS, 0);
        broker.dispatcher.endAttemptsWithin(attemptsEnd - performance.now());
        const stop = new AbortController();
        const timer = setTimeout(() => stop.abort(), Math.max(remaining - RECONCILE_STOP_MS, 0));
        let done: ReconcileReport;
        try {
          done = await reconciler.run({ signal: stop.signal });
        } finally {
          clearTimeout(timer);
        }
        // Then as after an event: the attempts under way end (by that time at the latest), their
        // delivery states are written, then lifecycle events.
        await broker.dispatcher.idle(Math.max(attemptsEnd - performance.now(), 0) + SETTLE_GRACE_MS);
        await broker.flushLifecycle();
        return stop.signal.aborted ? { ...done, stopped: true } : done;
      } finally {
        report(broker, 'reconcile');
      }
    },
  };
}

/** Milliseconds before the function's timeout; Infinity without a Lambda context. */
function remainingOf(context: InvocationContext | undefined): number {
  return typeof context?.getRemainingTimeInMillis === 'function'
    ? context.getRemainingTimeInMillis()
    : Number.POSITIVE_INFINITY;
}

function header(event: WebSocketEvent, name: string): string | undefined {
  for (const [k, v] of Object.entries(event.headers ?? {})) if (k.toLowerCase() === name) return v;
  return undefined;
}
