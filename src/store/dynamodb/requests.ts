import { setTimeout as delay } from 'node:timers/promises';
import {
  BatchGetItemCommand,
  BatchWriteItemCommand,
  type CancellationReason,
  ConditionalCheckFailedException,
  type DynamoDBClient,
  QueryCommand,
  type QueryCommandInput,
  type QueryCommandOutput,
  ScanCommand,
  type ScanCommandInput,
  TransactionCanceledException,
  type TransactWriteItem,
  TransactWriteItemsCommand,
} from '@aws-sdk/client-dynamodb';
import type { Item } from './attributes.js';
import { UnprocessedItemsError, WriteConflictError } from './errors.js';

/** The request patterns the DynamoDB store repeats: retried transactions and batches, paging. */

// DynamoDB's own request limits.
const BATCH_GET_MAX = 100;
export const BATCH_WRITE_MAX = 25;
/** Parallel single-item writes per burst: enough to overlap round trips, few enough not to throttle. */
const WRITE_CONCURRENCY = 16;
/** Transaction conflicts (another writer on the same item) and throttled transactions are tried this often. */
export const MAX_TRANSACTION_ATTEMPTS = 6;
/**
 * Cancellation reasons that mean "try the same transaction again": a conflict with another
 * writer, or an item's partition or index throttled (`ThrottlingError` on on-demand tables,
 * `ProvisionedThroughputExceeded` on provisioned ones).
 */
const RETRIED_CANCELLATIONS = new Set([
  'TransactionConflict',
  'ThrottlingError',
  'ProvisionedThroughputExceeded',
  'RequestLimitExceeded',
]);
/** Unprocessed batch items are retried this often, with a growing pause as DynamoDB advises. */
export const MAX_BATCH_ATTEMPTS = 8;

export class DynamoDbRequests {
  readonly #client: DynamoDBClient;

  constructor(client: DynamoDBClient) {
    this.#client = client;
  }

  /**
   * One TransactWriteItems, retried (the same items) while it was cancelled only by conflicts with
   * other writers or by throttling: the SDK retries neither. Resolves undefined once written, or to
   * the cancellation reasons when a condition did not hold.
   */
  async transact(items: TransactWriteItem[], what: string): Promise<CancellationReason[] | undefined> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#client.send(new TransactWriteItemsCommand({ TransactItems: items }));
        return undefined;
      } catch (err) {
        if (!(err instanceof TransactionCanceledException)) throw err;
        const reasons = err.CancellationReasons ?? [];
        if (reasons.some((r) => r.Code === 'ConditionalCheckFailed')) return reasons;
        const passing = reasons.filter((r) => r.Code !== undefined && r.Code !== 'None');
        if (passing.length === 0 || !passing.every((r) => RETRIED_CANCELLATIONS.has(r.Code as string))) throw err;
        if (attempt >= MAX_TRANSACTION_ATTEMPTS) throw new WriteConflictError(what, attempt, { cause: err });
        // Exponential with full jitter (as AWS advises for throttling), 40 ms to ~1.3 s.
        await delay(Math.random() * 20 * 2 ** attempt);
      }
    }
  }

  /** Consistent reads of `keys`, 100 to a BatchGetItem; `projection`: only those attributes of each. */
  async batchGet(table: string, keys: readonly Item[], projection?: string): Promise<Item[]> {
    const found: Item[] = [];
    for (let i = 0; i < keys.length; i += BATCH_GET_MAX) {
      await this.#untilProcessed('BatchGetItem', keys.slice(i, i + BATCH_GET_MAX), async (pending) => {
        const out = await this.#client.send(
          new BatchGetItemCommand({
            RequestItems: {
              [table]: {
                Keys: pending,
                ConsistentRead: true,
                ...(projection === undefined ? {} : { ProjectionExpression: projection }),
              },
            },
          }),
        );
        found.push(...(out.Responses?.[table] ?? []));
        return out.UnprocessedKeys?.[table]?.Keys ?? [];
      });
    }
    return found;
  }

  /** Deletes every item of `keys`, 25 to a BatchWriteItem, retrying what DynamoDB leaves unprocessed. */
  async deleteAll(table: string, keys: readonly Item[]): Promise<void> {
    for (let i = 0; i < keys.length; i += BATCH_WRITE_MAX) {
      await this.#untilProcessed('BatchWriteItem', keys.slice(i, i + BATCH_WRITE_MAX), async (pending) => {
        const out = await this.#client.send(
          new BatchWriteItemCommand({ RequestItems: { [table]: pending.map((Key) => ({ DeleteRequest: { Key } })) } }),
        );
        return (out.UnprocessedItems?.[table] ?? []).flatMap((r) =>
          r.DeleteRequest?.Key === undefined ? [] : [r.DeleteRequest.Key],
        );
      });
    }
  }

  /** Sends a batch, then what DynamoDB left unprocessed, with a growing pause, up to MAX_BATCH_ATTEMPTS times. */
  async #untilProcessed(what: string, batch: Item[], send: (pending: Item[]) => Promise<Item[]>): Promise<void> {
    let pending = batch;
    for (let attempt = 1; pending.length > 0; attempt++) {
      if (attempt > MAX_BATCH_ATTEMPTS) throw new UnprocessedItemsError(what, pending.length);
      if (attempt > 1) await delay(50 * 2 ** attempt);
      pending = await send(pending);
    }
  }

  /** Every page of a query, or pages until `limit` items. */
  async queryAll(input: QueryCommandInput, limit = Number.POSITIVE_INFINITY): Promise<Item[]> {
    const items: Item[] = [];
    await this.eachPage(
      input,
      () => limit - items.length,
      (out) => items.push(...(out.Items ?? [])),
    );
    return items;
  }

  /** Runs a query page after page while `left()` (items still wanted, the next page's `Limit`) is above 0. */
  async eachPage(input: QueryCommandInput, left: () => number, each: (out: QueryCommandOutput) => void): Promise<void> {
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

  async scanAll(input: ScanCommandInput): Promise<Item[]> {
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

/** Awaits a conditional write; false when its condition did not hold. */
export async function conditionHeld(write: Promise<unknown>): Promise<boolean> {
  try {
    await write;
    return true;
  } catch (err) {
    if (err instanceof ConditionalCheckFailedException) return false;
    throw err;
  }
}

/** Runs `fn` over `items`, at most WRITE_CONCURRENCY at a time; results in input order. */
export async function inBursts<T, R>(items: readonly T[], fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = [];
  for (let i = 0; i < items.length; i += WRITE_CONCURRENCY) {
    results.push(...(await Promise.all(items.slice(i, i + WRITE_CONCURRENCY).map(fn))));
  }
  return results;
}
