import { CfnCondition, CfnOutput, CfnParameter, Duration, Fn, Stack, type StackProps } from 'aws-cdk-lib';
import { EventBus, Rule, Schedule } from 'aws-cdk-lib/aws-events';
import { LambdaFunction as LambdaTarget } from 'aws-cdk-lib/aws-events-targets';
import type { Construct } from 'constructs';
import { BrokerAlarms } from './alarms.js';
import { BrokerApis } from './apis.js';
import { CredentialsSecret } from './credentials-secret.js';
import { BrokerFunctions } from './functions.js';
import { HealthLakeIngest } from './ingest.js';
import { BrokerTables } from './tables.js';
import { ConditionalTrail } from './trail.js';

export const DEFAULT_TABLE_PREFIX = 'fhir-broker-';
/**
 * The functions' BROKER_EVENT_RETENTION (the code's default, set explicitly): event ids are kept
 * this long for deduplication, and the dead-letter queue keeps messages a day less (ingest.ts).
 */
export const EVENT_RETENTION = Duration.days(7);

export interface BrokerStackProps extends StackProps {
  /** Prefix of table and event bus names; change it to run a second broker in one account and region. */
  readonly tablePrefix?: string;
}

/** fhir-subscription-broker on AWS: Lambda over DynamoDB, behind API Gateway, fed by EventBridge. */
export class BrokerStack extends Stack {
  constructor(scope: Construct, id: string, props: BrokerStackProps = {}) {
    super(scope, id, {
      description: 'fhir-subscription-broker: FHIR Subscriptions for AWS HealthLake changes',
      ...props,
    });
    const tablePrefix = props.tablePrefix ?? DEFAULT_TABLE_PREFIX;

    const datastoreId = new CfnParameter(this, 'HealthLakeDatastoreId', {
      type: 'String',
      default: '',
      // A mistyped id would make the rule match nothing, silently (no event, no dead letter, no alarm).
      allowedPattern: '^([0-9a-f]{32})?$',
      constraintDescription: 'a HealthLake datastore id: 32 lowercase hexadecimal characters (or empty)',
      description: 'Only this HealthLake datastore feeds the broker; empty for every datastore in the region.',
    });
    const createTrail = new CfnParameter(this, 'CreateCloudTrailTrail', {
      type: 'String',
      default: 'false',
      allowedValues: ['true', 'false'],
      description: 'true to create a CloudTrail trail; EventBridge sees HealthLake API calls only while one records.',
    });
    const alarmEmail = new CfnParameter(this, 'AlarmEmail', {
      type: 'String',
      default: '',
      description: 'Email address subscribed to the alarm topic; empty for none.',
    });
    const corsOrigins = new CfnParameter(this, 'CorsOrigins', {
      type: 'String',
      default: '',
      // What BROKER_CORS_ORIGINS takes (README, Configuration): checked here, or a typo would stop
      // every function at start.
      allowedPattern: '^(\\*|https?://[^/,\\s]+(\\s*,\\s*https?://[^/,\\s]+)*)?$',
      constraintDescription: 'browser origins (https://app.example.org), comma-separated, or * alone, or empty',
      description: 'Origins whose browser pages may call the FHIR API (BROKER_CORS_ORIGINS); empty for none.',
    });
    const isSet = (id: string, parameter: CfnParameter) =>
      new CfnCondition(this, id, { expression: Fn.conditionNot(Fn.conditionEquals(parameter.valueAsString, '')) });
    const datastoreIdSet = isSet('HealthLakeDatastoreIdSet', datastoreId);
    const alarmEmailSet = isSet('AlarmEmailSet', alarmEmail);
    const trailWanted = new CfnCondition(this, 'CreateCloudTrailTrailWanted', {
      expression: Fn.conditionEquals(createTrail.valueAsString, 'true'),
    });

    const tables = new BrokerTables(this, 'Tables', tablePrefix);
    const eventBus = new EventBus(this, 'EventBus', { eventBusName: `${tablePrefix}events` });
    const credentials = new CredentialsSecret(this, 'Secret').secret;
    const apis = new BrokerApis(this, 'Apis');
    const functions = new BrokerFunctions(this, 'Functions', {
      tablePrefix,
      eventRetention: EVENT_RETENTION,
      tables,
      apis,
      eventBus,
      credentials,
      corsOrigins: corsOrigins.valueAsString,
    });
    apis.route({
      http: functions.api,
      connect: functions.wsConnect,
      disconnect: functions.wsDisconnect,
      message: functions.wsMessage,
    });

    const ingest = new HealthLakeIngest(this, 'HealthLake', {
      handler: functions.events,
      eventRetention: EVENT_RETENTION,
      datastoreId: datastoreId.valueAsString,
      datastoreIdSet,
    });
    new Rule(this, 'DispatcherSchedule', {
      description: 'fhir-subscription-broker dispatcher: retries, handshakes, heartbeats, purge',
      schedule: Schedule.rate(Duration.minutes(1)),
      // No retries: the next tick, a minute later, does the same work.
      targets: [new LambdaTarget(functions.dispatcher, { retryAttempts: 0 })],
    });
    // Nor when Lambda throttles it: a queued tick older than a minute is dropped (left to itself,
    // Lambda keeps one up to 6 hours, and a backlog of ticks would all run once capacity returns).
    functions.dispatcher.configureAsyncInvoke({ retryAttempts: 0, maxEventAge: Duration.seconds(60) });
    new ConditionalTrail(this, 'CloudTrail', trailWanted);
    new BrokerAlarms(this, 'Alarms', {
      deadLetterQueue: ingest.deadLetterQueue,
      ingestRule: ingest.rule,
      eventsFunction: functions.events,
      dispatcherFunction: functions.dispatcher,
      brokerName: tablePrefix,
      apiFunction: functions.api,
      messageFunction: functions.wsMessage,
      connectFunction: functions.wsConnect,
      email: alarmEmail.valueAsString,
      emailSet: alarmEmailSet,
    });

    new CfnOutput(this, 'HttpApiUrl', { value: apis.httpUrl, description: 'Base URL: {url}/fhir/metadata' });
    new CfnOutput(this, 'WebSocketUrl', { value: apis.webSocketUrl, description: 'WebSocket URL for clients' });
    new CfnOutput(this, 'SecretArn', {
      value: credentials.secretArn,
      description: 'JSON secret: apiKeys (clientId:token), ingestToken, wsTokenSecret',
    });
    new CfnOutput(this, 'EventBusName', { value: eventBus.eventBusName, description: 'Broker lifecycle events' });
    new CfnOutput(this, 'DeadLetterQueueUrl', {
      value: ingest.deadLetterQueue.queueUrl,
      description: 'HealthLake events that did not reach the broker',
    });
  }
}
