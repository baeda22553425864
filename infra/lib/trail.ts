import { type CfnCondition, CfnResource, Duration, RemovalPolicy } from 'aws-cdk-lib';
import { ReadWriteType, Trail } from 'aws-cdk-lib/aws-cloudtrail';
import { BlockPublicAccess, Bucket, BucketEncryption } from 'aws-cdk-lib/aws-s3';
import { Construct } from 'constructs';

/**
 * A CloudTrail trail (and its log bucket), created only when `condition` holds. EventBridge
 * receives "AWS API Call via CloudTrail" events only while a trail records them; HealthLake's
 * CreateResource/UpdateResource/DeleteResource are recorded as management events. Accounts that
 * already have a trail leave the condition false.
 */
export class ConditionalTrail extends Construct {
  constructor(scope: Construct, id: string, condition: CfnCondition) {
    super(scope, id);
    const bucket = new Bucket(this, 'Logs', {
      encryption: BucketEncryption.S3_MANAGED,
      blockPublicAccess: BlockPublicAccess.BLOCK_ALL,
      enforceSSL: true,
      // Audit logs outlive the stack; one year bounds the storage bill.
      removalPolicy: RemovalPolicy.RETAIN,
      lifecycleRules: [{ expiration: Duration.days(365) }],
    });
    new Trail(this, 'Trail', {
      bucket,
      // Write events only: the broker needs nothing else, and a second trail's management events are billed.
      managementEvents: ReadWriteType.WRITE_ONLY,
      // This region's HealthLake is what the rule (a regional resource) listens to.
      isMultiRegionTrail: false,
      includeGlobalServiceEvents: false,
      sendToCloudWatchLogs: false,
    });
    for (const child of this.node.findAll()) {
      if (child instanceof CfnResource) child.cfnOptions.condition = condition;
    }
  }
}
