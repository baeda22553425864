import { fileURLToPath } from 'node:url';
import { App } from 'aws-cdk-lib';
import { BrokerStack } from '../lib/broker-stack.js';

// Resolved from this file, so `npm run synth` writes to infra/cdk.out whatever the working directory;
// under the CDK CLI, the directory it asks for (CDK_OUTDIR), or it would not find the templates.
const outdir = process.env.CDK_OUTDIR ?? fileURLToPath(new URL('../cdk.out', import.meta.url));
const app = new App({ outdir });

const account = process.env.CDK_DEFAULT_ACCOUNT;
const region = process.env.CDK_DEFAULT_REGION;
new BrokerStack(app, 'FhirSubscriptionBroker', {
  // Environment-agnostic unless the CDK CLI supplies an account and region.
  ...(account !== undefined && region !== undefined ? { env: { account, region } } : {}),
});
app.synth();
