import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureTables } from '../src/store/dynamodb/tables.js';
import { type DynamoDbLocal, dynamoDbEnv, startDynamoDbLocal } from './support/dynamodb-local.js';
import { fixture } from './support/fhir-client.js';
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
    const byEntry = readdirSync(outdir).filter((d) => d.startsWith('asset.'));
    expect(byEntry).toHaveLength(4);
    for (const asset of byEntry) {
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
});
