import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FUNCTION_ENTRIES } from '../infra/lib/functions.js';
import { parseSubscription } from '../src/core/subscription.js';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { ensureTables } from '../src/store/dynamodb/tables.js';
import { loadTopicCatalog } from '../src/store/topic-files.js';
import { type DynamoDbLocal, dynamoDbEnv, startDynamoDbLocal } from './support/dynamodb-local.js';
import { fixture, statusOf, topicSubscription } from './support/fhir-client.js';
import { FhirServer } from './support/fhir-server.js';
import { Receiver } from './support/receiver.js';
import { tempDir } from './support/temp-dirs.js';

/**
 * What `cdk deploy` would upload actually runs: the stack is synthesized with real esbuild
 * bundling, and each bundle is loaded by Node and invoked against DynamoDB Local, with the topic
 * files, the live page and the search parameter definitions found where the bundle hook copied them.
 */

describe('the Lambda bundles from `npm run synth`', () => {
  let local: DynamoDbLocal;
  let outdir: string;
  const saved = { ...process.env };

  beforeAll(async () => {
    outdir = tempDir('fsb-cdk-');
    execFileSync(process.execPath, ['--import', 'tsx', 'infra/bin/app.ts'], {
      env: { ...process.env, CDK_OUTDIR: outdir },
      stdio: 'pipe',
      timeout: 120_000,
    });
    local = await startDynamoDbLocal();
    await ensureTables(local.client, 'bundle-');
  });

  afterAll(async () => {
    process.env = saved;
    await local?.stop();
  });

  /** The asset folder of the function built from `entry` (the template names its code by asset hash). */
  function assetOf(entry: string): string {
    const template = JSON.parse(readFileSync(join(outdir, 'FhirSubscriptionBroker.template.json'), 'utf8')) as {
      Resources: Record<string, { Type: string; Properties: { Description?: string; Code?: { S3Key?: string } } }>;
    };
    const description = Object.values(FUNCTION_ENTRIES).find((e) => e.entry === entry)?.description;
    const fn = Object.values(template.Resources).find(
      (r) => r.Type === 'AWS::Lambda::Function' && r.Properties.Description === description,
    );
    return `asset.${String(fn?.Properties.Code?.S3Key).replace(/\.zip$/, '')}`;
  }

  it('load, and handle an EventBridge event, an HTTP API request and a scheduler tick', async () => {
    Object.assign(process.env, dynamoDbEnv(local.endpoint, 'bundle-'), {
      BROKER_API_KEYS: 'alice:alice-token-0123456789abcdef',
      BROKER_INGEST_TOKEN: 'ingest-token-0123456789abcdef',
      BROKER_WS_TOKEN_SECRET: 'bundle-ws-secret-0123456789abcdefghij',
      BROKER_WS_MANAGEMENT_ENDPOINT: 'http://127.0.0.1:9',
      BROKER_PUBLIC_URL: 'https://api.example.com',
      BROKER_LOG_LEVEL: 'error',
      // Content filters on: each bundle loads the R4 search parameters from where its hook copied them.
      BROKER_FHIR_READ: 'healthlake',
    });
    // The deployed functions find their files under /var/task; here, inside the asset folders.
    const all = readdirSync(outdir).filter((d) => d.startsWith('asset.'));
    expect(all).toHaveLength(5);
    // The reconcile bundle is loaded with its own environment, below.
    const reconcile = assetOf('lambda-reconcile.ts');
    expect(all).toContain(reconcile);
    const byEntry = all.filter((a) => a !== reconcile);
    for (const asset of all) {
      expect(readdirSync(join(outdir, asset, 'subscriptions', 'topics')).sort()).toEqual([
        'encounter-change.json',
        'observation-change.json',
        'patient-change.json',
        'resource-change.json',
      ]);
      expect(readdirSync(join(outdir, asset, 'live'))).toEqual(['live.html']);
      expect(readdirSync(join(outdir, asset, 'fhir', 'r4'))).toEqual(['search-parameters.json']);
    }
    const results: Record<string, unknown> = {};
    for (const asset of byEntry) {
      process.env.BROKER_TOPICS_DIR = join(outdir, asset, 'subscriptions', 'topics');
      const mod = (await import(join(outdir, asset, 'index.mjs'))) as Record<
        string,
        (e: unknown, c?: unknown) => Promise<unknown>
      >;
      const exported = Object.keys(mod).sort().join(',');
      if (exported === 'connect,disconnect,message') {
        results.ws = await mod.connect?.({ requestContext: { connectionId: 'c-1', routeKey: '$connect' } });
      }
      results[asset] = exported;
    }
    expect(Object.values(results).filter((v) => v === 'handler')).toHaveLength(3);
    expect(results.ws).toEqual({ statusCode: 200 });

    // Each single-handler bundle handles the input of its own trigger.
    const handlerBundles = byEntry.filter((a) => results[a] === 'handler');
    const outcomes = [];
    for (const asset of handlerBundles) {
      process.env.BROKER_TOPICS_DIR = join(outdir, asset, 'subscriptions', 'topics');
      const mod = (await import(join(outdir, asset, 'index.mjs'))) as {
        handler: (e: unknown, c?: unknown) => Promise<unknown>;
      };
      outcomes.push(
        await mod.handler(fixture('healthlake-create-patient'), {}).catch((err: Error) => `threw ${err.message}`),
      );
    }
    const kinds = outcomes.map((o) => {
      if (typeof o === 'object' && o !== null && 'accepted' in o) return 'events';
      if (typeof o === 'object' && o !== null && 'heartbeats' in o) return 'dispatcher';
      if (typeof o === 'object' && o !== null && 'statusCode' in o) return 'api';
      return String(o);
    });
    expect(kinds.sort()).toEqual(['api', 'dispatcher', 'events']);
    expect(outcomes.find((o) => typeof o === 'object' && o !== null && 'accepted' in o)).toEqual({
      accepted: 1,
      ignored: 0,
      duplicates: 0,
    });
  });

  it('load the reconcile function, whose scheduled runs search the FHIR server and deliver what they find', async () => {
    const [fhir, receiver] = await Promise.all([FhirServer.start(), Receiver.start()]);
    try {
      const topics = join(outdir, assetOf('lambda-reconcile.ts'), 'subscriptions', 'topics');
      const spec = parseSubscription(
        topicSubscription('patient-change', `${receiver.url}/bundled`, { filters: ['Patient?_id=bundled'] }),
        loadTopicCatalog(topics),
      );
      const created = new Date(Date.now() - 1000).toISOString();
      await new DynamoDbStore(local.client, 'bundle-').insertSubscription({
        id: 'bundled',
        owner: 'alice',
        kind: spec.kind,
        topic: spec.topic,
        status: 'active',
        match: spec.match,
        channel: spec.channel,
        webhookSecret: 'bundled-secret-0123456789abcdef',
        eventsSinceStart: 0,
        createdAt: created,
        updatedAt: created,
        resource: spec.resource,
      });
      Object.assign(process.env, dynamoDbEnv(local.endpoint, 'bundle-'), {
        BROKER_API_KEYS: 'alice:alice-token-0123456789abcdef',
        BROKER_INGEST_TOKEN: 'ingest-token-0123456789abcdef',
        BROKER_WS_TOKEN_SECRET: 'bundle-ws-secret-0123456789abcdefghij',
        BROKER_WS_MANAGEMENT_ENDPOINT: 'http://127.0.0.1:9',
        BROKER_PUBLIC_URL: 'https://api.example.com',
        BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
        BROKER_LOG_LEVEL: 'error',
        // As the stack sets them, but the lag: what the server changed is looked for at once.
        BROKER_FHIR_READ: fhir.url,
        BROKER_RECONCILE_EVERY: '5m',
        BROKER_RECONCILE_LAG: '0s',
        BROKER_TOPICS_DIR: topics,
      });
      const mod = (await import(join(outdir, assetOf('lambda-reconcile.ts'), 'index.mjs'))) as {
        handler: (e: unknown, c?: unknown) => Promise<unknown>;
      };
      const scheduled = { source: 'aws.events', 'detail-type': 'Scheduled Event', detail: {} };
      const context = { getRemainingTimeInMillis: () => 240_000 };
      // The first run sets the checkpoint; the next finds the change after it, and delivers it.
      expect(await mod.handler(scheduled, context)).toEqual({ found: 0, notifications: 0 });
      await new Promise((resolve) => setTimeout(resolve, 5));
      fhir.put({ resourceType: 'Patient', id: 'bundled', meta: { lastUpdated: new Date().toISOString() } });
      await new Promise((resolve) => setTimeout(resolve, 5));
      expect(await mod.handler(scheduled, context)).toMatchObject({ found: 1, notifications: 1 });
      expect(fhir.requests.map((r) => r.path)).toEqual(['/fhir/Patient']);
      expect(receiver.on('/bundled').map((r) => statusOf(JSON.parse(r.body)).params.get('type')?.valueCode)).toEqual([
        'event-notification',
      ]);
    } finally {
      await Promise.all([fhir.close(), receiver.close()]);
    }
  });
});
