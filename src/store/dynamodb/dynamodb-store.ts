import { setTimeout as delay } from 'node:timers/promises';
import {
  BatchGetItemCommand,
  BatchWriteItemCommand,
  type CancellationReason,
  ConditionalCheckFailedException,
  DeleteItemCommand,
  type DynamoDBClient,
  GetItemCommand,
  PutItemCommand,
  QueryCommand,
  type QueryCommandInput,
  type QueryCommandOutput,
  ScanCommand,
  type ScanCommandInput,
  TransactionCanceledException,
  type TransactWriteItem,
  TransactWriteItemsCommand,
  UpdateItemCommand,
} from '@aws-sdk/client-dynamodb';
import type {
  Channel,
  DeliveryState,
  FhirResource,
  MatchSpec,
  Notification,
  ResourceChange,
  StoredNotification,
  SubscriptionKind,
  SubscriptionRecord,
  SubscriptionStatus,
} from '../../core/types.js';
import type { AcceptItem, AcceptOutcome, DeliveryUpdate, MatchCandidate, StatusUpdate, Store } from '../store.js';
import { Expression, type Item, N, readNumber, readOptionalString, readString, S } from './attributes.js';
import { SubscriptionExistsError, UnprocessedItemsError, WriteConflictError } from './errors.js';
import { INDEX, type TableNames, TTL_ATTRIBUTE, tableNames } from './tables.js';

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
 * - `event-ids` (pk `eventId`, sk `scope`): scope `#event` marks an EventBridge id as accepted
 *   (the dedupe key); scope `<subscriptionId>` is the marker "this event already has notification
 *   `eventNumber` for this subscription". Both carry the TTL attribute `expiresAt`; TTL deletion
 *   is lazy, so reads treat an expired item as absent.
 * - `connections` (pk `connectionId`, TTL): created here, used by the API Gateway pusher.
 * - `subscription-types` (pk `resourceType`, sk `subscriptionId`): the type index `candidatesFor`
 *   reads. One item per resource type (or `*`) of each collecting subscription, with its `match`
 *   and `end`; written in the same TransactWriteItems as every subscription write, which reads the
 *   subscription first and is conditional on it being unchanged since (else it reads again).
 *
 * acceptChanges, per event, in this order:
 *   1. one consistent BatchGetItem of the dedupe keys and markers of the whole batch;
 *   2. a live `#event` key ⇒ duplicate, nothing written;
 *   3. per matched subscription: a live marker ⇒ reuse its notification (a retry of a
 *      half-finished acceptance); else take the next number (conditional ADD) and write the
 *      notification and its marker in one TransactWriteItems, with a ConditionCheck that the
 *      subscription still exists (so a concurrent delete cannot leave an orphan);
 *   4. write the `#event` key last. Until it is written, a retry redoes only what is missing.
 * Every write is acknowledged by DynamoDB before the method resolves: an accepted event is durable.
 *
 * Caveats, honestly:
 * - Event numbers can have gaps. A process that dies between step 3's counter increment and its
 *   transaction, or a subscription deleted in between, consumes a number no notification carries.
 *   The Backport IG lets a client see a gap in `events-since-subscription-start` and ask `$events`,
 *   which then has nothing for that number. SQLite never has gaps.
 * - Calls within one store instance are serialised, so numbers follow acceptance order. Across
 *   processes (several Lambdas) two batches may interleave numbers for the same subscription.
 * - GSI reads are eventually consistent on AWS: `listSubscriptions(owner)` may briefly miss a new
 *   subscription, and `pendingNotifications` / `subscriptionsWithPending` may briefly show a
 *   notification that was just delivered (a redelivery; receivers dedupe on `webhook-id`).
 *   DynamoDB Local updates GSIs synchronously, so the contract suite cannot see this.
 * - `recordDeliveries` writes item by item, not in one transaction (a lost update is a redelivery).
 * - `purge` and `requeueDeadLetters` scan/query with filters: fine for the retention window of a
 *   broker, not free. `deleteSubscription` deletes notifications in batches around the subscription
 *   delete; a crash in between can leave notifications of a deleted subscription behind.
 */

/** The `scope` of the item that marks an EventBridge id as accepted (FHIR ids cannot contain `#`). */
const EVENT_SCOPE = '#event';

/** A subscription id that cannot exist (FHIR ids have no `#`): what `ping` reads. */
const PING_KEY = '#ping';

/** Statuses that still collect notifications; mirrors the matching index and the SQLite adapter. */
const COLLECTING: readonly SubscriptionStatus[] = ['requested', 'active', 'error'];

/** The type index key of subscriptions on every resource type. */
const ANY_TYPE = '*';

/** Marks the type index as built (see ensureTypeIndex); `#` keeps it apart from resource types. */
const TYPE_INDEX_MARKER: Item = { resourceType: S('#index'), subscriptionId: S('#built') };

/** A planned subscription write: the record after it and its update, or (no `next`) a delete. */
type SubscriptionPlan =
  | { readonly next: SubscriptionRecord; readonly update: Expression }
  | { readonly next: undefined };

type IndexedFields = Pick<SubscriptionRecord, 'status' | 'match' | 'end'>;

// 7 days: the default event retention (config.eventRetentionMs); purge() usually removes them first.
const DEFAULT_EVENT_TTL_MS = 7 * 86_400_000;

// DynamoDB's own request limits.
const BATCH_GET_MAX = 100;
const BATCH_WRITE_MAX = 25;
/** Parallel single-item writes per burst: enough to overlap round trips, few enough not to throttle. */
const WRITE_CONCURRENCY = 16;
/** Transaction conflicts (another writer on the same subscription item) are retried this often. */
const MAX_TRANSACTION_ATTEMPTS = 5;
/** Unprocessed batch items are retried this often, with a growing pause as DynamoDB advises. */
const MAX_BATCH_ATTEMPTS = 8;

export interface DynamoDbStoreOptions {
  /** How long an accepted event id (and its markers) deduplicates; the TTL of those items. */
  readonly eventTtlMs?: number;
}

export class DynamoDbStore implements Store {
  readonly #client: DynamoDBClient;
  readonly #tables: TableNames;
  readonly #eventTtlMs: number;
  /** Tail of the acceptChanges chain: calls on one instance run one after another. */
  #accepting: Promise<unknown> = Promise.resolve();

  constructor(client: DynamoDBClient, tablePrefix: string, options: DynamoDbStoreOptions = {}) {
    this.#client = client;
    this.#tables = tableNames(tablePrefix);
    this.#eventTtlMs = options.eventTtlMs ?? DEFAULT_EVENT_TTL_MS;
  }

  async insertSubscription(rec: SubscriptionRecord): Promise<void> {
    const put: TransactWriteItem = {
      Put: {
        TableName: this.#tables.subscriptions,
        Item: toSubscriptionItem(rec),
        ConditionExpression: 'attribute_not_exists(id)',
      },
    };
    const failed = await this.#transact([put, ...this.#typeWrites(rec.id, undefined, rec)], `creating ${rec.id}`);
    if (failed !== undefined) throw new SubscriptionExistsError(rec.id);
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
        ? await this.#scanAll({ TableName: this.#tables.subscriptions, ConsistentRead: true })
        : await this.#queryAll(this.#byOwner(owner));
    // Same order as SQLite's `ORDER BY created_at, id` (binary string comparison).
    return items.map(fromSubscriptionItem).sort((a, b) => compare(a.createdAt, b.createdAt) || compare(a.id, b.id));
  }

  async countSubscriptions(owner: string): Promise<number> {
    let count = 0;
    await this.#eachPage(
      { ...this.#byOwner(owner), Select: 'COUNT' },
      () => Number.POSITIVE_INFINITY,
      (out) => {
        count += out.Count ?? 0;
      },
    );
    return count;
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
    const update = () =>
      new Expression()
        .set('kind', S(rec.kind))
        .set('topic', S(rec.topic))
        .set('status', S(rec.status))
        .setOrRemove('error', rec.error === undefined ? undefined : S(rec.error))
        .set('match', S(JSON.stringify(rec.match)))
        .set('channel', S(JSON.stringify(rec.channel)))
        .set('webhookSecret', S(rec.webhookSecret))
        .setOrRemove(
          'previousSecret',
          rec.previousSecret === undefined ? undefined : S(JSON.stringify(rec.previousSecret)),
        )
        .setOrRemove('end', rec.end === undefined ? undefined : S(rec.end))
        .set('updatedAt', S(rec.updatedAt))
        .set('resource', S(JSON.stringify(rec.resource)))
        .copyOrRemove('collectingOwner', 'owner', COLLECTING.includes(rec.status));
    const written = await this.#writeSubscription(rec.id, (current) =>
      stillExpected(current)
        ? {
            next: {
              ...rec,
              owner: current.owner,
              createdAt: current.createdAt,
              eventsSinceStart: current.eventsSinceStart,
            },
            update: update(),
          }
        : undefined,
    );
    return written?.next;
  }

  async updateStatus(id: string, update: StatusUpdate, at: string): Promise<SubscriptionRecord | undefined> {
    const { status, error, expected } = update;
    const written = await this.#writeSubscription(id, ({ error: _previous, ...current }) =>
      expected === undefined || expected.includes(current.status)
        ? {
            next: { ...current, status, ...(error === undefined ? {} : { error }), updatedAt: at },
            update: new Expression()
              .set('status', S(status))
              .setOrRemove('error', error === undefined ? undefined : S(error))
              .set('updatedAt', S(at))
              .copyOrRemove('collectingOwner', 'owner', COLLECTING.includes(status)),
          }
        : undefined,
    );
    return written?.next;
  }

  async deleteSubscription(id: string): Promise<boolean> {
    // Notifications first, then the subscription, then once more for any that an acceptance
    // committed in between (none can commit after: its transaction checks the subscription exists).
    await this.#deleteNotificationsOf(id);
    const deleted = await this.#writeSubscription(id, () => ({ next: undefined }));
    await this.#deleteNotificationsOf(id);
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
    const items = await this.#scanAll({ TableName: this.#tables.subscriptions, ConsistentRead: true });
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
      return (await this.#transact([check, ...puts], `indexing ${rec.id}`)) === undefined;
    });
    await this.#client.send(new PutItemCommand({ TableName: marker.TableName, Item: marker.Key }));
    return indexed.filter(Boolean).length;
  }

  async candidatesFor(resourceType: string): Promise<readonly MatchCandidate[]> {
    const query = (type: string) =>
      this.#queryAll({
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
        match: JSON.parse(readString(item, 'match')) as MatchSpec,
        ...(end === undefined ? {} : { end }),
      };
    });
  }

  acceptChanges(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    const run = this.#accepting.then(() => this.#accept(items, receivedAt));
    this.#accepting = run.catch(() => undefined);
    return run;
  }

  async pendingNotifications(
    subscriptionId: string,
    afterEventNumber: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    if (limit <= 0) return [];
    const items = await this.#queryAll(
      {
        TableName: this.#tables.notifications,
        IndexName: INDEX.pending,
        KeyConditionExpression: 'pendingSubscriptionId = :s AND eventNumber > :after',
        ExpressionAttributeValues: { ':s': S(subscriptionId), ':after': N(afterEventNumber) },
      },
      limit,
    );
    return items.map(fromNotificationItem);
  }

  async subscriptionsWithPending(): Promise<string[]> {
    const items = await this.#scanAll({
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
    await inBursts([...last.values()], (u) => this.#recordDelivery(u));
  }

  async notificationsInRange(
    subscriptionId: string,
    from: number,
    to: number,
    limit: number,
  ): Promise<StoredNotification[]> {
    // DynamoDB rejects BETWEEN with a lower bound above the upper one.
    if (from > to || limit <= 0) return [];
    const items = await this.#queryAll(
      {
        TableName: this.#tables.notifications,
        ConsistentRead: true,
        KeyConditionExpression: 'subscriptionId = :s AND eventNumber BETWEEN :from AND :to',
        ExpressionAttributeValues: { ':s': S(subscriptionId), ':from': N(from), ':to': N(to) },
      },
      limit,
    );
    return items.map(fromNotificationItem);
  }

  async requeueDeadLetters(subscriptionId: string, dueAt: number): Promise<number> {
    const dead = await this.#queryAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      KeyConditionExpression: 'subscriptionId = :s',
      FilterExpression: '#state = :dead',
      ProjectionExpression: 'subscriptionId, eventNumber',
      ExpressionAttributeNames: { '#state': 'state' },
      ExpressionAttributeValues: { ':s': S(subscriptionId), ':dead': S('dead') },
    });
    const requeued = await inBursts(dead, async (key) => {
      const e = new Expression()
        .set('state', S('pending'))
        .set('attempts', N(0))
        .set('dueAt', N(dueAt))
        .setOrRemove('lastError', undefined)
        .copyOrRemove('pendingSubscriptionId', 'subscriptionId', true);
      const condition = `${e.name('state')} = ${e.value(S('dead'))}`;
      return conditionHeld(
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
    });
    return requeued.filter(Boolean).length;
  }

  async purge(before: number): Promise<{ notifications: number; eventIds: number }> {
    const oldNotes = await this.#scanAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      FilterExpression: '#state IN (:delivered, :dead) AND createdAt < :before',
      ProjectionExpression: 'subscriptionId, eventNumber',
      ExpressionAttributeNames: { '#state': 'state' },
      ExpressionAttributeValues: { ':delivered': S('delivered'), ':dead': S('dead'), ':before': N(before) },
    });
    const notes = await inBursts(oldNotes, (key) =>
      // Re-checked on delete: a dead letter requeued since the scan is pending and stays.
      conditionHeld(
        this.#client.send(
          new DeleteItemCommand({
            TableName: this.#tables.notifications,
            Key: notificationKey(key),
            ConditionExpression: '#state IN (:delivered, :dead) AND createdAt < :before',
            ExpressionAttributeNames: { '#state': 'state' },
            ExpressionAttributeValues: { ':delivered': S('delivered'), ':dead': S('dead'), ':before': N(before) },
          }),
        ),
      ),
    );
    const oldIds = await this.#scanAll({
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
      notifications: notes.filter(Boolean).length,
      // Markers go with their event id but are not event ids themselves.
      eventIds: oldIds.filter((key, i) => ids[i] === true && readString(key, 'scope') === EVENT_SCOPE).length,
    };
  }

  async ping(): Promise<void> {
    // A data-plane read: /healthz is polled, and DescribeTable has low control-plane limits.
    await this.#client.send(new GetItemCommand({ TableName: this.#tables.subscriptions, Key: { id: S(PING_KEY) } }));
  }

  /** The client belongs to the composition root, which destroys it; only wait for acceptances. */
  async close(): Promise<void> {
    await this.#accepting;
  }

  async #accept(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    const expiresAt = Math.ceil((receivedAt + this.#eventTtlMs) / 1000);
    const known = await this.#readEventIds(items, receivedAt);
    const acceptedHere = new Set<string>();
    const outcomes: AcceptOutcome[] = [];
    for (const { change, subscriptionIds } of items) {
      if (acceptedHere.has(change.eventId) || known.has(eventIdKey(change.eventId, EVENT_SCOPE))) {
        outcomes.push({ duplicate: true, notifications: [] });
        continue;
      }
      acceptedHere.add(change.eventId);
      const created = await Promise.all(
        [...new Set(subscriptionIds)].map((subscriptionId) => {
          const marker = known.get(eventIdKey(change.eventId, subscriptionId));
          return marker === undefined
            ? this.#notify(change, subscriptionId, receivedAt, expiresAt)
            : this.#existingNotification(subscriptionId, marker);
        }),
      );
      await this.#client.send(
        new PutItemCommand({
          TableName: this.#tables.eventIds,
          Item: eventIdItem(change.eventId, EVENT_SCOPE, receivedAt, expiresAt),
        }),
      );
      outcomes.push({ duplicate: false, notifications: created.filter((n) => n !== undefined) });
    }
    return outcomes;
  }

  /** Live (unexpired) event-id items for every event and (event, subscription) pair of a batch. */
  async #readEventIds(items: readonly AcceptItem[], receivedAt: number): Promise<Map<string, number>> {
    const keys = new Map<string, Item>();
    for (const { change, subscriptionIds } of items) {
      for (const scope of [EVENT_SCOPE, ...subscriptionIds]) {
        keys.set(eventIdKey(change.eventId, scope), { eventId: S(change.eventId), scope: S(scope) });
      }
    }
    const found = new Map<string, number>();
    for (const item of await this.#batchGet(this.#tables.eventIds, [...keys.values()])) {
      if (readNumber(item, TTL_ATTRIBUTE) * 1000 <= receivedAt) continue; // expired, not yet deleted by TTL
      const key = eventIdKey(readString(item, 'eventId'), readString(item, 'scope'));
      found.set(key, item.eventNumber === undefined ? 0 : readNumber(item, 'eventNumber'));
    }
    return found;
  }

  /** Number and queue one notification; undefined when the subscription no longer collects. */
  async #notify(
    change: ResourceChange,
    subscriptionId: string,
    receivedAt: number,
    expiresAt: number,
  ): Promise<Notification | undefined> {
    const eventNumber = await this.#takeEventNumber(subscriptionId);
    if (eventNumber === undefined) return undefined;
    const note: Item = {
      subscriptionId: S(subscriptionId),
      eventNumber: N(eventNumber),
      change: S(JSON.stringify(change)),
      state: S('pending'),
      attempts: N(0),
      dueAt: N(receivedAt),
      createdAt: N(receivedAt),
      pendingSubscriptionId: S(subscriptionId),
    };
    const marker = {
      ...eventIdItem(change.eventId, subscriptionId, receivedAt, expiresAt),
      eventNumber: N(eventNumber),
    };
    const failed = await this.#transact(
      [
        {
          Put: {
            TableName: this.#tables.notifications,
            Item: note,
            ConditionExpression: 'attribute_not_exists(subscriptionId)',
          },
        },
        {
          Put: {
            TableName: this.#tables.eventIds,
            Item: marker,
            ConditionExpression: `attribute_not_exists(eventId) OR ${TTL_ATTRIBUTE} <= :now`,
            ExpressionAttributeValues: { ':now': N(Math.floor(receivedAt / 1000)) },
            ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
          },
        },
        {
          ConditionCheck: {
            TableName: this.#tables.subscriptions,
            Key: { id: S(subscriptionId) },
            ConditionExpression: 'attribute_exists(id)',
          },
        },
      ],
      `queueing event ${eventNumber} for ${subscriptionId}`,
    );
    if (failed === undefined) return { subscriptionId, eventNumber, change };
    const [, markerReason, subscriptionReason] = failed;
    // Deleted since its number was taken: the number stays unused (see the caveats above).
    if (subscriptionReason?.Code === 'ConditionalCheckFailed') return undefined;
    // Another acceptance of the same event got there first: its notification is the one.
    if (markerReason?.Code === 'ConditionalCheckFailed') {
      const winner = markerReason.Item ?? (await this.#readMarker(change.eventId, subscriptionId));
      return winner === undefined
        ? undefined
        : this.#existingNotification(subscriptionId, readNumber(winner, 'eventNumber'));
    }
    throw new Error(`notification ${eventNumber} of ${subscriptionId} already exists`);
  }

  /**
   * One TransactWriteItems, retried while it only conflicts with other writers. Resolves
   * undefined once written, or to the cancellation reasons when a condition did not hold.
   */
  async #transact(items: TransactWriteItem[], what: string): Promise<CancellationReason[] | undefined> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#client.send(new TransactWriteItemsCommand({ TransactItems: items }));
        return undefined;
      } catch (err) {
        if (!(err instanceof TransactionCanceledException)) throw err;
        const reasons = err.CancellationReasons ?? [];
        if (reasons.some((r) => r.Code === 'ConditionalCheckFailed')) return reasons;
        if (!reasons.some((r) => r.Code === 'TransactionConflict')) throw err;
        if (attempt >= MAX_TRANSACTION_ATTEMPTS) throw new WriteConflictError(what, attempt, { cause: err });
        await delay(20 * 2 ** attempt);
      }
    }
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
      const write: TransactWriteItem =
        planned.next === undefined
          ? { Delete: { ...key, ...e.bindings } }
          : { Update: { ...key, UpdateExpression: e.update, ...e.bindings } };
      const what = `writing subscription ${id}`;
      const failed = await this.#transact([write, ...this.#typeWrites(id, current, planned.next)], what);
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
              match: S(JSON.stringify(after?.match)),
              ...(after?.end === undefined ? {} : { end: S(after.end) }),
            },
          },
        })),
    ];
  }

  async #readMarker(eventId: string, subscriptionId: string): Promise<Item | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({
        TableName: this.#tables.eventIds,
        Key: { eventId: S(eventId), scope: S(subscriptionId) },
        ConsistentRead: true,
      }),
    );
    return out.Item;
  }

  /** `ADD eventsSinceStart 1` if the subscription still collects; undefined if not (or gone). */
  async #takeEventNumber(subscriptionId: string): Promise<number | undefined> {
    const e = new Expression().add('eventsSinceStart', N(1));
    const condition = `attribute_exists(${e.name('id')}) AND ${e.in('status', COLLECTING)}`;
    try {
      const out = await this.#client.send(
        new UpdateItemCommand({
          TableName: this.#tables.subscriptions,
          Key: { id: S(subscriptionId) },
          UpdateExpression: e.update,
          ConditionExpression: condition,
          ReturnValues: 'UPDATED_NEW',
          ...e.bindings,
        }),
      );
      return readNumber(out.Attributes ?? {}, 'eventsSinceStart');
    } catch (err) {
      if (err instanceof ConditionalCheckFailedException) return undefined;
      throw err;
    }
  }

  /** The notification an earlier (half-finished) acceptance queued; undefined if it is gone since. */
  async #existingNotification(subscriptionId: string, eventNumber: number): Promise<Notification | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({
        TableName: this.#tables.notifications,
        Key: { subscriptionId: S(subscriptionId), eventNumber: N(eventNumber) },
        ConsistentRead: true,
      }),
    );
    if (out.Item === undefined) return undefined;
    const {
      state: _state,
      attempts: _attempts,
      dueAt: _dueAt,
      lastError: _lastError,
      ...note
    } = fromNotificationItem(out.Item);
    return note;
  }

  async #recordDelivery(u: DeliveryUpdate): Promise<boolean> {
    const e = new Expression()
      .set('state', S(u.state))
      .set('attempts', N(u.attempts))
      .set('dueAt', N(u.dueAt))
      .setOrRemove('lastError', u.lastError === undefined ? undefined : S(u.lastError))
      .copyOrRemove('pendingSubscriptionId', 'subscriptionId', u.state === 'pending');
    // An outcome for a notification that no longer exists is ignored, not written as a new item.
    return conditionHeld(
      this.#client.send(
        new UpdateItemCommand({
          TableName: this.#tables.notifications,
          Key: { subscriptionId: S(u.subscriptionId), eventNumber: N(u.eventNumber) },
          UpdateExpression: e.update,
          ConditionExpression: `attribute_exists(${e.name('subscriptionId')})`,
          ...e.bindings,
        }),
      ),
    );
  }

  async #deleteNotificationsOf(subscriptionId: string): Promise<void> {
    const keys = await this.#queryAll({
      TableName: this.#tables.notifications,
      ConsistentRead: true,
      KeyConditionExpression: 'subscriptionId = :s',
      ProjectionExpression: 'subscriptionId, eventNumber',
      ExpressionAttributeValues: { ':s': S(subscriptionId) },
    });
    for (let i = 0; i < keys.length; i += BATCH_WRITE_MAX) {
      const requests = keys
        .slice(i, i + BATCH_WRITE_MAX)
        .map((key) => ({ DeleteRequest: { Key: notificationKey(key) } }));
      let pending: typeof requests = requests;
      for (let attempt = 1; pending.length > 0; attempt++) {
        if (attempt > MAX_BATCH_ATTEMPTS) throw new UnprocessedItemsError('BatchWriteItem', pending.length);
        if (attempt > 1) await delay(50 * 2 ** attempt);
        const out = await this.#client.send(
          new BatchWriteItemCommand({ RequestItems: { [this.#tables.notifications]: pending } }),
        );
        pending = (out.UnprocessedItems?.[this.#tables.notifications] ?? []).flatMap((r) =>
          r.DeleteRequest?.Key === undefined ? [] : [{ DeleteRequest: { Key: r.DeleteRequest.Key } }],
        );
      }
    }
  }

  async #batchGet(table: string, keys: readonly Item[]): Promise<Item[]> {
    const found: Item[] = [];
    for (let i = 0; i < keys.length; i += BATCH_GET_MAX) {
      let pending: Item[] = keys.slice(i, i + BATCH_GET_MAX);
      for (let attempt = 1; pending.length > 0; attempt++) {
        if (attempt > MAX_BATCH_ATTEMPTS) throw new UnprocessedItemsError('BatchGetItem', pending.length);
        if (attempt > 1) await delay(50 * 2 ** attempt);
        const out = await this.#client.send(
          new BatchGetItemCommand({ RequestItems: { [table]: { Keys: pending, ConsistentRead: true } } }),
        );
        found.push(...(out.Responses?.[table] ?? []));
        pending = out.UnprocessedKeys?.[table]?.Keys ?? [];
      }
    }
    return found;
  }

  /** Every page of a query, or pages until `limit` items. */
  async #queryAll(input: QueryCommandInput, limit = Number.POSITIVE_INFINITY): Promise<Item[]> {
    const items: Item[] = [];
    await this.#eachPage(
      input,
      () => limit - items.length,
      (out) => items.push(...(out.Items ?? [])),
    );
    return items;
  }

  /** Runs a query page after page while `left()` (items still wanted, the next page's `Limit`) is above 0. */
  async #eachPage(
    input: QueryCommandInput,
    left: () => number,
    each: (out: QueryCommandOutput) => void,
  ): Promise<void> {
    let start: Item | undefined;
    do {
      const wanted = left();
      const out = await this.#client.send(
        new QueryCommand({
          ...input,
          ...(Number.isFinite(wanted) ? { Limit: wanted } : {}),
          ...(start === undefined ? {} : { ExclusiveStartKey: start }),
        }),
      );
      each(out);
      start = out.LastEvaluatedKey;
    } while (start !== undefined && left() > 0);
  }

  async #scanAll(input: ScanCommandInput): Promise<Item[]> {
    const items: Item[] = [];
    let start: Item | undefined;
    do {
      const out = await this.#client.send(
        new ScanCommand({ ...input, ...(start === undefined ? {} : { ExclusiveStartKey: start }) }),
      );
      items.push(...(out.Items ?? []));
      start = out.LastEvaluatedKey;
    } while (start !== undefined);
    return items;
  }
}

function toSubscriptionItem(rec: SubscriptionRecord): Item {
  return {
    id: S(rec.id),
    owner: S(rec.owner),
    kind: S(rec.kind),
    topic: S(rec.topic),
    status: S(rec.status),
    ...(rec.error === undefined ? {} : { error: S(rec.error) }),
    match: S(JSON.stringify(rec.match)),
    channel: S(JSON.stringify(rec.channel)),
    webhookSecret: S(rec.webhookSecret),
    ...(rec.previousSecret === undefined ? {} : { previousSecret: S(JSON.stringify(rec.previousSecret)) }),
    ...(rec.end === undefined ? {} : { end: S(rec.end) }),
    eventsSinceStart: N(rec.eventsSinceStart),
    createdAt: S(rec.createdAt),
    updatedAt: S(rec.updatedAt),
    resource: S(JSON.stringify(rec.resource)),
    ...(COLLECTING.includes(rec.status) ? { collectingOwner: S(rec.owner) } : {}),
  };
}

// Items are written only by this adapter from validated records, so reading them back is trusted
// as far as their JSON goes; missing or mistyped attributes fail loudly (CorruptItemError).
function fromSubscriptionItem(item: Item): SubscriptionRecord {
  const error = readOptionalString(item, 'error');
  const previousSecret = readOptionalString(item, 'previousSecret');
  const end = readOptionalString(item, 'end');
  return {
    id: readString(item, 'id'),
    owner: readString(item, 'owner'),
    kind: readString(item, 'kind') as SubscriptionKind,
    topic: readString(item, 'topic'),
    status: readString(item, 'status') as SubscriptionStatus,
    ...(error === undefined ? {} : { error }),
    match: JSON.parse(readString(item, 'match')) as MatchSpec,
    channel: JSON.parse(readString(item, 'channel')) as Channel,
    webhookSecret: readString(item, 'webhookSecret'),
    ...(previousSecret === undefined
      ? {}
      : { previousSecret: JSON.parse(previousSecret) as { secret: string; until: string } }),
    ...(end === undefined ? {} : { end }),
    eventsSinceStart: readNumber(item, 'eventsSinceStart'),
    createdAt: readString(item, 'createdAt'),
    updatedAt: readString(item, 'updatedAt'),
    resource: JSON.parse(readString(item, 'resource')) as FhirResource,
  };
}

function fromNotificationItem(item: Item): StoredNotification {
  const lastError = readOptionalString(item, 'lastError');
  return {
    subscriptionId: readString(item, 'subscriptionId'),
    eventNumber: readNumber(item, 'eventNumber'),
    change: JSON.parse(readString(item, 'change')) as ResourceChange,
    state: readString(item, 'state') as DeliveryState,
    attempts: readNumber(item, 'attempts'),
    dueAt: readNumber(item, 'dueAt'),
    ...(lastError === undefined ? {} : { lastError }),
  };
}

/** A condition that the subscription item still has the attributes its type index items derive from. */
function unchangedSince(e: Expression, item: Item): string {
  return ['status', 'updatedAt', 'match', 'end']
    .map((attr) => {
      const value = item[attr];
      return value === undefined ? `attribute_not_exists(${e.name(attr)})` : `${e.name(attr)} = ${e.value(value)}`;
    })
    .join(' AND ');
}

/** The type index keys of a subscription: its types, or `*`; none unless it collects. */
function indexedTypes(sub: IndexedFields | undefined): string[] {
  if (sub === undefined || !COLLECTING.includes(sub.status)) return [];
  return sub.match.resourceTypes === ANY_TYPE ? [ANY_TYPE] : [...new Set(sub.match.resourceTypes)];
}

function notificationKey(item: Item): Item {
  return { subscriptionId: S(readString(item, 'subscriptionId')), eventNumber: N(readNumber(item, 'eventNumber')) };
}

function eventIdItem(eventId: string, scope: string, receivedAt: number, expiresAt: number): Item {
  return { eventId: S(eventId), scope: S(scope), receivedAt: N(receivedAt), [TTL_ATTRIBUTE]: N(expiresAt) };
}

function eventIdKey(eventId: string, scope: string): string {
  return `${scope}\n${eventId}`;
}

/** Awaits a conditional write; false when its condition did not hold. */
async function conditionHeld(write: Promise<unknown>): Promise<boolean> {
  try {
    await write;
    return true;
  } catch (err) {
    if (err instanceof ConditionalCheckFailedException) return false;
    throw err;
  }
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Runs `fn` over `items`, at most WRITE_CONCURRENCY at a time; results in input order. */
async function inBursts<T, R>(items: readonly T[], fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = [];
  for (let i = 0; i < items.length; i += WRITE_CONCURRENCY) {
    results.push(...(await Promise.all(items.slice(i, i + WRITE_CONCURRENCY).map(fn))));
  }
  return results;
}
