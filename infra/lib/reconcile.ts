import { Aws, type CfnCondition, CfnRule, Duration, Fn } from 'aws-cdk-lib';
import { Rule, Schedule } from 'aws-cdk-lib/aws-events';
import { LambdaFunction as LambdaTarget } from 'aws-cdk-lib/aws-events-targets';
import { type CfnPolicy, Policy, PolicyStatement } from 'aws-cdk-lib/aws-iam';
import type { Function as LambdaFunction } from 'aws-cdk-lib/aws-lambda';
import { Construct } from 'constructs';
import { onlyIf } from './only-if.js';

/** The `ReconcileEveryMinutes` values: 0 is off; the others are whole schedules of EventBridge. */
export const RECONCILE_EVERY_MINUTES = ['0', '5', '10', '15', '30', '60'];

export interface ReconcileScheduleProps {
  /** The reconcile function (functions.ts), which exists only under `on`. */
  readonly handler: LambdaFunction;
  /** `ReconcileEveryMinutes`: one of RECONCILE_EVERY_MINUTES. */
  readonly everyMinutes: string;
  readonly on: CfnCondition;
  /** `FhirRead` and `HealthLakeDatastoreId`, checked here (ReconcileReadsAServer). */
  readonly fhirRead: string;
  readonly datastoreId: string;
  /** `on` and FhirRead=healthlake: the function searches that datastore with SigV4. */
  readonly searchesHealthLake: CfnCondition;
}

/**
 * Reconciliation on AWS: an EventBridge schedule runs the reconcile function, which searches the
 * FHIR server for the changes whose CloudTrail event never reached the broker (a lost event, or
 * a `ProcessBundle`'s resources) and notifies them (src/service/reconciler.ts). All of it exists
 * only while `ReconcileEveryMinutes` is not 0.
 */
export class ReconcileSchedule extends Construct {
  readonly rule: Rule;

  constructor(scope: Construct, id: string, props: ReconcileScheduleProps) {
    super(scope, id);
    const { handler } = props;
    // The stack refuses a schedule with nothing to search, rather than deploying a function whose
    // every run fails at start (BROKER_RECONCILE_EVERY needs BROKER_FHIR_READ to be a base URL).
    new CfnRule(this, 'ReadsAServer', {
      ruleCondition: Fn.conditionNot(Fn.conditionEquals(props.everyMinutes, '0')),
      assertions: [
        {
          assert: Fn.conditionNot(Fn.conditionEquals(props.fhirRead, '')),
          assertDescription:
            'ReconcileEveryMinutes needs FhirRead: healthlake (with HealthLakeDatastoreId) or the FHIR base URL whose changes it searches',
        },
        {
          assert: Fn.conditionOr(
            Fn.conditionNot(Fn.conditionEquals(props.fhirRead, 'healthlake')),
            Fn.conditionNot(Fn.conditionEquals(props.datastoreId, '')),
          ),
          assertDescription:
            'ReconcileEveryMinutes with FhirRead=healthlake needs HealthLakeDatastoreId: the datastore whose changes it searches',
        },
      ],
    });

    this.rule = new Rule(this, 'Schedule', {
      description: 'fhir-subscription-broker reconciliation: changes whose CloudTrail event never came',
      schedule: Schedule.expression(`rate(${props.everyMinutes} minutes)`),
      // No retries: the next run starts from the checkpoint and does what this one did not.
      targets: [new LambdaTarget(handler, { retryAttempts: 0 })],
    });
    // Nor a throttled tick held for hours (a backlog of runs once capacity returns): dropped after
    // a minute. The function's timeout counts that minute in (functions.ts).
    handler.configureAsyncInvoke({ retryAttempts: 0, maxEventAge: Duration.seconds(60) });

    // The `_lastUpdated` type searches (GET [base]/[type]?...), on the one datastore it reads.
    const search = new Policy(this, 'SearchHealthLake', {
      statements: [
        new PolicyStatement({
          actions: ['healthlake:SearchWithGet'],
          resources: [
            `arn:${Aws.PARTITION}:healthlake:${Aws.REGION}:${Aws.ACCOUNT_ID}:datastore/fhir/${props.datastoreId}`,
          ],
        }),
      ],
      roles: [handler.role].filter((r) => r !== undefined),
    });
    (search.node.defaultChild as CfnPolicy).cfnOptions.condition = props.searchesHealthLake;
    // The rule and the permission it gives EventBridge to invoke the function.
    onlyIf(props.on, this);
  }
}

/**
 * The reconcile function's `BROKER_FHIR_READ`: the datastore's FHIR base URL for `healthlake` (the
 * other functions read each event's own datastore; a search needs one), else FhirRead as given.
 */
export function reconcileFhirBase(readsHealthLake: CfnCondition, fhirRead: string, datastoreId: string): string {
  return Fn.conditionIf(
    readsHealthLake.logicalId,
    `https://healthlake.${Aws.REGION}.amazonaws.com/datastore/${datastoreId}/r4`,
    fhirRead,
  ).toString();
}
