import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Json } from './fhir-client.js';

/**
 * A FHIR R4 server on 127.0.0.1:0 for the content stage to read from: `read`
 * (`GET [base]/[type]/[id]`: 200, 410 once deleted, 404 when never there) and instance `_history`
 * (a `history` Bundle, newest first, a delete as an entry without a resource). It records every
 * request; `token` makes it require that bearer token (401 otherwise), and `respond` can answer a
 * request with another status (a 503 while "down").
 */

export interface FhirRequest {
  readonly method: string;
  readonly path: string;
  readonly query: string;
  readonly headers: IncomingHttpHeaders;
}

interface Version {
  readonly resource?: Json;
}

export class FhirServer {
  readonly requests: FhirRequest[] = [];
  token: string | undefined;
  respond: (req: FhirRequest) => number | undefined = () => undefined;
  /** Held before answering (a slow server), or until a promise settles (a read held for a test's step). */
  delayMs = 0;
  hold: Promise<unknown> | undefined;
  /** Served instead of the stored version (a body the broker must cope with): raw text. */
  body: ((req: FhirRequest) => string | undefined) | undefined;
  readonly #versions = new Map<string, Version[]>();
  readonly #server: Server;

  private constructor() {
    this.#server = createServer(async (req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      const r: FhirRequest = { method: req.method ?? '', path: url.pathname, query: url.search, headers: req.headers };
      this.requests.push(r);
      if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
      if (this.hold !== undefined) await this.hold;
      const answer = (status: number, body?: Json) => {
        res.writeHead(status, body === undefined ? {} : { 'content-type': 'application/fhir+json' });
        res.end(body === undefined ? undefined : JSON.stringify(body));
      };
      if (this.token !== undefined && req.headers.authorization !== `Bearer ${this.token}`) return answer(401);
      const override = this.respond(r);
      if (override !== undefined) return answer(override);
      const raw = this.body?.(r);
      if (raw !== undefined) {
        res.writeHead(200, { 'content-type': 'application/fhir+json' });
        return void res.end(raw);
      }
      const m = /^\/fhir\/([A-Za-z]+)\/([A-Za-z0-9.-]+)(\/_history)?$/.exec(url.pathname);
      if (req.method !== 'GET' || m === null) return answer(400);
      const versions = this.#versions.get(`${m[1]}/${m[2]}`) ?? [];
      if (m[3] !== undefined) {
        if (versions.length === 0) return answer(404);
        const entry = versions
          .map((v, i) => ({
            ...(v.resource === undefined ? {} : { resource: v.resource }),
            request: { method: v.resource === undefined ? 'DELETE' : i === 0 ? 'POST' : 'PUT', url: `${m[1]}/${m[2]}` },
          }))
          .reverse();
        return answer(200, { resourceType: 'Bundle', type: 'history', total: entry.length, entry });
      }
      const last = versions.at(-1);
      if (last === undefined) return answer(404);
      if (last.resource === undefined) return answer(410);
      return answer(200, last.resource);
    });
  }

  static async start(): Promise<FhirServer> {
    const s = new FhirServer();
    s.#server.listen(0, '127.0.0.1');
    await once(s.#server, 'listening');
    return s;
  }

  /** The FHIR base URL. */
  get url(): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}/fhir`;
  }

  /** A new version of the resource (created or updated); `asId` files it under another id (a faulty server). */
  put(resource: Json, asId?: string): void {
    const key = `${resource.resourceType}/${asId ?? resource.id}`;
    const versions = this.#versions.get(key) ?? [];
    const meta = { ...(resource.meta as Json | undefined), versionId: String(versions.length + 1) };
    versions.push({ resource: { ...resource, meta } });
    this.#versions.set(key, versions);
  }

  delete(type: string, id: string): void {
    this.#versions.get(`${type}/${id}`)?.push({});
  }

  /** Requests for one resource (its read and its history). */
  requestsFor(type: string, id: string): FhirRequest[] {
    const path = `/fhir/${type}/${id}`;
    return this.requests.filter((r) => r.path === path || r.path === `${path}/_history`);
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    this.#server.close();
    await once(this.#server, 'close').catch(() => undefined);
  }
}
