import type {
  DeliveryState,
  MatchSpec,
  Notification,
  ResourceChange,
  StoredNotification,
  SubscriptionRecord,
  SubscriptionStatus,
  SubscriptionVersion,
} from '../core/types.js';

/**
 * The Store port, owned by the core. Adapters: `sqlite/` (embedded default) and `dynamodb/`.
 * Every method is async so a network store fits the same shape.
 */

/** How many earlier versions of a subscription a store keeps (`Store.subscriptionVersions`). */
export const EARLIER_VERSIONS_KEPT = 10;

/**
 * The `updatedAt` a write over a subscription last written at `previous` sets: `at`, or 1 ms after
 * `previous` when `at` is not later (two writes in one millisecond, a clock behind another
 * instance's). Every write moves a subscription's version forward, so no two versions share one:
 * it is what compare-and-sets and stale answers are told apart by. (SQLite applies the same rule
 * in its UPDATE statements, `forwardOf`.)
 */
export function nextVersionAt(at: string, previous: string): string {
  const stored = Date.parse(previous);
  return Date.parse(at) > stored ? at : new Date(stored + 1).toISOString();
}

export interface AcceptItem {
  readonly change: ResourceChange;
  /** The subscriptions the change matched when it arrived (matching is never redone later). */
  readonly subscriptionIds: readonly string[];
  /**
   * The resource as read, for the notifications of the subscriptions in `for` (full-resource
   * content): theirs are stored with `change.resource` set to `json`, the others without it.
   */
  readonly resource?: { readonly json: string; readonly for: ReadonlySet<string> };
}

/** `item`'s change as `subscriptionId`'s notification keeps it (with the resource, if it takes it). */
export function changesOf(item: AcceptItem): (subscriptionId: string) => ResourceChange {
  const { resource } = item;
  if (resource === undefined) return () => item.change;
  const full: ResourceChange = { ...item.change, resource: resource.json };
  return (subscriptionId) => (resource.for.has(subscriptionId) ? full : item.change);
}

export interface AcceptOutcome {
  readonly duplicate: boolean;
  /** Notifications created, with their per-subscription event numbers. */
  readonly notifications: readonly Notification[];
}

export interface DeliveryUpdate {
  readonly subscriptionId: string;
  readonly eventNumber: number;
  readonly state: DeliveryState;
  readonly attempts: number;
  readonly dueAt: number;
  readonly lastError?: string;
  /**
   * A failed attempt's outcome (a retry or a dead letter) sent under a lane lease: the lease's
   * re-queue epoch when the attempt began. A store with leases applies it only while the lane is
   * still at that epoch: a re-queue since (a re-activation, perhaps by another instance) started
   * the notification over, and the old attempt's outcome must not undo that.
   */
  readonly laneEpoch?: number;
  /**
   * The update of a marked bundle's first notification (see `StoredNotification.bundleLast`). A
   * store that writes a batch's updates one at a time writes these after the others: a process
   * that dies in between leaves the bundle findable by its mark, never the rest of it pending
   * without one (and regrouped under another id).
   */
  readonly bundleHead?: true;
}

/**
 * A bundle about to go out for the first time: `eventNumber` (its first notification) up to
 * `last`. Stored before the attempt (see `Store.markBundles`).
 */
export interface BundleMark {
  readonly subscriptionId: string;
  readonly eventNumber: number;
  readonly last: number;
  /**
   * The mark the caller read on that notification (absent: none). Written only while it is still
   * that one: a lane holder that stalled past its lease cannot overwrite the mark of a bundle the
   * next holder sent meanwhile.
   */
  readonly previous?: number;
}

export interface StatusUpdate {
  readonly status: SubscriptionStatus;
  readonly error?: string;
  /** Apply only when the stored status is one of these (compare-and-set). */
  readonly expected?: readonly SubscriptionStatus[];
  /** Apply only when the stored `updatedAt` is this one: the caller's record is still the current one. */
  readonly unchangedSince?: string;
}

/** What matching needs of a subscription, as `candidatesFor` returns it. */
export interface MatchCandidate {
  readonly id: string;
  readonly match: MatchSpec;
  readonly end?: string;
}

/** A lane lease as its holder took it: the lane's shared watermark, and the re-queue count it was read at. */
export interface LaneHold {
  /** Every event number at or below it is delivered, dead-lettered or void. */
  readonly through: number;
  /** Bumped by each re-queue (`requeueDeadLetters`), which also lowers `through`. */
  readonly epoch: number;
}

/** The pending notifications a lane may send next, as `LaneLeases.read` found them. */
export interface LaneRead {
  /** Pending notifications, in order, with no number missing between `through` and the last. */
  readonly notes: StoredNotification[];
  /** The watermark, moved over the done (delivered, dead, void) notifications right above it. */
  readonly through: number;
  /**
   * Set when a number right above what `notes` end with is taken but its notification not yet
   * written (an acceptance in flight elsewhere): nothing beyond it may go out before it. Whoever
   * writes it sends it (its lane asks the holder to read again); if nobody has by this time (clock
   * ms), the next read voids the number and goes on.
   */
  readonly voidableAt?: number;
}

/**
 * `LaneLeases.take` when another instance holds the lane: until when, unless it renews or lets go.
 * With `requeuing`, a re-queue (a re-activation) is under way: no lane is taken until the
 * re-activated subscription is written (`Store.requeueSettled`) or, should the instance re-queueing
 * die first, until `heldUntil`.
 */
export interface LaneHeld {
  readonly heldUntil: number;
  readonly requeuing?: true;
}

/**
 * One sender per subscription across instances sharing a store (AWS: Lambda containers). Each
 * accepts events and takes event numbers on its own, so without this two instances could send
 * one subscription's notifications at the same moment, and out of order; numbers also commit out
 * of order (a number is taken before its notification is written). The holder of a subscription's
 * lease alone sends its notifications, strictly upwards from the shared watermark.
 */
export interface LaneLeases {
  /**
   * Takes (or renews) the lease of `subscriptionId`'s lane for `holder` until `until` (epoch ms).
   * When another instance holds it, that one is asked to read the lane again before it lets go (so
   * what the caller committed is not left behind), and the answer says until when it holds it.
   */
  take(subscriptionId: string, holder: string, now: number, until: number): Promise<LaneHold | LaneHeld>;
  /**
   * Lets go, with the watermark moved to `through`. Undefined: let go (or lost: it ran out and
   * another took it). With `keepUntil`, when another instance asked for the lane meanwhile, or a
   * re-queue lowered the watermark (a new epoch), it stays held until then instead, and the answer
   * is the hold to read the lane again from before letting go. Without, it lets go regardless (the
   * request stays for the next holder; after a re-queue the lowered watermark is kept).
   */
  release(
    subscriptionId: string,
    holder: string,
    hold: LaneHold,
    through: number,
    keepUntil?: number,
    now?: number,
  ): Promise<LaneHold | undefined>;
  /**
   * Extends a held lease to `until` and stores `through`. Undefined: lost (it ran out and another
   * took it). `LaneHeld` with `requeuing`: re-queued since the hold was taken (the attempt on the
   * wire is one the re-queue starts over), and let go (lost, or the re-queue is still under way).
   * A hold with another epoch: re-queued meanwhile, read again from its watermark.
   */
  renew(
    subscriptionId: string,
    holder: string,
    hold: LaneHold,
    through: number,
    until: number,
    now?: number,
  ): Promise<LaneHold | LaneHeld | undefined>;
  /** A consistent read of up to `limit` pending notifications above `through` (see LaneRead). */
  read(subscriptionId: string, through: number, limit: number, now: number): Promise<LaneRead>;
}

export interface Store {
  /**
   * Other processes may accept events into this store and deliver from it at the same time (the
   * DynamoDB store, on AWS: one per Lambda container): a process's lanes and caches are not the
   * whole story. Such a store offers `laneLeases`, and lanes send only under a lease, from what
   * the store holds. Absent or false: this process is the store's only user (SQLite: the data
   * directory's lock), and its lanes know every pending notification.
   */
  readonly sharedByInstances?: boolean;
  /** For a store shared by instances: one sender per subscription at a time (see LaneLeases). */
  readonly laneLeases?: LaneLeases;
  /**
   * Stores a new subscription. With `quota`, only while its owner holds fewer than that many,
   * counted atomically with the insert (concurrent creates, on any number of instances, cannot go
   * past it): false, and nothing written, when it holds that many already.
   */
  insertSubscription(rec: SubscriptionRecord, quota?: number): Promise<boolean>;
  getSubscription(id: string): Promise<SubscriptionRecord | undefined>;
  listSubscriptions(owner?: string): Promise<SubscriptionRecord[]>;
  /**
   * Replace everything the client controls; the event counter is the store's and is kept.
   * With `expected`, only when the stored status and updatedAt are still those (compare-and-set);
   * undefined when the subscription is gone or changed meanwhile. Like `updateStatus`, it sets
   * `updatedAt` to the one given, or to 1 ms after the stored one when that is not later: every
   * write moves the version forward (two writes in one millisecond are two versions), and the
   * record returned carries the one written.
   */
  replaceSubscription(
    rec: SubscriptionRecord,
    expected?: { readonly status: SubscriptionStatus; readonly updatedAt: string },
  ): Promise<SubscriptionRecord | undefined>;
  /**
   * A status change (and its error), at `at` or 1 ms after the stored `updatedAt` when `at` is not
   * later (see `replaceSubscription`). Only from an `expected` status and only while `unchangedSince`
   * is still the stored `updatedAt`, when given; undefined when it did not apply.
   */
  updateStatus(id: string, update: StatusUpdate, at: string): Promise<SubscriptionRecord | undefined>;
  /**
   * The subscription's earlier versions, newest first: each write over it (`replaceSubscription`,
   * `updateStatus`) keeps the version it replaced, in the same write, up to the last
   * EARLIER_VERSIONS_KEPT. A delete forgets them. Empty for an unknown subscription, and always on
   * a store that keeps none (DynamoDB: see DynamoDbStore.subscriptionVersions).
   */
  subscriptionVersions(id: string): Promise<SubscriptionVersion[]>;
  /**
   * Forgets the subscription's earlier versions (FHIR `$expunge` of previous versions: a header
   * value the client retired must not stay readable); the current one stays. How many it forgot.
   */
  forgetSubscriptionVersions(id: string): Promise<number>;
  /**
   * Deletes the subscription and its notifications; false when there was none. With
   * `expectedUpdatedAt`, only while the stored `updatedAt` is still that one (compare-and-delete:
   * false, and nothing deleted, when it changed meanwhile).
   */
  deleteSubscription(id: string, expectedUpdatedAt?: string): Promise<boolean>;
  /**
   * Optional: the subscriptions that collect notifications (requested, active, error) and whose
   * match could include `resourceType` (it is among their types, or they take every type `*`),
   * read from the store now. A store that offers it is matched against per event instead of an
   * in-memory index of every subscription (see IngestService); `end` is not applied here.
   */
  candidatesFor?(resourceType: string): Promise<readonly MatchCandidate[]>;

  /**
   * Atomically, for each item: record its event id (a seen id makes it a duplicate and writes
   * nothing), take the next event number of each matched subscription, and queue the notification.
   * Resolves only once everything is durable.
   */
  acceptChanges(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]>;

  /** Pending notifications of one subscription, oldest event number first. */
  pendingNotifications(subscriptionId: string, afterEventNumber: number, limit: number): Promise<StoredNotification[]>;
  subscriptionsWithPending(): Promise<string[]>;
  /**
   * Optional: how many notifications wait for delivery (pending), from the store, for the outbox
   * depth gauge; offered only where that is one cheap read, never a scan of the notifications.
   */
  countPending?(): Promise<number>;
  /**
   * Applies delivery outcomes in the order given. An update's `attempts` counts the attempts made
   * so far, this one included: one with `attempts: 1` reports a notification's first attempt, so no
   * outcome of it was recorded before, or since `requeueDeadLetters` started it over (what lets the
   * embedded store mark such deliveries with a per-subscription watermark instead of a row write).
   * The `dueAt` of a delivered notification is not kept by every store.
   */
  recordDeliveries(updates: readonly DeliveryUpdate[]): Promise<void>;
  /**
   * Records where bundles end before their first attempt (`StoredNotification.bundleLast` of
   * each mark's first notification, while it is pending and still carries `previous`), so what a
   * restart or another instance reads back goes out in the same bundles, under the same
   * `webhook-id`s. Answers, per mark, whether it was written. Resolves once written so a process
   * killed after it keeps them (SQLite: committed to the WAL without an fsync of its own; a power
   * cut may lose one, and then the bundle is regrouped: delivered again, under another id, which
   * at-least-once allows). Whether a notification already delivered or dead-lettered takes a
   * mark is the store's (it is not sent again either way).
   */
  markBundles(marks: readonly BundleMark[]): Promise<boolean[]>;
  /** Stored notifications with `from <= eventNumber <= to`, oldest first. */
  notificationsInRange(subscriptionId: string, from: number, to: number, limit: number): Promise<StoredNotification[]>;

  /**
   * Re-activation: the subscription's dead-lettered notifications become pending again, and its
   * pending ones that have failed attempts (retries backing off, perhaps for an endpoint the client
   * has just left) start over; all of them with no attempt made and no error, due at `dueAt`, so
   * the endpoint gets the whole retry schedule. Pending notifications never attempted are left as
   * they are. Returns how many dead letters were re-queued.
   */
  requeueDeadLetters(subscriptionId: string, dueAt: number): Promise<number>;
  /**
   * A store shared by instances: the re-activation that called `requeueDeadLetters` (with the same
   * `dueAt`) has written (or failed to write) the subscription. Until then no instance sends the subscription's
   * notifications: one that read the subscription between the re-queue and its write would send
   * the re-queued ones to the endpoint the client just moved away from.
   */
  requeueSettled?(subscriptionId: string, dueAt: number): Promise<void>;
  /**
   * Forget what is older than `before` (epoch ms): delivered and dead-lettered notifications
   * (the `$events` retention window) and seen event ids (the deduplication window). Pending
   * notifications are never purged. Once `signal` is aborted the store stops at its next batch
   * boundary and answers what it purged so far (the rest waits for the next purge).
   */
  purge(before: number, signal?: AbortSignal): Promise<{ notifications: number; eventIds: number }>;

  /**
   * Reconciliation (src/service/reconciler.ts): the resources the subscription holds notifications
   * about whose change happened (`change.time`) at or after `since` (epoch ms), among the
   * notifications it accepted from NOTIFIED_SCAN_SLACK_MS before `since` on and still keeps
   * (delivered, dead-lettered or pending; retention purges the oldest): `Type/id` → the latest such
   * change time (epoch ms). Read newest first, so what is read is bounded by what the subscription
   * accepted since then, and in steps (an embedded store yields to the event loop between them).
   * Empty for a subscription unknown to the store, and for notifications without a resource id.
   * Once `signal` is aborted it stops at its next step and rejects (a part of the answer would
   * read as "not told").
   */
  notifiedResources(subscriptionId: string, since: number, signal?: AbortSignal): Promise<Map<string, number>>;
  /** The reconciler's checkpoint for `source` (epoch ms: every change before it was reconciled), if any. */
  reconcileCheckpoint(source: string): Promise<number | undefined>;
  /**
   * Moves the checkpoint of `source` to `through`, only forward: a lower one (a run that started
   * before another finished) leaves the stored one. Durable when it resolves.
   */
  saveReconcileCheckpoint(source: string, through: number): Promise<void>;

  ping(): Promise<void>;
  close(): Promise<void>;
}

/**
 * How far before `since` `Store.notifiedResources` still looks at accepted times: the broker's
 * clock (which stamps acceptance) may be behind the FHIR server's (which stamps changes).
 */
export const NOTIFIED_SCAN_SLACK_MS = 60_000;
