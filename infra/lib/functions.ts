import { Duration } from 'aws-cdk-lib';
import type { IEventBus } from 'aws-cdk-lib/aws-events';
import { PolicyStatement } from 'aws-cdk-lib/aws-iam';
import type { Function as LambdaFunction } from 'aws-cdk-lib/aws-lambda';
import type { ISecret } from 'aws-cdk-lib/aws-secretsmanager';
import { Construct } from 'constructs';
import type { BrokerApis } from './apis.js';
import { brokerFunction } from './broker-function.js';
import type { BrokerTables } from './tables.js';

export interface BrokerFunctionsProps {
  readonly tablePrefix: string;
  readonly tables: BrokerTables;
  readonly apis: BrokerApis;
  readonly eventBus: IEventBus;
  readonly credentials: ISecret;
}

/**
 * The six Lambda functions over the four entry modules in src/aws/. Every function gets the same
 * environment (one config loader serves them all); permissions follow what each one does.
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
      // Copied next to each bundle by its afterBundling hook (see broker-function.ts).
      BROKER_TOPICS_DIR: '/var/task/subscriptions/topics',
      // 6 MB: Lambda's own request payload limit, below the broker's 10 MiB default.
      BROKER_MAX_INGEST_BYTES: String(6 * 1000 * 1000),
      NODE_OPTIONS: '--enable-source-maps',
    };
    const fn = (fnId: string, entry: string, handler: string, description: string, timeout: Duration) =>
      brokerFunction(this, fnId, { entry: `src/aws/${entry}`, handler, description, environment, timeout });

    // 60 s: several webhook attempts of up to 10 s each after the event is stored.
    this.events = fn('Events', 'lambda-events.ts', 'handler', 'HealthLake change events', Duration.seconds(60));
    // 29 s: API Gateway gives up on an integration after 30 s anyway.
    this.api = fn('Api', 'lambda-api.ts', 'handler', 'REST API (/fhir, /events, ...)', Duration.seconds(29));
    // 55 s: finish before the next one-minute tick starts another run.
    this.dispatcher = fn(
      'Dispatcher',
      'lambda-dispatcher.ts',
      'handler',
      'Retries, handshakes, heartbeats, purge',
      Duration.seconds(55),
    );
    this.wsConnect = fn('WsConnect', 'lambda-ws.ts', 'connect', 'WebSocket $connect', Duration.seconds(10));
    this.wsDisconnect = fn('WsDisconnect', 'lambda-ws.ts', 'disconnect', 'WebSocket $disconnect', Duration.seconds(10));
    // 29 s: a bind replays missed notifications; API Gateway's integration limit is 29 s.
    this.wsMessage = fn('WsMessage', 'lambda-ws.ts', 'message', 'WebSocket messages', Duration.seconds(29));

    const all = [this.events, this.api, this.dispatcher, this.wsConnect, this.wsDisconnect, this.wsMessage];
    // Those that change subscription state or deliver, and so publish lifecycle events.
    const publishers = [this.events, this.api, this.dispatcher, this.wsMessage];
    // Those that push to WebSocket clients: a bind answers and replays; the others deliver (the API
    // function too: `POST /events` there ingests and delivers, and a PUT back to `requested`
    // handshakes; without the grant every push of its was refused and counted as sent).
    const pushers = [this.events, this.api, this.dispatcher, this.wsMessage];

    const readCredentials = new PolicyStatement({
      actions: ['secretsmanager:GetSecretValue'],
      resources: [props.credentials.secretArn],
    });
    for (const f of all) {
      props.tables.grantReadWriteData(f);
      f.addToRolePolicy(readCredentials);
    }
    for (const f of publishers) props.eventBus.grantPutEventsTo(f);
    for (const f of pushers) apis.webSocketStage.grantManagementApiAccess(f);
  }
}
