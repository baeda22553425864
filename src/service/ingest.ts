import { InvalidEnvelopeError, parseEventBridgeEvent } from '../core/cloudtrail.js';
import { BrokerError } from '../core/errors.js';
import { matchCandidates } from '../core/match-index.js';
import type { Clock, Interaction, MatchSpec, Notification, ResourceChange } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { AcceptItem, AcceptOutcome, MatchCandidate, Store } from '../store/store.js';
import { ContentStage, type ReadResult } from './content-stage.js';
import type { SubscriptionRegistry } from './subscription-registry.js';

/**
 * Ingest: EventBridge events → ResourceChange → matched once → committed with their
 * notifications → handed to the dispatcher. Requests that arrive together share one store
 * transaction (group commit), so the cost of a durable commit is paid once per batch.
 *
 * Matching: against the registry's in-memory index, or, when the store has a type index
 * (`Store.candidatesFor`, DynamoDB), against the store's current candidates for each resource type
 * of the request (one read per distinct type), so several instances sharing the store need not
 * hold every subscription in memory nor reload them to see each other's changes. The subscriptions
 * notified are then re-read into the registry cache, which delivery reads.
 */

export interface IngestResult {
  readonly accepted: number;
  readonly ignored: number;
  readonly duplicates: number;
}

/** A change the reconciler found, with the resource as found (content filters are judged on it). */
export interface FoundChange {
  readonly change: ResourceChange;
  readonly read: ReadResult;
  /**
   * A subscription must match the change as this interaction too (a version that may be a create
   * or an update goes only to subscriptions that take both).
   */
  readonly alsoAs?: Interaction;
}

/** Stage one's answer for a request: the subscriptions a change matches (at a time, by default the request's), and their specs. */
interface Matcher {
  match(change: ResourceChange, at?: number): string[];
  specOf(id: string): MatchSpec | undefined;
}

export interface NotificationSink {
  enqueue(notifications: readonly Notification[], acceptedAt: number): void;
}

export interface IngestOptions {
  /** Count a refusal in `broker_events_total{outcome="refused"}` (default true). */
  readonly countRefused?: boolean;
}

/** 1,000: ten times EventBridge's largest PutEvents batch; a request beyond it is refused whole. */
export const MAX_EVENTS_PER_REQUEST = 1000;

/** Group commits in flight at once (see `IngestService#inFlight`). */
const MAX_IN_FLIGHT = 2;

interface PendingCommit {
  readonly items: readonly AcceptItem[];
  /** Epoch ms the request came in (the delivery latency histogram starts there). */
  readonly receivedAt: number;
  readonly resolve: (outcomes: AcceptOutcome[]) => void;
  readonly reject: (err: unknown) => void;
}

export class IngestService {
  readonly #store: Store;
  readonly #registry: SubscriptionRegistry;
  readonly #sink: NotificationSink;
  readonly #clock: Clock;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #content: ContentStage;
  #pending: PendingCommit[] = [];
  #scheduled = false;
  /**
   * Commits handed to the store and not yet answered. Up to MAX_IN_FLIGHT at once, so the store
   * (the SQLite writer thread) starts the next commit as soon as one is durable instead of waiting
   * for this thread to take the answer; what arrives beyond that waits and joins a larger commit.
   * The store answers commits in order, so notifications reach the dispatcher in commit order.
   */
  #inFlight = 0;
  /** Tail of the post-commit hand-overs (see `#inCommitOrder`). */
  #handoff: Promise<void> = Promise.resolve();

  constructor(deps: {
    store: Store;
    registry: SubscriptionRegistry;
    sink: NotificationSink;
    clock: Clock;
    logger: Logger;
    metrics: Metrics;
    /**
     * Stage two: content filters. Without one, candidates with content filters are left out (never
     * delivered unfiltered), as by a stage without a reader.
     */
    content?: ContentStage;
  }) {
    this.#content = deps.content ?? new ContentStage({ logger: deps.logger, metrics: deps.metrics });
    this.#store = deps.store;
    this.#registry = deps.registry;
    this.#sink = deps.sink;
    this.#clock = deps.clock;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
  }

  /**
   * Validates every event first: one malformed element refuses the request and stores nothing.
   * `countRefused: false` (an SQS message handed out again, whose refusal was counted on its first
   * receive) logs a refusal without counting it.
   */
  async ingest(body: unknown, opts: IngestOptions = {}): Promise<IngestResult> {
    const events = Array.isArray(body) ? body : [body];
    const countRefused = opts.countRefused ?? true;
    if (events.length > MAX_EVENTS_PER_REQUEST) {
      const reason = `${events.length} events in one request; the limit is ${MAX_EVENTS_PER_REQUEST}`;
      this.#refused(events.length, { reason }, countRefused);
      throw new BrokerError('TOO_MANY_EVENTS', reason);
    }
    const receivedAt = this.#clock.now();
    const receivedIso = new Date(receivedAt).toISOString();
    const changes: ResourceChange[] = [];
    let ignored = 0;
    events.forEach((event, i) => {
      let parsed: ReturnType<typeof parseEventBridgeEvent>;
      try {
        parsed = parseEventBridgeEvent(event, receivedIso);
      } catch (err) {
        if (err instanceof InvalidEnvelopeError) {
          this.#refused(events.length, { index: i, reason: err.message }, countRefused);
          const where = Array.isArray(body) ? `event [${i}]` : 'event';
          throw new BrokerError('INVALID_EVENT', `${where}: ${err.message}`, { cause: err });
        }
        throw err;
      }
      if (parsed.kind === 'ignored') {
        ignored++;
        if (parsed.unusableWrite) {
          this.#logger.warn('write event unusable: no notification derived', {
            eventId: parsed.eventId,
            reason: parsed.reason,
          });
          this.#metrics.inc('broker_unusable_writes_total');
        } else this.#logger.info('event ignored', { eventId: parsed.eventId, reason: parsed.reason });
        return;
      }
      for (const warning of parsed.warnings ?? []) {
        this.#logger.warn('event accepted with a part left out', { eventId: parsed.change.eventId, warning });
      }
      changes.push(parsed.change);
    });

    const { match, specOf } = await this.#matcher(changes, receivedAt);
    const matched: AcceptItem[] = changes.map((change) => ({ change, subscriptionIds: match(change) }));
    const narrowed = this.#content.narrow(matched, specOf);
    const items = Array.isArray(narrowed) ? narrowed : await narrowed;
    // Answered once committed and handed to the dispatcher (see `#flush`).
    const outcomes = items.length === 0 ? [] : await this.#commit(items, receivedAt);
    let notifications = 0;
    let duplicates = 0;
    for (const o of outcomes) {
      notifications += o.notifications.length;
      if (o.duplicate) duplicates++;
    }

    const result = { accepted: outcomes.length - duplicates, ignored, duplicates };
    this.#metrics.inc('broker_events_total', { outcome: 'accepted' }, result.accepted);
    this.#metrics.inc('broker_events_total', { outcome: 'ignored' }, result.ignored);
    this.#metrics.inc('broker_events_total', { outcome: 'duplicate' }, result.duplicates);
    if (result.accepted > 0 || duplicates > 0) {
      this.#logger.debug('events accepted', { ...result, notifications });
    }
    return result;
  }

  /**
   * Changes the reconciler found on the FHIR server (src/service/reconciler.ts), through the same
   * pipeline as events: matched as of when each happened (stage one, `end` at that time; then
   * content filters judged on the resource found, not read again), `select` keeps of each item the
   * subscriptions to notify (those not yet told), and what is left is committed in the group
   * commits and handed to delivery. Counted in the reconciler's metrics, not as events.
   */
  async acceptFound(
    found: readonly FoundChange[],
    select: (items: readonly AcceptItem[]) => Promise<AcceptItem[]>,
  ): Promise<{ readonly notifications: number }> {
    const receivedAt = this.#clock.now();
    const changes = found.map((f) => f.change);
    const { match, specOf } = await this.#matcher(changes, receivedAt);
    const reads = new Map(found.map((f) => [f.change.eventId, f.read]));
    const source = {
      read: async (change: ResourceChange): Promise<ReadResult> =>
        reads.get(change.eventId) ?? { missing: 'not found by the reconciler' },
    };
    const matched = found
      .map(({ change, alsoAs }) => {
        const at = Date.parse(change.time);
        const ids = match(change, at);
        if (alsoAs === undefined) return { change, subscriptionIds: ids };
        const both = new Set(match({ ...change, interaction: alsoAs }, at));
        return { change, subscriptionIds: ids.filter((id) => both.has(id)) };
      })
      .filter((item) => item.subscriptionIds.length > 0);
    const narrowed = await this.#content.narrow(matched, specOf, source);
    const items = (await select(narrowed.filter((item) => item.subscriptionIds.length > 0))).filter(
      (item) => item.subscriptionIds.length > 0,
    );
    const outcomes = items.length === 0 ? [] : await this.#commit(items, receivedAt);
    return { notifications: outcomes.reduce((n, o) => n + o.notifications.length, 0) };
  }

  /** Stage one: the in-memory index, or the store's type index when it has one (see the class comment). */
  async #matcher(changes: readonly ResourceChange[], receivedAt: number): Promise<Matcher> {
    const candidatesFor = this.#store.candidatesFor?.bind(this.#store);
    return candidatesFor === undefined
      ? {
          match: (change: ResourceChange, at = receivedAt) => this.#registry.match(change, at),
          specOf: (id: string) => this.#registry.get(id)?.match,
        }
      : await this.#storeMatcher(candidatesFor, changes, receivedAt);
  }

  /**
   * A request refused whole (the sender gets a 4xx and, from EventBridge, the event goes to its
   * dead-letter queue): said and counted, with where and why but never the event itself.
   */
  #refused(events: number, fields: { index?: number; reason: string }, count: boolean): void {
    this.#logger.warn('events refused', { events, ...fields });
    if (count) this.#metrics.inc('broker_events_total', { outcome: 'refused' }, events);
  }

  /** Matching against the store's type index, read once per distinct resource type. */
  async #storeMatcher(
    candidatesFor: NonNullable<Store['candidatesFor']>,
    changes: readonly ResourceChange[],
    nowMs: number,
  ): Promise<Matcher> {
    const types = [...new Set(changes.map((c) => c.resourceType))];
    let candidates: Map<string, readonly MatchCandidate[]>;
    try {
      candidates = new Map(await Promise.all(types.map(async (t) => [t, await candidatesFor(t)] as const)));
    } catch (err) {
      this.#logger.error('could not read the subscriptions to match; the senders will retry', { err: err as Error });
      throw new BrokerError('STORE_UNAVAILABLE', 'The events could not be matched; retry', { cause: err });
    }
    const specs = new Map<string, MatchSpec>();
    for (const list of candidates.values()) for (const c of list) specs.set(c.id, c.match);
    return {
      match: (change, at = nowMs) => matchCandidates(candidates.get(change.resourceType) ?? [], change, at),
      specOf: (id) => specs.get(id),
    };
  }

  /**
   * Runs the hand-over to the dispatcher of each commit in the order commits were answered (the
   * order they reach this call). Without it, a commit whose registry refresh (a store read)
   * finished late would enqueue event 4 after event 5 of the same subscription had been delivered,
   * and the lane, which counts delivered numbers, would take 4 for done: left pending in the store.
   */
  #inCommitOrder(step: () => Promise<void>): Promise<void> {
    const run = this.#handoff.then(step);
    this.#handoff = run.catch(() => undefined);
    return run;
  }

  /**
   * The commit's notifications to the registry's counters and the dispatcher's lanes, request by
   * request (each with its own received time).
   */
  async #handOver(batch: readonly PendingCommit[], answers: readonly AcceptOutcome[][]): Promise<void> {
    const perRequest = answers.map((outcomes) => outcomes.flatMap((o) => o.notifications));
    const notifications = perRequest.flat();
    if (this.#store.candidatesFor !== undefined && notifications.length > 0) {
      // The events are committed: a failed re-read must not turn the answer into an error (the
      // sender would retry, see duplicates and nothing would enqueue them). Delivery goes on with
      // the cached records; a subscription not cached yet is picked up by the next resume.
      await this.#registry.refresh(notifications.map((n) => n.subscriptionId)).catch((err: unknown) => {
        this.#logger.warn('could not re-read the notified subscriptions; delivering from the cache', {
          err: err as Error,
        });
      });
    }
    this.#registry.noteNotifications(notifications);
    batch.forEach((p, i) => {
      const notes = perRequest[i] as Notification[];
      if (notes.length > 0) this.#sink.enqueue(notes, p.receivedAt);
    });
  }

  #commit(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    return new Promise((resolve, reject) => {
      this.#pending.push({ items, receivedAt, resolve, reject });
      this.#schedule();
    });
  }

  #schedule(): void {
    if (this.#scheduled || this.#inFlight >= MAX_IN_FLIGHT) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      void this.#flush();
    });
  }

  async #flush(): Promise<void> {
    if (this.#inFlight >= MAX_IN_FLIGHT || this.#pending.length === 0) return;
    this.#inFlight++;
    const batch = this.#pending;
    this.#pending = [];
    try {
      await this.#commitTogether(batch);
    } finally {
      this.#inFlight--;
      if (this.#pending.length > 0) this.#schedule();
    }
  }

  /**
   * `batch` in one store commit, then each request answered once its commit is handed over. A
   * commit that failed on a fault in the broker's own code (see `isInternalError`), not the
   * store's, may be one request's doing: each request is then committed alone, so the others go
   * through, and one that fails alone gets a 500, not a 503 that blames the store. Committing again
   * is what a sender's retry does anyway: a failed commit leaves nothing a second one would double.
   */
  async #commitTogether(batch: readonly PendingCommit[]): Promise<void> {
    const all = batch.flatMap((p) => p.items);
    let outcomes: AcceptOutcome[];
    try {
      outcomes = await this.#store.acceptChanges(all, this.#clock.now());
    } catch (err) {
      const internal = isInternalError(err);
      if (internal && batch.length > 1) {
        this.#logger.warn('could not commit events together; committing each request alone', {
          err: err as Error,
          requests: batch.length,
        });
        for (const p of batch) await this.#commitTogether([p]);
        return;
      }
      const failure = internal
        ? new BrokerError('INTERNAL', 'The events could not be stored: an internal error; see the broker log', {
            cause: err,
          })
        : new BrokerError('STORE_UNAVAILABLE', 'The events could not be stored; retry', { cause: err });
      this.#logger.error(
        internal ? 'could not commit events: internal error' : 'could not commit events; the senders will retry',
        {
          err: err as Error,
          events: all.length,
          eventIds: all.slice(0, 10).map((item) => item.change.eventId),
        },
      );
      for (const p of batch) p.reject(failure);
      return;
    }
    const answers: AcceptOutcome[][] = [];
    let offset = 0;
    for (const p of batch) {
      answers.push(outcomes.slice(offset, offset + p.items.length));
      offset += p.items.length;
    }
    // One hand-over per commit, queued as soon as it is answered (so in commit order), then every
    // request of it is answered.
    void this.#inCommitOrder(() => this.#handOver(batch, answers)).then(
      () => {
        batch.forEach((p, i) => {
          p.resolve(answers[i] as AcceptOutcome[]);
        });
      },
      (err: unknown) => {
        for (const p of batch) p.reject(err);
      },
    );
  }
}

/**
 * JavaScript's own errors for a programming fault (a spread past the stack, a property of
 * undefined), thrown by the broker's code around the store: they say nothing about the store's
 * health. Anything else (SQLite's errors, the AWS SDK's, a stopped writer) is the store failing.
 */
function isInternalError(err: unknown): boolean {
  return (
    err instanceof RangeError || err instanceof TypeError || err instanceof ReferenceError || err instanceof SyntaxError
  );
}
