import { Aws, type CfnCondition, Duration } from 'aws-cdk-lib';
import {
  Alarm,
  type CfnAlarm,
  ComparisonOperator,
  type IMetric,
  MathExpression,
  Metric,
  TreatMissingData,
} from 'aws-cdk-lib/aws-cloudwatch';
import { SnsAction } from 'aws-cdk-lib/aws-cloudwatch-actions';
import type { IRule } from 'aws-cdk-lib/aws-events';
import { PolicyStatement, ServicePrincipal } from 'aws-cdk-lib/aws-iam';
import type { IFunction } from 'aws-cdk-lib/aws-lambda';
import { CfnSubscription, Topic } from 'aws-cdk-lib/aws-sns';
import type { IQueue } from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import { EMF_NAMESPACE } from '../../src/observability/metrics.js';

export interface BrokerAlarmsProps {
  readonly deadLetterQueue: IQueue;
  /** The HealthLake rule (on the default bus), whose target dead-letters into `deadLetterQueue`. */
  readonly ingestRule: IRule;
  /** Its target, whose on-failure destination is `deadLetterQueue`. */
  readonly eventsFunction: IFunction;
  readonly dispatcherFunction: IFunction;
  /** The stack's table prefix: the `Broker` dimension of the broker's own metrics (aws-broker.ts). */
  readonly brokerName: string;
  /** The HTTP API's function and the WebSocket messages' function: their errors and throttles are alarmed too. */
  readonly apiFunction: IFunction;
  readonly messageFunction: IFunction;
  /** WebSocket `$connect`: when it fails, every client's socket is refused. */
  readonly connectFunction: IFunction;
  /** The reconcile function, which exists only under `on`: so do its alarms. */
  readonly reconcile: { readonly handler: IFunction; readonly on: CfnCondition };
  /** The `AlarmEmail` parameter's value; subscribed only when `emailSet` holds. */
  readonly email: string;
  readonly emailSet: CfnCondition;
}

/**
 * Alarms on the things that mean "a change may not reach its subscribers": a dead-lettered event
 * (each new one, and one left in the queue for 4 days of its 6), a failing or throttled events
 * function or one whose events wait in Lambda's queue, a failing, throttled or stopped dispatcher,
 * a dead letter that could not be written (by EventBridge or by Lambda's on-failure destination:
 * the event is then lost with no other trace), a notification the broker dead-lettered (its
 * endpoint failed the whole retry schedule), a failing or throttled API or WebSocket function, and,
 * with reconciliation on, a failing reconcile function or reconciliation run.
 */
export class BrokerAlarms extends Construct {
  readonly topic: Topic;

  constructor(scope: Construct, id: string, props: BrokerAlarmsProps) {
    super(scope, id);
    // No KMS key: CloudWatch cannot publish to a topic encrypted with the AWS managed SNS key.
    this.topic = new Topic(this, 'Topic', { displayName: 'fhir-subscription-broker alarms', enforceSSL: true });
    // enforceSSL gives the topic a policy of its own (a Deny without TLS), which replaces the
    // default one: without this Allow, CloudWatch may not publish and no alarm reaches anyone.
    this.topic.addToResourcePolicy(
      new PolicyStatement({
        principals: [new ServicePrincipal('cloudwatch.amazonaws.com')],
        actions: ['sns:Publish'],
        resources: [this.topic.topicArn],
        conditions: {
          ArnLike: { 'aws:SourceArn': `arn:${Aws.PARTITION}:cloudwatch:${Aws.REGION}:${Aws.ACCOUNT_ID}:alarm:*` },
          StringEquals: { 'aws:SourceAccount': Aws.ACCOUNT_ID },
        },
      }),
    );
    const email = new CfnSubscription(this, 'Email', {
      topicArn: this.topic.topicArn,
      protocol: 'email',
      endpoint: props.email,
    });
    email.cfnOptions.condition = props.emailSet;

    const action = new SnsAction(this.topic);
    /** Fires above `threshold` (0: on the first occurrence), or below it with `below`. */
    const alarm = (
      alarmId: string,
      description: string,
      metric: IMetric,
      rule: { threshold?: number; below?: boolean } = {},
    ): Alarm => {
      const made = new Alarm(this, alarmId, {
        alarmDescription: description,
        metric,
        threshold: rule.threshold ?? 0,
        comparisonOperator: rule.below
          ? ComparisonOperator.LESS_THAN_THRESHOLD
          : ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        // No data means no messages and no invocations: healthy; for a count that must stay up
        // (`below`), no data is the worst case.
        treatMissingData: rule.below ? TreatMissingData.BREACHING : TreatMissingData.NOT_BREACHING,
      });
      made.addAlarmAction(action);
      return made;
    };

    const period = Duration.minutes(5);
    // The broker's own metrics, which each invocation writes to its log (Embedded Metric Format).
    const brokerMetric = (metricName: string, fn: string, outcome: string) =>
      new Metric({
        namespace: EMF_NAMESPACE,
        metricName,
        dimensionsMap: { Broker: props.brokerName, Function: fn, outcome },
        period,
        statistic: 'Sum',
      });
    // Each new dead letter (the visible count stays above 0 and would fire once for all of them).
    alarm(
      'DeadLetters',
      'HealthLake events sent to the dead-letter queue: changes that did not reach the broker',
      props.deadLetterQueue.metricNumberOfMessagesSent({ period, statistic: 'Sum' }),
    );
    alarm(
      'DeadLettersAging',
      'A HealthLake event has waited 4 days in the dead-letter queue: replay it before the queue drops it (6 days)',
      props.deadLetterQueue.metricApproximateAgeOfOldestMessage({ period, statistic: 'Maximum' }),
      { threshold: Duration.days(4).toSeconds() },
    );
    alarm(
      'EventsThrottles',
      "The events function was throttled (account concurrency): HealthLake changes wait in Lambda's queue",
      props.eventsFunction.metricThrottles({ period, statistic: 'Sum' }),
    );
    alarm(
      'EventsWaiting',
      "HealthLake changes waited over 5 minutes in Lambda's queue before the events function took them",
      props.eventsFunction.metric('AsyncEventAge', { period, statistic: 'Maximum' }),
      { threshold: Duration.minutes(5).toMilliseconds() },
    );
    alarm(
      'EventsErrors',
      'The events function failed: HealthLake changes are being retried or dead-lettered',
      props.eventsFunction.metricErrors({ period, statistic: 'Sum' }),
    );
    alarm(
      'DeadLetterDeliveryFailures',
      'An event the events function failed on could not be written to the dead-letter queue: it is lost',
      props.eventsFunction.metric('DestinationDeliveryFailures', { period, statistic: 'Sum' }),
    );
    alarm(
      'RuleDeadLetterFailures',
      'An event EventBridge could not deliver could not be written to the dead-letter queue: it is lost',
      new Metric({
        namespace: 'AWS/Events',
        metricName: 'InvocationsFailedToBeSentToDlq',
        // A rule on the default bus: its metrics carry the rule name alone.
        dimensionsMap: { RuleName: props.ingestRule.ruleName },
        period,
        statistic: 'Sum',
      }),
    );
    // A notification dead-lettered by whichever function's lane gave up on it.
    const deadLettered = (fn: string) => brokerMetric('broker_notifications_total', fn, 'dead-lettered');
    alarm(
      'NotificationsDeadLettered',
      'A notification was dead-lettered: its subscription is in error until the client re-activates it',
      new MathExpression({
        expression: 'FILL(e, 0) + FILL(a, 0) + FILL(m, 0) + FILL(d, 0) + FILL(r, 0)',
        usingMetrics: {
          e: deadLettered('events'),
          a: deadLettered('api'),
          m: deadLettered('message'),
          d: deadLettered('dispatch'),
          r: deadLettered('reconcile'),
        },
        label: 'notifications dead-lettered',
        period,
      }),
    );
    alarm(
      'DispatcherErrors',
      'The dispatcher failed: retries, handshakes, heartbeats and purges are not running',
      props.dispatcherFunction.metricErrors({ period, statistic: 'Sum' }),
    );
    alarm(
      'DispatcherThrottles',
      'The dispatcher was throttled: retries, handshakes, heartbeats and purges are late',
      props.dispatcherFunction.metricThrottles({ period, statistic: 'Sum' }),
    );
    // It runs every minute: fewer than 3 runs in 5 minutes, or none at all (no data), is a stopped
    // schedule (a disabled rule, throttling), which no error alarm sees.
    alarm(
      'DispatcherNotRunning',
      'The dispatcher ran fewer than 3 times in 5 minutes: retries, handshakes, heartbeats and purges are not running',
      props.dispatcherFunction.metricInvocations({ period, statistic: 'Sum' }),
      { threshold: 3, below: true },
    );
    for (const [name, fn, what] of [
      ['Api', props.apiFunction, 'The HTTP API function'],
      ['WebSocketMessages', props.messageFunction, 'The WebSocket messages function'],
      ['WebSocketConnect', props.connectFunction, 'The WebSocket $connect function'],
    ] as const) {
      alarm(`${name}Errors`, `${what} failed: clients got errors`, fn.metricErrors({ period, statistic: 'Sum' }));
      alarm(
        `${name}Throttles`,
        `${what} was throttled: clients got errors`,
        fn.metricThrottles({ period, statistic: 'Sum' }),
      );
    }
    // Reconciliation: the function failed (it could not start, or ran into its timeout), or a run
    // failed (the FHIR server unreachable, or refusing the search); the next run does the window
    // again, so a single one is no loss yet, but every one is a change not found while it lasts.
    // No throttle alarm: a throttled tick is dropped and the next run does its work.
    const reconcileAlarms = [
      alarm(
        'ReconcileErrors',
        'The reconcile function failed: changes whose CloudTrail event never came are not being found',
        props.reconcile.handler.metricErrors({ period, statistic: 'Sum' }),
      ),
      alarm(
        'ReconcileRunsFailed',
        'A reconciliation run failed (the FHIR server unreachable or refusing the search): see the reconcile function log',
        brokerMetric('broker_reconcile_runs_total', 'reconcile', 'failed'),
      ),
    ];
    for (const a of reconcileAlarms) (a.node.defaultChild as CfnAlarm).cfnOptions.condition = props.reconcile.on;
  }
}
