import { randomUUID } from 'node:crypto';
import { DeleteTableCommand, type DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';
import { DynamoDbStore } from '../../src/store/dynamodb/dynamodb-store.js';
import { ensureTables, tableDefinitions } from '../../src/store/dynamodb/tables.js';
import { type DynamoDbLocal, startDynamoDbLocal } from './dynamodb-local.js';
import { record } from './store-fixtures.js';

export interface StoreUnderTest {
  readonly client: DynamoDBClient;
  /** The tables' name prefix, `<name>-<random>-`. */
  readonly prefix: string;
  /** A DynamoDB store on them, holding subscription `s1` (store-fixtures' `record`). */
  readonly store: DynamoDbStore;
}

/**
 * One DynamoDB Local for the test file, and for each test fresh tables and a store on them, handed
 * to `use` before the test (which keeps them in the file's own variables); after it the store is
 * closed and the tables deleted.
 */
export function storePerTest(name: string, use: (t: StoreUnderTest) => void): void {
  let local: DynamoDbLocal;
  let current: StoreUnderTest | undefined;
  beforeAll(async () => {
    local = await startDynamoDbLocal();
  });
  afterAll(() => local?.stop());
  beforeEach(async () => {
    const prefix = `${name}-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    const store = new DynamoDbStore(local.client, prefix);
    await store.insertSubscription(record('s1'));
    current = { client: local.client, prefix, store };
    use(current);
  });
  afterEach(async () => {
    if (current === undefined) return;
    const { client, prefix, store } = current;
    current = undefined;
    await store.close();
    await Promise.all(
      tableDefinitions(prefix).map((d) => client.send(new DeleteTableCommand({ TableName: d.input.TableName }))),
    );
  });
}
