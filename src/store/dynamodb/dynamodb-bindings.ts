import { DeleteItemCommand, type DynamoDBClient, GetItemCommand, PutItemCommand } from '@aws-sdk/client-dynamodb';
import type { Binding, BindingMode, BindingStore } from '../../delivery/websocket-port.js';
import { DynamoDbRequests } from './requests.js';
import { INDEX } from './tables.js';

/**
 * WebSocket connections and bindings for API Gateway, in the `<prefix>connections` table:
 * one `#connection` item per connection (its owner from `$connect`), one `sub#<id>` item per
 * binding, and a sparse `by-subscription` index to find a subscription's connections. Every item
 * carries a TTL a little past API Gateway's 2-hour connection limit, because `$disconnect` is best
 * effort; readers also skip expired items themselves (TTL deletion is lazy).
 */

export const CONNECTIONS_INDEX = INDEX.connectionsBySubscription;
/** 2 h 10 min: API Gateway closes every connection at 2 h. */
const CONNECTION_TTL_SECONDS = 2 * 3600 + 600;
const CONNECTION_ITEM = '#connection';

export class DynamoDbBindings implements BindingStore {
  readonly #client: DynamoDBClient;
  readonly #requests: DynamoDbRequests;
  readonly #table: string;
  readonly #nowSeconds: () => number;

  constructor(deps: { client: DynamoDBClient; tablePrefix: string; nowMs?: () => number }) {
    this.#client = deps.client;
    this.#requests = new DynamoDbRequests(deps.client);
    this.#table = `${deps.tablePrefix}connections`;
    const now = deps.nowMs ?? Date.now;
    this.#nowSeconds = () => Math.floor(now() / 1000);
  }

  /** `$connect`: remember the connection and the API client that opened it, if any. */
  async connect(connectionId: string, owner: string | undefined): Promise<void> {
    await this.#client.send(
      new PutItemCommand({
        TableName: this.#table,
        Item: {
          connectionId: { S: connectionId },
          sk: { S: CONNECTION_ITEM },
          ...(owner === undefined ? {} : { owner: { S: owner } }),
          expiresAt: { N: String(this.#nowSeconds() + CONNECTION_TTL_SECONDS) },
        },
      }),
    );
  }

  /**
   * The API client that opened the connection (for R4 `bind`), when it is still known. Read
   * strongly consistent: a client's first message may follow `$connect`'s write within
   * milliseconds, and an eventually consistent read could miss it and refuse the bind.
   */
  async ownerOf(connectionId: string): Promise<string | undefined> {
    const out = await this.#client.send(
      new GetItemCommand({
        TableName: this.#table,
        Key: { connectionId: { S: connectionId }, sk: { S: CONNECTION_ITEM } },
        ConsistentRead: true,
      }),
    );
    if (out.Item === undefined || this.#expired(out.Item.expiresAt?.N)) return undefined;
    return out.Item.owner?.S;
  }

  async bind(b: Binding): Promise<void> {
    await this.#client.send(
      new PutItemCommand({
        TableName: this.#table,
        Item: {
          connectionId: { S: b.connectionId },
          sk: { S: `sub#${b.subscriptionId}` },
          subscriptionId: { S: b.subscriptionId },
          mode: { S: b.mode },
          expiresAt: { N: String(this.#nowSeconds() + CONNECTION_TTL_SECONDS) },
        },
      }),
    );
  }

  async unbind(connectionId: string, subscriptionId?: string): Promise<void> {
    if (subscriptionId !== undefined) {
      await this.#client.send(
        new DeleteItemCommand({
          TableName: this.#table,
          Key: { connectionId: { S: connectionId }, sk: { S: `sub#${subscriptionId}` } },
        }),
      );
      return;
    }
    // Without a subscription: the whole connection ($disconnect or gone), every page of it.
    const keys = await this.#requests.queryAll({
      TableName: this.#table,
      ConsistentRead: true,
      KeyConditionExpression: 'connectionId = :c',
      ExpressionAttributeValues: { ':c': { S: connectionId } },
      ProjectionExpression: 'connectionId, sk',
    });
    await this.#requests.deleteAll(
      this.#table,
      keys.map((i) => ({ connectionId: i.connectionId as { S: string }, sk: i.sk as { S: string } })),
    );
  }

  async bindingsFor(subscriptionId: string): Promise<readonly Binding[]> {
    const items = await this.#requests.queryAll({
      TableName: this.#table,
      IndexName: CONNECTIONS_INDEX,
      KeyConditionExpression: 'subscriptionId = :s',
      ExpressionAttributeValues: { ':s': { S: subscriptionId } },
    });
    return items
      .filter((item) => !this.#expired(item.expiresAt?.N))
      .map((item) => ({
        connectionId: item.connectionId?.S ?? '',
        subscriptionId,
        mode: (item.mode?.S ?? 'bundle') as BindingMode,
      }));
  }

  async bindingsOf(connectionId: string): Promise<readonly Binding[]> {
    const items = await this.#requests.queryAll({
      TableName: this.#table,
      KeyConditionExpression: 'connectionId = :c AND begins_with(sk, :p)',
      ExpressionAttributeValues: { ':c': { S: connectionId }, ':p': { S: 'sub#' } },
    });
    return items
      .filter((item) => !this.#expired(item.expiresAt?.N))
      .map((item) => ({
        connectionId,
        subscriptionId: item.subscriptionId?.S ?? '',
        mode: (item.mode?.S ?? 'bundle') as BindingMode,
      }));
  }

  #expired(epochSeconds: string | undefined): boolean {
    return epochSeconds !== undefined && Number(epochSeconds) <= this.#nowSeconds();
  }
}
