import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll } from 'vitest';
import { type DynamoDbLocal, dynamoDbEnv, startDynamoDbLocal } from './support/dynamodb-local.js';
import { runEndToEndSuite } from './support/e2e-suite.js';

/** The end-to-end suite once more, with the broker on DynamoDB Local (it creates its own tables). */

let local: DynamoDbLocal | undefined;

beforeAll(async () => {
  local = await startDynamoDbLocal();
});
afterAll(() => local?.stop());

runEndToEndSuite('DynamoDB', () => {
  if (local === undefined) throw new Error('DynamoDB Local is not running');
  return dynamoDbEnv(local.endpoint, `e2e-${randomUUID().slice(0, 8)}-`);
});
