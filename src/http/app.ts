import { Hono } from 'hono';
import { cors } from 'hono/cors';
import { BrokerError } from '../core/errors.js';
import type { FhirResource } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { IngestService } from '../service/ingest.js';
import type { IngestAuth } from './auth.js';
import { closeIfBodyUnread, type NodeBindings, readJsonBody } from './body.js';
import { type FhirRouteDeps, mountFhirRoutes } from './fhir-routes.js';
import { loadLivePage } from './live-page.js';
import { fhirResponse, operationOutcome, outcomeOf } from './outcome.js';

/** The hono app: every route of the contract, one error handler, one not-found handler. */

export interface AppDeps extends FhirRouteDeps {
  readonly ingest: IngestService;
  readonly ingestAuth: IngestAuth;
  /** `GET /metrics`: the operator's token; API clients must not see every client's totals. */
  readonly metricsAuth: IngestAuth;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly maxIngestBodyBytes: number;
  /** BROKER_PUBLIC_URL was set: the root redirects there (a proxy's path prefix and all). */
  readonly publicUrlExplicit?: boolean;
}

/** Paths and the methods they allow, for 405 answers. */
const ROUTES: readonly [string, readonly string[]][] = [
  ['/events', ['POST']],
  ['/healthz', ['GET']],
  ['/metrics', ['GET']],
  ['/fhir/metadata', ['GET']],
  ['/fhir/SubscriptionTopic', ['GET']],
  ['/fhir/SubscriptionTopic/_search', ['POST']],
  ['/fhir/SubscriptionTopic/:id', ['GET']],
  ['/fhir/Subscription', ['GET', 'POST']],
  ['/fhir/Subscription/_search', ['POST']],
  ['/fhir/Subscription/$status', ['GET', 'POST']],
  ['/fhir/Subscription/:id/$status', ['GET', 'POST']],
  ['/fhir/Subscription/:id/$events', ['GET', 'POST']],
  ['/fhir/Subscription/:id/$expunge', ['POST']],
  ['/fhir/Subscription/$get-ws-binding-token', ['GET', 'POST']],
  ['/fhir/Subscription/:id/$get-ws-binding-token', ['GET', 'POST']],
  ['/fhir/Subscription/:id/_history', ['GET']],
  ['/fhir/Subscription/:id/_history/:vid', ['GET']],
  ['/ws', ['GET']],
  ['/live', ['GET']],
  ['/', ['GET']],
  ['/fhir/Subscription/:id', ['GET', 'PUT', 'DELETE']],
];

export function createApp(deps: AppDeps): Hono<{ Variables: { owner: string } }> {
  const app = new Hono<{ Variables: { owner: string } }>();

  // Whatever the answer (an error, a 404, a route that reads no body), a body still unread closes
  // the connection rather than being read and thrown away (see closeIfBodyUnread).
  app.use(async (c, next) => {
    await next();
    const node = c.env as NodeBindings | undefined;
    if (node?.incoming !== undefined && node.outgoing !== undefined) closeIfBodyUnread(node.incoming, node.outgoing);
  });

  app.get('/healthz', async () => {
    try {
      await deps.store.ping();
      return Response.json({ status: 'ok' });
    } catch (err) {
      deps.logger.error('health check failed', { err: err as Error });
      return Response.json({ status: 'unavailable', reason: 'store unreachable' }, { status: 503 });
    }
  });

  app.get('/metrics', async (c) => {
    deps.metricsAuth.check(c.req.header('authorization'));
    return new Response(await deps.metrics.render(), { headers: { 'content-type': 'text/plain; version=0.0.4' } });
  });

  app.post('/events', async (c) => {
    deps.ingestAuth.check(c.req.header('authorization'));
    const body = await readJsonBody(c, deps.maxIngestBodyBytes);
    const result = await deps.ingest.ingest(body);
    return c.json(result, 202);
  });

  // CORS for browser apps on the origins allowed (R4 http.html: servers SHOULD): ahead of the
  // FHIR routes' token check, since a preflight carries no token. Tokens are sent as a header, never
  // a cookie, so no credentials mode; the headers FHIR clients send and read are listed.
  const corsOrigins = deps.corsOrigins ?? [];
  if (corsOrigins.length > 0) {
    app.use(
      '/fhir/*',
      cors({
        origin: corsOrigins.includes('*') ? '*' : [...corsOrigins],
        allowMethods: ['GET', 'HEAD', 'POST', 'PUT', 'DELETE'],
        allowHeaders: ['Authorization', 'Content-Type', 'Accept', 'If-Match', 'If-None-Exist', 'Prefer'],
        exposeHeaders: ['Location', 'ETag', 'Last-Modified', 'Content-Location', 'WWW-Authenticate'],
        maxAge: 600,
      }),
    );
  }
  mountFhirRoutes(app, deps);

  const live = loadLivePage();
  app.get('/live', () => new Response(live.html, { headers: live.headers }));
  // The root, opened in a browser after `npm start`: the live page, under BROKER_PUBLIC_URL when it
  // is set (a path prefix a proxy strips is kept), else relative (an API Gateway stage is kept).
  const liveUrl = deps.publicUrlExplicit === true ? `${deps.publicUrl}/live` : './live';
  app.get('/', () => new Response(null, { status: 302, headers: { location: liveUrl } }));
  // A plain GET reaches here; upgrades are taken over by the WebSocket server before routing.
  app.get('/ws', () =>
    fhirResponse(
      operationOutcome('UPGRADE_REQUIRED', 'GET /ws is a WebSocket endpoint: send an Upgrade request'),
      426,
      {
        upgrade: 'websocket',
      },
    ),
  );

  for (const [path, methods] of ROUTES) {
    app.all(path, (c) => {
      throw new BrokerError(
        'METHOD_NOT_ALLOWED',
        `${c.req.method} is not allowed on ${c.req.path}; use ${methods.join(', ')}`,
      );
    });
  }

  app.notFound((c) => fhirResponse(operationOutcome('NOT_FOUND', `No route for ${c.req.method} ${c.req.path}`), 404));

  app.onError((err, c) => {
    const { status, body, headers } = errorAnswer(err, c.req.method, c.req.path, deps.logger);
    return fhirResponse(body, status, headers);
  });

  return app;
}

/** A failed request's answer (OperationOutcome, status, headers), whichever front door it came through. */
export function errorAnswer(
  err: unknown,
  method: string,
  path: string,
  logger: Logger,
): { status: number; body: FhirResource; headers: Record<string, string> } {
  const { status, body } = outcomeOf(err);
  // A content read that failed is logged where it failed, at warn: transient, the sender retries.
  const transient = err instanceof BrokerError && err.code === 'CONTENT_UNAVAILABLE';
  if (status >= 500 && !transient) logger.error('request failed', { method, path, err: err as Error });
  const headers: Record<string, string> = {};
  if (err instanceof BrokerError && err.code === 'UNAUTHORIZED') headers['www-authenticate'] = 'Bearer';
  if (err instanceof BrokerError && err.code === 'METHOD_NOT_ALLOWED') {
    const route = ROUTES.find(([p]) => matchPath(p, path));
    if (route !== undefined) headers.allow = route[1].join(', ');
  }
  return { status, body, headers };
}

function matchPath(pattern: string, path: string): boolean {
  const p = pattern.split('/');
  const q = path.split('/');
  return p.length === q.length && p.every((seg, i) => seg.startsWith(':') || seg === q[i]);
}

export const ROUTE_TABLE = ROUTES;
