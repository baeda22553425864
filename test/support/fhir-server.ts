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
  /** Search pages hold at most this many entries (a server may page below the `_count` asked for). */
  pageSize = 100;
  /** Searches answer every current resource of the type, whatever `_lastUpdated` asks (a faulty server). */
  ignoreLastUpdated = false;
  /** The `next` link of a search page instead of the server's own (a link elsewhere). */
  nextLink: ((own: string) => string) | undefined;
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
      // A type search, or a page of one as HAPI links it (`[base]?_getpages=…`).
      const search =
        /^\/fhir\/([A-Za-z]+)$/.exec(url.pathname)?.[1] ??
        (url.pathname === '/fhir' ? url.searchParams.get('_getpages') : null);
      if (req.method === 'GET' && search !== null) return answer(200, this.#search(search, url));
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

  /**
   * A type search on `_lastUpdated` (`ge` `gt` `le` `lt` instants): the current version of each
   * resource of the type, oldest change first, `_count` (and `pageSize`) per page, `_page` for the
   * next ones.
   */
  #search(type: string, url: URL): Json {
    const bounds = url.searchParams
      .getAll('_lastUpdated')
      .map((v) => ({ op: v.slice(0, 2), at: Date.parse(v.slice(2)) }));
    const holds = (at: number) =>
      bounds.every(({ op, at: b }) =>
        op === 'ge' ? at >= b : op === 'gt' ? at > b : op === 'le' ? at <= b : op === 'lt' ? at < b : false,
      );
    const current = [...this.#versions.entries()]
      .filter(([key]) => key.startsWith(`${type}/`))
      .map(([, versions]) => versions.at(-1)?.resource)
      .filter((r): r is Json => r !== undefined)
      .map((r) => ({ r, at: Date.parse(String((r.meta as Json | undefined)?.lastUpdated)) }))
      .filter(({ at }) => this.ignoreLastUpdated || (!Number.isNaN(at) && holds(at)))
      .sort((a, b) => a.at - b.at);
    const count = Math.min(Number(url.searchParams.get('_count') ?? 100), this.pageSize);
    const page = Number(url.searchParams.get('_page') ?? 1);
    const entries = current.slice((page - 1) * count, page * count);
    const link: Json[] = [{ relation: 'self', url: `${this.url}${url.pathname.slice(5)}${url.search}` }];
    if (page * count < current.length) {
      const next = new URL(url.href);
      next.searchParams.set('_page', String(page + 1));
      const own = `${this.url}${next.pathname.slice(5)}${next.search}`;
      link.push({ relation: 'next', url: this.nextLink?.(own) ?? own });
    }
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      total: current.length,
      link,
      entry: entries.map(({ r }) => ({
        fullUrl: `${this.url}/${type}/${r.id}`,
        resource: r,
        search: { mode: 'match' },
      })),
    };
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

  /**
   * A new version of the resource (created or updated), numbered unless it carries a `versionId` of
   * its own (an opaque one, as some servers give); `asId` files it under another id (a faulty server).
   */
  put(resource: Json, asId?: string): void {
    const key = `${resource.resourceType}/${asId ?? resource.id}`;
    const versions = this.#versions.get(key) ?? [];
    const given = (resource.meta as Json | undefined)?.versionId;
    const meta = { ...(resource.meta as Json | undefined), versionId: given ?? String(versions.length + 1) };
    versions.push({ resource: { ...resource, meta } });
    this.#versions.set(key, versions);
  }

  delete(type: string, id: string): void {
    this.#versions.get(`${type}/${id}`)?.push({});
  }

  /** The resource as a read of it answers now (its last version), or undefined. */
  current(type: string, id: string): Json | undefined {
    return this.#versions.get(`${type}/${id}`)?.at(-1)?.resource;
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
