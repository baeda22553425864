import { type CfnCondition, Duration } from 'aws-cdk-lib';
import {
  Alarm,
  ComparisonOperator,
  type IMetric,
  MathExpression,
  Metric,
  TreatMissingData,
} from 'aws-cdk-lib/aws-cloudwatch';
import { SnsAction } from 'aws-cdk-lib/aws-cloudwatch-actions';
import type { IRule } from 'aws-cdk-lib/aws-events';
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
  /** The `AlarmEmail` parameter's value; subscribed only when `emailSet` holds. */
  readonly email: string;
  readonly emailSet: CfnCondition;
}

/**
 * Alarms on the things that mean "a change may not reach its subscribers": a dead-lettered event,
 * a failing events function, a failing dispatcher, a dead letter that could not be written (by
 * EventBridge or by Lambda's on-failure destination: the event is then lost with no other trace),
 * and a notification the broker dead-lettered (its endpoint failed the whole retry schedule).
 * Each one fires on the first occurrence.
 */
export class BrokerAlarms extends Construct {
  readonly topic: Topic;

  constructor(scope: Construct, id: string, props: BrokerAlarmsProps) {
    super(scope, id);
    // No KMS key: CloudWatch cannot publish to a topic encrypted with the AWS managed SNS key.
    this.topic = new Topic(this, 'Topic', { displayName: 'fhir-subscription-broker alarms', enforceSSL: true });
    const email = new CfnSubscription(this, 'Email', {
      topicArn: this.topic.topicArn,
      protocol: 'email',
      endpoint: props.email,
    });
    email.cfnOptions.condition = props.emailSet;

    const action = new SnsAction(this.topic);
    const alarm = (alarmId: string, description: string, metric: IMetric) =>
      new Alarm(this, alarmId, {
        alarmDescription: description,
        metric,
        threshold: 0,
        comparisonOperator: ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        // No data means no messages and no invocations: healthy.
        treatMissingData: TreatMissingData.NOT_BREACHING,
      }).addAlarmAction(action);

    const period = Duration.minutes(5);
    alarm(
      'DeadLetters',
      'HealthLake events in the dead-letter queue: changes that did not reach the broker',
      props.deadLetterQueue.metricApproximateNumberOfMessagesVisible({ period, statistic: 'Maximum' }),
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
    // The broker's own metrics, which each invocation writes to its log (Embedded Metric Format):
    // a notification dead-lettered by whichever function's lane gave up on it.
    const deadLettered = (fn: string) =>
      new Metric({
        namespace: EMF_NAMESPACE,
        metricName: 'broker_notifications_total',
        dimensionsMap: { Function: fn, outcome: 'dead-lettered' },
        period,
        statistic: 'Sum',
      });
    alarm(
      'NotificationsDeadLettered',
      'A notification was dead-lettered: its subscription is in error until the client re-activates it',
      new MathExpression({
        expression: 'FILL(e, 0) + FILL(a, 0) + FILL(m, 0) + FILL(d, 0)',
        usingMetrics: {
          e: deadLettered('events'),
          a: deadLettered('api'),
          m: deadLettered('message'),
          d: deadLettered('dispatch'),
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
  }
}
