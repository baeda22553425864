import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { getRequestListener } from '@hono/node-server';
import { type Broker, createBroker } from './broker.js';
import { defaultPublicUrl, loadConfig } from './config.js';
import type { Credentials } from './credentials.js';
import { lockDataDir } from './data-dir-lock.js';
import { SocketProcessHub } from './delivery/socket-process-hub.js';
import { ThreadedSender } from './delivery/threaded-sender.js';
import { awaitingContinue } from './http/body.js';
import { isIngestRequest } from './http/ingest-listener.js';
import { attachWebSocket } from './http/websocket-upgrade.js';
import { SqliteStore } from './store/sqlite/sqlite-store.js';

/**
 * Composition root for `npm start`: config → listen → broker → serve, and a graceful stop.
 * The socket is bound before the broker is built so that with PORT=0 the public URL (used in
 * fullUrl and references) names the real port.
 */

async function main(): Promise<void> {
  let config = loadConfig();
  // The embedded store is this process's alone (a second broker would deliver everything twice).
  const lock = config.store === 'sqlite' ? lockDataDir(config.dataDir) : undefined;
  const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  let broker: Broker | undefined;
  // The Node bindings (`incoming`, `outgoing`) travel with the request: body reads use them.
  const hono = getRequestListener((req: Request, env: unknown) =>
    broker === undefined ? Response.json({ status: 'starting' }, { status: 503 }) : broker.app.fetch(req, env),
  );
  // `POST /events` skips the hono app (see http/ingest-listener.ts); everything else goes through it.
  // Idle keep-alive connections stay open 65 s (Node's default is 5 s), longer than clients' own
  // idle timeouts (60 s for an AWS load balancer, ~4 s for undici), so the client closes first: a
  // server that closes first races the client's next request on that socket, which then fails
  // with "other side closed" (seen in this repo's tests under load). A request's headers must come
  // within 30 s of its first byte, the whole request within BROKER_REQUEST_TIMEOUT (else 408 and
  // the connection closed), checked every 2 s: a client trickling bytes holds no connection for
  // Node's default 5 minutes.
  const requestTimeout = config.requestTimeoutMs;
  const serve = (req: IncomingMessage, res: ServerResponse): void => {
    // `/fhir/R4/…` is `/fhir/…`: Medplum's client asks its subscription manager's binding token there.
    if (req.url !== undefined && /^\/fhir\/R4(?=[/?]|$)/.test(req.url)) req.url = `/fhir${req.url.slice(8)}`;
    if (broker !== undefined && isIngestRequest(req)) void broker.serveIngest(req, res);
    else void hono(req, res);
  };
  const server = createServer(
    {
      keepAliveTimeout: 65_000,
      headersTimeout: Math.min(30_000, requestTimeout),
      requestTimeout,
      connectionsCheckingInterval: Math.min(2_000, requestTimeout),
    },
    serve,
  );
  // `Expect: 100-continue`: no `100 Continue` until the route reads the body (see awaitingContinue).
  server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    awaitingContinue.add(req);
    serve(req, res);
  });
  server.listen(config.port, config.host);
  await once(server, 'listening').catch((err: Error) => {
    throw new Error(`cannot listen on HOST=${config.host} PORT=${config.port}: ${err.message}`);
  });
  const port = (server.address() as AddressInfo).port;
  if (!config.publicUrlExplicit) {
    const derivedWs = `${config.publicUrl.replace(/^http/, 'ws')}/ws`;
    const publicUrl = defaultPublicUrl(config.host, port);
    const websocketUrl =
      config.websocketUrl === derivedWs ? `${publicUrl.replace(/^http/, 'ws')}/ws` : config.websocketUrl;
    config = { ...config, publicUrl, websocketUrl };
  }

  const { wsProcesses, logLevel, webhookThreads, endpointAllowlist } = config;
  broker = await createBroker(config, {
    version,
    // The main thread parses events and runs the lanes; signing and sending webhooks happen beside it.
    ...(webhookThreads > 0
      ? {
          sender: ({ logger: log, userAgent, connectionsPerOrigin }) =>
            new ThreadedSender({
              threads: webhookThreads,
              allowlist: endpointAllowlist,
              userAgent,
              connectionsPerOrigin,
              logger: log,
            }),
        }
      : {}),
    // Several cores write to the local WebSockets: the main thread sends one IPC message per fan-out.
    ...(wsProcesses > 0
      ? { localSockets: (deps) => SocketProcessHub.start({ ...deps, processes: wsProcesses, logLevel }) }
      : {}),
  });
  const { logger } = broker;
  // A store that failed for good (writer crashed, database file deleted) cannot recover in place:
  // exit, so that the service manager restarts the broker on what was committed.
  if (broker.store instanceof SqliteStore) {
    broker.store.onFailure((err) => {
      logger.error('the SQLite store failed; exiting so that a restart recovers', { err });
      process.exit(70);
    });
  }
  attachWebSocket(server, {
    hub: broker.websocketHub,
    apiAuth: broker.apiAuth,
    logger,
    metrics: broker.metrics,
    maxConnections: config.wsMaxConnections,
    maxUnboundPerAddress: config.wsMaxUnboundPerAddress,
  });
  // Signals are heard from here on, before `listening` is announced: a stop right after it (a
  // supervisor, a test) is a clean shutdown, not the default death by SIGTERM.
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping || broker === undefined) return;
    stopping = true;
    logger.info('shutting down', { signal });
    server.close();
    broker
      .close(5000)
      .then(() => lock?.release())
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
  // 0.0.0.0 or :: as HOST (a container, another machine's clients) is no address to hand out: the
  // references in bundles and the WebSocket URL (the /live page's too) would name it.
  const bound = (server.address() as AddressInfo).address;
  if (!config.publicUrlExplicit && (bound === '0.0.0.0' || bound === '::')) {
    logger.warn('HOST is a wildcard address, and references and the WebSocket URL name it: set BROKER_PUBLIC_URL', {
      host: config.host,
      publicUrl: config.publicUrl,
    });
  }
  logger.info('listening', { port, host: config.host, publicUrl: config.publicUrl, store: config.store });
  printLocalCredentials(broker.credentials.local, config.dataDir, config.publicUrl);
  await broker.start();
  broker.startSources();
  warnOfRefusedEndpoints(broker);
}

/**
 * Stored subscriptions whose endpoints the address policy refuses now (the broker restarted
 * without the allow-list they were registered under, say): said once at start, not at their first
 * failed delivery, which turns them to `error`. In the background: names are resolved.
 */
function warnOfRefusedEndpoints(b: Broker): void {
  b.registry.refusedEndpoints().then(
    (refused) => {
      b.logger.info('endpoints of stored subscriptions checked', { refused: refused.length });
      for (const { id, owner, reason } of refused) {
        b.logger.warn('a subscription names an endpoint the address policy refuses: its deliveries will fail', {
          subscription: id,
          owner,
          reason,
        });
      }
    },
    (err: unknown) => b.logger.error('endpoints of stored subscriptions not checked', { err: err as Error }),
  );
}

/** Where the broker is, and any generated credentials, to stderr at start, for the person at the terminal; never to the JSON log. */
function printLocalCredentials(local: Credentials['local'], dataDir: string, publicUrl: string): void {
  const lines = ['', `Broker at ${publicUrl} (live page: ${publicUrl}/live)`];
  if (local.apiClient !== undefined || local.ingestToken !== undefined) {
    lines.push(`Local credentials (kept in ${dataDir}/credentials.json):`);
  }
  if (local.apiClient !== undefined)
    lines.push(`  API key (client "${local.apiClient.clientId}"): ${local.apiClient.token}`);
  if (local.ingestToken !== undefined) lines.push(`  Ingest token for POST /events:   ${local.ingestToken}`);
  process.stderr.write(`${lines.join('\n')}\n\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`fhir-subscription-broker failed to start: ${(err as Error).message}\n`);
  process.exit(1);
});
