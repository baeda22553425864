import {
  type AttributeValue,
  ConditionalCheckFailedException,
  type ConditionCheck,
  type DynamoDBClient,
  PutItemCommand,
  QueryCommand,
  UpdateItemCommand,
} from '@aws-sdk/client-dynamodb';
import type { Clock } from '../../core/types.js';
import type { LaneHeld, LaneHold, LaneLeases, LaneRead } from '../store.js';
import { type Item, N, readNumber, readString, S } from './attributes.js';
import { DynamoDbRequests, inBursts } from './requests.js';
import { withResources } from './resource-items.js';

/**
 * `LaneLeases` of the DynamoDB store. A subscription's lease is an item of the `notifications`
 * table at event number 0 (numbers start at 1, so no read of notifications meets it, and deleting
 * a subscription's notifications deletes it too): every function that delivers reads and writes
 * that table already. Attributes: `laneHolder` and `laneUntil` (epoch ms) while held,
 * `laneThrough` (the watermark), `laneEpoch` (re-queues), `laneWanted` (another instance asked),
 * `laneFence` (epoch ms: when a re-queue's fence was last made fresh, see `fenceLane`) and
 * `laneFenceTokens` (a string set: the re-queues under way; none, no fence).
 *
 * A number taken for an acceptance that never wrote its notification (its container died between
 * the two, or a write failed and the event came back under a new number) would hold the lane
 * forever: once the notification above it is older than VOID_AFTER_MS, the reader writes a `void`
 * row in its place. An acceptance still trying to write that number then finds it taken and takes
 * another (see acceptance.ts): nothing is lost, and nothing goes out of order.
 */

/** Longer than any acceptance takes between taking a number and writing its notification. */
export const VOID_AFTER_MS = 30_000;
/**
 * How long a re-queue's fence holds after it was last made fresh: longer than the API function's
 * 29 s, so it runs out only when the instance re-queueing died before it wrote the subscription
 * (its lanes wait that long).
 */
export const FENCE_MS = 60_000;
/** A quarter of FENCE_MS: a refresh or two may fail (or be slow) before the fence goes stale. */
export const FENCE_REFRESH_MS = FENCE_MS / 4;
/** The event number of a subscription's lease item. */
const LANE_NUMBER = 0;
/** Notifications per page of a lane read. */
const PAGE = 100;
/** The update that lets a lease go. */
const FREE = 'REMOVE #holder, #until';

const NAMES = {
  '#holder': 'laneHolder',
  '#until': 'laneUntil',
  '#through': 'laneThrough',
  '#epoch': 'laneEpoch',
  '#wanted': 'laneWanted',
  '#fence': 'laneFence',
  '#tokens': 'laneFenceTokens',
};
/**
 * An UpdateItem of the lease item of `subscriptionId`, with the names of NAMES its expressions use
 * (DynamoDB refuses a name given and not used).
 */
function laneUpdate(
  table: string,
  subscriptionId: string,
  input: {
    UpdateExpression: string;
    ConditionExpression?: string;
    ExpressionAttributeValues: Record<string, AttributeValue>;
    ReturnValues?: 'ALL_NEW';
    ReturnValuesOnConditionCheckFailure?: 'ALL_OLD';
  },
): UpdateItemCommand {
  const used = `${input.UpdateExpression} ${input.ConditionExpression ?? ''}`;
  return new UpdateItemCommand({
    TableName: table,
    Key: laneKey(subscriptionId),
    ExpressionAttributeNames: Object.fromEntries(Object.entries(NAMES).filter(([k]) => used.includes(k))),
    ...input,
  });
}
/** Not fenced: no re-queue under way (or only ones whose instances died, the fence older than FENCE_MS). */
const UNFENCED = '(attribute_not_exists(#tokens) OR #fence <= :stale)';

export class DynamoDbLaneLeases implements LaneLeases {
  readonly #client: DynamoDBClient;
  readonly #table: string;
  readonly #voidAfterMs: number;
  readonly #requests: DynamoDbRequests;

  constructor(client: DynamoDBClient, notificationsTable: string, voidAfterMs = VOID_AFTER_MS) {
    this.#client = client;
    this.#table = notificationsTable;
    this.#voidAfterMs = voidAfterMs;
    this.#requests = new DynamoDbRequests(client);
  }

  async take(subscriptionId: string, holder: string, now: number, until: number): Promise<LaneHold | LaneHeld> {
    // A few rounds at most: each lost race means the other side moved (took it, or let it go).
    for (let round = 0; round < 4; round++) {
      try {
        const out = await this.#update(subscriptionId, {
          UpdateExpression:
            'SET #holder = :me, #until = :until, #through = if_not_exists(#through, :zero), #epoch = if_not_exists(#epoch, :zero) REMOVE #wanted',
          ConditionExpression: `(attribute_not_exists(#holder) OR #holder = :me OR #until < :now) AND ${UNFENCED}`,
          ExpressionAttributeValues: {
            ':me': S(holder),
            ':until': N(until),
            ':zero': N(0),
            ':now': N(now),
            ':stale': N(now - FENCE_MS),
          },
          ReturnValues: 'ALL_NEW',
          ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
        });
        return holdOf(out.Attributes ?? {});
      } catch (err) {
        if (!(err instanceof ConditionalCheckFailedException)) throw err;
        const fenced = requeuing(err.Item, now);
        if (fenced !== undefined) return fenced;
      }
      // Held elsewhere: the holder reads the lane again before it lets go (see `release`).
      try {
        const out = await this.#update(subscriptionId, {
          UpdateExpression: 'ADD #wanted :one',
          ConditionExpression: 'attribute_exists(#holder) AND #holder <> :me AND #until >= :now',
          ExpressionAttributeValues: { ':one': N(1), ':me': S(holder), ':now': N(now) },
          ReturnValues: 'ALL_NEW',
        });
        return { heldUntil: readNumber(out.Attributes ?? {}, 'laneUntil') };
      } catch (err) {
        if (!(err instanceof ConditionalCheckFailedException)) throw err;
        // Let go (or ran out) in between: take it.
      }
    }
    throw new Error(`the delivery lease of ${subscriptionId} kept changing hands`);
  }

  async release(
    subscriptionId: string,
    holder: string,
    hold: LaneHold,
    through: number,
    keepUntil?: number,
    now = Date.now(),
  ): Promise<LaneHold | undefined> {
    let old: Item | undefined;
    try {
      await this.#update(subscriptionId, {
        UpdateExpression: `SET #through = :through ${FREE}`,
        ConditionExpression: `#holder = :me AND #epoch = :epoch${keepUntil === undefined ? '' : ' AND attribute_not_exists(#wanted)'}`,
        ExpressionAttributeValues: { ':through': N(through), ':me': S(holder), ':epoch': N(hold.epoch) },
        ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
      });
      return undefined;
    } catch (err) {
      if (!(err instanceof ConditionalCheckFailedException)) throw err;
      old = err.Item;
    }
    // Gone with its subscription, or ran out and taken by another: nothing of it is ours.
    if (old === undefined || old.laneHolder?.S !== holder) return undefined;
    const current = holdOf(old);
    if (keepUntil === undefined) {
      // Re-queued meanwhile: let go without the watermark (the re-queue lowered it).
      await this.#free(subscriptionId, holder);
      return undefined;
    }
    const kept = await this.#keep(
      subscriptionId,
      holder,
      current,
      current.epoch === hold.epoch ? through : current.through,
      keepUntil,
      now,
    );
    // Fenced by a re-queue in between: let go (whoever re-queued takes it when done).
    return kept !== undefined && 'through' in kept ? kept : undefined;
  }

  async renew(
    subscriptionId: string,
    holder: string,
    hold: LaneHold,
    through: number,
    until: number,
    now = Date.now(),
  ): Promise<LaneHold | LaneHeld | undefined> {
    try {
      await this.#update(subscriptionId, {
        UpdateExpression: 'SET #through = :through, #until = :until',
        ConditionExpression: '#holder = :me AND #epoch = :epoch',
        ExpressionAttributeValues: {
          ':through': N(through),
          ':until': N(until),
          ':me': S(holder),
          ':epoch': N(hold.epoch),
        },
        ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
      });
      return { through, epoch: hold.epoch };
    } catch (err) {
      if (!(err instanceof ConditionalCheckFailedException)) throw err;
      const old = err.Item;
      if (old === undefined) return undefined;
      if (old.laneHolder?.S !== holder) {
        // Lost (it ran out and another took it); if re-queued since, the attempt on the wire is one
        // the re-queue started over, whoever holds the lane now.
        return holdOf(old).epoch === hold.epoch ? undefined : { heldUntil: 0, requeuing: true };
      }
      // Re-queued: still ours, from the lowered watermark; unless the re-queue is still under way.
      const current = holdOf(old);
      return this.#keep(subscriptionId, holder, current, current.through, until, now);
    }
  }

  /**
   * Still held, until `until`, from `through` at `current.epoch`; the request to read again is
   * answered. A re-queue under way (fenced): let go instead, and the answer says until when it may
   * last; whoever re-queued takes the lane once the re-activated subscription is written.
   */
  async #keep(
    subscriptionId: string,
    holder: string,
    current: LaneHold,
    through: number,
    until: number,
    now: number,
  ): Promise<LaneHold | LaneHeld | undefined> {
    try {
      await this.#update(subscriptionId, {
        UpdateExpression: 'SET #through = :through, #until = :until REMOVE #wanted',
        ConditionExpression: `#holder = :me AND #epoch = :epoch AND ${UNFENCED}`,
        ExpressionAttributeValues: {
          ':through': N(through),
          ':until': N(until),
          ':me': S(holder),
          ':epoch': N(current.epoch),
          ':stale': N(now - FENCE_MS),
        },
        ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
      });
      return { through, epoch: current.epoch };
    } catch (err) {
      if (!(err instanceof ConditionalCheckFailedException)) throw err;
      // Fenced, or re-queued again (or lost) in between: let it go, if still ours, for a later take
      // to read afresh.
      await this.#free(subscriptionId, holder);
      return requeuing(err.Item, now) ?? { heldUntil: 0, requeuing: true };
    }
  }

  /** Lets the lease go if `holder` still holds it, writing nothing else (no watermark, any request kept). */
  async #free(subscriptionId: string, holder: string): Promise<void> {
    await this.#update(subscriptionId, {
      UpdateExpression: FREE,
      ConditionExpression: '#holder = :me',
      ExpressionAttributeValues: { ':me': S(holder) },
    }).catch(ignoreCondition);
  }

  async read(subscriptionId: string, through: number, limit: number, now: number): Promise<LaneRead> {
    const { items, ...rest } = await this.#readItems(subscriptionId, through, limit, now);
    return { notes: await withResources(this.#requests, this.#table, items), ...rest };
  }

  async #readItems(
    subscriptionId: string,
    through: number,
    limit: number,
    now: number,
  ): Promise<Omit<LaneRead, 'notes'> & { items: Item[] }> {
    const notes: Item[] = [];
    let mark = through;
    let expected = through + 1;
    let start: Record<string, AttributeValue> | undefined;
    do {
      const out = await this.#client.send(
        new QueryCommand({
          TableName: this.#table,
          ConsistentRead: true,
          KeyConditionExpression: 'subscriptionId = :s AND eventNumber > :after',
          ExpressionAttributeValues: { ':s': S(subscriptionId), ':after': N(Math.max(through, LANE_NUMBER)) },
          Limit: PAGE,
          ...(start === undefined ? {} : { ExclusiveStartKey: start }),
        }),
      );
      for (const item of out.Items ?? []) {
        const n = readNumber(item, 'eventNumber');
        if (n > expected) {
          // Taken but not written: an acceptance under way (wait for it), or one that never will be.
          const missing = Array.from({ length: n - expected }, (_, k) => expected + k);
          const createdAt = readNumber(item, 'createdAt');
          if (createdAt > now - this.#voidAfterMs) {
            return { items: notes, through: mark, voidableAt: createdAt + this.#voidAfterMs };
          }
          // Written meanwhile: read again at once.
          if (!(await voidNumbers(this.#client, this.#table, subscriptionId, missing, now))) {
            return { items: notes, through: mark, voidableAt: now };
          }
        }
        expected = n + 1;
        if (readString(item, 'state') === 'pending') {
          notes.push(item);
          if (notes.length >= limit) return { items: notes, through: mark };
        } else if (notes.length === 0) {
          mark = n;
        }
      }
      start = out.LastEvaluatedKey;
    } while (start !== undefined);
    return { items: notes, through: mark };
  }

  #update(
    subscriptionId: string,
    input: {
      UpdateExpression: string;
      ConditionExpression: string;
      ExpressionAttributeValues: Record<string, AttributeValue>;
      ReturnValues?: 'ALL_NEW';
      ReturnValuesOnConditionCheckFailure?: 'ALL_OLD';
    },
  ) {
    return this.#client.send(laneUpdate(this.#table, subscriptionId, input));
  }
}

/**
 * Writes void rows for `numbers` of a subscription, each only where no notification is: false when
 * one was written meanwhile (the caller reads again). Safe at any time: an acceptance still about
 * to write a voided number finds it taken and takes another.
 */
export async function voidNumbers(
  client: DynamoDBClient,
  table: string,
  subscriptionId: string,
  numbers: readonly number[],
  now: number,
): Promise<boolean> {
  const written = await inBursts(numbers, async (eventNumber) => {
    try {
      await client.send(
        new PutItemCommand({
          TableName: table,
          Item: { subscriptionId: S(subscriptionId), eventNumber: N(eventNumber), state: S('void'), createdAt: N(now) },
          ConditionExpression: 'attribute_not_exists(subscriptionId)',
        }),
      );
      return true;
    } catch (err) {
      if (err instanceof ConditionalCheckFailedException) return false;
      throw err;
    }
  });
  return written.every(Boolean);
}

export function laneKey(subscriptionId: string): Item {
  return { subscriptionId: S(subscriptionId), eventNumber: N(LANE_NUMBER) };
}

/**
 * Re-queueing (after its rows are pending again): the watermark goes below `lowest` and the epoch
 * moves, so a holder writes no watermark it read before and reads the lane again. No lease item:
 * no lane was ever held, and the first one reads from the start.
 */
export async function lowerLane(
  client: DynamoDBClient,
  table: string,
  subscriptionId: string,
  lowest: number,
): Promise<void> {
  const send = (update: string, condition: string, values: Record<string, AttributeValue>) =>
    client.send(
      laneUpdate(table, subscriptionId, {
        UpdateExpression: update,
        ConditionExpression: condition,
        ExpressionAttributeValues: values,
      }),
    );
  try {
    await send('SET #through = :low ADD #epoch :one', 'attribute_exists(#through) AND #through > :low', {
      ':low': N(lowest - 1),
      ':one': N(1),
    });
    return;
  } catch (err) {
    if (!(err instanceof ConditionalCheckFailedException)) throw err;
  }
  await send('ADD #epoch :one', 'attribute_exists(#through)', { ':one': N(1) }).catch(ignoreCondition);
}

/**
 * Before a re-queue: a new epoch, and a fence that lets no instance take the lease, nor its holder
 * go on at the new epoch, until `unfenceLane` (or FENCE_MS after it was last fresh): the holder's
 * next renew (before its next run, or when an attempt fails) learns that a re-queue is under way,
 * counts an attempt on the wire as one the re-queue starts over, and lets go, rather than read the
 * lane again while the re-activated subscription is not yet written and send the re-queued
 * notifications to the endpoint the client is moving away from. The holder keeps the lease until
 * then: no second sender can start while it may still be sending. Made also without a lease item
 * (none was ever held), so that no lane starts meanwhile. `token` (unique per re-queue) joins the
 * fence's set: the fence stands until every re-queue in it lifted its token, in whatever order they
 * end (or until none has kept it fresh for FENCE_MS). A fence gone stale is made anew, without the
 * tokens of the re-queues that let it go stale. `now` is when it was fresh.
 */
export async function fenceLane(
  client: DynamoDBClient,
  table: string,
  subscriptionId: string,
  token: string,
  now: number,
): Promise<void> {
  const fence = (update: string, condition?: string) =>
    client.send(
      laneUpdate(table, subscriptionId, {
        UpdateExpression: `SET #fence = :now, #through = if_not_exists(#through, :zero) ${update}`,
        ...(condition === undefined ? {} : { ConditionExpression: condition }),
        ExpressionAttributeValues: {
          ':now': N(now),
          ':token': { SS: [token] },
          ':zero': N(0),
          ':one': N(1),
          ...(condition === undefined ? {} : { ':stale': N(now - FENCE_MS) }),
        },
      }),
    );
  try {
    await fence(', #tokens = :token ADD #epoch :one', UNFENCED);
  } catch (err) {
    if (!(err instanceof ConditionalCheckFailedException)) throw err;
    // Another re-queue's fence stands: this one joins it.
    await fence('ADD #epoch :one, #tokens :token');
  }
}

/**
 * Keeps the fence `token` fresh (`laneFence` set to `clock.now()` every `everyMs`) until the
 * returned function is called: a re-queue of many dead letters can take longer than FENCE_MS, and
 * a fence gone stale in its middle would let lanes go on, to the endpoint the client is leaving or
 * out of order. An instance that dies stops refreshing, so its fence still runs out. A failed
 * refresh is tried again at the next tick and never fails the re-queue; one that finds the fence
 * no longer this token's (lifted, or made anew by another re-queue, which keeps its own fresh)
 * stops. The timer does not keep the process alive.
 */
export function keepFenced(
  client: DynamoDBClient,
  table: string,
  subscriptionId: string,
  token: string,
  clock: Clock,
  everyMs: number,
): () => void {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const schedule = () => {
    if (!stopped) timer = setTimeout(refresh, everyMs).unref();
  };
  const refresh = () => {
    void client
      .send(
        laneUpdate(table, subscriptionId, {
          UpdateExpression: 'SET #fence = :now',
          ConditionExpression: 'contains(#tokens, :token)',
          ExpressionAttributeValues: { ':now': N(clock.now()), ':token': S(token) },
        }),
      )
      .then(schedule, (err: unknown) => {
        if (!(err instanceof ConditionalCheckFailedException)) schedule();
      });
  };
  schedule();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/**
 * The re-activated subscription is written (or its write failed): the lane may be taken again, at
 * a new epoch, so that an instance that took it after a stale fence reads the subscription afresh.
 * Only the fence `token` goes (a refresh of it still in flight then finds it gone, and never makes
 * the fence fresh again); the fence stands while another re-queue's token is in it, and goes with
 * the last (DynamoDB removes a set left empty).
 */
export async function unfenceLane(
  client: DynamoDBClient,
  table: string,
  subscriptionId: string,
  token: string,
): Promise<void> {
  await client
    .send(
      laneUpdate(table, subscriptionId, {
        UpdateExpression: 'DELETE #tokens :set ADD #epoch :one',
        ConditionExpression: 'contains(#tokens, :token)',
        ExpressionAttributeValues: { ':one': N(1), ':set': { SS: [token] }, ':token': S(token) },
      }),
    )
    .catch(ignoreCondition);
}

/** A TransactWriteItems condition: the lane is still at re-queue epoch `epoch`. */
export function sameLaneEpoch(table: string, subscriptionId: string, epoch: number): ConditionCheck {
  return {
    TableName: table,
    Key: laneKey(subscriptionId),
    ConditionExpression: '#epoch = :epoch',
    ExpressionAttributeNames: { '#epoch': 'laneEpoch' },
    ExpressionAttributeValues: { ':epoch': N(epoch) },
  };
}

/** The lease item `item` (as a failed condition returned it) is fenced by a re-queue at `now`: until when. */
function requeuing(item: Item | undefined, now: number): LaneHeld | undefined {
  if (item?.laneFenceTokens === undefined || item.laneFence === undefined) return undefined;
  const heldUntil = readNumber(item, 'laneFence') + FENCE_MS;
  return heldUntil > now ? { heldUntil, requeuing: true } : undefined;
}

function holdOf(item: Item): LaneHold {
  return {
    through: item.laneThrough === undefined ? 0 : readNumber(item, 'laneThrough'),
    epoch: item.laneEpoch === undefined ? 0 : readNumber(item, 'laneEpoch'),
  };
}

function ignoreCondition(err: unknown): void {
  if (!(err instanceof ConditionalCheckFailedException)) throw err;
}
