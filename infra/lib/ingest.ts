import { type CfnCondition, Duration, Fn, RemovalPolicy } from 'aws-cdk-lib';
import { type CfnRule, Rule } from 'aws-cdk-lib/aws-events';
import { LambdaFunction as LambdaTarget } from 'aws-cdk-lib/aws-events-targets';
import type { Function as LambdaFunction } from 'aws-cdk-lib/aws-lambda';
import { SqsDestination } from 'aws-cdk-lib/aws-lambda-destinations';
import { Queue, QueueEncryption } from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';

/**
 * HealthLake writes the broker receives (ARCHITECTURE.md, "Events the broker understands", plus
 * `PatchResource`, an update). `ProcessBundle` cannot be turned into notifications (it names no
 * resources) but is let through so that each one is logged and counted as ignored, with that reason:
 * an operator sees what subscribers miss instead of the rule dropping it unseen.
 */
export const HEALTHLAKE_EVENT_NAMES = [
  'CreateResource',
  'UpdateResource',
  'PatchResource',
  'DeleteResource',
  'ProcessBundle',
];

/**
 * How much sooner than event ids expire a dead letter does: a failure record reaches the queue up
 * to 6 h (Lambda's maximum event age) after the event's id was stored, and DynamoDB deletes expired
 * items late, never early. One day covers both.
 */
export const DEAD_LETTER_MARGIN = Duration.days(1);

/**
 * How long the dead-letter queue keeps a message: shorter than event ids are kept for
 * deduplication (`eventRetention`, the functions' BROKER_EVENT_RETENTION) by DEAD_LETTER_MARGIN,
 * so that every replay from the queue is still recognised as a duplicate if it was stored before.
 * Within SQS's bounds (1 minute to 14 days).
 */
export function deadLetterRetention(eventRetention: Duration): Duration {
  const minutes = eventRetention.toMinutes() - DEAD_LETTER_MARGIN.toMinutes();
  return Duration.minutes(Math.min(Math.max(minutes, 1), Duration.days(14).toMinutes()));
}

export interface HealthLakeIngestProps {
  readonly handler: LambdaFunction;
  /** The functions' BROKER_EVENT_RETENTION: the queue keeps dead letters for less (`deadLetterRetention`). */
  readonly eventRetention: Duration;
  /** The `HealthLakeDatastoreId` parameter's value; only read when `datastoreIdSet` holds. */
  readonly datastoreId: string;
  readonly datastoreIdSet: CfnCondition;
}

/**
 * HealthLake's CloudTrail events on the default bus → the events function. Nothing is dropped
 * silently: an event EventBridge cannot hand to Lambda (after 24 h of retries), and an event the
 * function fails on (after Lambda's own retries), both land in one dead-letter queue.
 */
export class HealthLakeIngest extends Construct {
  readonly deadLetterQueue: Queue;
  readonly rule: Rule;

  constructor(scope: Construct, id: string, props: HealthLakeIngestProps) {
    super(scope, id);
    this.deadLetterQueue = new Queue(this, 'DeadLetterQueue', {
      // Its messages are events not yet replayed: a stack deletion or a replacement must not take them.
      removalPolicy: RemovalPolicy.RETAIN,
      // SSE-SQS, not KMS: EventBridge and Lambda can write to it without a key policy.
      encryption: QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      // Time to notice the alarm and replay, but no longer than a replay is deduplicated: a day less
      // than event ids are kept (6 days by default). SQS would keep messages up to 14 days.
      retentionPeriod: deadLetterRetention(props.eventRetention),
    });

    // Not failed calls (CloudTrail records them with an errorCode): nothing changed, and the broker
    // would only log and count them, at an invocation each.
    const detail = { eventName: HEALTHLAKE_EVENT_NAMES, errorCode: [{ exists: false }] };
    this.rule = new Rule(this, 'Rule', {
      description: 'HealthLake resource writes (CloudTrail) to fhir-subscription-broker',
      eventPattern: { source: ['aws.healthlake'], detailType: ['AWS API Call via CloudTrail'], detail },
      targets: [
        new LambdaTarget(props.handler, {
          deadLetterQueue: this.deadLetterQueue,
          // 185 attempts over 24 h: EventBridge's maximum, so an outage of the function loses nothing.
          retryAttempts: 185,
          maxEventAge: Duration.hours(24),
        }),
      ],
    });
    // One pattern, two shapes: any datastore while the parameter is empty, else only that one.
    (this.rule.node.defaultChild as CfnRule).addPropertyOverride(
      'EventPattern.detail',
      Fn.conditionIf(
        props.datastoreIdSet.logicalId,
        { ...detail, requestParameters: { datastoreId: [props.datastoreId] } },
        detail,
      ),
    );

    // EventBridge invokes asynchronously: once Lambda accepts an event, the target's retry policy
    // no longer applies and a failing function is retried by Lambda. Keep those failures too.
    props.handler.configureAsyncInvoke({
      retryAttempts: 2,
      // 6 h: Lambda's maximum event age for asynchronous invocations.
      maxEventAge: Duration.hours(6),
      onFailure: new SqsDestination(this.deadLetterQueue),
    });
    // An event the broker refuses (not an EventBridge event) fails the same way however often it is
    // tried: the function puts it on the queue itself, at once, as a failure record, and succeeds
    // (src/aws/refused-events.ts). The destination makes the same grant; said here too, so that a
    // change of destination cannot take it away.
    props.handler.addEnvironment('BROKER_DEAD_LETTER_QUEUE_URL', this.deadLetterQueue.queueUrl);
    this.deadLetterQueue.grantSendMessages(props.handler);
  }
}
