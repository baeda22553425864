import type { AttributeDefinition, KeySchemaElement } from '@aws-sdk/client-dynamodb';
import { RemovalPolicy } from 'aws-cdk-lib';
import { type Attribute, AttributeType, BillingMode, Table, TableEncryption } from 'aws-cdk-lib/aws-dynamodb';
import type { IGrantable } from 'aws-cdk-lib/aws-iam';
import { Construct } from 'constructs';
import { type TableNames, TTL_ATTRIBUTE, tableDefinitions, tableNames } from '../../src/store/dynamodb/tables.js';
import type { DataAccess, TableRole } from './function-access.js';

/**
 * The broker's DynamoDB tables, built from the store adapter's own definitions
 * (src/store/dynamodb/tables.ts), so names, keys, GSIs and TTL cannot drift from what the code
 * reads and writes. What the adapter does not decide is added here: on-demand billing (also in
 * the definitions), point-in-time recovery, encryption with the AWS managed key, and RETAIN,
 * because a stack update must never take the data with it.
 */
export class BrokerTables extends Construct {
  readonly tables: Readonly<Record<keyof TableNames, Table>>;

  constructor(scope: Construct, id: string, prefix: string) {
    super(scope, id);
    const names = tableNames(prefix);
    const byName = new Map<string, Table>();
    for (const def of tableDefinitions(prefix)) {
      const { TableName, KeySchema, AttributeDefinitions, GlobalSecondaryIndexes } = def.input;
      if (TableName === undefined || KeySchema === undefined || AttributeDefinitions === undefined) {
        throw new TypeError('a table definition lacks its name, key schema or attribute definitions');
      }
      const attribute = attributeOf(AttributeDefinitions);
      const table = new Table(this, logicalName(names, TableName), {
        tableName: TableName,
        ...keys(KeySchema, attribute),
        billingMode: BillingMode.PAY_PER_REQUEST,
        pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
        encryption: TableEncryption.AWS_MANAGED,
        ...(def.ttl ? { timeToLiveAttribute: TTL_ATTRIBUTE } : {}),
        removalPolicy: RemovalPolicy.RETAIN,
        // RETAIN guards against CloudFormation; this against a delete from the console or the API.
        deletionProtection: true,
      });
      for (const gsi of GlobalSecondaryIndexes ?? []) {
        if (gsi.IndexName === undefined || gsi.KeySchema === undefined) {
          throw new TypeError(`an index of ${TableName} lacks its name or key schema`);
        }
        if (gsi.Projection?.ProjectionType !== 'ALL') {
          throw new TypeError(`index ${gsi.IndexName} of ${TableName}: only ALL projections are mapped`);
        }
        table.addGlobalSecondaryIndex({ indexName: gsi.IndexName, ...keys(gsi.KeySchema, attribute) });
      }
      byName.set(TableName, table);
    }
    const table = (name: string): Table => {
      const found = byName.get(name);
      if (found === undefined) throw new TypeError(`no definition for table ${name}`);
      return found;
    };
    this.tables = {
      subscriptions: table(names.subscriptions),
      notifications: table(names.notifications),
      eventIds: table(names.eventIds),
      connections: table(names.connections),
      subscriptionTypes: table(names.subscriptionTypes),
    };
  }

  /** Item-level access to one table and its indexes (never `CreateTable` and the like: the stack owns the tables). */
  grant(grantee: IGrantable, role: TableRole, access: DataAccess): void {
    const table = this.tables[role];
    switch (access) {
      case 'read':
        table.grantReadData(grantee);
        return;
      case 'write':
        table.grantWriteData(grantee);
        return;
      case 'read-write':
        table.grantReadWriteData(grantee);
        return;
      case 'put':
        table.grant(grantee, 'dynamodb:PutItem');
        return;
    }
  }
}

/** `subscriptions` → `Subscriptions`, `event-ids` → `EventIds`: stable logical ids per role. */
function logicalName(names: TableNames, tableName: string): string {
  const role = Object.entries(names).find(([, name]) => name === tableName)?.[0];
  if (role === undefined) throw new TypeError(`table ${tableName} has no role in tableNames()`);
  return role.charAt(0).toUpperCase() + role.slice(1);
}

function attributeOf(definitions: AttributeDefinition[]): (name: string) => Attribute {
  return (name) => {
    const type = definitions.find((d) => d.AttributeName === name)?.AttributeType;
    switch (type) {
      case 'S':
        return { name, type: AttributeType.STRING };
      case 'N':
        return { name, type: AttributeType.NUMBER };
      case 'B':
        return { name, type: AttributeType.BINARY };
      case undefined:
        throw new TypeError(`key attribute ${name} has no attribute definition`);
    }
  };
}

function keys(
  schema: KeySchemaElement[],
  attribute: (name: string) => Attribute,
): { partitionKey: Attribute; sortKey?: Attribute } {
  const named = (keyType: 'HASH' | 'RANGE') => schema.find((k) => k.KeyType === keyType)?.AttributeName;
  const hash = named('HASH');
  const range = named('RANGE');
  if (hash === undefined) throw new TypeError('a key schema lacks its HASH key');
  return { partitionKey: attribute(hash), ...(range === undefined ? {} : { sortKey: attribute(range) }) };
}
