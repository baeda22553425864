import { type TableNames, tableNames } from '../../src/store/dynamodb/tables.js';
import type { AwsCall } from './aws-recorder.js';
import { ACCOUNT, allows, connectionArn, eventBusArn, REGION, type Statement, tableArn } from './stack-iam.js';

/**
 * What IAM asks of a recorded AWS call, and which kinds of access a role grants, in one
 * vocabulary: `<table>:read` and `<table>:write` (by the table's role in `tableNames`), as CDK's
 * `grantReadData` / `grantWriteData` divide DynamoDB's actions; `secret:read`; `bus:put`;
 * `connections:manage`; `failures:send` (the on-failure destination: the Lambda service sends a
 * failed invocation there, the events function a refused event).
 */

/** CDK's read and write data actions (aws-cdk-lib/aws-dynamodb perms); `DescribeTable` comes with either. */
export const DYNAMODB_READ = [
  'dynamodb:BatchGetItem',
  'dynamodb:Query',
  'dynamodb:GetItem',
  'dynamodb:Scan',
  'dynamodb:ConditionCheckItem',
  'dynamodb:GetRecords',
  'dynamodb:GetShardIterator',
] as const;
export const DYNAMODB_WRITE = [
  'dynamodb:BatchWriteItem',
  'dynamodb:PutItem',
  'dynamodb:UpdateItem',
  'dynamodb:DeleteItem',
] as const;
const DESCRIBE_TABLE = 'dynamodb:DescribeTable';

/** The function's view of the stack's resources, from its (resolved) environment. */
export interface Targets {
  readonly tablePrefix: string;
  readonly secretArn: string;
  readonly eventBus: string;
  readonly apiId: string;
  readonly stage: string;
  /** SQS queues of the function's on-failure destination. */
  readonly failureDestinations: readonly string[];
}

export function targetsOf(env: Readonly<Record<string, string>>, failureDestinations: readonly string[]): Targets {
  const endpoint = new URL(String(env.BROKER_WS_MANAGEMENT_ENDPOINT));
  return {
    tablePrefix: String(env.BROKER_TABLE_PREFIX),
    secretArn: String(env.BROKER_SECRET_ARN),
    eventBus: String(env.BROKER_EVENT_BUS),
    apiId: endpoint.hostname.split('.')[0] ?? '',
    stage: endpoint.pathname.replace(/^\//, ''),
    failureDestinations,
  };
}

export interface Permission {
  readonly action: string;
  readonly resource: string;
  /** The kind of access, e.g. `connections:write`. */
  readonly access: string;
}

/** Each action and resource IAM authorizes the call against. */
export function permissionsOf(call: AwsCall, targets: Targets): Permission[] {
  const input = call.input;
  switch (call.service) {
    case 'dynamodb':
      return dynamoDbPermissions(call.operation, input as DynamoDbInput).map(({ action, table, index }) => ({
        action,
        resource: `${tableArn(table)}${index === undefined ? '' : `/index/${index}`}`,
        access: `${roleOf(table, targets.tablePrefix)}:${classOf(action)}`,
      }));
    case 'secretsmanager':
      return [{ action: `secretsmanager:${call.operation}`, resource: String(input.SecretId), access: 'secret:read' }];
    case 'events':
      return ((input.Entries ?? []) as { EventBusName?: string }[]).map((e) => ({
        action: `events:${call.operation}`,
        resource: eventBusArn(e.EventBusName ?? 'default'),
        access: 'bus:put',
      }));
    case 'execute-api':
      return [
        {
          action: 'execute-api:ManageConnections',
          resource: connectionArn(targets.apiId, String(input.stage), call.operation, String(input.connectionId)),
          access: 'connections:manage',
        },
      ];
    case 'sqs':
      return [{ action: `sqs:${call.operation}`, resource: queueArn(String(input.QueueUrl)), access: 'failures:send' }];
    case 'unknown':
      return [{ action: call.operation, resource: '?', access: 'unknown' }];
  }
}

/** The kinds of access the statements grant on the function's targets. */
export function grantedAccess(statements: readonly Statement[], targets: Targets): string[] {
  const granted: string[] = [];
  for (const [role, name] of Object.entries(tableNames(targets.tablePrefix))) {
    const arns = [tableArn(name), `${tableArn(name)}/index/any`];
    const any = (actions: readonly string[]) => actions.some((a) => arns.some((arn) => allows(statements, a, arn)));
    if (any(DYNAMODB_READ)) granted.push(`${role}:read`);
    if (any(DYNAMODB_WRITE)) granted.push(`${role}:write`);
  }
  if (allows(statements, 'secretsmanager:GetSecretValue', targets.secretArn)) granted.push('secret:read');
  if (allows(statements, 'events:PutEvents', eventBusArn(targets.eventBus))) granted.push('bus:put');
  const anyConnection = connectionArn(targets.apiId, targets.stage, 'POST', 'any');
  if (allows(statements, 'execute-api:ManageConnections', anyConnection)) granted.push('connections:manage');
  if (targets.failureDestinations.some((q) => allows(statements, 'sqs:SendMessage', q))) granted.push('failures:send');
  return granted.sort();
}

/**
 * Statement parts that no kind of access above accounts for: another service, another table, a
 * wildcard resource. `grantedAccess` alone would not see them.
 */
export function unaccountedGrants(statements: readonly Statement[], targets: Targets): string[] {
  const tables = Object.values(tableNames(targets.tablePrefix)).flatMap((n) => [tableArn(n), `${tableArn(n)}/index/*`]);
  const dynamodb = new Set<string>([...DYNAMODB_READ, ...DYNAMODB_WRITE, DESCRIBE_TABLE]);
  const expected: Record<string, string> = {
    'secretsmanager:GetSecretValue': targets.secretArn,
    'events:PutEvents': eventBusArn(targets.eventBus),
    'execute-api:ManageConnections': `arn:aws:execute-api:${REGION}:${ACCOUNT}:${targets.apiId}/${targets.stage}/*/@connections/*`,
  };
  // What CDK's grantSendMessages gives: the Lambda service sends failed invocations with it.
  const sqs = new Set(['sqs:SendMessage', 'sqs:GetQueueAttributes', 'sqs:GetQueueUrl']);
  const accounted = (action: string, resource: string): boolean => {
    if (dynamodb.has(action)) return tables.includes(resource);
    if (sqs.has(action)) return targets.failureDestinations.includes(resource);
    return expected[action] === resource;
  };
  return statements.flatMap((s) =>
    s.actions.flatMap((action) =>
      s.resources
        .filter((resource) => !accounted(action, resource))
        .map((resource) => `${s.where}: ${action} on ${resource}`),
    ),
  );
}

/** `https://sqs.<region>.amazonaws.com/<account>/<name>` → `arn:aws:sqs:<region>:<account>:<name>`. */
function queueArn(queueUrl: string): string {
  const url = new URL(queueUrl);
  const [, account = '', name = ''] = url.pathname.split('/');
  return `arn:aws:sqs:${url.hostname.split('.')[1]}:${account}:${name}`;
}

/** The parts of a DynamoDB request that name tables and indexes. */
interface DynamoDbInput {
  readonly TableName?: string;
  readonly IndexName?: string;
  readonly RequestItems?: Readonly<Record<string, unknown>>;
  readonly TransactItems?: readonly Readonly<Record<string, { readonly TableName?: string }>>[];
}

interface TableAction {
  readonly action: string;
  readonly table: string;
  readonly index?: string;
}

/** DynamoDB's authorization per operation: one action per table, and per item of a transaction. */
function dynamoDbPermissions(operation: string, input: DynamoDbInput): TableAction[] {
  const action = `dynamodb:${operation}`;
  const table = String(input.TableName);
  switch (operation) {
    case 'GetItem':
    case 'PutItem':
    case 'UpdateItem':
    case 'DeleteItem':
    case 'DescribeTable':
      return [{ action, table }];
    case 'Query':
    case 'Scan':
      return [{ action, table, ...(input.IndexName === undefined ? {} : { index: input.IndexName }) }];
    case 'BatchGetItem':
    case 'BatchWriteItem':
      return Object.keys(input.RequestItems ?? {}).map((name) => ({ action, table: name }));
    case 'TransactWriteItems':
    case 'TransactGetItems':
      return (input.TransactItems ?? []).map((item) => {
        const [kind = '', body] = Object.entries(item)[0] ?? [];
        return { action: `dynamodb:${PER_ITEM[kind] ?? kind}`, table: String(body?.TableName) };
      });
    default:
      // Not mapped yet: reported as it is, so the test fails until it is.
      return [{ action, table }];
  }
}

/** The action a transaction item is authorized as. */
const PER_ITEM: Readonly<Record<string, string>> = {
  Put: 'PutItem',
  Update: 'UpdateItem',
  Delete: 'DeleteItem',
  ConditionCheck: 'ConditionCheckItem',
  Get: 'GetItem',
};

function classOf(action: string): string {
  if ((DYNAMODB_READ as readonly string[]).includes(action) || action === DESCRIBE_TABLE) return 'read';
  if ((DYNAMODB_WRITE as readonly string[]).includes(action)) return 'write';
  return action;
}

function roleOf(table: string, prefix: string): string {
  const role = Object.entries(tableNames(prefix)).find(([, name]) => name === table)?.[0] as
    | keyof TableNames
    | undefined;
  return role ?? table;
}
