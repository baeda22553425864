import { type LifecycleSink, noLifecycleSink } from '../core/lifecycle.js';
import { memo } from '../core/memo.js';
import { type NotificationType, notificationBundleJson } from '../core/notification.js';
import { DEFAULT_HANDSHAKE_RETRY_DELAYS_MS, nextHandshakeIn, nextRetryDelay } from '../core/retry.js';
import { HANDSHAKE_FAILED, HEARTBEAT_FAILED, heartbeatsAllowed } from '../core/status.js';
import { contentNow } from '../core/subscription.js';
import type { Clock, IdSource, Notification, StoredNotification, SubscriptionRecord } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { SubscriptionRegistry } from '../service/subscription-registry.js';
import type { BundleMark, DeliveryUpdate, LaneHold, LaneLeases, Store } from '../store/store.js';
import { DeliveryStateLog } from './delivery-state-log.js';
import { LimiterClosedError, OriginLimiter, originOf } from './origin-limiter.js';
import { RunStop, type Sender, type SendResult, sendInOrder, type WebhookRequest } from './rest-hook-sender.js';
import { WebSocketRefusedError } from './websocket-port.js';

/**
 * Delivers what the outbox holds. It never re-evaluates a subscription's criteria: matching
 * happened when the change arrived, and the outbox row is the decision.
 *
 * One lane per subscription keeps notifications in event-number order with one request in flight;
 * lanes run independently under a global concurrency cap, so a slow endpoint holds only its own
 * lane. A lane buffers a bounded window in memory and reads the rest back from the store.
 */

export interface DispatcherOptions {
  readonly fhirBase: string;
  readonly retryDelaysMs: readonly number[];
  /** A failed handshake is tried again at these delays (see `nextHandshakeIn`) before `error`. */
  readonly handshakeRetryDelaysMs?: readonly number[];
  /** Requests handed to the sender across all lanes (on the wire or queued for a connection). */
  readonly maxInFlight?: number;
  /**
   * Requests on the wire to one endpoint origin (scheme://host:port), however many subscriptions
   * share it: the sender's connections per origin. Twice as many may be handed over (see below).
   */
  readonly maxInFlightPerOrigin?: number;
  /**
   * Requests handed to the sender for one API client's subscriptions, whatever origins they name:
   * one client's hanging endpoints cannot hold every slot of `maxInFlight` and stall the others.
   */
  readonly maxInFlightPerClient?: number;
  /** How long delivered notifications stay for `$events`; older ones are purged hourly. */
  readonly retentionMs?: number;
  /** Notifications a lane keeps in memory before it reads the rest back from the store. */
  readonly laneBuffer?: number;
  readonly defaultTimeoutMs?: number;
  /** `BROKER_FULL_RESOURCE_CLIENTS`: a full-resource subscription of another client is sent id-only. */
  readonly fullResourceClients?: readonly string[] | '*';
}

/** Pushes notifications of websocket subscriptions to the sockets bound to them. */
export interface WebSocketDeliverer {
  deliver(sub: SubscriptionRecord, type: NotificationType, notes: readonly Notification[]): Promise<number>;
  /** The subscription was deleted or changed: let go of sockets it no longer may have. */
  subscriptionChanged(id: string): Promise<void>;
}

interface QueuedNotification {
  readonly note: StoredNotification;
  /** Epoch ms when the event was accepted, for the latency histogram (absent after a restart). */
  readonly acceptedAt?: number;
}

class Lane {
  queue: QueuedNotification[] = [];
  running = false;
  /** The store holds pending notifications beyond what `queue` has. */
  backlog = false;
  /** Highest event number delivered or dead-lettered here: reads of the backlog start above it. */
  done = 0;
  /** Highest event number put in `queue` since it was last emptied by a rebuild: above it, none is queued. */
  queuedThrough = 0;
  /**
   * The next backlog read starts from the lowest pending number instead, with the delivery states
   * written first (set at start, on re-activation and by a re-queue: numbers below `done` may be
   * pending again). Not used under a lease, whose reads always start at the shared watermark.
   */
  rescan = false;
  /** The lane's lease while this instance holds it (a store shared by instances: `LaneLeases`). */
  hold: LaneHold | undefined;
  /** When (clock ms) the lease runs out unless renewed. */
  heldUntil = 0;
  /** Re-queued here: the lease's watermark moved, renew it (and read again) before sending. */
  recheck = false;
  /** The re-queue epoch of the lease when this instance last took or renewed it (none yet: 0). */
  epochSeen: number | undefined;
  /** The last renew found the lane re-queued, and let the lease go (`#sameEpoch` reads it). */
  requeuedAway = false;
  /** Re-queued by this instance (a re-activation here), and not taken since. */
  requeuedHere = false;
  /** Under a lease, the last read stopped below a missing number that may be voided from then on (clock ms). */
  voidableAt: number | undefined;
  /** `#wake` found the lane running (a leased lane letting go checks it: the wake must not be lost). */
  wokenWhileRunning = false;
  /** A re-queue is under way (`#pauseForRequeue` until `requeued`): the lane sends nothing. */
  paused = false;
  /** A store read for this lane is under way. */
  reloading = false;
  /** Something was enqueued while `reloading`: read the store again afterwards. */
  missed = false;
  timer: NodeJS.Timeout | undefined;
  /**
   * The retry this process scheduled for the head of the queue: its due time as stored (wall
   * clock) and as `performance.now()` (monotonic), which no step of the wall clock moves.
   */
  retry: { readonly dueAt: number; readonly at: number } | undefined;
  /**
   * `performance.now()` of the last successful request to the endpoint (notification or
   * heartbeat): heartbeats are timed on the monotonic clock, so a wall clock stepped back an hour
   * does not hold them for the hour.
   */
  lastSentAt = Number.NEGATIVE_INFINITY;
  /**
   * Counts rebuilds (`requeued`): an attempt that was on the wire across one records its outcome
   * but leaves the rebuilt queue and `done` alone (it would lift `done` over the requeued numbers).
   */
  generation = 0;
  heartbeat: NodeJS.Timeout | undefined;
  /**
   * A heartbeat fell due while the lane was running: the run may reach the endpoint (and stand for
   * it) or fail, so the lane's loop decides when it ends, rather than the next period.
   */
  heartbeatOwed = false;
  /** The run being sent (or waiting for a connection slot): stopped when the client deletes or changes the subscription. */
  run: RunStop | undefined;
}

/** `batch`, the head of the lane's queue, is done with (delivered or dead-lettered). */
function retire(lane: Lane, batch: readonly QueuedNotification[]): void {
  lane.queue.splice(0, batch.length);
  for (const q of batch) lane.done = Math.max(lane.done, q.note.eventNumber);
}

// 1 h: purging is cheap and retention is counted in days.
const PURGE_INTERVAL_MS = 60 * 60 * 1000;
/** The longest delay `setTimeout` takes (about 24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** A minute of slack: the hourly timer may fire a little early relative to a late previous run. */
const PURGE_MIN_GAP_MS = PURGE_INTERVAL_MS - 60 * 1000;

/**
 * A dead letter the store does not show written (the write failed, or a re-queue came first): its
 * lane reads it again after this, rather than let the shared watermark pass it.
 */
const DEAD_LETTER_RECHECK_MS = 5_000;

/** A lane whose bundle marks could not be written (the store failed) tries again after this. */
const MARK_RETRY_MS = 1_000;

// 10 s: the default per-attempt timeout when a subscription sets no backport-timeout.
const DEFAULT_TIMEOUT_MS = 10_000;
/**
 * A lane re-queued here that finds its lease held elsewhere asks again after this, not only when
 * that lease runs out (90 s): the holder may let go without reading again.
 */
const REQUEUED_RECHECK_MS = 5_000;
/** Requests handed to the sender per connection to an origin: one on the wire, one waiting behind it. */
const HANDOVER_PER_CONNECTION = 2;
/**
 * A lane with a backlog hands the sender up to RUN_LENGTH bundles at once, sent one after another
 * on the sender's side (`sendInOrder`) with no trip back to this thread between them: a backlog
 * drains ~1.5x faster (bench/README.md). A deletion or a change by the client stops the run at
 * once (`Lane.run`), a shutdown stops every run; none starts later than RUN_WITHIN_MS into the
 * run, which bounds how long the lane keeps a subscription as it was when the run began (a change
 * made through another instance sharing the store is seen only when this one reads it again).
 */
const RUN_LENGTH = 16;
/**
 * 10 min: the longest a Retry-After holds a client's other subscriptions at the origin that sent
 * it (the subscription it answered waits all of it). One path's long Retry-After must not silence
 * every endpoint of the client at that host for a day; past this they try again, and a refusal
 * pauses them anew.
 */
const MAX_ORIGIN_PAUSE_MS = 10 * 60 * 1000;
const RUN_WITHIN_MS = 1000;
/**
 * A lane lease (store shared by instances) lasts this long unless renewed: longer than any run (a
 * run starts no request after RUN_WITHIN_MS, and an attempt times out within 60 s). A holder that
 * dies holds its subscriptions' lanes until then.
 */
const LEASE_MS = 90_000;
/**
 * A held lease is renewed before a run once this much of it has passed: it confirms the lane was
 * not re-queued meanwhile (a client moved the subscription, perhaps in another instance), so a lane
 * goes on at most about a second (and one run) with the subscription as it was before. At 15 s, a
 * holder draining a backlog sent ~150 notifications to the old endpoint after the PUT moving the
 * subscription had returned. Costs one conditional write a second per lane that is sending.
 */
const RENEW_AFTER_MS = 1_000;
/** What a run may take (RUN_WITHIN_MS, then an attempt's longest timeout, 60 s): a run starts only with this much lease left. */
const RUN_UNDER_LEASE_MS = 62_000;
/**
 * An attempt not over when the invocation's attempts must be (`endAttemptsWithin`) counts as this
 * failure: not permanent, so a notification is retried on its schedule and a heartbeat goes out
 * with the next one.
 */
const ATTEMPT_CUT: SendResult = { ok: false, error: "timeout: no answer within the invocation's time for attempts" };
/**
 * The cut comes this long after the invocation's time for attempts: a request's own timeout is
 * capped at that time, so the sender usually answers first, with what a run delivered before it.
 * The cut is for what that cap does not bound (connecting, waiting for a slot, a WebSocket push).
 */
const CUT_GRACE_MS = 200;

export class Dispatcher {
  readonly #store: Store;
  readonly #sender: Sender;
  readonly #websocket: WebSocketDeliverer | undefined;
  readonly #lifecycle: LifecycleSink;
  readonly #registry: SubscriptionRegistry;
  readonly #clock: Clock;
  readonly #ids: IdSource;
  readonly #random: () => number;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #opts: Required<DispatcherOptions>;
  readonly #lanes = new Map<string, Lane>();
  readonly #limiter: OriginLimiter;
  #purgeTimer: NodeJS.Timeout | undefined;
  #purging = false;
  /** Per subscription with an `end`: the timer that turns it off then. */
  readonly #endTimers = new Map<string, NodeJS.Timeout>();
  /** When the last purge began (clock ms); undefined before the first. */
  #purgedAt: number | undefined;
  /** Aborted by `close`: a purge in progress stops at its next batch instead of holding shutdown. */
  readonly #purgeAbort = new AbortController();
  readonly #running = new Set<Promise<unknown>>();
  #closed = false;
  /** Delivery states, written behind (see DeliveryStateLog). */
  readonly #states: DeliveryStateLog;
  /** Bundle marks asked for in this turn of the event loop, and their one write (see `#writeMarks`). */
  #marks: BundleMark[] = [];
  #marksWritten: Promise<boolean[]> | undefined;
  readonly #origins = new Map<string, string>();
  /**
   * Until when (`performance.now()`) one client's notifications to one origin wait, keyed
   * `owner\norigin`: that origin answered 429 or 503 with a Retry-After. Its other subscriptions
   * there then send nothing until the pause is over, rather than each spend attempts of its own
   * schedule on the same refusal. Per client, so that one client's endpoint cannot pause another's
   * at a shared host.
   */
  readonly #originPauses = new Map<string, number>();
  /** Handshakes due again (failed, or held by an origin's pause), by subscription: the timer and when (epoch ms). */
  readonly #handshakeRetries = new Map<string, { readonly timer: NodeJS.Timeout; readonly dueAt: number }>();
  /**
   * Where this process's count of a subscription's handshake schedule starts (`performance.now()`),
   * for the version (`updatedAt`) it was requested as: set at its first failed attempt here from
   * the wall clock, then counted on the monotonic one, which no clock step moves.
   */
  readonly #handshakeStarts = new Map<string, { readonly updatedAt: string; readonly at: number }>();
  readonly #newId = (): string => this.#ids.uuid();
  /** A store shared by instances: lanes send under its leases, as `#holder`. */
  readonly #leases: LaneLeases | undefined;
  readonly #holder: string;
  /**
   * When (`performance.now()`) the attempts of the running Lambda invocation must be over; see
   * `endAttemptsWithin`. Undefined (a server): each attempt ends by its own timeout.
   */
  #attemptsEndAt: number | undefined;

  constructor(deps: {
    store: Store;
    sender: Sender;
    websocket?: WebSocketDeliverer;
    lifecycle?: LifecycleSink;
    registry: SubscriptionRegistry;
    clock: Clock;
    ids: IdSource;
    random?: () => number;
    logger: Logger;
    metrics: Metrics;
    options: DispatcherOptions;
  }) {
    this.#store = deps.store;
    this.#sender = deps.sender;
    this.#websocket = deps.websocket;
    this.#lifecycle = deps.lifecycle ?? noLifecycleSink;
    this.#registry = deps.registry;
    this.#clock = deps.clock;
    this.#ids = deps.ids;
    this.#random = deps.random ?? Math.random;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#opts = {
      maxInFlight: 512,
      maxInFlightPerOrigin: 32,
      maxInFlightPerClient: 128,
      fullResourceClients: [],
      retentionMs: 7 * 86_400_000,
      laneBuffer: 256,
      defaultTimeoutMs: DEFAULT_TIMEOUT_MS,
      handshakeRetryDelaysMs: DEFAULT_HANDSHAKE_RETRY_DELAYS_MS,
      ...deps.options,
    };
    this.#states = new DeliveryStateLog({ store: deps.store, logger: deps.logger });
    this.#leases = deps.store.laneLeases;
    this.#holder = deps.ids.uuid();
    // A request holds its slot from hand-over until this thread has taken its result: with the
    // sender on another thread, two thread hops longer than its time on the wire. Twice the
    // origin's connections in hand-over keep each connection's next request already waiting in
    // the sender's pool, so the origin's connections stay busy; the origin still never sees more
    // than `maxInFlightPerOrigin` at once (the pool's connection cap).
    this.#limiter = new OriginLimiter({
      total: this.#opts.maxInFlight,
      perOrigin: HANDOVER_PER_CONNECTION * this.#opts.maxInFlightPerOrigin,
      perOwner: this.#opts.maxInFlightPerClient,
    });
    deps.registry.listen({
      onRequested: (id) => {
        // A new handshake starts a new schedule: a retry due for the one before is dropped.
        this.#forgetHandshake(id);
        this.#track(this.#handshake(id));
        this.#scheduleEnd(id);
      },
      onActivated: (id) => {
        // Everything pending goes: while the subscription was not active nothing was sent.
        if (this.#leases === undefined) this.#lane(id).rescan = true;
        this.#wake(id, true);
      },
      onRemoved: (id, before) => {
        this.#forgetHandshake(id);
        this.#forget(id);
        this.#letGoOfSockets(before);
      },
      onChanged: (id, before) => {
        // Whatever changed (endpoint, headers, secret, status), the rest of the run goes out as the subscription is now.
        this.#lanes.get(id)?.run?.stop();
        this.#scheduleHeartbeat(id);
        this.#scheduleEnd(id);
        this.#letGoOfSockets(before);
      },
      beforeRequeue: (id) => this.#pauseForRequeue(id),
      onRequeued: (id) => this.requeued(id),
    });
  }

  /** Resume after a restart: handshakes still owed, and every lane with pending notifications. */
  async start(): Promise<void> {
    // On AWS every scheduled run starts: a handshake due again later in this instance is left to
    // its timer; one whose time has come (a timer held over by a frozen container) goes now.
    const now = this.#clock.now();
    for (const sub of this.#registry.all()) {
      if (sub.status !== 'requested') continue;
      const retry = this.#handshakeRetries.get(sub.id);
      if (retry !== undefined && retry.dueAt > now) continue;
      this.#dropHandshakeRetry(sub.id);
      this.#track(this.#handshake(sub.id));
    }
    for (const id of await this.#store.subscriptionsWithPending()) {
      // On its own store a starting process is the only sender: everything pending goes. On a
      // shared one (AWS: the scheduled dispatcher, every minute) the lane reads under its lease.
      if (this.#leases === undefined) this.#lane(id).rescan = true;
      this.#wake(id, true);
    }
    for (const sub of this.#registry.all()) {
      this.#scheduleHeartbeat(sub.id);
      this.#scheduleEnd(sub.id);
    }
    // Not awaited: after a long stop the first purge may be big, and start-up (the server's signal
    // handlers, a Lambda's deliveries) must not wait for it. `idle` and `close` do.
    this.#startPurge();
    if (this.#purgeTimer === undefined) {
      this.#purgeTimer = setInterval(() => this.#startPurge(), PURGE_INTERVAL_MS);
      this.#purgeTimer.unref();
    }
  }

  /** Hand over notifications that were just committed. */
  enqueue(notifications: readonly Notification[], acceptedAt: number): void {
    const touched = new Set<string>();
    if (this.#leases !== undefined) {
      // A store shared by instances: the lane reads what the store holds, under its lease (numbers
      // interleave with other instances', and an earlier one may still be written elsewhere).
      for (const n of notifications) touched.add(n.subscriptionId);
      for (const id of touched) this.#wake(id, true);
      return;
    }
    for (const n of notifications) {
      const lane = this.#lane(n.subscriptionId);
      if (
        n.eventNumber <= lane.done ||
        (n.eventNumber <= lane.queuedThrough && lane.queue.some((q) => q.note.eventNumber === n.eventNumber))
      )
        continue;
      if (lane.reloading) {
        // A reload is reading the store right now and may or may not see this one: read again after it.
        lane.missed = true;
      } else if (lane.backlog || lane.queue.length >= this.#laneBuffer(n.subscriptionId)) {
        lane.backlog = true;
      } else {
        const { subscriptionId, eventNumber, change } = n;
        lane.queue.push({
          note: { subscriptionId, eventNumber, change, state: 'pending', attempts: 0, dueAt: acceptedAt },
          acceptedAt,
        });
        lane.queuedThrough = Math.max(lane.queuedThrough, eventNumber);
      }
      touched.add(n.subscriptionId);
    }
    for (const id of touched) this.#wake(id, false);
  }

  /**
   * Resolves once nothing is in flight (or `timeoutMs` passed) and delivery states are written:
   * a Lambda invocation awaits this before returning, since a frozen container sends nothing.
   */
  async idle(timeoutMs: number): Promise<void> {
    const deadline = this.#clock.now() + timeoutMs;
    while (this.#running.size > 0 && this.#clock.now() < deadline) {
      const left = deadline - this.#clock.now();
      await Promise.race([Promise.allSettled([...this.#running]), new Promise((r) => setTimeout(r, left).unref())]);
    }
    await this.#states.flush();
  }

  /**
   * For a Lambda invocation, which is killed at its timeout and frozen once it returns: every
   * attempt under way or made from now on is over within `ms` (undefined: no bound). One not
   * answered by then counts as failed (a timeout: recorded, and retried on the schedule) and its
   * late answer is ignored; none starts after it (a lane stops, its notifications stay pending in
   * the store for the next scheduled run). Stays in force until called again: a timer that fires
   * after the invocation (or as a frozen container thaws, before the next one sets its own) starts
   * no attempt that nobody waits for.
   */
  endAttemptsWithin(ms: number | undefined): void {
    this.#attemptsEndAt = ms === undefined ? undefined : performance.now() + ms;
  }

  /** Milliseconds left for attempts in this invocation (Infinity: no bound). */
  #timeLeft(): number {
    return this.#attemptsEndAt === undefined ? Number.POSITIVE_INFINITY : this.#attemptsEndAt - performance.now();
  }

  /**
   * One attempt within the in-flight caps (`#withSlot`) and the invocation's time for attempts:
   * `send()` once it has a slot, unless that time is over by then. Answers undefined for one that
   * never started (no slot in time, or the time was over: nothing sent, nothing to record, the
   * next run makes it), and `cut()` for one that started and had no answer shortly after the time
   * was over (a failed attempt; its late answer is ignored). Per attempt, so a slot granted after
   * the cut (even in a later invocation) starts nothing nobody waits for.
   */
  #attempt<T>(sub: SubscriptionRecord, send: () => Promise<T>, cut: () => T): Promise<T | undefined> {
    let started = false;
    let cutOff = false;
    const attempt = this.#withSlot(sub, (): Promise<T | undefined> => {
      if (cutOff || this.#timeLeft() <= 0) return Promise.resolve(undefined);
      started = true;
      return send();
    });
    const left = this.#timeLeft();
    if (left === Number.POSITIVE_INFINITY) return attempt;
    return new Promise<T | undefined>((resolve, reject) => {
      const timer = setTimeout(() => {
        cutOff = true;
        resolve(started ? cut() : undefined);
      }, Math.max(left, 0) + CUT_GRACE_MS);
      attempt.then(
        (value) => {
          clearTimeout(timer);
          resolve(value);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err);
        },
      );
    });
  }

  /**
   * For a scheduler that runs every `windowMs` (the AWS dispatcher function): send a heartbeat to
   * each subscription whose heartbeat period boundary fell within the last window. Stateless, so
   * any instance may run it; granularity is the window.
   */
  async sendDueHeartbeats(windowMs: number): Promise<number> {
    const now = this.#clock.now();
    const due = [...this.#registry.all()].filter((sub) => {
      const period = (sub.channel.heartbeatPeriodSeconds ?? 0) * 1000;
      if (period === 0 || !heartbeatsAllowed(sub) || this.#pausedFor(sub) > 0) return false;
      return Math.floor(now / period) !== Math.floor((now - windowMs) / period);
    });
    // Within the invocation's time for attempts: one the endpoint has not answered by then fails
    // (the next run sends the next heartbeat), so a slow endpoint cannot hold the run.
    await Promise.all(
      due.map(async (sub) => {
        const result = await this.#attempt(
          sub,
          () => this.#sendBundle(sub, 'heartbeat', [], `${sub.id}-heartbeat-${now}`),
          () => ATTEMPT_CUT,
        );
        if (result !== undefined) await this.#heartbeatAnswered(sub, result);
      }),
    );
    return due.length;
  }

  get outboxDepth(): number {
    let depth = 0;
    for (const lane of this.#lanes.values()) depth += lane.queue.length;
    return depth;
  }

  /** Stop taking new work, let in-flight attempts finish within `graceMs`, persist what is known. */
  async close(graceMs = 5000): Promise<void> {
    this.#closed = true;
    clearInterval(this.#purgeTimer);
    this.#purgeAbort.abort();
    for (const lane of this.#lanes.values()) {
      clearTimeout(lane.timer);
      clearTimeout(lane.heartbeat);
    }
    for (const timer of this.#endTimers.values()) clearTimeout(timer);
    for (const retry of this.#handshakeRetries.values()) clearTimeout(retry.timer);
    this.#limiter.close();
    this.#sender.stop();
    await Promise.race([Promise.allSettled([...this.#running]), new Promise((r) => setTimeout(r, graceMs).unref())]);
    await this.#states.close();
  }

  #lane(id: string): Lane {
    let lane = this.#lanes.get(id);
    if (lane === undefined) {
      lane = new Lane();
      this.#lanes.set(id, lane);
    }
    return lane;
  }

  /**
   * Only a subscription that was or is a websocket one, or is gone, can have sockets to let go of
   * (on AWS, finding them is a query): a bind that raced a change may have left one behind.
   */
  #letGoOfSockets(before: SubscriptionRecord): void {
    const now = this.#registry.get(before.id);
    const maybe = before.channel.type === 'websocket' || now === undefined || now.channel.type === 'websocket';
    if (maybe && this.#websocket !== undefined) this.#track(this.#websocket.subscriptionChanged(before.id));
  }

  #forget(id: string): void {
    clearTimeout(this.#endTimers.get(id));
    this.#endTimers.delete(id);
    const lane = this.#lanes.get(id);
    if (lane !== undefined) {
      clearTimeout(lane.timer);
      clearTimeout(lane.heartbeat);
      lane.run?.stop();
    }
    this.#lanes.delete(id);
  }

  #wake(id: string, reload: boolean): void {
    if (this.#closed) return;
    const lane = this.#lane(id);
    if (reload) lane.backlog = true;
    if (lane.running) {
      lane.wokenWhileRunning = true;
      return;
    }
    clearTimeout(lane.timer);
    lane.timer = undefined;
    const leases = this.#leases;
    this.#track(leases === undefined ? this.#drain(id, lane) : this.#drainLeased(id, lane, leases));
  }

  /** Every background task is tracked (for idle/close) and can never become an unhandled rejection. */
  #track(p: Promise<unknown>): void {
    const q = p.catch((err: unknown) => {
      if (!(err instanceof LimiterClosedError)) this.#logger.error('dispatcher task failed', { err: err as Error });
    });
    this.#running.add(q);
    void q.finally(() => this.#running.delete(q));
  }

  async #drain(id: string, lane: Lane): Promise<void> {
    lane.running = true;
    try {
      while (!this.#closed && this.#lanes.get(id) === lane && !lane.paused) {
        const sub = this.#registry.get(id);
        if (sub === undefined || sub.status !== 'active') return;
        if ((lane.queue.length === 0 && lane.backlog) || lane.rescan) {
          await this.#reload(id, lane);
          // From the top: the client may have deleted or changed the subscription during the read
          // (there was no run yet to stop), and notifications committed meanwhile set `missed`
          // (their wake-up found this lane running), so the store is read again.
          continue;
        }
        const head = lane.queue[0];
        if (head === undefined) return;
        const now = this.#dueNow(sub, lane, head);
        // Not due yet (a timer wakes the lane), or the invocation's time for attempts is over (the
        // rest stays pending for a later run).
        if (now === undefined || this.#timeLeft() <= 0) return;
        if (!(await this.#sendRun(sub, lane, now))) return;
      }
    } catch (err) {
      this.#laneFailed(id, err);
    } finally {
      this.#endRunning(id, lane);
    }
  }

  /** The lane's loop ends: a heartbeat that fell due meanwhile is scheduled now (sent at once if nothing got through). */
  #endRunning(id: string, lane: Lane): void {
    lane.running = false;
    if (!lane.heartbeatOwed) return;
    lane.heartbeatOwed = false;
    if (this.#lanes.get(id) === lane) this.#scheduleHeartbeat(id, true);
  }

  /**
   * A lane on a store shared by instances (`LaneLeases`): it sends only while it holds the
   * subscription's lease, and only what a consistent read of the store finds pending above the
   * shared watermark, strictly upwards (it stops below a number taken but not yet written
   * elsewhere: whoever writes it makes the holder read again). With nothing to send now it lets
   * go, unless another instance asked for the lane meanwhile: then it reads again first, so what
   * that instance committed is never left behind.
   */
  async #drainLeased(id: string, lane: Lane, leases: LaneLeases): Promise<void> {
    lane.running = true;
    lane.wokenWhileRunning = false;
    try {
      while (!this.#closed && this.#lanes.get(id) === lane && !lane.paused && this.#timeLeft() > 0) {
        // Wakes from here on (an event committed here, a timer) are this turn's to answer.
        lane.wokenWhileRunning = false;
        const sub = this.#registry.get(id);
        if (sub === undefined || sub.status !== 'active') return;
        if (!(await this.#holdLane(id, lane, leases))) return;
        if (lane.queue.length === 0 && lane.backlog) {
          lane.backlog = false;
          // Outcomes recorded here first, so the read sees them.
          await this.#states.flush();
          const { read, limit } = await readWholeHead(this.#laneBuffer(id), (n) =>
            leases.read(id, lane.done, n, this.#clock.now()),
          );
          lane.done = Math.max(lane.done, read.through);
          const full = read.notes.length === limit;
          const notes = wholeBundles(read.notes, full);
          lane.queue = notes.map((note) => ({ note, ...(note.attempts === 0 ? { acceptedAt: note.dueAt } : {}) }));
          // A wake during the read (an event committed here) keeps the backlog set: read again after these.
          lane.backlog ||= full;
          // (A bundle left for the next read stands between these and any missing number.)
          lane.voidableAt = notes.length === read.notes.length ? read.voidableAt : undefined;
          continue;
        }
        const head = lane.queue[0];
        const now = head === undefined ? undefined : this.#dueNow(sub, lane, head);
        if (now !== undefined) {
          // Not once the lease is too short for a whole run (a run that waited long for a
          // connection slot): the next turn renews it first, or finds it lost.
          if (!(await this.#sendRun(sub, lane, now, () => lane.heldUntil - this.#clock.now() > RUN_UNDER_LEASE_MS)))
            return;
          continue;
        }
        // Nothing to send now. Stopped below a missing number that may be voided by now (or was
        // just written): read again.
        const voidableAt = head === undefined ? lane.voidableAt : undefined;
        if (voidableAt !== undefined && voidableAt <= this.#clock.now()) {
          lane.backlog = true;
          continue;
        }
        // Let go, unless another instance asked meanwhile (then read again), or this one was woken
        // meanwhile (an event committed here, a timer): then take the lane again and go on.
        if (await this.#letGo(id, lane, leases, true)) continue;
        if (lane.wokenWhileRunning) continue;
        // Below a missing number: whoever writes it asks for the lane; if nobody does, read again
        // once it may be voided.
        if (voidableAt !== undefined) this.#wakeAt(id, lane, voidableAt);
        return;
      }
    } catch (err) {
      this.#laneFailed(id, err);
    } finally {
      // Stopped (a retry to wait for, time over, closing, the subscription changed, the lane held
      // elsewhere): let go as it is, still running, so no second loop starts on a lease this one is
      // letting go. A wake since this turn began (an event committed here while the lane was taken
      // elsewhere, say) starts one after: the holder may have read before that event was written.
      if (lane.hold !== undefined) {
        await this.#letGo(id, lane, leases, false).catch((err: unknown) =>
          this.#logger.error('dispatcher lane lease not released', { subscription: id, err: err as Error }),
        );
      }
      this.#endRunning(id, lane);
      const woken = lane.wokenWhileRunning;
      lane.wokenWhileRunning = false;
      // Never from here on the stack (a loop that cannot run, its time over, must not wake itself
      // again and again), and not once the time for attempts is over: a later run sends it.
      if (woken && this.#lanes.get(id) === lane && this.#timeLeft() > 0) setImmediate(() => this.#wake(id, false));
    }
  }

  /** Wakes the lane (to read the store) at clock time `at`, in place of any timer it had. */
  #wakeAt(id: string, lane: Lane, at: number): void {
    // A wake in case another instance does not come through: it holds no process open.
    this.#wakeIn(id, lane, at - this.#clock.now(), true)?.unref();
  }

  /** The lane's one timer: wakes it in `ms` (capped at what a timer takes), in place of any it had; none once closed. */
  #wakeIn(id: string, lane: Lane, ms: number, reload: boolean): NodeJS.Timeout | undefined {
    clearTimeout(lane.timer);
    lane.timer = undefined;
    if (this.#closed) return undefined;
    lane.timer = setTimeout(() => this.#wake(id, reload), Math.min(Math.max(ms, 0), MAX_TIMER_MS));
    return lane.timer;
  }

  /** A lane's loop ended by an error: logged (a closing limiter is no error); its notifications stay pending. */
  #laneFailed(id: string, err: unknown): void {
    if (!(err instanceof LimiterClosedError))
      this.#logger.error('dispatcher lane failed', { subscription: id, err: err as Error });
  }

  /** Takes the lane's lease, or renews it when due; false when another instance holds it (it reads again for this one). */
  async #holdLane(id: string, lane: Lane, leases: LaneLeases): Promise<boolean> {
    const now = this.#clock.now();
    const held = lane.hold;
    if (held === undefined) {
      const hold = await leases.take(id, this.#holder, now, now + LEASE_MS);
      if (!('through' in hold)) {
        // The holder reads again before it lets go; should it die instead, take over once its lease
        // ran out. (Or a re-queue is under way: whoever re-queued takes it when done.) Re-queued
        // here: the holder may let go without reading again (it finds the subscription waiting for
        // its handshake), so ask again sooner.
        lane.queue = [];
        const at = hold.heldUntil + 1000;
        this.#wakeAt(id, lane, lane.requeuedHere ? Math.min(at, now + REQUEUED_RECHECK_MS) : at);
        return false;
      }
      // Re-queued since this instance last held the lane (or ever, if it never did): re-activated,
      // so the subscription as it is now (a new endpoint, say), not as this instance's cache has it.
      const requeued = hold.epoch !== (lane.epochSeen ?? 0);
      this.#adopt(lane, hold, now);
      if (requeued) await this.#registry.refresh([id]);
      return true;
    }
    if (!lane.recheck && lane.heldUntil - now > LEASE_MS - RENEW_AFTER_MS) return true;
    lane.recheck = false;
    await this.#states.flush();
    const hold = await leases.renew(id, this.#holder, held, lane.done, now + LEASE_MS, now);
    if (hold === undefined || !('through' in hold)) {
      // Ran out and taken by another instance: it sends from here on. Or let go to a re-queue (a
      // re-activation, perhaps in another instance) under way: whoever re-queued sends once the
      // subscription is written; woken in case it died before.
      lane.hold = undefined;
      lane.queue = [];
      if (hold?.requeuing === true) {
        lane.requeuedAway = true;
        if (hold.heldUntil > now) this.#wakeAt(id, lane, hold.heldUntil + 1000);
      }
      return false;
    }
    await this.#stillHeld(id, lane, held, hold, now);
    return true;
  }

  /**
   * The lease is still this lane's, as `hold` says (renewed, or kept to read again): extended; if
   * a re-queue gave it a new epoch meanwhile, the lane starts over from its lowered watermark.
   */
  async #stillHeld(id: string, lane: Lane, held: LaneHold, hold: LaneHold, now: number): Promise<void> {
    if (hold.epoch !== held.epoch) {
      this.#adopt(lane, hold, now);
      // Re-queued by a re-activation, perhaps in another instance: the subscription as it is now
      // (a new endpoint, waiting for its handshake), not as this instance's cache last read it.
      await this.#registry.refresh([id]);
      return;
    }
    lane.hold = hold;
    lane.heldUntil = now + LEASE_MS;
  }

  /**
   * Under a lease: still at re-queue epoch `epoch` (renewed to find out), or lost (but not to a
   * re-queue), or the renew failed (nothing learnt: the failure is recorded all the same, and the
   * store's epoch condition keeps it from undoing a re-queue).
   */
  async #sameEpoch(id: string, lane: Lane, epoch: number): Promise<boolean> {
    const leases = this.#leases;
    if (leases === undefined || lane.hold === undefined) return true;
    lane.recheck = true;
    lane.requeuedAway = false;
    try {
      if (!(await this.#holdLane(id, lane, leases))) return !lane.requeuedAway;
    } catch (err) {
      this.#logger.warn('dispatcher lane lease not renewed; recording the failed attempt', {
        subscription: id,
        err: err as Error,
      });
      return true;
    }
    return lane.hold?.epoch === epoch;
  }

  /** A lease taken, or found re-queued: the lane starts over from its watermark. */
  #adopt(lane: Lane, hold: LaneHold, now: number): void {
    lane.hold = hold;
    lane.epochSeen = hold.epoch;
    lane.requeuedHere = false;
    lane.heldUntil = now + LEASE_MS;
    lane.done = hold.through;
    lane.queue = [];
    lane.backlog = true;
    lane.recheck = false;
  }

  /**
   * Lets the lane's lease go with its watermark (the delivery states written first, so the next
   * holder reads them). With `keep`, a request to read again (or a re-queue) keeps it: true, read again.
   */
  async #letGo(id: string, lane: Lane, leases: LaneLeases, keep: boolean): Promise<boolean> {
    const held = lane.hold;
    if (held === undefined) return false;
    await this.#states.flush();
    const now = this.#clock.now();
    const hold = await leases.release(id, this.#holder, held, lane.done, keep ? now + LEASE_MS : undefined, now);
    if (hold === undefined) {
      lane.hold = undefined;
      return false;
    }
    await this.#stillHeld(id, lane, held, hold, now);
    lane.backlog = true;
    return true;
  }

  /**
   * The clock time to send the head at, or undefined when it is not due yet (a timer wakes the
   * lane then). A retry this process scheduled is due when its own (monotonic) time has passed: a
   * wall clock stepped back meanwhile would otherwise hold the lane for the length of the step.
   */
  #dueNow(sub: SubscriptionRecord, lane: Lane, head: QueuedNotification): number | undefined {
    const now = this.#clock.now();
    let due = now;
    if (head.note.dueAt > now) {
      const own = lane.retry?.dueAt === head.note.dueAt ? lane.retry : undefined;
      const left = own === undefined ? head.note.dueAt - now : own.at - performance.now();
      if (left > 0) {
        this.#wakeIn(sub.id, lane, left, false);
        return undefined;
      }
      due = head.note.dueAt;
    }
    // Due, but its origin asked this client for a pause: no attempt now, none counted. The head
    // is due again when the pause ends, in the store too: under lane leases (AWS) the instance
    // that reads it next may not know of the pause.
    const paused = this.#pausedFor(sub);
    if (paused > 0) {
      const dueAt = now + paused;
      // A failed bundle moves whole with its head (what takeRun would send as its first bundle):
      // moved alone, the head would no longer share the failure's due time with the rest, and the
      // bundle would go out split, under new ids. A head not yet attempted moves alone.
      const bundle =
        head.note.attempts === 0
          ? 1
          : (takeRun(lane.queue, sub.channel.maxCount ?? 1, 1, Number.POSITIVE_INFINITY, this.#carries(sub))[0]
              ?.length ?? 1);
      const moved = lane.queue.slice(0, bundle).map((q) => ({ ...q, note: { ...q.note, dueAt } }));
      lane.queue.splice(0, bundle, ...moved);
      this.#recordBundle(moved, (note) => ({ ...note, laneEpoch: lane.hold?.epoch }));
      lane.retry = { dueAt, at: performance.now() + paused };
      this.#wakeIn(sub.id, lane, paused, false);
      return undefined;
    }
    return due;
  }

  #pauseKey(sub: SubscriptionRecord): string | undefined {
    return sub.channel.type === 'rest-hook' ? `${sub.owner}\n${this.#originOf(sub.channel.endpoint)}` : undefined;
  }

  /** How long the subscription's origin has asked its client to wait yet (ms; 0: not paused). */
  #pausedFor(sub: SubscriptionRecord): number {
    if (this.#originPauses.size === 0) return 0;
    const key = this.#pauseKey(sub);
    const until = key === undefined ? undefined : this.#originPauses.get(key);
    if (key === undefined || until === undefined) return 0;
    const left = until - performance.now();
    if (left > 0) return left;
    this.#originPauses.delete(key);
    return 0;
  }

  /**
   * A 429 or 503 with Retry-After: the client's other subscriptions at that origin wait as long
   * (at most MAX_ORIGIN_PAUSE_MS). The answered subscription's own retry waits all of it (#settle).
   */
  #pauseOrigin(sub: SubscriptionRecord, result: SendResult): void {
    const asked = result.ok ? undefined : result.retryAfterMs;
    if ((result.status !== 429 && result.status !== 503) || asked === undefined || asked <= 0) return;
    const key = this.#pauseKey(sub);
    if (key === undefined) return;
    const ms = Math.min(asked, MAX_ORIGIN_PAUSE_MS);
    const now = performance.now();
    if ((this.#originPauses.get(key) ?? 0) >= now + ms) return;
    // Pauses over are forgotten here (set rarely) as well as when read, so the map holds only
    // live ones, whatever became of the subscriptions that set them.
    for (const [k, until] of this.#originPauses) if (until <= now) this.#originPauses.delete(k);
    this.#originPauses.set(key, now + ms);
    this.#metrics.inc('broker_origin_pauses_total');
    this.#logger.info('endpoint origin asked for a pause', {
      subscription: sub.id,
      owner: sub.owner,
      origin: this.#originOf(sub.channel.endpoint),
      status: result.status,
      pauseMs: Math.round(ms),
    });
  }

  /**
   * Sends one run from the head of the lane's queue and applies its outcomes; false when the lane
   * must stop. `mayStart`, asked once the run has a connection slot: false sends nothing (and
   * changes nothing).
   */
  async #sendRun(
    sub: SubscriptionRecord,
    lane: Lane,
    now: number,
    mayStart: () => boolean = () => true,
  ): Promise<boolean> {
    let batches = takeRun(lane.queue, sub.channel.maxCount ?? 1, RUN_LENGTH, now, this.#carries(sub));
    const generation = lane.generation;
    const epoch = lane.hold?.epoch;
    const run = new RunStop();
    lane.run = run;
    let results: SendResult[];
    try {
      if (marksBundles(sub)) {
        let marked: QueuedNotification[][] | undefined;
        try {
          marked = await this.#markBundles(sub.id, lane, batches);
        } catch (err) {
          // Nothing is sent unmarked: the lane tries again shortly (its notifications stay pending).
          this.#logger.warn('could not store where bundles end; the lane tries again shortly', {
            subscription: sub.id,
            err: err as Error,
          });
          if (!this.#closed && this.#lanes.get(sub.id) === lane) this.#wakeIn(sub.id, lane, MARK_RETRY_MS, false);
          return false;
        }
        // Rebuilt meanwhile (a re-queue): the loop starts over from the lane as it is now.
        if (lane.generation !== generation) return true;
        if (marked === undefined) {
          // A mark the store holds is not the one this lane read (on AWS, another holder sent from
          // the lane meanwhile): read the lane again, from the store.
          this.#rebuild(lane);
          return true;
        }
        batches = marked;
      }
      // Cut when the invocation's time for attempts is over: a run under way counts its first
      // bundle as failed (one it delivered before the cut goes again under its webhook-id) and
      // starts no more; one that never got a slot sends nothing and stays queued, its attempts
      // unchanged (the loop then stops: the time is over).
      results =
        (await this.#attempt(
          sub,
          () => (mayStart() ? this.#sendNotifications(sub, batches, run) : Promise.resolve([])),
          () => {
            run.stop();
            return [ATTEMPT_CUT];
          },
        )) ?? [];
    } finally {
      lane.run = undefined;
    }
    for (const [i, result] of results.entries()) {
      const batch = batches[i] as QueuedNotification[];
      if (!(await this.#settle(sub, lane, batch, result, lane.generation === generation, epoch))) return false;
    }
    return true;
  }

  /**
   * Before a run's first attempt, where each of its bundles ends is stored (on the bundle's first
   * notification, `bundleLast`), unless it is already: a webhook-id names a bundle's first and
   * last event numbers, and without the mark a restart (or, on AWS, the next holder of the lane)
   * would group what it reads back with what arrived since, and send events the endpoint may
   * already have under another id. A stored mark is kept when the bundle holds every queued
   * notification within it (those missing were recorded done: the bundle goes again under its
   * first id, and its endpoint, which had it, deduplicates); one the bundle ends before (the client
   * lowered `max-count`) is replaced. Answers the batches with their heads marked, as the queue
   * now holds them, or undefined when the store holds another mark than the one read (see
   * `BundleMark.previous`). (With `max-count` 1 every bundle is one notification: nothing to store.)
   */
  async #markBundles(
    id: string,
    lane: Lane,
    batches: QueuedNotification[][],
  ): Promise<QueuedNotification[][] | undefined> {
    const marks: BundleMark[] = [];
    let end = 0;
    for (const batch of batches) {
      const head = (batch[0] as QueuedNotification).note;
      const last = (batch[batch.length - 1] as QueuedNotification).note.eventNumber;
      end += batch.length;
      const after = lane.queue[end]?.note.eventNumber ?? Number.POSITIVE_INFINITY;
      const kept = head.bundleLast !== undefined && head.bundleLast >= last && after > head.bundleLast;
      if (!kept) {
        const previous = head.bundleLast === undefined ? {} : { previous: head.bundleLast };
        marks.push({ subscriptionId: id, eventNumber: head.eventNumber, last, ...previous });
      }
    }
    if (marks.length === 0) return batches;
    const generation = lane.generation;
    const first = batches[0]?.[0];
    // On a store shared by instances each mark is its own write: this lane's alone, so it waits for
    // nobody else's (on SQLite, one transaction for the marks of every lane starting a run now).
    const written = await (this.#leases === undefined ? this.#writeMarks(marks) : this.#store.markBundles(marks));
    // Rebuilt meanwhile (a re-queue): the caller sees it and starts over.
    if (lane.generation !== generation) return batches;
    // Refused (the store holds another mark than the one read), or the queue changed meanwhile:
    // read the lane again rather than send with a mark the store may not hold.
    if (written.includes(false) || lane.queue[0] !== first) return undefined;
    const lasts = new Map(marks.map((m) => [m.eventNumber, m.last]));
    let at = 0;
    return batches.map((batch) => {
      const start = at;
      at += batch.length;
      const head = batch[0] as QueuedNotification;
      const last = lasts.get(head.note.eventNumber);
      if (last === undefined) return batch;
      const marked: QueuedNotification = { ...head, note: { ...head.note, bundleLast: last } };
      lane.queue[start] = marked;
      return [marked, ...batch.slice(1)];
    });
  }

  /**
   * The marks of every lane starting a run in this turn of the event loop, in one store write (a
   * group commit wakes many lanes at once): resolves, once they are all written, with whether each
   * of `marks` was.
   */
  async #writeMarks(marks: readonly BundleMark[]): Promise<boolean[]> {
    const from = this.#marks.length;
    for (const m of marks) this.#marks.push(m);
    this.#marksWritten ??= new Promise<void>((resolve) => setImmediate(resolve)).then(() => {
      const all = this.#marks;
      this.#marks = [];
      this.#marksWritten = undefined;
      return this.#store.markBundles(all);
    });
    return (await this.#marksWritten).slice(from, from + marks.length);
  }

  /** The lane forgets what it holds and reads it again from the store. */
  #rebuild(lane: Lane): void {
    lane.queue = [];
    lane.backlog = true;
    lane.generation++;
    if (this.#leases !== undefined) {
      lane.recheck = true;
    } else {
      lane.queuedThrough = 0;
      lane.rescan = true;
    }
  }

  /**
   * Reads the lane's backlog from the store (this process its only sender): the pending
   * notifications above what this lane delivered, or, on a rescan, all of them from the lowest
   * number. A rescan first writes the delivery states still waiting in the write-behind, so a row
   * read as pending is one no attempt of this process delivered.
   */
  async #reload(id: string, lane: Lane): Promise<void> {
    lane.reloading = true;
    lane.missed = false;
    const rescan = lane.rescan;
    lane.rescan = false;
    const generation = lane.generation;
    let rows: StoredNotification[];
    let limit: number;
    try {
      if (rescan) await this.#states.flush();
      ({
        read: { notes: rows },
        limit,
      } = await readWholeHead(this.#laneBuffer(id), async (n) => ({
        notes: await this.#store.pendingNotifications(id, rescan ? 0 : lane.done, n),
      })));
    } finally {
      lane.reloading = false;
    }
    const full = rows.length === limit;
    rows = wholeBundles(rows, full);
    // Rebuilt (`requeued`) meanwhile: this read may predate the re-queue; the next one will not.
    if (lane.generation !== generation) return;
    const queued = new Set(lane.queue.map((q) => q.note.eventNumber));
    for (const note of rows) {
      if (queued.has(note.eventNumber)) continue;
      lane.queue.push({ note });
      lane.queuedThrough = Math.max(lane.queuedThrough, note.eventNumber);
    }
    lane.queue.sort((a, b) => a.note.eventNumber - b.note.eventNumber);
    lane.backlog = full || lane.missed;
  }

  /**
   * Dead letters of `id` were put back in the queue (re-activation): forget what the lane holds
   * and rebuild it from the store, so they go out first and in order.
   */
  requeued(id: string): void {
    const lane = this.#lane(id);
    clearTimeout(lane.timer);
    lane.timer = undefined;
    lane.paused = false;
    // (Rebuilt without a lease, the read is a rescan: an attempt on the wire now records its outcome
    // after this, and the read waits for that write.)
    this.#rebuild(lane);
    if (this.#leases !== undefined) {
      // The store lowered the lease's watermark at a new epoch: the next run takes it afresh (this
      // instance's hold, if it had one, is let go by then, or taken again as its own).
      lane.hold = undefined;
      lane.requeuedHere = true;
    } else {
      lane.done = 0;
    }
    // (A subscription not active, the usual case as it waits for its handshake, sends nothing yet.)
    this.#wake(id, true);
  }

  /**
   * Before a re-queue (re-activation): the lane stops sending until `requeued`, and an attempt
   * that settles from here on counts as one the re-queue started over (pending, no attempt
   * counted), whichever of the two the store writes first: one the old endpoint fails for good
   * in that window would otherwise be dead-lettered after the re-queue and stay dead. Then the
   * delivery states so far are written, for the re-queue to read.
   */
  #pauseForRequeue(id: string): Promise<void> {
    const lane = this.#lane(id);
    lane.run?.stop();
    clearTimeout(lane.timer);
    lane.timer = undefined;
    lane.paused = true;
    lane.queue = [];
    lane.generation++;
    return this.flush();
  }

  /** Write pending delivery states now (before a requeue reads them, for one). */
  flush(): Promise<void> {
    return this.#states.flush();
  }

  /**
   * Apply an attempt's outcome; true when the lane may go on sending now. `current`: the lane was
   * not rebuilt while the attempt was on the wire (else only the outcome is recorded).
   */
  async #settle(
    sub: SubscriptionRecord,
    lane: Lane,
    batch: QueuedNotification[],
    result: SendResult,
    current: boolean,
    epoch?: number,
  ): Promise<boolean> {
    // Left as it was (still pending, its attempts unchanged): the restart sends it again.
    if (this.#cutByShutdown(result)) return false;
    const now = this.#clock.now();
    if (result.ok) {
      lane.lastSentAt = performance.now();
      if (current) retire(lane, batch);
      this.#recordBundle(batch, ({ subscriptionId, eventNumber, attempts }) => ({
        subscriptionId,
        eventNumber,
        state: 'delivered',
        attempts: attempts + 1,
        dueAt: now,
      }));
      for (const { acceptedAt } of batch) {
        if (acceptedAt !== undefined)
          this.#metrics.observe('broker_delivery_latency_seconds', (now - acceptedAt) / 1000);
      }
      this.#metrics.inc('broker_notifications_total', { outcome: 'delivered' }, batch.length);
      return true;
    }
    // Under a lease, a re-queue in another instance (the client re-activated the subscription
    // there) is learnt from the lease: then this attempt counts as one the re-queue started over.
    if (current && epoch !== undefined && !(await this.#sameEpoch(sub.id, lane, epoch))) current = false;
    const attempts = (batch[0]?.note.attempts ?? 0) + 1;
    this.#logger.warn('delivery failed', {
      subscription: sub.id,
      eventNumbers: batch.map((q) => q.note.eventNumber),
      attempt: attempts,
      error: result.error,
    });
    // A 410 turns the subscription off only while it still has the endpoint that answered it:
    // otherwise the client moved it meanwhile and the notification is retried like any failure, at
    // the endpoint it has now.
    if (await this.#offIfGone(sub, result)) {
      this.#metrics.inc('broker_notifications_total', { outcome: 'gone' }, batch.length);
      return false;
    }
    this.#pauseOrigin(sub, result);
    // Retry-After may ask for a longer pause, never for more attempts or a shorter one.
    const scheduled = result.permanent ? undefined : nextRetryDelay(this.#opts.retryDelaysMs, attempts, this.#random());
    const delay = scheduled === undefined ? undefined : Math.max(scheduled, result.retryAfterMs ?? 0);
    if (!current) {
      // The client re-activated the subscription while this attempt was on the wire: the
      // re-activation put its dead letters back in the queue and started its retries over, so this
      // one starts over with them (no attempt counted, due now) rather than keep the old endpoint's
      // schedule, or die after them if it was the last (dead until the next re-activation). The
      // rebuilt lane reads it from the store, after this state (its rescan, or under a lease its next
      // read, writes what is waiting first).
      this.#recordBundle(batch, ({ subscriptionId, eventNumber }) => ({
        subscriptionId,
        eventNumber,
        state: 'pending',
        attempts: 0,
        dueAt: now,
        lastError: result.error,
      }));
      this.#metrics.inc('broker_notifications_total', { outcome: 'retried' }, batch.length);
      return true;
    }
    if (delay === undefined) {
      const doneBefore = lane.done;
      retire(lane, batch);
      this.#recordBundle(batch, (note) => ({
        ...note,
        state: 'dead',
        attempts,
        dueAt: now,
        lastError: result.error,
        laneEpoch: epoch,
      }));
      // Under a lease the dead letter is written only at the epoch the attempt began in: when the
      // renew before it failed (nothing learnt), a re-queue may have voided it, and the subscription,
      // re-activated since, must not go to `error` for the old endpoint's failure.
      if (epoch !== undefined && !(await this.#deadLettered(sub.id, batch))) {
        // Not in the store as dead: re-queued since (pending again, read at the new epoch), or the
        // write failed (pending as the last retry left it). Either way the shared watermark must
        // not pass it, or no lane would read it again, and the subscription stays active with
        // nothing to tell the client: the lane reads it again shortly (once more attempted, then
        // dead-lettered again, or sent to where the re-activation moved it).
        lane.done = doneBefore;
        lane.queue = [];
        lane.backlog = true;
        if (this.#lanes.get(sub.id) === lane) this.#wakeIn(sub.id, lane, DEAD_LETTER_RECHECK_MS, true)?.unref();
        return false;
      }
      this.#metrics.inc('broker_notifications_total', { outcome: 'dead-lettered' }, batch.length);
      this.#lifecycle.publish({
        type: 'Notification Dead-Lettered',
        subscriptionId: sub.id,
        owner: sub.owner,
        eventNumbers: batch.map((q) => q.note.eventNumber),
        reason: result.error,
        time: new Date(now).toISOString(),
      });
      await this.#registry.transition(sub.id, {
        kind: 'delivery-exhausted',
        reason: `delivery failed after ${attempts} attempt(s): ${result.error}`,
      });
      return false;
    }
    const dueAt = now + delay;
    const failed = batch.map((q) => ({ ...q, note: { ...q.note, attempts, dueAt, lastError: result.error } }));
    failed.forEach((f, i) => {
      // (Not into a queue emptied meanwhile: a lease lost while the attempt was on the wire.)
      if (current && lane.queue[i] === batch[i]) lane.queue[i] = f;
    });
    this.#recordBundle(failed, (note) => ({ ...note, laneEpoch: epoch }));
    this.#metrics.inc('broker_notifications_total', { outcome: 'retried' }, batch.length);
    // A rebuilt lane reads the retry back from the store (its rescan, or under a lease its next read,
    // writes this state first).
    if (!current) return true;
    // Not for a lane forgotten meanwhile (the subscription was deleted): waking it would make a new one.
    if (!this.#closed && this.#lanes.get(sub.id) === lane) {
      lane.retry = { dueAt, at: performance.now() + delay };
      this.#wakeIn(sub.id, lane, delay, false);
    }
    return false;
  }

  /**
   * One state per notification of `batch`, all in one write of the state log (a bundle is never
   * part recorded), a marked first notification flagged to go last (`DeliveryUpdate.bundleHead`).
   */
  #recordBundle(batch: readonly QueuedNotification[], state: (note: StoredNotification) => DeliveryUpdate): void {
    this.#states.record(
      ...batch.map((q, i): DeliveryUpdate => {
        const update = state(q.note);
        return i === 0 && q.note.bundleLast !== undefined ? { ...update, bundleHead: true } : update;
      }),
    );
  }

  /**
   * The batch's dead letters are in the store (written now, with the delivery states before them);
   * false also when the store could not be read (as good as not written: the lane reads them again).
   */
  async #deadLettered(id: string, batch: readonly QueuedNotification[]): Promise<boolean> {
    const first = batch[0]?.note.eventNumber ?? 0;
    const last = batch.at(-1)?.note.eventNumber ?? 0;
    try {
      await this.#states.flush();
      // The batch may have gaps (a marked bundle resent in part): its own numbers, each dead.
      const rows = await this.#store.notificationsInRange(id, first, last, last - first + 1);
      const dead = new Set(rows.filter((r) => r.state === 'dead').map((r) => r.eventNumber));
      return batch.every((q) => dead.has(q.note.eventNumber));
    } catch (err) {
      this.#logger.warn('dead letter not confirmed in the store; its lane reads it again', {
        subscription: id,
        err: err as Error,
      });
      return false;
    }
  }

  async #handshake(id: string): Promise<void> {
    const sub = this.#registry.get(id);
    if (sub === undefined || sub.status !== 'requested' || this.#closed) return;
    if (sub.kind === 'classic' || sub.channel.type === 'websocket') {
      // R4 classic Subscriptions have no handshake: the endpoint was vetted at registration.
      // A websocket subscription has no endpoint to verify: its handshake goes to each socket at bind.
      await this.#registry.transition(id, { kind: 'handshake-succeeded' });
      return;
    }
    // Its origin asked this client for a pause: the handshake waits it out (sent now, its 429 would
    // spend an attempt of its schedule). On AWS no timer outlives the invocation: a later run sends it.
    const paused = this.#pausedFor(sub);
    if (paused > 0) {
      this.#retryHandshakeIn(sub, paused);
      return;
    }
    // Changed or deleted while this waited for a slot: a change's own handshake decides.
    const result = await this.#sendIfCurrent(sub, 'handshake', `${id}-handshake-${this.#ids.uuid()}`);
    // Cut by a shutdown: still `requested`, so the next start sends the handshake again.
    if (result === undefined || this.#cutByShutdown(result)) return;
    // Applied only while the subscription is still the one the handshake went out for (`sub`): the
    // answer of an endpoint the client moved away from meanwhile neither activates nor fails it.
    if (result.ok) {
      this.#handshakeStarts.delete(id);
      this.#metrics.inc('broker_handshakes_total', { outcome: 'ok' });
      await this.#registry.transition(id, { kind: 'handshake-succeeded' }, sub);
    } else {
      // Changed or deleted while on the wire: its answer decides nothing (the change's own handshake does).
      if (!this.#registry.isCurrent(sub)) return;
      // Nobody listening yet, or a moment's outage: tried again while the schedule lasts, still
      // `requested`. Not after a 410 (the endpoint will never take notifications) nor when the SSRF
      // guard refused the endpoint (that answer would not change).
      const retryIn = result.status === 410 || result.permanent === true ? undefined : this.#handshakeDueIn(sub);
      if (retryIn !== undefined) {
        // Its client's other subscriptions there hold off; so does this retry (`#pausedFor` above).
        this.#pauseOrigin(sub, result);
        this.#metrics.inc('broker_handshakes_total', { outcome: 'retried' });
        this.#logger.warn('handshake failed; tried again', {
          subscription: id,
          error: result.error,
          retryInMs: Math.round(retryIn),
        });
        this.#retryHandshakeIn(sub, retryIn);
        return;
      }
      this.#handshakeStarts.delete(id);
      this.#metrics.inc('broker_handshakes_total', { outcome: 'failed' });
      this.#logger.warn('handshake failed', { subscription: id, error: result.error });
      // 410 Gone: off, not error.
      if (await this.#offIfGone(sub, result)) return;
      this.#pauseOrigin(sub, result);
      await this.#registry.transition(
        id,
        { kind: 'handshake-failed', reason: `${HANDSHAKE_FAILED}${result.error}` },
        sub,
      );
    }
  }

  /**
   * How long until the subscription's next handshake is due, counted from when it became
   * `requested` (its `updatedAt`: a failed attempt writes nothing), or undefined when its schedule
   * is over. On AWS a scheduled run that finds it still `requested` tries it anyway, and gives up
   * by the same rule. Within a process the count goes on from its first failure on the monotonic
   * clock (`#handshakeStarts`): a wall clock stepped back neither holds it back nor repeats it.
   */
  #handshakeDueIn(sub: SubscriptionRecord): number | undefined {
    let start = this.#handshakeStarts.get(sub.id);
    if (start === undefined || start.updatedAt !== sub.updatedAt) {
      const since = Date.parse(sub.updatedAt);
      // Requested "in the future" (the clock stepped back since): no time has passed yet.
      const elapsed = Number.isNaN(since) ? Number.POSITIVE_INFINITY : Math.max(this.#clock.now() - since, 0);
      start = { updatedAt: sub.updatedAt, at: performance.now() - elapsed };
      this.#handshakeStarts.set(sub.id, start);
    }
    return nextHandshakeIn(this.#opts.handshakeRetryDelaysMs, performance.now() - start.at);
  }

  /** The handshake of `sub` again in `ms`, if it is still the subscription as it is then. */
  #retryHandshakeIn(sub: SubscriptionRecord, ms: number): void {
    if (this.#closed) return;
    const id = sub.id;
    this.#dropHandshakeRetry(id);
    const at = performance.now() + ms;
    const timer = setTimeout(
      () => {
        // A timer counts from the event loop's cached time, which a busy turn leaves behind: it can
        // fire tens of ms early. Sent early, an attempt that fails fast finds the schedule's step
        // not yet passed, and one attempt too many follows; so it waits out the rest first.
        const early = at - performance.now();
        if (early > 0) return this.#retryHandshakeIn(sub, early);
        this.#handshakeRetries.delete(id);
        this.#track(this.#retryHandshake(sub));
      },
      Math.min(ms, MAX_TIMER_MS),
    );
    timer.unref();
    this.#handshakeRetries.set(id, { timer, dueAt: this.#clock.now() + ms });
  }

  /**
   * A handshake due again goes only while the subscription is the one whose attempt failed. Here a
   * `PUT` or `DELETE` drops the timer; on a shared store (AWS) it may have been served by another
   * instance, whose own handshake then decides, so the store is read first: no handshake goes to
   * an endpoint the client has moved away from, or for a subscription it deleted.
   */
  async #retryHandshake(sub: SubscriptionRecord): Promise<void> {
    if (this.#leases !== undefined) {
      // Unreadable just now: the cache decides, as it did before this read (its answer decides
      // nothing unless the store still holds `sub`: the transitions compare and set).
      await this.#registry.refresh([sub.id]).catch((err: unknown) =>
        this.#logger.warn('handshake retry: could not read the subscription', {
          subscription: sub.id,
          err: err as Error,
        }),
      );
    }
    if (this.#registry.isCurrent(sub)) await this.#handshake(sub.id);
  }

  /** The subscription's handshake schedule, retry and count both: a new one starts, or it is gone. */
  #forgetHandshake(id: string): void {
    this.#dropHandshakeRetry(id);
    this.#handshakeStarts.delete(id);
  }

  #dropHandshakeRetry(id: string): void {
    clearTimeout(this.#handshakeRetries.get(id)?.timer);
    this.#handshakeRetries.delete(id);
  }

  /**
   * A 410 from the endpoint turns the subscription off, provided it still has the endpoint that
   * answered (the store checks it has not changed since `sub`). True when it did.
   */
  async #offIfGone(sub: SubscriptionRecord, result: SendResult): Promise<boolean> {
    if (result.ok || result.status !== 410) return false;
    // To a classic Subscription's update of one resource on a FHIR base, a 410 speaks of that
    // resource, not of the endpoint: an ordinary failure.
    if (sub.kind === 'classic' && sub.channel.content === 'full-resource') return false;
    const holder = this.#registry.get(sub.id);
    if (holder === undefined || holder.channel.endpoint !== sub.channel.endpoint) return false;
    const reason = 'endpoint answered 410 Gone';
    const changed = await this.#registry.transition(sub.id, { kind: 'endpoint-gone', reason }, holder);
    if (changed === undefined) return false;
    this.#lifecycle.publish({
      type: 'Endpoint Disabled',
      subscriptionId: sub.id,
      owner: sub.owner,
      endpointOrigin: originOf(sub.channel.endpoint),
      reason,
      time: new Date(this.#clock.now()).toISOString(),
    });
    return true;
  }

  /**
   * One bundle without events (handshake, heartbeat), sent within the in-flight caps unless the
   * subscription was deleted or changed while it waited for a slot (then undefined: nothing sent).
   */
  #sendIfCurrent(sub: SubscriptionRecord, type: NotificationType, webhookId: string): Promise<SendResult | undefined> {
    // Also undefined when it never started within the invocation's time for attempts (see #attempt).
    return this.#attempt(
      sub,
      () => (this.#registry.isCurrent(sub) ? this.#sendBundle(sub, type, [], webhookId) : Promise.resolve(undefined)),
      () => ATTEMPT_CUT,
    );
  }

  /**
   * Sends `batches` (each one bundle) in order, each once the one before it was delivered: results
   * of the bundles attempted, successes then at most one failure. None once `run` is stopped (the
   * subscription was deleted or changed while the run waited for a connection slot): `sub` is
   * what it was before.
   */
  async #sendNotifications(
    sub: SubscriptionRecord,
    batches: readonly QueuedNotification[][],
    run: RunStop,
  ): Promise<SendResult[]> {
    if (run.stopped) return [];
    // Marked (`#markBundles`): the id names the bundle as first sent, also when part of it was
    // recorded done before a crash and is not sent again.
    const marked = marksBundles(sub);
    const bundles = batches.map((batch) => {
      const notes = batch.map((q) => q.note);
      const first = notes[0]?.eventNumber ?? 0;
      const last = (marked ? notes[0]?.bundleLast : undefined) ?? notes[notes.length - 1]?.eventNumber ?? first;
      return { notes, webhookId: first === last ? `${sub.id}-${first}` : `${sub.id}-${first}-${last}` };
    });
    if (sub.channel.type === 'websocket') {
      // The same rules as the sender's runs; a push that fails is retried.
      const push = (b: (typeof bundles)[number]): Promise<SendResult> =>
        this.#sendBundle(sub, 'event-notification', b.notes, b.webhookId);
      return sendInOrder(push, bundles, RUN_WITHIN_MS, this.#clock, () => this.#closed || run.stopped);
    }
    const requests: WebhookRequest[] = [];
    for (const b of bundles) {
      const req = this.#request(sub, 'event-notification', b.notes, b.webhookId);
      // An outcome without a request (nothing to send for it, or it cannot be sent): the run
      // stops before it, and it is the first of the next run.
      if ('ok' in req) {
        if (requests.length === 0) return [req];
        break;
      }
      requests.push(req);
    }
    return this.#sender.sendInOrder(requests, RUN_WITHIN_MS, run);
  }

  #sendBundle(
    sub: SubscriptionRecord,
    type: NotificationType,
    notes: readonly Notification[],
    webhookId: string,
  ): Promise<SendResult> {
    if (sub.channel.type === 'websocket') {
      const ws = this.#websocket;
      if (ws === undefined) return Promise.resolve({ ok: false, error: 'no websocket channel', permanent: true });
      // A push every connection refused, or a store read that failed (AWS), is a failed send.
      return ws.deliver(sub, type, notes).then(
        (reached): SendResult => ({ ok: true, status: reached }),
        (err: unknown): SendResult => {
          if (err instanceof WebSocketRefusedError)
            return { ok: false, error: `websocket delivery failed: ${err.message}` };
          // A store read (AWS): its message may name an account, a role or a table, and the error is
          // the client's to read (Subscription.error, `$events`). The log has it whole.
          this.#logger.warn('websocket delivery failed', { subscription: sub.id, err: err as Error });
          return { ok: false, error: 'websocket delivery failed: the broker could not read its bindings' };
        },
      );
    }
    const req = this.#request(sub, type, notes, webhookId);
    return 'ok' in req ? Promise.resolve(req) : this.#sender.send(req);
  }

  /**
   * How many notifications a lane holds at once: LANE_RESOURCE_BUFFER for a subscription whose
   * notifications are stored with their resources (up to 256 KiB each; as stored, whether or not
   * its client may still have them), so a backlog of large resources is held a few MiB at a time.
   */
  #laneBuffer(id: string): number {
    const sub = this.#registry.get(id);
    return sub?.channel.content === 'full-resource'
      ? Math.min(LANE_RESOURCE_BUFFER, this.#opts.laneBuffer)
      : this.#opts.laneBuffer;
  }

  /** Whether `sub`'s bundles carry their resources now (full-resource, its client still allowed). */
  #carries(sub: SubscriptionRecord): boolean {
    return contentNow(sub, this.#opts.fullResourceClients) === 'full-resource';
  }

  /** The signed POST of one bundle to a rest-hook endpoint, or why there is none. */
  #request(
    sub: SubscriptionRecord,
    type: NotificationType,
    notes: readonly Notification[],
    webhookId: string,
  ): WebhookRequest | SendResult {
    const endpoint = sub.channel.endpoint;
    if (endpoint === undefined) return { ok: false, error: 'no endpoint', permanent: true };
    const lastNumber = notes[notes.length - 1]?.eventNumber ?? 0;
    if (sub.kind === 'classic' && sub.channel.content === 'full-resource') {
      const update = this.#classicUpdate(sub, endpoint, notes);
      return 'ok' in update ? update : { ...update, ...this.#requestOf(sub, webhookId) };
    }
    // Classic subscriptions without payload get an empty POST, as R4 prescribes.
    const body =
      sub.kind === 'classic'
        ? ''
        : notificationBundleJson(
            // The count includes this bundle's events (the registry's may lag behind a restart).
            lastNumber > sub.eventsSinceStart ? { ...sub, eventsSinceStart: lastNumber } : sub,
            type,
            notes,
            contentNow(sub, this.#opts.fullResourceClients),
            { fhirBase: this.#opts.fhirBase, newId: this.#newId, timestamp: new Date(this.#clock.now()).toISOString() },
          );
    return {
      endpoint,
      ...(sub.kind === 'classic' ? {} : { contentType: sub.channel.payload ?? 'application/fhir+json' }),
      body,
      ...this.#requestOf(sub, webhookId),
    };
  }

  /** What every request of `sub` carries: its headers, id, signing secrets and timeout. */
  #requestOf(sub: SubscriptionRecord, webhookId: string) {
    return {
      headers: sub.channel.headers,
      webhookId,
      secrets: this.#registry.signingSecrets(sub),
      // Never beyond the invocation's time for attempts (`endAttemptsWithin`).
      timeoutMs: Math.min(
        (sub.channel.timeoutSeconds ?? 0) * 1000 || this.#opts.defaultTimeoutMs,
        Math.max(Math.ceil(this.#timeLeft()), 1),
      ),
    };
  }

  /**
   * A classic Subscription with a payload (full-resource content): R4 has its endpoint be a FHIR
   * service base, updated with the resource, `PUT [endpoint]/[type]/[id]` (as HAPI FHIR sends it),
   * and `DELETE` there for a delete, or for a change read after the resource was deleted (events
   * may come out of order: its delete may have gone already). A FHIR base takes no empty `POST`, so
   * a change that carries no resource (not found, over the size cap, an id that names no path
   * segment) is not sent (logged; done, so what follows goes on); a client taken off
   * BROKER_FULL_RESOURCE_CLIENTS fails for good (dead-lettered, the subscription in `error`, with why).
   */
  #classicUpdate(
    sub: SubscriptionRecord,
    endpoint: string,
    notes: readonly Notification[],
  ): Pick<WebhookRequest, 'endpoint' | 'method' | 'resourcePath' | 'contentType' | 'body'> | SendResult {
    // One notification per request (a classic Subscription with a payload takes no max-count).
    const note = notes[0];
    if (note === undefined) return { ok: false, error: 'no notification to send', permanent: true };
    if (contentNow(sub, this.#opts.fullResourceClients) !== 'full-resource') {
      return {
        ok: false,
        error: `full resources are not enabled for client ${sub.owner} (BROKER_FULL_RESOURCE_CLIENTS): the change cannot be sent`,
        permanent: true,
      };
    }
    const { change } = note;
    // `.` and `..` are FHIR ids, and path segments a server or proxy resolves: never sent as one.
    const id = change.resourceId;
    const unsendable =
      id === undefined || /^\.+$/.test(id)
        ? 'its event names no resource id that can be a path segment'
        : change.interaction !== 'delete' && change.resource === undefined
          ? 'no resource was stored with it (not found on the server, over the size cap, or its client was not allowed full resources when it came)'
          : undefined;
    if (unsendable !== undefined || id === undefined) {
      this.#logger.warn("a change was not sent to a classic subscription's FHIR base: it carries no resource", {
        subscription: sub.id,
        eventNumber: note.eventNumber,
        resourceType: change.resourceType,
        reason: unsendable,
      });
      return { ok: true, status: 0 };
    }
    const resourcePath = `/${change.resourceType}/${encodeURIComponent(id)}`;
    if (change.interaction === 'delete' || change.resourceGone === true) {
      return { endpoint, method: 'DELETE', resourcePath, body: '' };
    }
    const contentType = sub.channel.payload ?? 'application/fhir+json';
    return { endpoint, method: 'PUT', resourcePath, contentType, body: change.resource as string };
  }

  /** Runs `fn` within the in-flight caps; local socket writes need no network slot. */
  #withSlot<T>(sub: SubscriptionRecord, fn: () => Promise<T>): Promise<T> {
    return sub.channel.type === 'websocket'
      ? fn()
      : this.#limiter.run(this.#originOf(sub.channel.endpoint), fn, sub.owner);
  }

  /** Endpoint → origin, parsed once per endpoint rather than once per request. */
  #originOf(endpoint: string | undefined): string {
    return endpoint === undefined ? '' : memo(this.#origins, endpoint, originOf);
  }

  /**
   * Heartbeats for subscriptions with `heartbeat-period`: sent when nothing else reached the
   * endpoint within the period, carrying the current status (also while in `error`).
   */
  #scheduleHeartbeat(id: string, owed = false): void {
    const sub = this.#registry.get(id);
    const period = (sub?.channel.heartbeatPeriodSeconds ?? 0) * 1000;
    const lane = this.#lanes.get(id);
    if (lane !== undefined) clearTimeout(lane.heartbeat);
    if (sub === undefined || period === 0 || this.#closed || !heartbeatsAllowed(sub)) return;
    const owner = this.#lane(id);
    // Overdue: now if a loop that was running owes it, else a period on (a heartbeat that failed).
    const left = owner.lastSentAt + period - performance.now();
    const due = left > 0 ? left : owed ? 0 : period;
    owner.heartbeat = setTimeout(() => this.#track(this.#heartbeat(id, period)), due);
    owner.heartbeat.unref();
  }

  async #heartbeat(id: string, period: number): Promise<void> {
    const sub = this.#registry.get(id);
    const lane = this.#lanes.get(id);
    if (sub === undefined || lane === undefined || this.#closed) return;
    const now = this.#clock.now();
    // Not to an origin that asked this client for a pause: the next period's turn sends it.
    if (performance.now() - lane.lastSentAt >= period && this.#pausedFor(sub) === 0) {
      if (lane.running) {
        // A run may be on the wire: its end (`#endRunning`) sends the heartbeat unless the run got through.
        lane.heartbeatOwed = true;
        return;
      }
      // Changed or deleted while this waited for a slot: no heartbeat to the endpoint it had.
      const result = await this.#sendIfCurrent(sub, 'heartbeat', `${id}-heartbeat-${now}`);
      if (result !== undefined) {
        if (result.ok) lane.lastSentAt = performance.now();
        // Off (410) or refused by the SSRF guard: none until the subscription changes (which schedules again).
        if (!(await this.#heartbeatAnswered(sub, result))) return;
      }
    }
    this.#scheduleHeartbeat(id);
  }

  /**
   * `Subscription.end`: the subscription goes `off` when it passes (unless it changed meanwhile;
   * a change schedules again). Timers longer than Node allows are re-armed on the way. On AWS no
   * timer outlives an invocation: each scheduled dispatcher run (`start`) ends what has passed.
   */
  #scheduleEnd(id: string): void {
    clearTimeout(this.#endTimers.get(id));
    this.#endTimers.delete(id);
    const sub = this.#registry.get(id);
    if (sub?.end === undefined || sub.status === 'off' || this.#closed) return;
    const left = Date.parse(sub.end) - this.#clock.now();
    if (left <= 0) {
      this.#track(
        this.#registry.transition(id, { kind: 'ended', reason: `ended at ${sub.end} (Subscription.end)` }, sub),
      );
      return;
    }
    const timer = setTimeout(() => this.#scheduleEnd(id), Math.min(left, MAX_TIMER_MS));
    timer.unref();
    this.#endTimers.set(id, timer);
  }

  /**
   * Counts and logs a heartbeat's outcome; false: send no more. A 410 turns the subscription off.
   * An endpoint the SSRF guard refused puts it in `error` with the guard's reason, provided it is
   * still the subscription the heartbeat went out for (`sub`): a timer that merely stopped would be
   * armed again by the next start, and on AWS every scheduled run is one, so the refusal must be
   * kept in the store for `heartbeatsAllowed` to see. The client re-activates it as after any error.
   */
  async #heartbeatAnswered(sub: SubscriptionRecord, result: SendResult): Promise<boolean> {
    if (this.#cutByShutdown(result)) return false;
    const refused = !result.ok && result.permanent === true;
    this.#metrics.inc('broker_heartbeats_total', { outcome: result.ok ? 'ok' : refused ? 'refused' : 'failed' });
    if (result.ok) return true;
    this.#logger.warn('heartbeat failed', { subscription: sub.id, error: result.error });
    if (await this.#offIfGone(sub, result)) return false;
    this.#pauseOrigin(sub, result);
    if (!refused) return true;
    await this.#registry.transition(
      sub.id,
      { kind: 'heartbeat-refused', reason: `${HEARTBEAT_FAILED}${result.error}` },
      sub,
    );
    return false;
  }

  /**
   * An attempt that ended with no answer from the endpoint once shutdown began: `close` stopped the
   * sender and then aborted what was still on the wire (a sender thread stopped, a destroyed
   * connection). That is not the endpoint failing, so it counts as never made: no retry counted, no
   * dead letter, no status change. A subscription must not come back from a graceful restart in
   * `error` for an attempt the broker itself cut.
   */
  #cutByShutdown(result: SendResult): boolean {
    return this.#closed && !result.ok && result.status === undefined;
  }

  /**
   * One purge at a time: a purge still going when the timer fires again is left to finish. At
   * most one per PURGE_INTERVAL_MS however often `start` runs: on AWS the scheduled dispatcher
   * calls it every minute, and each purge scans its tables.
   */
  #startPurge(): void {
    if (this.#closed || this.#purging) return;
    const now = this.#clock.now();
    if (this.#purgedAt !== undefined && now - this.#purgedAt < PURGE_MIN_GAP_MS) return;
    this.#purgedAt = now;
    this.#purging = true;
    this.#track(this.#purge().finally(() => (this.#purging = false)));
  }

  async #purge(): Promise<void> {
    try {
      const purged = await this.#store.purge(this.#clock.now() - this.#opts.retentionMs, this.#purgeAbort.signal);
      if (purged.notifications > 0 || purged.eventIds > 0) this.#logger.info('retention purge', purged);
    } catch (err) {
      this.#logger.error('retention purge failed', { err: err as Error });
    }
  }
}

/**
 * The resources one bundle of several events carries at most (full-resource content; UTF-16 units
 * of their JSON): a backlog of large resources goes out in several bundles, not in one body of up
 * to `max-count` × 256 KiB. A single event's bundle carries its resource whatever its size.
 */
const BUNDLE_RESOURCES = 1024 * 1024;
/** Notifications of a full-resource subscription a lane holds at once (see `#laneBuffer`): at most 8 MiB of resources. */
const LANE_RESOURCE_BUFFER = 32;

/**
 * The due head of the queue as up to `bundles` bundles of up to `max` notifications each, in order:
 * what one `sendInOrder` run sends. A bundle that went out before goes out again as it was (so
 * under the same `webhook-id`, which receivers deduplicate on): its first notification carries
 * where it ends (`bundleLast`, stored before its first attempt, so also after a restart), and what
 * is queued up to there goes with it, nothing beyond. Without a mark (legacy rows, `max-count` 1),
 * a failed bundle is held together by the attempt count and due time its failure gave it.
 * Notifications not yet attempted group freely. A mark longer than `max` (the client lowered
 * `max-count` since) is cut at `max`, and `#markBundles` marks the part sent afresh.
 */
function takeRun(
  queue: readonly QueuedNotification[],
  max: number,
  bundles: number,
  now: number,
  /** Whether the bundles carry the resources (full-resource content as sent now): only then do they count. */
  carries: boolean,
): QueuedNotification[][] {
  const out: QueuedNotification[][] = [];
  let current: QueuedNotification[] = [];
  /** The stored end of the bundle `current` is (event numbers start at 1), or 0: none. */
  let last = 0;
  /** The resources `current` carries (full-resource content), in UTF-16 units. */
  let carried = 0;
  for (const q of queue) {
    const size = carries ? (q.note.change.resource?.length ?? 0) : 0;
    const n = q.note.eventNumber;
    // Within a marked bundle, what is queued goes with its head, whatever of its states was
    // written before a crash (attempts, due time): up to `max`, which the client may have lowered.
    if (n <= last && current.length < max) {
      current.push(q);
      carried += size;
      continue;
    }
    if (q.note.dueAt > now) break;
    const head = current[0];
    if (
      head !== undefined &&
      (last > 0 ||
        current.length === max ||
        carried + size > BUNDLE_RESOURCES ||
        q.note.bundleLast !== undefined ||
        !sameAttempt(head.note, q.note))
    ) {
      out.push(current);
      if (out.length === bundles) return out;
      current = [];
      carried = 0;
    }
    if (current.length === 0) last = q.note.bundleLast ?? 0;
    current.push(q);
    carried += size;
  }
  if (current.length > 0) out.push(current);
  return out;
}

/**
 * A lane's read of `limit` notifications, made again with a larger limit when it ended inside the
 * bundle it starts with (a bundle marked longer than the lane's buffer: marked while the
 * subscription's lane held 256, before it took full resources, or by a build with one buffer for
 * all), and the limit the answer was read with. Cut, the bundle's first part would go out under its
 * webhook-id and the rest under another, which an endpoint that had the whole bundle takes twice.
 * Such a bundle is small: its resources, if it carries any, were about 1 MiB at most when it was marked.
 */
async function readWholeHead<R extends { readonly notes: readonly StoredNotification[] }>(
  limit: number,
  read: (limit: number) => Promise<R>,
): Promise<{ read: R; limit: number }> {
  const first = await read(limit);
  const { notes } = first;
  const head = notes[0];
  const last = notes[notes.length - 1];
  if (
    notes.length < limit ||
    head?.bundleLast === undefined ||
    last === undefined ||
    head.bundleLast <= last.eventNumber
  )
    return { read: first, limit };
  const whole = Math.max(limit, head.bundleLast - head.eventNumber + 1);
  return { read: await read(whole), limit: whole };
}

/**
 * What a full read of a lane's backlog (`full`) may send: not a bundle it cuts short (a stored
 * mark beyond its last number), which would go out under another `webhook-id`; that one is left
 * for the next read, unless it is the first (then it is all there is to send).
 */
function wholeBundles(notes: StoredNotification[], full: boolean): StoredNotification[] {
  if (!full) return notes;
  const end = notes[notes.length - 1]?.eventNumber ?? 0;
  for (let i = notes.length - 1; i > 0; i--) {
    const last = (notes[i] as StoredNotification).bundleLast;
    if (last !== undefined) return last > end ? notes.slice(0, i) : notes;
  }
  return notes;
}

/**
 * Whether the subscription's lanes store where their bundles end (`#markBundles`): rest-hooks whose
 * bundles may carry more than one notification (a webhook-id names their first and last).
 */
function marksBundles(sub: SubscriptionRecord): boolean {
  return (sub.channel.maxCount ?? 1) > 1 && sub.channel.type === 'rest-hook';
}

/** Whether two queued notifications belong in one bundle: both unattempted, or failed together. */
function sameAttempt(a: StoredNotification, b: StoredNotification): boolean {
  return a.attempts === 0 ? b.attempts === 0 : a.attempts === b.attempts && a.dueAt === b.dueAt;
}
