import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { serve } from '@hono/node-server';
import { loadConfig } from './config.js';
import { systemClock } from './core/types.js';
import { resolveCredentials } from './credentials.js';
import { Allowlist } from './delivery/address-policy.js';
import { Dispatcher } from './delivery/dispatcher.js';
import { EndpointGuard } from './delivery/endpoint-guard.js';
import { RestHookSender } from './delivery/rest-hook-sender.js';
import { createApp } from './http/app.js';
import { ApiKeyAuth, IngestAuth } from './http/auth.js';
import { createLogger } from './observability/logger.js';
import { Metrics } from './observability/metrics.js';
import { IngestService } from './service/ingest.js';
import { SubscriptionRegistry } from './service/subscription-registry.js';
import { SqliteStore } from './store/sqlite/sqlite-store.js';
import { loadTopicCatalog } from './store/topic-files.js';

/** Composition root: builds every adapter once, injects it, starts the server. */

async function main(): Promise<void> {
  const config = loadConfig();
  const logger = createLogger(config.logLevel);
  const version = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string })
    .version;
  if (config.store !== 'sqlite') {
    throw new Error(`BROKER_STORE=${config.store} is not available in this build; use sqlite`);
  }
  const credentials = resolveCredentials(config);
  const clock = systemClock;
  const ids = { uuid: () => randomUUID() };
  const metrics = new Metrics();
  const store = new SqliteStore(config.dataDir);
  const topics = loadTopicCatalog(config.topicsDir);
  const guard = new EndpointGuard(new Allowlist(config.endpointAllowlist));
  const sender = new RestHookSender(guard, clock, { userAgent: `fhir-subscription-broker/${version}` });
  const registry = new SubscriptionRegistry({ store, topics, guard, clock, ids, logger });
  await registry.load();
  const dispatcher = new Dispatcher({
    store,
    sender,
    registry,
    clock,
    ids,
    logger,
    metrics,
    options: { fhirBase: `${config.publicUrl}/fhir`, retryDelaysMs: config.retryDelaysMs },
  });
  const ingest = new IngestService({ store, registry, sink: dispatcher, clock, logger, metrics });
  metrics.gauge('broker_outbox_depth', () => dispatcher.outboxDepth);
  metrics.gauge('broker_subscriptions', () => registry.size);

  const app = createApp({
    registry,
    store,
    topics,
    auth: new ApiKeyAuth(credentials.apiClients),
    apiAuth: new ApiKeyAuth(credentials.apiClients),
    ingestAuth: new IngestAuth(credentials.ingestToken),
    ingest,
    clock,
    ids,
    metrics,
    logger,
    publicUrl: config.publicUrl,
    maxBodyBytes: config.maxBodyBytes,
    maxIngestBodyBytes: config.maxIngestBodyBytes,
    version,
  });

  const server = serve({ fetch: app.fetch, port: config.port, hostname: config.host }, (info) => {
    logger.info('listening', { port: info.port, host: config.host, publicUrl: config.publicUrl, store: config.store });
    printLocalCredentials(credentials.local, config.dataDir);
  });
  await dispatcher.start();

  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    logger.info('shutting down', { signal });
    server.close();
    void dispatcher
      .close(5000)
      .then(() => sender.close())
      .then(() => store.close())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          logger.error('shutdown failed', { err: err as Error });
          process.exit(1);
        },
      );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

/** Generated credentials go to stderr once per start, for the person at the terminal; never to the JSON log. */
function printLocalCredentials(local: ReturnType<typeof resolveCredentials>['local'], dataDir: string): void {
  if (local.apiClient === undefined && local.ingestToken === undefined) return;
  const lines = ['', `Local credentials (kept in ${dataDir}/credentials.json):`];
  if (local.apiClient !== undefined) lines.push(`  API key (client "${local.apiClient.clientId}"): ${local.apiClient.token}`);
  if (local.ingestToken !== undefined) lines.push(`  Ingest token for POST /events:   ${local.ingestToken}`);
  process.stderr.write(`${lines.join('\n')}\n\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`fhir-subscription-broker failed to start: ${(err as Error).message}\n`);
  process.exit(1);
});
