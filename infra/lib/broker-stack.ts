import { Aws, CfnCondition, CfnOutput, CfnParameter, CfnRule, Duration, Fn, Stack, type StackProps } from 'aws-cdk-lib';
import { EventBus, Rule, Schedule } from 'aws-cdk-lib/aws-events';
import { LambdaFunction as LambdaTarget } from 'aws-cdk-lib/aws-events-targets';
import { type CfnPolicy, Policy, PolicyStatement } from 'aws-cdk-lib/aws-iam';
import type { Construct } from 'constructs';
import { BrokerAlarms } from './alarms.js';
import { BrokerApis } from './apis.js';
import { CredentialsSecret } from './credentials-secret.js';
import { BrokerFunctions } from './functions.js';
import { HealthLakeIngest } from './ingest.js';
import { CORS_ORIGINS_PATTERN, FHIR_READ_PATTERN } from './parameter-patterns.js';
import { RECONCILE_EVERY_MINUTES, ReconcileSchedule, reconcileFhirBase } from './reconcile.js';
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
      allowedPattern: CORS_ORIGINS_PATTERN,
      constraintDescription:
        'browser origins as a browser sends them (https://app.example.org, http://localhost:5173: scheme and host in lower case, no default port, no path), comma-separated, or * alone, or empty',
      description: 'Origins whose browser pages may call the FHIR API (BROKER_CORS_ORIGINS); empty for none.',
    });
    const fhirRead = new CfnParameter(this, 'FhirRead', {
      type: 'String',
      default: '',
      // What BROKER_FHIR_READ takes (README, Content filters): checked here, or a typo would stop
      // every function at start. A HealthLake URL must be given as healthlake: only that value
      // grants the functions the read.
      allowedPattern: FHIR_READ_PATTERN,
      constraintDescription:
        'healthlake, an http(s) FHIR base URL (a host name or address, a numeric port, no credentials, query or fragment; for HealthLake write healthlake), or empty',
      description:
        "Where content filters (patient=, code=...) read changed resources (BROKER_FHIR_READ): healthlake (each event's datastore, with SigV4), a FHIR base URL, or empty to refuse such filters.",
    });
    const fullResourceClients = new CfnParameter(this, 'FullResourceClients', {
      type: 'String',
      default: '',
      // What BROKER_FULL_RESOURCE_CLIENTS takes: checked here, or a typo would stop every function at start.
      allowedPattern: '^(\\*|[A-Za-z0-9_.-]{1,64}(\\s*,\\s*[A-Za-z0-9_.-]{1,64})*)?$',
      constraintDescription: 'API client ids, comma-separated, or * alone, or empty',
      description:
        'API clients whose subscriptions may ask for full-resource content, the resource read from FhirRead put in each notification (BROKER_FULL_RESOURCE_CLIENTS); * for all, empty for none. Needs FhirRead.',
    });
    // Refused here rather than deployed into functions that all stop at start (the config needs both).
    new CfnRule(this, 'FullResourceReadsAServer', {
      ruleCondition: Fn.conditionNot(Fn.conditionEquals(fullResourceClients.valueAsString, '')),
      assertions: [
        {
          assert: Fn.conditionNot(Fn.conditionEquals(fhirRead.valueAsString, '')),
          assertDescription:
            'FullResourceClients needs FhirRead: healthlake or the FHIR base URL the resources are read from',
        },
      ],
    });
    const reconcileEvery = new CfnParameter(this, 'ReconcileEveryMinutes', {
      type: 'String',
      default: '0',
      allowedValues: RECONCILE_EVERY_MINUTES,
      description:
        'Minutes between reconciliation runs, which notify the changes whose CloudTrail event never came (BROKER_RECONCILE_EVERY); 0 for none. Needs FhirRead (with healthlake, HealthLakeDatastoreId).',
    });
    const reconcileLag = new CfnParameter(this, 'ReconcileLagMinutes', {
      type: 'Number',
      default: 15,
      minValue: 0,
      maxValue: 1440,
      description:
        'Minutes a change is left to its own CloudTrail event before reconciliation looks for it (BROKER_RECONCILE_LAG).',
    });
    const isSet = (id: string, parameter: CfnParameter) =>
      new CfnCondition(this, id, { expression: Fn.conditionNot(Fn.conditionEquals(parameter.valueAsString, '')) });
    const datastoreIdSet = isSet('HealthLakeDatastoreIdSet', datastoreId);
    const alarmEmailSet = isSet('AlarmEmailSet', alarmEmail);
    const trailWanted = new CfnCondition(this, 'CreateCloudTrailTrailWanted', {
      expression: Fn.conditionEquals(createTrail.valueAsString, 'true'),
    });
    const readHealthLake = new CfnCondition(this, 'FhirReadHealthLake', {
      expression: Fn.conditionEquals(fhirRead.valueAsString, 'healthlake'),
    });
    const reconcileOn = new CfnCondition(this, 'ReconcileOn', {
      expression: Fn.conditionNot(Fn.conditionEquals(reconcileEvery.valueAsString, '0')),
    });
    const reconcileSearchesHealthLake = new CfnCondition(this, 'ReconcileSearchesHealthLake', {
      expression: Fn.conditionAnd(reconcileOn, readHealthLake),
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
      fhirRead: fhirRead.valueAsString,
      fullResourceClients: fullResourceClients.valueAsString,
      reconcile: {
        condition: reconcileOn,
        environment: {
          BROKER_RECONCILE_EVERY: `${reconcileEvery.valueAsString}m`,
          BROKER_RECONCILE_LAG: `${reconcileLag.valueAsString}m`,
          BROKER_FHIR_READ: reconcileFhirBase(readHealthLake, fhirRead.valueAsString, datastoreId.valueAsString),
        },
      },
    });
    // Content filters on HealthLake: the functions that ingest (EventBridge's target, and POST /events)
    // read the changed resources, and only then, from the datastore the broker is fed by when one is set.
    const datastores = Fn.conditionIf(
      datastoreIdSet.logicalId,
      `arn:${Aws.PARTITION}:healthlake:${Aws.REGION}:${Aws.ACCOUNT_ID}:datastore/fhir/${datastoreId.valueAsString}`,
      `arn:${Aws.PARTITION}:healthlake:${Aws.REGION}:${Aws.ACCOUNT_ID}:datastore/fhir/*`,
    ).toString();
    const readResources = new Policy(this, 'ReadHealthLakeResources', {
      // The read, and the instance history read after a delete: AWS lists no action of its own for
      // history, and its read-only managed policy (AmazonHealthLakeReadOnlyAccess) reads with these two.
      statements: [
        new PolicyStatement({
          actions: ['healthlake:ReadResource', 'healthlake:SearchWithGet'],
          resources: [datastores],
        }),
      ],
      roles: [functions.events.role, functions.api.role].filter((r) => r !== undefined),
    });
    (readResources.node.defaultChild as CfnPolicy).cfnOptions.condition = readHealthLake;
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
    new ReconcileSchedule(this, 'Reconcile', {
      handler: functions.reconcile,
      everyMinutes: reconcileEvery.valueAsString,
      on: reconcileOn,
      fhirRead: fhirRead.valueAsString,
      datastoreId: datastoreId.valueAsString,
      searchesHealthLake: reconcileSearchesHealthLake,
    });
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
      reconcile: { handler: functions.reconcile, on: reconcileOn },
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
