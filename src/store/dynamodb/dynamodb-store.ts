import { randomUUID } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import {
  type AttributeValue,
  DeleteItemCommand,
  type DynamoDBClient,
  GetItemCommand,
  PutItemCommand,
  type QueryCommandInput,
  type TransactWriteItem,
  UpdateItemCommand,
} from '@aws-sdk/client-dynamodb';
import { matchFromStore, storedMatch } from '../../core/stored-match.js';
import {
  type Clock,
  type ResourceChange,
  type StoredNotification,
  type SubscriptionRecord,
  type SubscriptionStatus,
  type SubscriptionVersion,
  systemClock,
} from '../../core/types.js';
import {
  type AcceptItem,
  type AcceptOutcome,
  type BundleMark,
  type DeliveryUpdate,
  EARLIER_VERSIONS_KEPT,
  type MatchCandidate,
  NOTIFIED_SCAN_SLACK_MS,
  nextVersionAt,
  type StatusUpdate,
  type Store,
} from '../store.js';
import { EventAcceptance } from './acceptance.js';
import {
  Expression,
  type Item,
  N,
  readNumber,
  readOptionalNumber,
  readOptionalString,
  readString,
  S,
} from './attributes.js';

import { SubscriptionExistsError, WriteConflictError } from './errors.js';
import {
  ANY_TYPE,
  CHECKPOINT_ATTRIBUTE,
  COLLECTING,
  checkpointKey,
  compare,
  EVENT_SCOPE,
  fromSubscriptionItem,
  fromVersionItem,
  type IndexedFields,
  indexedTypes,
  notificationKey,
  toSubscriptionItem,
  toVersionItem,
  unchangedSince,
  VERSIONS_WRITTEN,
  versionKey,
  versionsPartition,
} from './items.js';
import {
  DynamoDbLaneLeases,
  FENCE_MS,
  FENCE_REFRESH_MS,
  fenceLane,
  keepFenced,
  laneKey,
  lowerLane,
  sameLaneEpoch,
  unfenceLane,
} from './lane-leases.js';
import { conditionHeld, DynamoDbRequests, inBursts, MAX_TRANSACTION_ATTEMPTS } from './requests.js';
import { notificationKeyOf, resourceItemsToPurge, withResources } from './resource-items.js';
import { INDEX, type TableNames, tableNames } from './tables.js';

/**
 * The Store port on DynamoDB (low-level client, injected). Five tables, `<prefix><role>`; the
 * design and its reasons are in docs/dynamodb.md.
 *
 * - `subscriptions` (pk `id`): the record as flat attributes, JSON blobs as strings. The event
 *   counter `eventsSinceStart` lives on this item, so taking the next number is one UpdateItem:
 *   `ADD eventsSinceStart 1` with the condition "status collects" and `ReturnValues: UPDATED_NEW`.
 *   A separate counter item could not check the status in the same write. GSI `by-owner`
 *   (owner, createdAt) lists an owner's subscriptions; sparse GSI `collecting-by-owner` holds only
 *   subscriptions in requested/active/error (attribute `collectingOwner`, removed otherwise).
 * - `notifications` (pk `subscriptionId`, sk `eventNumber`): state, attempts, dueAt, lastError,
 *   createdAt. Sparse GSI `pending` (attribute `pendingSubscriptionId`, present only while pending).
 *   A full-resource notification's resource is an item of its own at the number negated
 *   (resource-items.ts).
 * - `event-ids` (pk `eventId`, sk `scope`): scope `#event` marks an EventBridge id as accepted
 *   (the dedupe key); scope `<subscriptionId>` is the marker "this event already has notification
 *   `eventNumber` for this subscription". Both carry the TTL attribute `expiresAt`; TTL deletion
 *   is lazy, so reads treat an expired item as absent. Scope `#reconcile` holds the reconciler's
 *   checkpoint of each source (pk the source), without a TTL (items.ts, checkpointKey).
 * - `connections` (pk `connectionId`, TTL): created here, used by the API Gateway pusher.
 * - `subscription-types` (pk `resourceType`, sk `subscriptionId`): the type index `candidatesFor`
 *   reads. One item per resource type (or `*`) of each collecting subscription, with its `match`
 *   and `end`; written in the same TransactWriteItems as every subscription write, which reads the
 *   subscription first and is conditional on it being unchanged since (else it reads again).
 *   Partitions `#owner` (each client's subscription count) and `#versions <id>` (a subscription's
 *   earlier versions, a ring written in the same transactions: items.ts, versionKey) share it.
 *
 * acceptChanges is `EventAcceptance` (acceptance.ts): the batch's dedupe keys and markers read
 * first, one transaction per notification, the `#event` key written last; every write is
 * acknowledged before it resolves. The request patterns (retried transactions and batches,
 * paging) are in requests.ts, the record ↔ item mapping in items.ts.
 *
 * Caveats, honestly:
 * - Event numbers can have gaps. A process that dies between a counter increment and its
 *   transaction (step 3 in acceptance.ts), a transaction failing past its retries, or a copy of the
 *   event accepted at the same moment elsewhere consumes a number no notification carries; such a
 *   number is left void (a `void` row, lane-leases.ts). A subscription deleted in between leaves a
 *   gap nobody reads. (`notifications` also holds each subscription's lane lease, at number 0.)
 *   The Backport IG lets a client see a gap in `events-since-subscription-start` and ask `$events`,
 *   which then has nothing for that number. SQLite never has gaps.
 * - Calls within one store instance are serialised, so numbers follow acceptance order. Across
 *   processes (several Lambdas) numbers interleave and commit out of order; delivery is still in
 *   number order, one sender per subscription at a time (`laneLeases`, docs/dynamodb.md).
 * - GSI reads are eventually consistent on AWS: `listSubscriptions(owner)` may briefly miss a new
 *   subscription, and `pendingNotifications` / `subscriptionsWithPending` may briefly show a
 *   notification that was just delivered (a redelivery; receivers dedupe on `webhook-id`).
 *   DynamoDB Local updates GSIs synchronously, so the contract suite cannot see this.
 * - `recordDeliveries` writes item by item, not in one transaction (a lost update is a redelivery).
 * - `purge` and `requeueDeadLetters` scan/query with filters: fine for the retention window of a
 *   broker, not free. `deleteSubscription` deletes the subscription, then its notifications in
 *   batches; a crash in between leaves notifications of a deleted subscription behind until the
 *   next purge, which deletes them (and a lease item a lane wrote after the delete).
 */

/** A subscription id that cannot exist (FHIR ids have no `#`): what `ping` reads. */
const PING_KEY = '#ping';

/** Notifications per page of a `notifiedResources` read: what it reads past its stop is paid for, so not DynamoDB's 1 MB. */
const NOTIFIED_PAGE = 100;

/** Rounds of a create whose count condition failed (the quota reached, or the count item created meanwhile). */
const COUNT_ATTEMPTS = 20;

/** Marks the type index as built (see ensureTypeIndex); `#` keeps it apart from resource types. */
const TYPE_INDEX_MARKER: Item = { resourceType: S('#index'), subscriptionId: S('#built') };

/**
 * Each owner's subscription count (attribute `held`) is an item of the type index table under
 * the partition `#owner` (never a resource type, so never matched): creates and deletes move it
 * in their transactions, which is what makes the quota exact across instances.
 */
const ownerCountKey = (owner: string): Item => ({ resourceType: S('#owner'), subscriptionId: S(owner) });

/** A re-queue's own fence, as the Store port names it to both of its calls (FHIR ids have no space). */
const fenceKey = (subscriptionId: string, dueAt: number): string => `${subscriptionId} ${dueAt}`;

/** Marks the owner counts as complete (see ensureOwnerCounts); `#` keeps it apart from client ids. */
const OWNER_COUNTS_MARKER: Item = { resourceType: S('#owner'), subscriptionId: S('#counted') };

/** A planned subscription write: the record after it and its update, or (no `next`) a delete. */
type SubscriptionPlan =
  | { readonly next: SubscriptionRecord; readonly update: Expression }
  | { readonly next: undefined };

// 7 days: the default event retention (config.eventRetentionMs); purge() usually removes them first.
const DEFAULT_EVENT_TTL_MS = 7 * 86_400_000;

export interface DynamoDbStoreOptions {
  /** How long an accepted event id (and its markers) deduplicates; the TTL of those items. */
  readonly eventTtlMs?: number;
  /** How long a lane waits for a taken number's notification before voiding it (lane-leases.ts, VOID_AFTER_MS). */
  readonly voidAfterMs?: number;
  /** The time a re-queue's fence is made fresh at (every other time comes with the call). */
  readonly clock?: Clock;
  /** How often a re-queue makes its fence fresh (lane-leases.ts, FENCE_REFRESH_MS); below FENCE_MS. */
  readonly fenceRefreshMs?: number;
}

/**
 * A lane fence this store made, until the re-queue that made it is settled. Two re-queues of one
 * subscription in this process at the same `dueAt` cannot be told apart when they settle: they
 * share the fence, lifted once both are settled.
 */
interface OwnFence {
  readonly token: string;
  requeues: number;
}

export class DynamoDbStore implements Store {
  readonly sharedByInstances = true;
  readonly laneLeases: DynamoDbLaneLeases;
  readonly #client: DynamoDBClient;
  readonly #tables: TableNames;
  readonly #requests: DynamoDbRequests;
  readonly #acceptance: EventAcceptance;
  readonly #clock: Clock;
  readonly #fenceRefreshMs: number;
  /** By `fenceKey`: the Store port hands `requeueSettled` only what it handed `requeueDeadLetters`. */
  readonly #fences = new Map<string, OwnFence>();
  /** Tail of the acceptChanges chain: calls on one instance run one after another. */
  #accepting: Promise<unknown> = Promise.resolve();

  constructor(client: DynamoDBClient, tablePrefix: string, options: DynamoDbStoreOptions = {}) {
    const fenceRefreshMs = options.fenceRefreshMs ?? FENCE_REFRESH_MS;
    if (!(fenceRefreshMs > 0 && fenceRefreshMs < FENCE_MS)) {
      throw new TypeError(`fenceRefreshMs must be above 0 and below ${FENCE_MS}: got ${fenceRefreshMs}`);
    }
    this.#client = client;
    this.#clock = options.clock ?? systemClock;
    this.#fenceRefreshMs = fenceRefreshMs;
    this.#tables = tableNames(tablePrefix);
    this.#requests = new DynamoDbRequests(client);
    this.laneLeases = new DynamoDbLaneLeases(client, this.#tables.notifications, options.voidAfterMs);
    this.#acceptance = new EventAcceptance({
      client,
      requests: this.#requests,
      tables: this.#tables,
      eventTtlMs: options.eventTtlMs ?? DEFAULT_EVENT_TTL_MS,
    });
  }

  async insertSubscription(rec: SubscriptionRecord, quota?: number): Promise<boolean> {
    const put: TransactWriteItem = {
      Put: {
        TableName: this.#tables.subscriptions,
        Item: toSubscriptionItem(rec),
        ConditionExpression: 'attribute_not_exists(id)',
      },
    };
    const what = `creating ${rec.id}`;
    for (let attempt = 1; ; attempt++) {
      const count = await this.#countWrite(rec.owner, 1, quota);
      if (count === undefined) return false;
      const failed = await this.#requests.transact([put, count, ...this.#typeWrites(rec.id, undefined, rec)], what);
      if (failed === undefined) return true;
      if (failed[0]?.Code === 'ConditionalCheckFailed') throw new SubscriptionExistsError(rec.id);
      // The count reached the quota meanwhile, or its item was created meanwhile (another create,
      // on any instance): read it again, after a short random pause.
      if (attempt >= COUNT_ATTEMPTS) throw new WriteConflictError(what, attempt);
      await delay(Math.random() * 5 * attempt);
    }
  }

  /**
   * The transaction item that moves `owner`'s subscription count by `delta`: `ADD`, which commutes,
   * so creates and deletes of one client's different subscriptions never fail each other's
   * conditions (they may still conflict, and are retried); a create's carries the condition that
   * the count is below `quota`, so no create takes it past the quota, whatever other instances do
   * meanwhile. Undefined when the owner holds `quota` already. An owner without a count item holds
   * none (once `ensureOwnerCounts` has counted the owners of older tables) and gets one,
   * conditioned on there still being none.
   */
  async #countWrite(owner: string, delta: 1 | -1, quota?: number): Promise<TransactWriteItem | undefined> {
    const key = ownerCountKey(owner);
    const TableName = this.#tables.subscriptionTypes;
    const read = () => this.#client.send(new GetItemCommand({ TableName, Key: key, ConsistentRead: true }));
    let item = (await read()).Item;
    if (item === undefined && (await this.ensureOwnerCounts()) >= 0) item = (await read()).Item;
    const held = item === undefined ? 0 : readNumber(item, 'held');
    const limited = delta > 0 && quota !== undefined && Number.isFinite(quota);
    if (limited && held >= (quota as number)) return undefined;
    const e = new Expression();
    if (item === undefined) {
      return {
        Put: {
          TableName,
          Item: { ...key, held: N(Math.max(delta, 0)) },
          ConditionExpression: `attribute_not_exists(${e.name('held')})`,
          ...e.bindings,
        },
      };
    }
    e.add('held', N(delta));
    const exists = `attribute_exists(${e.name('held')})`;
    return {
      Update: {
        TableName,
        Key: key,
        UpdateExpression: e.update,
        ConditionExpression: limited ? `${exists} AND ${e.name('held')} < ${e.value(N(quota as number))}` : exists,
        ...e.bindings,
      },
    };
  }

  /**
   * Gives every owner a count item unless a marker says it was done: for tables written before
   * the counts were kept (the quota check counted a GSI then, which lags). Run by the first create
   * or delete that finds its owner without one, so only what writes subscriptions writes counts.
   * Safe alongside creates and deletes on other instances: no write changes a count before its
   * item exists and count items are never removed, so an item written here (only if there is none
   * yet) holds an exact count. Returns how many it wrote, and -1 when it was done already.
   */
  async ensureOwnerCounts(): Promise<number> {
    const TableName = this.#tables.subscriptionTypes;
    const marker = await this.#client.send(
      new GetItemCommand({ TableName, Key: OWNER_COUNTS_MARKER, ConsistentRead: true }),
    );
    if (marker.Item !== undefined) return -1;
    const held = new Map<string, number>();
    const items = await this.#requests.scanAll({
      TableName: this.#tables.subscriptions,
      ConsistentRead: true,
      ProjectionExpression: '#owner',
      ExpressionAttributeNames: { '#owner': 'owner' },
    });
    for (const item of items) {
      const owner = readString(item, 'owner');
      held.set(owner, (held.get(owner) ?? 0) + 1);
    }
    const written = await inBursts([...held], ([owner, n]) =>
      conditionHeld(
        this.#client.send(
          new PutItemCommand({
            TableName,
            Item: { ...ownerCountKey(owner), held: N(n) },
            ConditionExpression: 'attribute_not_exists(held)',
          }),
        ),
      ),
    );
    await this.#client.send(new PutItemCommand({ TableName, Item: OWNER_COUNTS_MARKER }));
    return written.filter(Boolean).length;
  }

  async getSubscription(id: string): Promise<SubscriptionRecord | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({ TableName: this.#tables.subscriptions, Key: { id: S(id) }, ConsistentRead: true }),
    );
    return out.Item === undefined ? undefined : fromSubscriptionItem(out.Item);
  }

  async listSubscriptions(owner?: string): Promise<SubscriptionRecord[]> {
    const items =
      owner === undefined
        ? await this.#requests.scanAll({ TableName: this.#tables.subscriptions, ConsistentRead: true })
        : await this.#requests.queryAll(this.#byOwner(owner));
    // Same order as SQLite's `ORDER BY created_at, id` (binary string comparison).
    return items.map(fromSubscriptionItem).sort((a, b) => compare(a.createdAt, b.createdAt) || compare(a.id, b.id));
  }

  #byOwner(owner: string): QueryCommandInput {
    return {
      TableName: this.#tables.subscriptions,
      IndexName: INDEX.byOwner,
      KeyConditionExpression: '#owner = :owner',
      ExpressionAttributeNames: { '#owner': 'owner' },
      ExpressionAttributeValues: { ':owner': S(owner) },
    };
  }

  async replaceSubscription(
    rec: SubscriptionRecord,
    expected?: { readonly status: SubscriptionStatus; readonly updatedAt: string },
  ): Promise<SubscriptionRecord | undefined> {
    const stillExpected = (current: SubscriptionRecord) =>
      expected === undefined || (current.status === expected.status && current.updatedAt === expected.updatedAt);
    // Owner, creation time and the event counter are the store's: not touched here.
    const update = (updatedAt: string) =>
      new Expression()
        .set('kind', S(rec.kind))
        .set('topic', S(rec.topic))
        .set('status', S(rec.status))
        .setOrRemove('error', rec.error === undefined ? undefined : S(rec.error))
        .set('match', S(storedMatch(rec.match)))
        .set('channel', S(JSON.stringify(rec.channel)))
        .set('webhookSecret', S(rec.webhookSecret))
        .setOrRemove(
          'previousSecret',
          rec.previousSecret === undefined ? undefined : S(JSON.stringify(rec.previousSecret)),
        )
        .setOrRemove('end', rec.end === undefined ? undefined : S(rec.end))
        .set('updatedAt', S(updatedAt))
        .set('resource', S(JSON.stringify(rec.resource)))
        .copyOrRemove('collectingOwner', 'owner', COLLECTING.includes(rec.status));
    const written = await this.#writeSubscription(rec.id, (current) => {
      if (!stillExpected(current)) return undefined;
      const updatedAt = nextVersionAt(rec.updatedAt, current.updatedAt);
      const next = {
        ...rec,
        owner: current.owner,
        createdAt: current.createdAt,
        eventsSinceStart: current.eventsSinceStart,
        updatedAt,
      };
      return { next, update: update(updatedAt) };
    });
    return written?.next;
  }

  async updateStatus(id: string, update: StatusUpdate, at: string): Promise<SubscriptionRecord | undefined> {
    const { status, error, expected, unchangedSince: since } = update;
    const written = await this.#writeSubscription(id, ({ error: _previous, ...current }) => {
      if (expected !== undefined && !expected.includes(current.status)) return undefined;
      if (since !== undefined && current.updatedAt !== since) return undefined;
      const updatedAt = nextVersionAt(at, current.updatedAt);
      return {
        next: { ...current, status, ...(error === undefined ? {} : { error }), updatedAt },
        update: new Expression()
          .set('status', S(status))
          .setOrRemove('error', error === undefined ? undefined : S(error))
          .set('updatedAt', S(updatedAt))
          .copyOrRemove('collectingOwner', 'owner', COLLECTING.includes(status)),
      };
    });
    return written?.next;
  }

  /**
   * Kept apart from the subscription item (a ring in the type index table: items.ts, versionKey):
   * every matched event updates that item, and DynamoDB charges such a write by the whole item, so
   * versions on it would multiply the cost of every event. Versions of an earlier subscription under
   * the same id (a delete that stopped before removing them) are told apart by `createdAt`.
   */
  async subscriptionVersions(id: string): Promise<SubscriptionVersion[]> {
    const current = await this.getSubscription(id);
    if (current === undefined) return [];
    const items = await this.#requests.queryAll({
      TableName: this.#tables.subscriptionTypes,
      ConsistentRead: true,
      KeyConditionExpression: 'resourceType = :p',
      ExpressionAttributeValues: { ':p': S(versionsPartition(id)) },
    });
    return items
      .map(fromVersionItem)
      .filter((v) => v.createdAt === current.createdAt)
      .sort((a, b) => compare(b.updatedAt, a.updatedAt))
      .map(({ createdAt: _createdAt, ...version }) => version);
  }

  /** Deletes the ring's items (those of an earlier subscription under the id too); counts the current one's. */
  async forgetSubscriptionVersions(id: string): Promise<number> {
    const kept = (await this.subscriptionVersions(id)).length;
    await this.#deleteVersionRing(id);
    return kept;
  }

  /** The ring's ten keys, known without a read (items.ts, versionKey). */
  async #deleteVersionRing(id: string): Promise<void> {
    const slots = Array.from({ length: EARLIER_VERSIONS_KEPT }, (_, slot) => versionKey(id, slot));
    await this.#requests.deleteAll(this.#tables.subscriptionTypes, slots);
  }

  async deleteSubscription(id: string, expectedUpdatedAt?: string): Promise<boolean> {
    // The subscription first (with `expectedUpdatedAt`, conditioned on the item as read), then its
    // notifications: a delete that fails (a changed version, a conflict) keeps them all, and none
    // can be added after (an acceptance's transaction checks that the subscription exists). A crash
    // in between leaves notifications of a deleted subscription (never read again; `purge` takes them).
    const deleted = await this.#writeSubscription(id, (current) =>
      expectedUpdatedAt === undefined || current.updatedAt === expectedUpdatedAt ? { next: undefined } : undefined,
    );
    if (deleted !== undefined || expectedUpdatedAt === undefined) {
      await this.#deleteNotificationsOf(id);
      await this.#deleteVersionRing(id);
    }
    return deleted !== undefined;
  }

  /**
   * Fills the type index from the subscriptions table unless a marker item says it was built:
   * for tables written before the index existed. Safe alongside subscription writes (each item is
   * written only if its subscription is unchanged since the scan) and alongside itself.
   * Returns how many subscriptions it indexed.
   */
  async ensureTypeIndex(): Promise<number> {
    const marker = { TableName: this.#tables.subscriptionTypes, Key: TYPE_INDEX_MARKER };
    if ((await this.#client.send(new GetItemCommand({ ...marker, ConsistentRead: true }))).Item !== undefined) return 0;
    const items = await this.#requests.scanAll({ TableName: this.#tables.subscriptions, ConsistentRead: true });
    const indexed = await inBursts(items, async (item) => {
      const rec = fromSubscriptionItem(item);
      const puts = this.#typeWrites(rec.id, undefined, rec);
      if (puts.length === 0) return false;
      const e = new Expression();
      const check: TransactWriteItem = {
        ConditionCheck: {
          TableName: this.#tables.subscriptions,
          Key: { id: S(rec.id) },
          ConditionExpression: unchangedSince(e, item),
          ...e.bindings,
        },
      };
      return (await this.#requests.transact([check, ...puts], `indexing ${rec.id}`)) === undefined;
    });
    await this.#client.send(new PutItemCommand({ TableName: marker.TableName, Item: marker.Key }));
    return indexed.filter(Boolean).length;
  }

  async candidatesFor(resourceType: string): Promise<readonly MatchCandidate[]> {
    const query = (type: string) =>
      this.#requests.queryAll({
        TableName: this.#tables.subscriptionTypes,
        ConsistentRead: true,
        KeyConditionExpression: 'resourceType = :t',
        ExpressionAttributeValues: { ':t': S(type) },
      });
    const types = resourceType === ANY_TYPE ? [ANY_TYPE] : [resourceType, ANY_TYPE];
    const items = (await Promise.all(types.map(query))).flat();
    return items.map((item) => {
      const end = readOptionalString(item, 'end');
      return {
        id: readString(item, 'subscriptionId'),
        match: matchFromStore(readString(item, 'match')),
        ...(end === undefined ? {} : { end }),
      };
    });
  }

  acceptChanges(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    const run = this.#accepting.then(() => this.#acceptance.accept(items, receivedAt));
    this.#accepting = run.catch(() => undefined);
    return run;
  }

  async pendingNotifications(
    subscriptionId: string,
    afterEventNumber: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    if (limit <= 0) return [];
    const items = await this.#requests.queryAll(
      {
        TableName: this.#tables.notifications,
        IndexName: INDEX.pending,
        KeyConditionExpression: 'pendingSubscriptionId = :s AND eventNumber > :after',
        ExpressionAttributeValues: { ':s': S(subscriptionId), ':after': N(afterEventNumber) },
      },
      limit,
    );
    return withResources(this.#requests, this.#tables.notifications, items);
  }

  async subscriptionsWithPending(): Promise<string[]> {
    const items = await this.#requests.scanAll({
      TableName: this.#tables.notifications,
      IndexName: INDEX.pending,
      ProjectionExpression: 'pendingSubscriptionId',
    });
    return [...new Set(items.map((i) => readString(i, 'pendingSubscriptionId')))].sort(compare);
  }

  async recordDeliveries(updates: readonly DeliveryUpdate[]): Promise<void> {
    // Writes run in parallel, so keep only the last outcome per notification (SQLite applies in order).
    const last = new Map<string, DeliveryUpdate>();
    for (const u of updates) last.set(`${u.subscriptionId}\n${u.eventNumber}`, u);
    // Marked bundles' first notifications after the rest (DeliveryUpdate.bundleHead).
    const all = [...last.values()];
    await inBursts(
      all.filter((u) => u.bundleHead !== true),
      (u) => this.#recordDelivery(u),
    );
    await inBursts(
      all.filter((u) => u.bundleHead === true),
      (u) => this.#recordDelivery(u),
    );
  }

  /**
   * One conditional update per bundle, on its first notification while it is pending (one a
   * delivery or a dead letter got to first keeps no mark: it is not sent again) and still has the
   * mark the caller read: a holder that stalled past its lease does not overwrite the next holder's.
   */
  markBundles(marks: readonly BundleMark[]): Promise<boolean[]> {
    return inBursts(marks, (m) => {
      const e = new Expression().set('bundleLast', N(m.last));
      const seen =
        m.previous === undefined
          ? `attribute_not_exists(${e.name('bundleLast')})`
          : `${e.name('bundleLast')} = ${e.value(N(m.previous))}`;
      return conditionHeld(
        this.#client.send(
          new UpdateItemCommand({
            TableName: this.#tables.notifications,
            Key: { subscriptionId: S(m.subscriptionId), eventNumber: N(m.eventNumber) },
            UpdateExpression: e.update,
            ConditionExpression: `${e.name('state')} = ${e.value(S('pending'))} AND ${seen}`,
            ...e.bindings,
          }),
        ),
      );
    });
  }

  async notificationsInRange(
    subscriptionId: string,
    from: number,
    to: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    // Numbers start at 1 (0 is the lane's lease item); DynamoDB rejects BETWEEN with a lower bound above the upper one.
    const low = Math.max(from, 1);
    if (low > to || limit <= 0) return [];
    // A void row (a number taken for an acceptance that never wrote it) is no notification.
    const items = await this.#requests.queryAll(
      {
        TableName: this.#tables.notifications,
        ConsistentRead: true,
        KeyConditionExpression: 'subscriptionId = :s AND eventNumber BETWEEN :from AND :to',
        FilterExpression: '#state <> :void',
        ExpressionAttributeNames: { '#state': 'state' },
        ExpressionAttributeValues: { ':s': S(subscriptionId), ':from': N(low), ':to': N(to), ':void': S('void') },
      },
      limit,
    );
    const notes = await withResources(this.#requests, this.#tables.notifications, items);
    if (!notes.some((n) => n.state === 'pending')) return notes;
    // As on SQLite: a row at or below the lane's watermark (`laneThrough`, on the lease item at
    // number 0) still in state `pending` was delivered: its own write failed (logged) after the lane
    // had moved past it, and nothing sends it again.
    const lease = await this.#client.send(
      new GetItemCommand({
        TableName: this.#tables.notifications,
        Key: laneKey(subscriptionId),
        ProjectionExpression: 'laneThrough',
        ConsistentRead: true,
      }),
    );
    const through = (lease.Item === undefined ? undefined : readOptionalNumber(lease.Item, 'laneThrough')) ?? 0;
    return notes.map((n) => {
      if (n.state !== 'pending' || n.eventNumber > through) return n;
      const { lastError: _stale, ...rest } = n;
      return { ...rest, state: 'delivered', attempts: Math.max(n.attempts, 1) };
    });
  }

  /**
   * One consistent query of the subscription's notifications, then one conditional update per dead
   * letter or pending retry: each is reset only if it is still what the query read, so an outcome
   * recorded meanwhile (a delivery, a dead letter) is not undone.
   */
  async requeueDeadLetters(subscriptionId: string, dueAt: number): Promise<number> {
    // Counted before the fence is made: the settle that follows a failed fence write still finds it
    // (and lifts the fence, should the write have landed after all).
    const key = fenceKey(subscriptionId, dueAt);
    const fence = this.#fences.get(key) ?? { token: randomUUID(), requeues: 0 };
    fence.requeues++;
    this.#fences.set(key, fence);
    // First a new epoch, and a fence no lane passes until `requeueSettled`: an attempt's failure
    // settling from here on (in any instance) leaves the rows as this re-queue leaves them (see
    // DeliveryUpdate.laneEpoch), and nothing is sent before the re-activated subscription is written.
    await fenceLane(this.#client, this.#tables.notifications, subscriptionId, fence.token, dueAt);
    // Kept fresh only while the rows are reset: what is left before the settle is the subscription
    // write (one request), and a fence one refresh old still stands for FENCE_MS less that refresh
    // (45 s); a caller that never settles leaves a fence that runs out, as one that died does.
    const stop = keepFenced(
      this.#client,
      this.#tables.notifications,
      subscriptionId,
      fence.token,
      this.#clock,
      this.#fenceRefreshMs,
    );
    try {
      return await this.#requeue(subscriptionId, dueAt);
    } finally {
      stop();
    }
  }

  /** Lifts the fence this store made for the re-queue at `dueAt`, if any (not twice, nor another's). */
  async requeueSettled(subscriptionId: string, dueAt: number): Promise<void> {
    const key = fenceKey(subscriptionId, dueAt);
    const fence = this.#fences.get(key);
    if (fence === undefined || --fence.requeues > 0) return;
    this.#fences.delete(key);
    await unfenceLane(this.#client, this.#tables.notifications, subscriptionId, fence.token);
  }

  async #requeue(subscriptionId: string, dueAt: number): Promise<number> {
    // Every dead or pending one: the pending ones never attempted stay as they are, but count for
    // the lane's watermark below (so a re-queue repeated after a failure half-way lowers it again).
    const outstanding = await this.#requests.queryAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      // Above the lease item (0), so not through the resource items (negative numbers) either.
      KeyConditionExpression: 'subscriptionId = :s AND eventNumber > :lane',
      FilterExpression: '#state IN (:dead, :pending)',
      ProjectionExpression: 'subscriptionId, eventNumber, #state, attempts',
      ExpressionAttributeNames: { '#state': 'state' },
      ExpressionAttributeValues: {
        ':s': S(subscriptionId),
        ':lane': N(0),
        ':dead': S('dead'),
        ':pending': S('pending'),
      },
    });
    const requeuable = outstanding.filter(
      (key) => readString(key, 'state') === 'dead' || readNumber(key, 'attempts') > 0,
    );
    const requeued = await inBursts(requeuable, async (key) => {
      const wasDead = readString(key, 'state') === 'dead';
      const e = new Expression()
        .set('state', S('pending'))
        .set('attempts', N(0))
        .set('dueAt', N(dueAt))
        .setOrRemove('lastError', undefined)
        .copyOrRemove('pendingSubscriptionId', 'subscriptionId', true);
      const condition = wasDead
        ? `${e.name('state')} = ${e.value(S('dead'))}`
        : `${e.name('state')} = ${e.value(S('pending'))} AND ${e.name('attempts')} > ${e.value(N(0))}`;
      const held = await conditionHeld(
        this.#client.send(
          new UpdateItemCommand({
            TableName: this.#tables.notifications,
            Key: notificationKey(key),
            UpdateExpression: e.update,
            ConditionExpression: condition,
            ...e.bindings,
          }),
        ),
      );
      return held && wasDead;
    });
    // Then (the rows pending first) the lane's watermark goes below them: a holder reads them.
    if (outstanding.length > 0) {
      const lowest = Math.min(...outstanding.map((key) => readNumber(key, 'eventNumber')));
      await lowerLane(this.#client, this.#tables.notifications, subscriptionId, lowest);
    }
    return requeued.filter(Boolean).length;
  }

  /** Two phases (notifications, then event ids); an aborted `signal` skips what has not started. */
  /**
   * Also finishes deletes that did not finish: the rows and lease item of a subscription no longer
   * in the store (a crash between a delete and the delete of its notifications, or a lane that
   * renewed its lease just after another instance deleted the subscription) go too, pending ones
   * included, and count among the notifications purged. Lease items are read on every purge (one
   * per subscription that ever delivered) to find those.
   */
  async purge(before: number, signal?: AbortSignal): Promise<{ notifications: number; eventIds: number }> {
    if (isAborted(signal)) return { notifications: 0, eventIds: 0 };
    const scanned = await this.#requests.scanAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      FilterExpression: 'createdAt < :before OR eventNumber = :lane',
      ProjectionExpression: 'subscriptionId, eventNumber, #state',
      ExpressionAttributeNames: { '#state': 'state' },
      ExpressionAttributeValues: { ':before': N(before), ':lane': N(0) },
    });
    const gone = await this.#deletedSubscriptions(scanned.map((item) => readString(item, 'subscriptionId')));
    let swept = 0;
    for (const id of gone) {
      if (isAborted(signal)) return { notifications: swept, eventIds: 0 };
      swept += await this.#deleteNotificationsOf(id);
      await this.#deleteVersionRing(id);
    }
    const left = scanned.filter((item) => !gone.has(readString(item, 'subscriptionId')));
    const oldNotes = left.filter(
      (item) => readNumber(item, 'eventNumber') > 0 && DONE_STATES.has(readString(item, 'state')),
    );
    const notes = await inBursts(oldNotes, (key) =>
      // Re-checked on delete: a dead letter requeued since the scan is pending and stays.
      conditionHeld(
        this.#client.send(
          new DeleteItemCommand({
            TableName: this.#tables.notifications,
            Key: notificationKey(key),
            ConditionExpression: '#state IN (:delivered, :dead, :void) AND createdAt < :before',
            ExpressionAttributeNames: { '#state': 'state' },
            ExpressionAttributeValues: DONE_BEFORE(before),
          }),
        ),
      ),
    );
    // Then the resource items of the notifications deleted, and of any an earlier purge deleted
    // before it stopped: every one scanned whose notification is not still there.
    const deleted = new Set(oldNotes.filter((_, i) => notes[i] === true).map(notificationKeyOf));
    const kept = new Set(
      left
        .filter((item) => readNumber(item, 'eventNumber') > 0)
        .map(notificationKeyOf)
        .filter((key) => !deleted.has(key)),
    );
    await this.#requests.deleteAll(this.#tables.notifications, resourceItemsToPurge(left, kept).map(notificationKey));
    const purged = swept + notes.filter(Boolean).length;
    if (isAborted(signal)) return { notifications: purged, eventIds: 0 };
    const oldIds = await this.#requests.scanAll({
      TableName: this.#tables.eventIds,
      ConsistentRead: true,
      FilterExpression: 'receivedAt < :before',
      ProjectionExpression: 'eventId, #scope',
      ExpressionAttributeNames: { '#scope': 'scope' },
      ExpressionAttributeValues: { ':before': N(before) },
    });
    const ids = await inBursts(oldIds, (key) =>
      conditionHeld(
        this.#client.send(
          new DeleteItemCommand({
            TableName: this.#tables.eventIds,
            Key: { eventId: S(readString(key, 'eventId')), scope: S(readString(key, 'scope')) },
            ConditionExpression: 'attribute_exists(eventId)',
          }),
        ),
      ),
    );
    return {
      notifications: purged,
      // Markers go with their event id but are not event ids themselves.
      eventIds: oldIds.filter((key, i) => ids[i] === true && readString(key, 'scope') === EVENT_SCOPE).length,
    };
  }

  /**
   * One read of the subscription's notifications, newest event number first, NOTIFIED_PAGE a page,
   * until one accepted (`createdAt`: the acceptance's `receivedAt`, which every notification
   * carries and nothing rewrites) before the bound (`since` - NOTIFIED_SCAN_SLACK_MS). Numbers
   * follow acceptance order within a process but may interleave across processes (see the caveats
   * above): one accepted after the bound yet numbered below one accepted before it is not read; the
   * reconciler then notifies again, which at-least-once allows. Void rows and the lease item
   * (number 0) are no notifications. A subscription without notifications answers an empty map;
   * one deleted by a delete that crashed before its notifications went (purge takes them) is read
   * like any other: the reconciler notifies no deleted subscription either way.
   */
  async notifiedResources(subscriptionId: string, since: number, signal?: AbortSignal): Promise<Map<string, number>> {
    const found = new Map<string, number>();
    const bound = since - NOTIFIED_SCAN_SLACK_MS;
    let done = false;
    await this.#requests.eachPage(
      {
        TableName: this.#tables.notifications,
        ConsistentRead: true,
        // Above the lease item (number 0); newest first.
        KeyConditionExpression: 'subscriptionId = :s AND eventNumber > :lane',
        ScanIndexForward: false,
        ProjectionExpression: 'createdAt, #state, #change',
        ExpressionAttributeNames: { '#state': 'state', '#change': 'change' },
        ExpressionAttributeValues: { ':s': S(subscriptionId), ':lane': N(0) },
      },
      () => (done || signal?.aborted === true ? 0 : NOTIFIED_PAGE),
      (out) => {
        for (const item of out.Items ?? []) {
          if (readString(item, 'state') === 'void') continue;
          if (readNumber(item, 'createdAt') < bound) {
            done = true;
            return;
          }
          const change = JSON.parse(readString(item, 'change')) as ResourceChange;
          const time = Date.parse(change.time);
          if (change.resourceId === undefined || !(time >= since)) continue;
          // FHIR types have no `/`.
          const key = `${change.resourceType}/${change.resourceId}`;
          if (!(time <= (found.get(key) ?? Number.NEGATIVE_INFINITY))) found.set(key, time);
        }
      },
    );
    if (!done) signal?.throwIfAborted();
    return found;
  }

  async reconcileCheckpoint(source: string): Promise<number | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({
        TableName: this.#tables.eventIds,
        Key: checkpointKey(source),
        ProjectionExpression: '#through',
        ExpressionAttributeNames: { '#through': CHECKPOINT_ATTRIBUTE },
        ConsistentRead: true,
      }),
    );
    return out.Item === undefined ? undefined : readOptionalNumber(out.Item, CHECKPOINT_ATTRIBUTE);
  }

  /** A save that finds a checkpoint at or past `through` (its condition fails) leaves it: that is its answer. */
  async saveReconcileCheckpoint(source: string, through: number): Promise<void> {
    await conditionHeld(
      this.#client.send(
        new UpdateItemCommand({
          TableName: this.#tables.eventIds,
          Key: checkpointKey(source),
          UpdateExpression: 'SET #through = :through',
          ConditionExpression: 'attribute_not_exists(#through) OR #through < :through',
          ExpressionAttributeNames: { '#through': CHECKPOINT_ATTRIBUTE },
          ExpressionAttributeValues: { ':through': N(through) },
        }),
      ),
    );
  }

  async ping(): Promise<void> {
    // A data-plane read: /healthz is polled, and DescribeTable has low control-plane limits.
    await this.#client.send(new GetItemCommand({ TableName: this.#tables.subscriptions, Key: { id: S(PING_KEY) } }));
  }

  /** The client belongs to the composition root, which destroys it; only wait for acceptances. */
  async close(): Promise<void> {
    await this.#accepting;
  }

  /**
   * Changes (or, when the plan has no `next`, deletes) a subscription and its type index items in
   * one transaction. Reads it first, consistently; the write is conditional on the attributes the
   * plan and the index depend on being unchanged since, and is read and planned again when they
   * changed. Undefined when the subscription does not exist or `plan` declines.
   */
  async #writeSubscription(
    id: string,
    plan: (current: SubscriptionRecord) => SubscriptionPlan | undefined,
  ): Promise<{ readonly next: SubscriptionRecord | undefined } | undefined> {
    for (let attempt = 1; ; attempt++) {
      const out = await this.#client.send(
        new GetItemCommand({ TableName: this.#tables.subscriptions, Key: { id: S(id) }, ConsistentRead: true }),
      );
      if (out.Item === undefined) return undefined;
      const current = fromSubscriptionItem(out.Item);
      const planned = plan(current);
      if (planned === undefined) return undefined;
      const e = planned.next === undefined ? new Expression() : planned.update;
      const key = {
        TableName: this.#tables.subscriptions,
        Key: { id: S(id) },
        ConditionExpression: unchangedSince(e, out.Item),
      };
      // An update keeps the version it replaces (items.ts, versionKey) in the same transaction.
      const written = out.Item[VERSIONS_WRITTEN] === undefined ? 0 : readNumber(out.Item, VERSIONS_WRITTEN);
      if (planned.next !== undefined) e.set(VERSIONS_WRITTEN, N(written + 1));
      const write: TransactWriteItem =
        planned.next === undefined
          ? { Delete: { ...key, ...e.bindings } }
          : { Update: { ...key, UpdateExpression: e.update, ...e.bindings } };
      const version: TransactWriteItem[] =
        planned.next === undefined
          ? []
          : [
              {
                Put: {
                  TableName: this.#tables.subscriptionTypes,
                  Item: toVersionItem(current, written % EARLIER_VERSIONS_KEPT),
                },
              },
            ];
      // A delete gives its owner's count back in the same transaction.
      const count =
        planned.next === undefined ? [(await this.#countWrite(current.owner, -1)) as TransactWriteItem] : [];
      const what = `writing subscription ${id}`;
      const failed = await this.#requests.transact(
        [write, ...version, ...count, ...this.#typeWrites(id, current, planned.next)],
        what,
      );
      if (failed === undefined) return { next: planned.next };
      // Changed since the read: plan again from what is there now.
      if (attempt >= MAX_TRANSACTION_ATTEMPTS) throw new WriteConflictError(what, attempt);
    }
  }

  /** What moves a subscription's type index items from `before` to `after` (absent: none). */
  #typeWrites(id: string, before: IndexedFields | undefined, after: IndexedFields | undefined): TransactWriteItem[] {
    const old = indexedTypes(before);
    const next = indexedTypes(after);
    const same =
      before !== undefined &&
      after !== undefined &&
      JSON.stringify(before.match) === JSON.stringify(after.match) &&
      before.end === after.end;
    const key = (type: string) => ({ resourceType: S(type), subscriptionId: S(id) });
    return [
      ...old
        .filter((type) => !next.includes(type))
        .map((type) => ({ Delete: { TableName: this.#tables.subscriptionTypes, Key: key(type) } })),
      ...next
        .filter((type) => !(same && old.includes(type)))
        .map((type) => ({
          Put: {
            TableName: this.#tables.subscriptionTypes,
            Item: {
              ...key(type),
              match: S(storedMatch((after as IndexedFields).match)),
              ...(after?.end === undefined ? {} : { end: S(after.end) }),
            },
          },
        })),
    ];
  }

  async #recordDelivery(u: DeliveryUpdate): Promise<boolean> {
    const e = new Expression()
      .set('state', S(u.state))
      .set('attempts', N(u.attempts))
      .set('dueAt', N(u.dueAt))
      .setOrRemove('lastError', u.lastError === undefined ? undefined : S(u.lastError))
      .copyOrRemove('pendingSubscriptionId', 'subscriptionId', u.state === 'pending');
    // An outcome for a notification that no longer exists is ignored, not written as a new item. A
    // pending one (a retry, or an attempt a re-queue started over) is for a row its lane was
    // attempting, so pending: written only while it still is, never over a delivery another
    // container made after the lane changed hands (that would send it again, or strand it pending
    // below the lane's watermark).
    const exists = `attribute_exists(${e.name('subscriptionId')})`;
    const update = {
      TableName: this.#tables.notifications,
      Key: { subscriptionId: S(u.subscriptionId), eventNumber: N(u.eventNumber) },
      UpdateExpression: e.update,
      ConditionExpression:
        u.state === 'pending' ? `${exists} AND ${e.name('state')} = ${e.value(S('pending'))}` : exists,
      ...e.bindings,
    };
    if (u.laneEpoch === undefined) return conditionHeld(this.#client.send(new UpdateItemCommand(update)));
    // Only while the lane is at the epoch the attempt began in: a re-queue since started it over.
    const check = sameLaneEpoch(this.#tables.notifications, u.subscriptionId, u.laneEpoch);
    const what = `recording ${u.subscriptionId} #${u.eventNumber}`;
    return (await this.#requests.transact([{ ConditionCheck: check }, { Update: update }], what)) === undefined;
  }

  /**
   * Deletes every row of the subscription, its lease item and resource items included; answers
   * how many were notifications.
   */
  async #deleteNotificationsOf(subscriptionId: string): Promise<number> {
    const keys = await this.#requests.queryAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      KeyConditionExpression: 'subscriptionId = :s',
      ProjectionExpression: 'subscriptionId, eventNumber',
      ExpressionAttributeValues: { ':s': S(subscriptionId) },
    });
    await this.#requests.deleteAll(this.#tables.notifications, keys.map(notificationKey));
    return keys.filter((key) => readNumber(key, 'eventNumber') > 0).length;
  }

  /** Which of `ids` the subscriptions table no longer holds (a consistent read). */
  async #deletedSubscriptions(ids: readonly string[]): Promise<Set<string>> {
    const gone = new Set(ids);
    const found = await this.#requests.batchGet(
      this.#tables.subscriptions,
      [...gone].map((id) => ({ id: S(id) })),
      'id',
    );
    for (const item of found) gone.delete(readString(item, 'id'));
    return gone;
  }
}

/** Values of the purge's condition: notifications done with (and void rows) received before `before`. */
/** The states of a row the retention purge may take (a pending one waits for its delivery). */
const DONE_STATES: ReadonlySet<string> = new Set(['delivered', 'dead', 'void']);

const DONE_BEFORE = (before: number): Record<string, AttributeValue> => ({
  ':delivered': S('delivered'),
  ':dead': S('dead'),
  ':void': S('void'),
  ':before': N(before),
});

/** A function, so that a check after an await is not narrowed away by the one before it. */
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}
