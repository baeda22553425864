import {
  type CancellationReason,
  ConditionalCheckFailedException,
  type DynamoDBClient,
  GetItemCommand,
  PutItemCommand,
  type TransactWriteItem,
  UpdateItemCommand,
} from '@aws-sdk/client-dynamodb';
import type { Notification, ResourceChange, StoredNotification } from '../../core/types.js';
import { type AcceptItem, type AcceptOutcome, changesOf } from '../store.js';
import { Expression, type Item, N, readNumber, readString, S } from './attributes.js';
import { COLLECTING, EVENT_SCOPE, eventIdItem, eventIdKey } from './items.js';
import { voidNumbers } from './lane-leases.js';
import { conditionHeld, type DynamoDbRequests } from './requests.js';
import { RESOURCE_BYTES, resourceItem, withResources } from './resource-items.js';
import { type TableNames, TTL_ATTRIBUTE } from './tables.js';

/** `#queue`'s answer for a number voided before its notification was written. */
const VOIDED = Symbol('voided');
/** Numbers given up in a row for one notification before the acceptance fails (EventBridge retries it). */
const MAX_VOIDED = 3;

/**
 * `acceptChanges` of the DynamoDB store, per event, in this order:
 *   1. one consistent BatchGetItem of the dedupe keys and markers of the whole batch;
 *   2. a live `#event` key ⇒ duplicate, nothing written;
 *   3. per matched subscription: a live marker ⇒ reuse its notification (a retry of a
 *      half-finished acceptance); else take the next number (conditional ADD) and write the
 *      notification and its marker (and its resource's item, see resource-items.ts) in one
 *      TransactWriteItems, with a ConditionCheck that the subscription still exists (so a
 *      concurrent delete cannot leave an orphan);
 *   4. write the `#event` key last. Until it is written, a retry redoes only what is missing.
 * Every write is acknowledged by DynamoDB before `accept` resolves: an accepted event is durable.
 * The caveats (gaps in event numbers, interleaving across processes) are in dynamodb-store.ts.
 */
export class EventAcceptance {
  readonly #client: DynamoDBClient;
  readonly #requests: DynamoDbRequests;
  readonly #tables: TableNames;
  readonly #eventTtlMs: number;

  constructor(deps: { client: DynamoDBClient; requests: DynamoDbRequests; tables: TableNames; eventTtlMs: number }) {
    this.#client = deps.client;
    this.#requests = deps.requests;
    this.#tables = deps.tables;
    this.#eventTtlMs = deps.eventTtlMs;
  }

  async accept(items: readonly AcceptItem[], receivedAt: number): Promise<AcceptOutcome[]> {
    const expiresAt = Math.ceil((receivedAt + this.#eventTtlMs) / 1000);
    const known = await this.#readEventIds(items, receivedAt);
    const acceptedHere = new Set<string>();
    const outcomes: AcceptOutcome[] = [];
    for (const item of items) {
      const { change, subscriptionIds } = item;
      const changeOf = changesOf(item);
      if (acceptedHere.has(change.eventId) || known.has(eventIdKey(change.eventId, EVENT_SCOPE))) {
        outcomes.push({ duplicate: true, notifications: [] });
        continue;
      }
      acceptedHere.add(change.eventId);
      // All settled before a failure is thrown: no write of this event is still under way when the
      // caller answers (a Lambda invocation that returned can be frozen mid-write), so a retry
      // finds each subscription's notification either written, with its marker, or not at all.
      const settled = await Promise.allSettled(
        [...new Set(subscriptionIds)].map((subscriptionId) => {
          const marker = known.get(eventIdKey(change.eventId, subscriptionId));
          return marker === undefined
            ? this.#notify(changeOf(subscriptionId), subscriptionId, receivedAt, expiresAt)
            : this.#existingNotification(subscriptionId, marker);
        }),
      );
      const failed = settled.find((r) => r.status === 'rejected');
      if (failed !== undefined) throw failed.reason;
      const created = settled.map((r) => (r.status === 'fulfilled' ? r.value : undefined));
      // Conditional: the same event accepted at the same moment elsewhere (EventBridge delivers at
      // least once; both read "not seen") is accepted by whichever writes this key first. Both
      // queued the same notifications (the markers settled that); the other reports a duplicate
      // and hands nothing on, so the event is counted and enqueued once.
      const first = await conditionHeld(
        this.#client.send(
          new PutItemCommand({
            TableName: this.#tables.eventIds,
            Item: eventIdItem(change.eventId, EVENT_SCOPE, receivedAt, expiresAt),
            ConditionExpression: `attribute_not_exists(eventId) OR ${TTL_ATTRIBUTE} <= :now`,
            ExpressionAttributeValues: { ':now': N(Math.floor(receivedAt / 1000)) },
          }),
        ),
      );
      outcomes.push(
        first
          ? { duplicate: false, notifications: created.filter((n) => n !== undefined) }
          : { duplicate: true, notifications: [] },
      );
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
    for (const item of await this.#requests.batchGet(this.#tables.eventIds, [...keys.values()])) {
      if (readNumber(item, TTL_ATTRIBUTE) * 1000 <= receivedAt) continue; // expired, not yet deleted by TTL
      const key = eventIdKey(readString(item, 'eventId'), readString(item, 'scope'));
      found.set(key, item.eventNumber === undefined ? 0 : readNumber(item, 'eventNumber'));
    }
    return found;
  }

  /**
   * Number and queue one notification; undefined when the subscription no longer collects. A
   * number voided before its notification was written (this acceptance took longer than a lane
   * waits for it: see lane-leases.ts) is given up for the next one.
   */
  async #notify(
    change: ResourceChange,
    subscriptionId: string,
    receivedAt: number,
    expiresAt: number,
  ): Promise<Notification | undefined> {
    for (let attempt = 1; ; attempt++) {
      const eventNumber = await this.#takeEventNumber(subscriptionId);
      if (eventNumber === undefined) return undefined;
      const queued = await this.#queue(change, subscriptionId, eventNumber, receivedAt, expiresAt);
      if (queued !== VOIDED) return queued;
      if (attempt === MAX_VOIDED) throw new Error(`event numbers of ${subscriptionId} were voided ${attempt} times`);
    }
  }

  /** Writes the notification numbered `eventNumber` and its marker; VOIDED when that number was voided. */
  async #queue(
    change: ResourceChange,
    subscriptionId: string,
    eventNumber: number,
    receivedAt: number,
    expiresAt: number,
  ): Promise<Notification | undefined | typeof VOIDED> {
    // The resource (full-resource content) in an item of its own (resource-items.ts): not inside
    // `change`, where its JSON would be escaped again, up to twice its size, past the 400 KB an
    // item holds; not on this item, which the `pending` index copies while it is pending.
    const { resource, ...bare } = change;
    const note: Item = {
      subscriptionId: S(subscriptionId),
      eventNumber: N(eventNumber),
      change: S(JSON.stringify(bare)),
      ...(resource === undefined ? {} : { [RESOURCE_BYTES]: N(Buffer.byteLength(resource)) }),
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
    const failed = await this.#transactOrVoid(
      subscriptionId,
      eventNumber,
      receivedAt,
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
        ...(resource === undefined
          ? []
          : [
              {
                Put: {
                  TableName: this.#tables.notifications,
                  Item: resourceItem(subscriptionId, eventNumber, resource, receivedAt),
                },
              },
            ]),
      ],
      `queueing event ${eventNumber} for ${subscriptionId}`,
    );
    if (failed === undefined) return { subscriptionId, eventNumber, change };
    const [noteReason, markerReason, subscriptionReason] = failed;
    // Deleted since its number was taken: the number stays unused (see the caveats in dynamodb-store.ts).
    if (subscriptionReason?.Code === 'ConditionalCheckFailed') return undefined;
    // Another acceptance of the same event got there first: its notification is the one, and this
    // number is left void (so the lane need not wait for it).
    if (markerReason?.Code === 'ConditionalCheckFailed') {
      await voidNumbers(this.#client, this.#tables.notifications, subscriptionId, [eventNumber], receivedAt);
      const winner = markerReason.Item ?? (await this.#readMarker(change.eventId, subscriptionId));
      return winner === undefined
        ? undefined
        : this.#existingNotification(subscriptionId, readNumber(winner, 'eventNumber'));
    }
    // The number is taken by a void row: a lane waited for it too long and went on without it.
    if (noteReason?.Code === 'ConditionalCheckFailed') return VOIDED;
    throw new Error(`queueing event ${eventNumber} for ${subscriptionId} failed: ${JSON.stringify(failed)}`);
  }

  /**
   * The transaction that queues a numbered notification. One that fails (past its retries) leaves
   * its number void, so the subscription's lane need not wait for it (lane-leases.ts); the event
   * comes back (EventBridge retries the invocation) under a new number. A void that fails too is
   * left to the lane, which voids the number once it waited long enough.
   */
  async #transactOrVoid(
    subscriptionId: string,
    eventNumber: number,
    now: number,
    items: TransactWriteItem[],
    what: string,
  ): Promise<CancellationReason[] | undefined> {
    try {
      return await this.#requests.transact(items, what);
    } catch (err) {
      await voidNumbers(this.#client, this.#tables.notifications, subscriptionId, [eventNumber], now).catch(
        () => undefined,
      );
      throw err;
    }
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

  /**
   * The notification an earlier (half-finished) acceptance queued, to hand on again while it is
   * still pending; undefined if it is gone since, or already delivered or dead-lettered (the
   * acceptance failed half-way and its retry came after delivery had dealt with it: handed on
   * again, a delivered one would go out twice).
   */
  async #existingNotification(subscriptionId: string, eventNumber: number): Promise<Notification | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({
        TableName: this.#tables.notifications,
        Key: { subscriptionId: S(subscriptionId), eventNumber: N(eventNumber) },
        ConsistentRead: true,
      }),
    );
    // (A void row carries no notification: a marker never points at one, but nothing is read from it.)
    if (out.Item === undefined || out.Item.state?.S === 'void') return undefined;
    const [read] = await withResources(this.#requests, this.#tables.notifications, [out.Item]);
    const { state, attempts: _attempts, dueAt: _dueAt, lastError: _lastError, ...note } = read as StoredNotification;
    return state === 'pending' ? note : undefined;
  }
}
