import { type CfnCondition, Duration } from 'aws-cdk-lib';
import type { IEventBus } from 'aws-cdk-lib/aws-events';
import { PolicyStatement } from 'aws-cdk-lib/aws-iam';
import type { Function as LambdaFunction } from 'aws-cdk-lib/aws-lambda';
import type { ISecret } from 'aws-cdk-lib/aws-secretsmanager';
import { Construct } from 'constructs';
import type { BrokerApis } from './apis.js';
import { brokerFunction } from './broker-function.js';
import { type DataAccess, FUNCTION_ACCESS, type FunctionName, type TableRole } from './function-access.js';
import { onlyIf } from './only-if.js';
import type { BrokerTables } from './tables.js';

export interface FunctionEntry {
  /** The entry module in src/aws/. */
  readonly entry: string;
  /** Its exported handler. */
  readonly handler: string;
  readonly description: string;
  readonly timeout: Duration;
}

/** The seven functions over the five entry modules; the construct id is the name, capitalized. */
export const FUNCTION_ENTRIES: Readonly<Record<FunctionName, FunctionEntry>> = {
  // 60 s: several webhook attempts of up to 10 s each after the event is stored.
  events: {
    entry: 'lambda-events.ts',
    handler: 'handler',
    description: 'HealthLake change events',
    timeout: Duration.seconds(60),
  },
  // 29 s: API Gateway gives up on an integration after 30 s anyway.
  api: {
    entry: 'lambda-api.ts',
    handler: 'handler',
    description: 'REST API (/fhir, /events, ...)',
    timeout: Duration.seconds(29),
  },
  // 55 s: finish before the next one-minute tick starts another run.
  dispatcher: {
    entry: 'lambda-dispatcher.ts',
    handler: 'handler',
    description: 'Retries, handshakes, heartbeats, purge',
    timeout: Duration.seconds(55),
  },
  wsConnect: {
    entry: 'lambda-ws.ts',
    handler: 'connect',
    description: 'WebSocket $connect',
    timeout: Duration.seconds(10),
  },
  wsDisconnect: {
    entry: 'lambda-ws.ts',
    handler: 'disconnect',
    description: 'WebSocket $disconnect',
    timeout: Duration.seconds(10),
  },
  // 29 s: a bind replays missed notifications; API Gateway's integration limit is 29 s.
  wsMessage: {
    entry: 'lambda-ws.ts',
    handler: 'message',
    description: 'WebSocket messages',
    timeout: Duration.seconds(29),
  },
  // 4 min: with the minute a throttled tick may wait (reconcile.ts), over before the next tick of
  // the shortest schedule (5 min), so runs do not overlap, without reserved concurrency (README,
  // Limits). A run stops 30 s before it (RECONCILE_STOP_MS, src/aws/handlers.ts) and the next run
  // goes on from there: after a long stop, the checkpoint catches up over several runs.
  reconcile: {
    entry: 'lambda-reconcile.ts',
    handler: 'handler',
    description: 'Reconciliation: changes whose event never came',
    timeout: Duration.minutes(4),
  },
};

export interface BrokerFunctionsProps {
  readonly tablePrefix: string;
  /**
   * `BROKER_EVENT_RETENTION`: how long event ids are kept for deduplication (and delivered
   * notifications for `$events`). Whole days.
   */
  readonly eventRetention: Duration;
  readonly tables: BrokerTables;
  readonly apis: BrokerApis;
  readonly eventBus: IEventBus;
  readonly credentials: ISecret;
  /** `BROKER_CORS_ORIGINS` (the stack's CorsOrigins parameter): empty for no CORS. */
  readonly corsOrigins: string;
  /** `BROKER_FHIR_READ` (the stack's FhirRead parameter): empty refuses content filters. */
  readonly fhirRead: string;
  /** `BROKER_FULL_RESOURCE_CLIENTS` (the stack's FullResourceClients parameter): empty for none. */
  readonly fullResourceClients: string;
  /**
   * The reconcile function: its environment on top of the others' (`BROKER_RECONCILE_*`, and its
   * own `BROKER_FHIR_READ`, the FHIR base URL it searches), and the condition it exists under
   * (with everything that is its own: role, policies, log group, invoke configuration).
   */
  readonly reconcile: { readonly environment: Readonly<Record<string, string>>; readonly condition: CfnCondition };
}

/**
 * The seven Lambda functions over the five entry modules in src/aws/. Every function gets the same
 * environment (one config loader serves them all); permissions follow what each one does
 * (function-access.ts, proven against the handlers by test/aws-iam.test.ts).
 */
export class BrokerFunctions extends Construct {
  /** EventBridge target for HealthLake events; also attempts delivery of what it accepted. */
  readonly events: LambdaFunction;
  /** The REST API behind the HTTP API's `$default` route. */
  readonly api: LambdaFunction;
  /** Every minute: retries, handshakes, heartbeats, purge. */
  readonly dispatcher: LambdaFunction;
  readonly wsConnect: LambdaFunction;
  readonly wsDisconnect: LambdaFunction;
  readonly wsMessage: LambdaFunction;
  /** Scheduled (ReconcileEveryMinutes): changes whose event never came. Exists only under its condition. */
  readonly reconcile: LambdaFunction;

  constructor(scope: Construct, id: string, props: BrokerFunctionsProps) {
    super(scope, id);
    const { apis } = props;
    const environment = {
      BROKER_STORE: 'dynamodb',
      BROKER_TABLE_PREFIX: props.tablePrefix,
      BROKER_PUBLIC_URL: apis.httpUrl,
      BROKER_WEBSOCKET_URL: apis.webSocketUrl,
      BROKER_WS_MANAGEMENT_ENDPOINT: apis.managementEndpoint,
      BROKER_EVENT_BUS: props.eventBus.eventBusName,
      BROKER_SECRET_ARN: props.credentials.secretArn,
      // Set here, not left to the code's default: the dead-letter queue keeps messages for less (ingest.ts).
      BROKER_EVENT_RETENTION: `${props.eventRetention.toDays()}d`,
      // Copied next to each bundle by its afterBundling hook (see broker-function.ts).
      BROKER_TOPICS_DIR: '/var/task/subscriptions/topics',
      // Below the broker's 10 MiB default: Lambda takes 6 MiB of event JSON, in which API Gateway puts the body as an escaped string
      // (~12% longer for CloudTrail events): a body past ~5.6 MB never reached the handler and got
      // API Gateway's error instead of the broker's 413.
      BROKER_MAX_INGEST_BYTES: String(5 * 1000 * 1000),
      BROKER_CORS_ORIGINS: props.corsOrigins,
      BROKER_FHIR_READ: props.fhirRead,
      BROKER_FULL_RESOURCE_CLIENTS: props.fullResourceClients,
      NODE_OPTIONS: '--enable-source-maps',
    };
    const fn = (name: FunctionName, extra: Readonly<Record<string, string>> = {}) => {
      const { entry, ...rest } = FUNCTION_ENTRIES[name];
      const fnId = name.charAt(0).toUpperCase() + name.slice(1);
      return brokerFunction(this, fnId, {
        ...rest,
        entry: `src/aws/${entry}`,
        environment: { ...environment, ...extra },
      });
    };
    this.events = fn('events');
    this.api = fn('api');
    this.dispatcher = fn('dispatcher');
    this.wsConnect = fn('wsConnect');
    this.wsDisconnect = fn('wsDisconnect');
    this.wsMessage = fn('wsMessage');
    this.reconcile = fn('reconcile', props.reconcile.environment);
    // With its role, grants and invoke configuration; its log group is made beside it.
    onlyIf(props.reconcile.condition, this.reconcile, this.reconcile.logGroup);

    const byName: Readonly<Record<FunctionName, LambdaFunction>> = {
      events: this.events,
      api: this.api,
      dispatcher: this.dispatcher,
      wsConnect: this.wsConnect,
      wsDisconnect: this.wsDisconnect,
      wsMessage: this.wsMessage,
      reconcile: this.reconcile,
    };
    // Every function reads the credentials at start-up (aws-broker.ts), whatever it does next.
    const readCredentials = new PolicyStatement({
      actions: ['secretsmanager:GetSecretValue'],
      resources: [props.credentials.secretArn],
    });
    for (const [name, f] of Object.entries(byName) as [FunctionName, LambdaFunction][]) {
      const access = FUNCTION_ACCESS[name];
      for (const [role, data] of Object.entries(access.tables) as [TableRole, DataAccess][]) {
        props.tables.grant(f, role, data);
      }
      f.addToRolePolicy(readCredentials);
      if (access.putEvents) props.eventBus.grantPutEventsTo(f);
      if (access.manageConnections) apis.webSocketStage.grantManagementApiAccess(f);
    }
  }
}
