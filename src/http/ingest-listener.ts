import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../observability/logger.js';
import type { IngestService } from '../service/ingest.js';
import { errorAnswer } from './app.js';
import type { IngestAuth } from './auth.js';
import { checkJsonRequest, closeIfBodyUnread, parseJsonBody, readNodeBody } from './body.js';
import { FHIR_JSON } from './outcome.js';

/**
 * `POST /events` served straight from Node's request and response, ahead of the hono app: the
 * hottest route of the broker skips the web `Request`/`Response` objects, routing and the
 * middleware chain (in the outbox bench those cost more than authenticating, parsing and matching
 * the event together). Same checks in the same order, same answers: test/ingest-listener.test.ts
 * sends the same requests through both doors and compares. Anything else, `/events` with a query
 * string included, goes to the hono app.
 */

export interface IngestListenerDeps {
  readonly ingest: IngestService;
  readonly ingestAuth: IngestAuth;
  readonly maxIngestBodyBytes: number;
  readonly logger: Logger;
}

export function isIngestRequest(req: IncomingMessage): boolean {
  return req.method === 'POST' && req.url === '/events';
}

export async function serveIngest(deps: IngestListenerDeps, req: IncomingMessage, res: ServerResponse): Promise<void> {
  try {
    deps.ingestAuth.check(req.headers.authorization);
    checkJsonRequest(req.headers['content-type'], req.headers['content-length'], deps.maxIngestBodyBytes);
    const body = parseJsonBody(await readNodeBody(req, res, deps.maxIngestBodyBytes));
    answer(res, 202, 'application/json', JSON.stringify(await deps.ingest.ingest(body)));
  } catch (err) {
    const { status, body, headers } = errorAnswer(err, 'POST', '/events', deps.logger);
    closeIfBodyUnread(req, res);
    for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
    answer(res, status, FHIR_JSON, JSON.stringify(body));
  }
}

function answer(res: ServerResponse, status: number, contentType: string, text: string): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
