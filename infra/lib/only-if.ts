import { Aspects, type CfnCondition, CfnResource, type IAspect } from 'aws-cdk-lib';
import type { IConstruct } from 'constructs';

/**
 * Puts every CloudFormation resource of the given constructs under `condition` (one with a
 * condition of its own keeps it: that one implies `condition` where it is used). An aspect, so
 * that what is added later (grants, a schedule's permission, an invoke configuration) is covered too.
 */
export function onlyIf(condition: CfnCondition, ...scopes: IConstruct[]): void {
  const aspect: IAspect = {
    visit(node: IConstruct): void {
      if (node instanceof CfnResource && node.cfnOptions.condition === undefined) {
        node.cfnOptions.condition = condition;
      }
    },
  };
  for (const scope of scopes) Aspects.of(scope).add(aspect);
}
