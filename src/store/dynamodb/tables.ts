import {
  CreateTableCommand,
  type CreateTableCommandInput,
  DescribeTableCommand,
  type DynamoDBClient,
  ResourceInUseException,
  ResourceNotFoundException,
  UpdateTimeToLiveCommand,
  waitUntilTableExists,
} from '@aws-sdk/client-dynamodb';
import { TableNotReadyError } from './errors.js';

/**
 * The broker's DynamoDB tables, named `<prefix><role>`. One definition serves `ensureTables`
 * (DynamoDB Local, first start) and is the reference for the CDK stack. See docs/dynamodb.md.
 */

export interface TableNames {
  readonly subscriptions: string;
  readonly notifications: string;
  readonly eventIds: string;
  readonly connections: string;
  readonly subscriptionTypes: string;
}

export const INDEX = {
  /** subscriptions: every subscription of an owner, by creation time. */
  byOwner: 'by-owner',
  /** subscriptions, sparse: only those that collect notifications (requested, active, error). */
  collectingByOwner: 'collecting-by-owner',
  /** notifications, sparse: only pending ones, by subscription and event number. */
  pending: 'pending',
  /** connections, sparse: binding items by subscription (for delivery over API Gateway). */
  connectionsBySubscription: 'by-subscription',
} as const;

/** The TTL attribute (epoch seconds) on event ids, per-subscription markers and connections. */
export const TTL_ATTRIBUTE = 'expiresAt';

export function tableNames(prefix: string): TableNames {
  return {
    subscriptions: `${prefix}subscriptions`,
    notifications: `${prefix}notifications`,
    eventIds: `${prefix}event-ids`,
    connections: `${prefix}connections`,
    subscriptionTypes: `${prefix}subscription-types`,
  };
}

interface TableDefinition {
  readonly input: CreateTableCommandInput;
  readonly ttl: boolean;
}

export function tableDefinitions(prefix: string): TableDefinition[] {
  const names = tableNames(prefix);
  const all = { ProjectionType: 'ALL' } as const;
  return [
    {
      ttl: false,
      input: {
        TableName: names.subscriptions,
        BillingMode: 'PAY_PER_REQUEST',
        AttributeDefinitions: [
          { AttributeName: 'id', AttributeType: 'S' },
          { AttributeName: 'owner', AttributeType: 'S' },
          { AttributeName: 'collectingOwner', AttributeType: 'S' },
          { AttributeName: 'createdAt', AttributeType: 'S' },
        ],
        KeySchema: [{ AttributeName: 'id', KeyType: 'HASH' }],
        GlobalSecondaryIndexes: [
          {
            IndexName: INDEX.byOwner,
            KeySchema: [
              { AttributeName: 'owner', KeyType: 'HASH' },
              { AttributeName: 'createdAt', KeyType: 'RANGE' },
            ],
            Projection: all,
          },
          {
            IndexName: INDEX.collectingByOwner,
            KeySchema: [
              { AttributeName: 'collectingOwner', KeyType: 'HASH' },
              { AttributeName: 'createdAt', KeyType: 'RANGE' },
            ],
            Projection: all,
          },
        ],
      },
    },
    {
      ttl: false,
      input: {
        TableName: names.notifications,
        BillingMode: 'PAY_PER_REQUEST',
        AttributeDefinitions: [
          { AttributeName: 'subscriptionId', AttributeType: 'S' },
          { AttributeName: 'eventNumber', AttributeType: 'N' },
          { AttributeName: 'pendingSubscriptionId', AttributeType: 'S' },
        ],
        KeySchema: [
          { AttributeName: 'subscriptionId', KeyType: 'HASH' },
          { AttributeName: 'eventNumber', KeyType: 'RANGE' },
        ],
        GlobalSecondaryIndexes: [
          {
            IndexName: INDEX.pending,
            KeySchema: [
              { AttributeName: 'pendingSubscriptionId', KeyType: 'HASH' },
              { AttributeName: 'eventNumber', KeyType: 'RANGE' },
            ],
            Projection: all,
          },
        ],
      },
    },
    {
      ttl: true,
      input: {
        TableName: names.eventIds,
        BillingMode: 'PAY_PER_REQUEST',
        AttributeDefinitions: [
          { AttributeName: 'eventId', AttributeType: 'S' },
          { AttributeName: 'scope', AttributeType: 'S' },
        ],
        KeySchema: [
          { AttributeName: 'eventId', KeyType: 'HASH' },
          { AttributeName: 'scope', KeyType: 'RANGE' },
        ],
      },
    },
    {
      ttl: true,
      input: {
        TableName: names.connections,
        BillingMode: 'PAY_PER_REQUEST',
        // One `#connection` item per API Gateway connection and one `sub#<id>` item per binding.
        AttributeDefinitions: [
          { AttributeName: 'connectionId', AttributeType: 'S' },
          { AttributeName: 'sk', AttributeType: 'S' },
          { AttributeName: 'subscriptionId', AttributeType: 'S' },
        ],
        KeySchema: [
          { AttributeName: 'connectionId', KeyType: 'HASH' },
          { AttributeName: 'sk', KeyType: 'RANGE' },
        ],
        GlobalSecondaryIndexes: [
          {
            // Sparse: only binding items carry subscriptionId.
            IndexName: INDEX.connectionsBySubscription,
            KeySchema: [
              { AttributeName: 'subscriptionId', KeyType: 'HASH' },
              { AttributeName: 'connectionId', KeyType: 'RANGE' },
            ],
            Projection: all,
          },
        ],
      },
    },
    {
      ttl: false,
      input: {
        TableName: names.subscriptionTypes,
        BillingMode: 'PAY_PER_REQUEST',
        // Sparse by construction: one item per resource type (or `*`) of each collecting subscription.
        AttributeDefinitions: [
          { AttributeName: 'resourceType', AttributeType: 'S' },
          { AttributeName: 'subscriptionId', AttributeType: 'S' },
        ],
        KeySchema: [
          { AttributeName: 'resourceType', KeyType: 'HASH' },
          { AttributeName: 'subscriptionId', KeyType: 'RANGE' },
        ],
      },
    },
  ];
}

// 2 min: DynamoDB creates an on-demand table in seconds; DynamoDB Local at once.
const TABLE_WAIT_SECONDS = 120;

/**
 * Creates every missing table (on demand capacity, TTL enabled where it applies) and waits until
 * each is ACTIVE. Existing tables are left as they are. Safe to run from several processes at once.
 */
export async function ensureTables(client: DynamoDBClient, prefix: string): Promise<void> {
  await Promise.all(tableDefinitions(prefix).map((def) => ensureTable(client, def)));
}

async function ensureTable(client: DynamoDBClient, def: TableDefinition): Promise<void> {
  const name = def.input.TableName as string;
  let created = false;
  try {
    await client.send(new DescribeTableCommand({ TableName: name }));
  } catch (err) {
    if (!(err instanceof ResourceNotFoundException)) throw err;
    try {
      await client.send(new CreateTableCommand(def.input));
      created = true;
    } catch (createErr) {
      // Another process created it between our describe and create.
      if (!(createErr instanceof ResourceInUseException)) throw createErr;
    }
  }
  try {
    await waitUntilTableExists(
      { client, maxWaitTime: TABLE_WAIT_SECONDS, minDelay: 1, maxDelay: 5 },
      { TableName: name },
    );
  } catch (err) {
    throw new TableNotReadyError(name, { cause: err });
  }
  if (created && def.ttl) {
    await client.send(
      new UpdateTimeToLiveCommand({
        TableName: name,
        TimeToLiveSpecification: { Enabled: true, AttributeName: TTL_ATTRIBUTE },
      }),
    );
  }
}
