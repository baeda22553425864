import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';
import { defaultProvider } from '@aws-sdk/credential-provider-node';
import { SignatureV4 } from '@smithy/signature-v4';
import { Agent, request } from 'undici';
import type { FhirReadConfig } from '../config.js';
import type { ResourceChange } from '../core/types.js';
import { ContentUnavailableError, type ReadResult, type ResourceSource } from '../service/content-stage.js';
import {
  type ChangeFeed,
  type FoundResource,
  PAGE,
  SearchRefusedError,
  WindowChangingError,
} from '../service/reconciler.js';

/**
 * Reads the resource an event names from the FHIR server, for the content stage: the current
 * version after a create or an update, the last version before a delete (from the instance's
 * `_history`). HealthLake is read with SigV4 (service `healthlake`, the AWS SDK's default
 * credential chain); any other FHIR server at a base URL with a bearer token or without one.
 *
 * Answers:
 * - `{ resource }`;
 * - `{ missing }`, with the reason: the server has no version of it (never there, or expunged), or
 *   after a delete it cannot say what was deleted (no `_history`: 400, 405, 501). Nothing to match,
 *   and retrying would not change that;
 * - `ContentUnavailableError`: it could not be read now (unreachable, past the timeout, 401/403,
 *   429, 5xx, any other refusal, an answer that is not the resource). The ingest request then fails
 *   with a 503 and stores nothing, so the sender (EventBridge) tries again later; nothing is
 *   delivered unfiltered.
 */

export interface ResourceReader extends ResourceSource, ChangeFeed {
  /**
   * A bearer token (`BROKER_FHIR_READ_TOKEN` read again: rotated, or added since the start) for the
   * reads from now on; ignored by a reader that signs with SigV4.
   */
  setToken(token: string): void;
  close(): Promise<void>;
}

/** Answers to `_history` that say the server keeps no history to read, for good. */
const NO_HISTORY = new Set([400, 405, 501]);
/** 8 MiB: a FHIR resource (a Binary aside) is far smaller; a larger answer is refused, not buffered. */
const MAX_ANSWER_BYTES = 8 * 1024 * 1024;
/** Versions asked for from `_history` (newest first): the delete, what it deleted, and some after. */
const HISTORY_COUNT = 10;
/**
 * Answers that say "not now" (the sender should try again later): credentials the operator must
 * fix, throttling, the server's own failures. Any other refusal will not change on a retry.
 */
const TRANSIENT = (status: number) =>
  status === 401 || status === 403 || status === 408 || status === 429 || status >= 500;
/** Reads in flight at once, in all: more wait for a turn, and their deadline starts with it. */
const READS_IN_FLIGHT = 16;
/** `https://healthlake.<region>.amazonaws.com/datastore/<id>/r4`: the region to sign for, and the datastore. */
const HEALTHLAKE_URL = /^https:\/\/healthlake\.([a-z0-9-]+)\.amazonaws\.com\/datastore\/([0-9a-f]{32})\//;

interface Answer {
  readonly status: number;
  readonly body: unknown;
  /** A 200 whose body cannot be taken (not JSON, too large): why. */
  readonly unusable?: string;
  /** The body was larger than MAX_ANSWER_BYTES. */
  readonly tooLarge?: true;
}

interface HistoryEntry {
  readonly resource?: unknown;
  readonly request?: { readonly method?: unknown };
  readonly response?: { readonly lastModified?: unknown };
}

export class FhirReader implements ResourceReader {
  readonly #config: FhirReadConfig;
  readonly #agent: Agent;
  #closed: Promise<void> | undefined;
  readonly #signer: SignatureV4 | undefined;
  /** The bearer token: from the start (`bearer` auth), or set when the credentials are read again (AWS). */
  #token: string | undefined;
  #inFlight = 0;
  readonly #waiting: (() => void)[] = [];

  constructor(config: FhirReadConfig, deps: { signer?: SignatureV4 } = {}) {
    this.#config = config;
    this.#token = config.token;
    this.#agent = new Agent({
      connect: { timeout: config.timeoutMs },
      headersTimeout: config.timeoutMs,
      bodyTimeout: config.timeoutMs,
      maxResponseSize: MAX_ANSWER_BYTES,
      connections: READS_IN_FLIGHT,
    });
    this.#signer =
      config.auth !== 'sigv4'
        ? undefined
        : (deps.signer ??
          new SignatureV4({
            service: 'healthlake',
            region: config.region,
            credentials: defaultProvider(),
            sha256: Sha256,
          }));
  }

  setToken(token: string): void {
    if (this.#config.auth !== 'sigv4') this.#token = token;
  }

  async read(change: ResourceChange): Promise<ReadResult> {
    const id = change.resourceId;
    if (id === undefined) return { missing: 'the event names no resource id' };
    const base = this.#config.baseUrl ?? change.fhirBase.replace(/\/+$/, '');
    // A base URL naming one HealthLake datastore serves that datastore's events only: another
    // datastore's resource of the same id is another resource.
    const named = HEALTHLAKE_URL.exec(`${base}/`)?.[2];
    if (named !== undefined && named !== change.datastoreId) {
      return { missing: `the event is from another HealthLake datastore than BROKER_FHIR_READ names` };
    }
    await this.#turn();
    try {
      // One deadline for the whole read, the history read after a 404 included, from its turn on.
      return await this.#read(change, id, base, AbortSignal.timeout(this.#config.timeoutMs));
    } finally {
      this.#release();
    }
  }

  async #read(change: ResourceChange, id: string, base: string, signal: AbortSignal): Promise<ReadResult> {
    const path = `${base}/${change.resourceType}/${encodeURIComponent(id)}`;
    // Messages name the server and the type, never the resource id (they reach logs and answers).
    const what = `reading the ${change.resourceType} from ${base}`;
    if (change.interaction !== 'delete') {
      const current = await this.#get(path, what, signal);
      if (current.status === 200) return this.#taken(current, change, what, base);
      if (current.status !== 404 && current.status !== 410) return refused(what, current.status);
    }
    const history = `reading the ${change.resourceType}'s history from ${base}`;
    const versions = await this.#get(`${path}/_history?_count=${HISTORY_COUNT}`, history, signal);
    if (versions.status === 404 || versions.status === 410) return { missing: 'the server has no version of it' };
    if (NO_HISTORY.has(versions.status)) {
      return { missing: `${history} answered ${versions.status}: the server keeps no history to read` };
    }
    if (versions.status !== 200) return refused(history, versions.status);
    if (versions.unusable !== undefined) return { missing: `${history}: ${versions.unusable}`, anomaly: true };
    const bundle = versions.body as { resourceType?: unknown; entry?: unknown };
    if (bundle?.resourceType !== 'Bundle') return { missing: `${history}: the answer is not a Bundle`, anomaly: true };
    const version = versionAt((Array.isArray(bundle.entry) ? bundle.entry : []) as HistoryEntry[], change);
    if (version === undefined) return { missing: 'its history holds no version of it from before the event' };
    const taken = this.#taken({ status: 200, body: version }, change, history, base);
    // A create or update read after the resource was deleted: its last version, and that it is gone.
    return change.interaction !== 'delete' && 'resource' in taken ? { ...taken, gone: true } : taken;
  }

  /** The answer as the resource the event names, or why it is not (a fault of the server's, for good). */
  #taken(answer: Answer, change: ResourceChange, what: string, base: string): ReadResult {
    if (answer.unusable !== undefined) return { missing: `${what}: ${answer.unusable}`, anomaly: true };
    const r = answer.body as Record<string, unknown> | null;
    if (r?.resourceType !== change.resourceType || r.id !== change.resourceId) {
      return { missing: `${what}: the answer is not the ${change.resourceType} the event names`, anomaly: true };
    }
    return { resource: r, base };
  }

  /**
   * The reconciler's feed (src/service/reconciler.ts): `GET [base]/[type]?_lastUpdated=ge…&
   * _lastUpdated=lt…&_count=100`, then each page's `next` link, which must stay on the base URL
   * (under it, or it with a query, as HAPI pages; a link elsewhere is not followed: the credentials
   * would go with it). Each page read with its own deadline and turn among the reads in flight.
   *
   * The window is in the past, so a resource can only leave it while it is paged (changed again,
   * deleted), and on a server that pages by offset every later page then starts one resource late:
   * when a page's `total` differs from the first's, the search starts over (what was found twice is
   * notified once), up to RESTARTS times, then `WindowChangingError` (the reconciler searches
   * shorter windows), as after MAX_PAGES pages. A page larger than 8 MiB starts the search over
   * with half the `_count`, down to one resource a page.
   *
   * Throws `SearchRefusedError` for what a retry would not change (a refusal such as 400, 404, 405
   * or 501 for a type the server does not search; a page that is not JSON or not a Bundle; one
   * resource larger than 8 MiB), anything else when the server cannot answer now.
   */
  async *changed(
    type: string,
    fromMs: number,
    toMs: number,
    signal: AbortSignal,
  ): AsyncGenerator<readonly FoundResource[]> {
    const base = this.#config.baseUrl;
    if (base === undefined) throw new Error('reconciliation reads a FHIR base URL (BROKER_FHIR_READ)');
    const what = `searching the ${type}s changed in a window at ${base}`;
    const firstPage = (count: number) =>
      `${base}/${type}?${new URLSearchParams([
        ['_lastUpdated', `ge${new Date(fromMs).toISOString()}`],
        ['_lastUpdated', `lt${new Date(toMs).toISOString()}`],
        ['_count', String(count)],
      ])}`;
    let count = PAGE;
    let first = firstPage(count);
    let url: string | undefined = first;
    let total: unknown;
    let restarts = 0;
    for (let pages = 0; url !== undefined && !signal.aborted; pages++) {
      // Too many pages for one search: the reconciler searches shorter windows.
      if (pages === MAX_PAGES) throw new WindowChangingError(`${what}: more than ${MAX_PAGES} pages; stopped`);
      await this.#turn();
      let answer: Answer;
      try {
        answer = await this.#get(url, what, AbortSignal.any([signal, AbortSignal.timeout(this.#config.timeoutMs)]));
      } finally {
        this.#release();
      }
      if (answer.status !== 200) {
        const message = `${what}: the server answered ${answer.status}`;
        throw TRANSIENT(answer.status) && answer.status !== 501 ? new Error(message) : new SearchRefusedError(message);
      }
      if (answer.tooLarge === true && count > 1) {
        count = Math.floor(count / 2);
        url = first = firstPage(count);
        pages = -1;
        continue;
      }
      if (answer.unusable !== undefined) throw new SearchRefusedError(`${what}: ${answer.unusable}`);
      const bundle = answer.body as { resourceType?: unknown; entry?: unknown; link?: unknown; total?: unknown } | null;
      if (bundle?.resourceType !== 'Bundle') throw new SearchRefusedError(`${what}: the answer is not a Bundle`);
      if (url === first) total = bundle.total;
      else if (typeof bundle.total === 'number' && typeof total === 'number' && bundle.total !== total) {
        if (++restarts > RESTARTS)
          throw new WindowChangingError(`${what}: the window kept changing while it was paged`);
        url = first;
        pages = -1;
        continue;
      }
      const entries = Array.isArray(bundle.entry) ? (bundle.entry as { resource?: unknown; search?: unknown }[]) : [];
      yield entries.flatMap((e) => {
        const r = e?.resource;
        const mode = (e?.search as { mode?: unknown } | undefined)?.mode;
        // Included resources (`search.mode` include) are not the type's changes.
        if (typeof r !== 'object' || r === null || Array.isArray(r) || (mode !== undefined && mode !== 'match')) {
          return [];
        }
        return [{ resource: r as Record<string, unknown> }];
      });
      url = nextLink(bundle.link, base, what);
    }
  }

  /** Idempotent: a broker closed twice (a test's explicit close, then its clean-up) closes it once. */
  close(): Promise<void> {
    this.#closed ??= this.#agent.close();
    return this.#closed;
  }

  async #turn(): Promise<void> {
    if (this.#inFlight < READS_IN_FLIGHT) {
      this.#inFlight++;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }

  #release(): void {
    const next = this.#waiting.shift();
    if (next === undefined) this.#inFlight--;
    else next();
  }

  async #get(url: string, what: string, signal: AbortSignal): Promise<Answer> {
    const target = new URL(url);
    let headers: Record<string, string> = { accept: 'application/fhir+json' };
    if (this.#token !== undefined) headers.authorization = `Bearer ${this.#token}`;
    if (this.#signer !== undefined) headers = await this.#sign(target, headers);
    let res: Awaited<ReturnType<typeof request>>;
    try {
      res = await request(target, { method: 'GET', headers, dispatcher: this.#agent, signal });
    } catch (err) {
      throw new ContentUnavailableError(`${what} failed: ${failure(err, this.#config.timeoutMs)}`, { cause: err });
    }
    if (res.statusCode !== 200) {
      await res.body.dump().catch(() => undefined);
      return { status: res.statusCode, body: undefined };
    }
    let text: string;
    try {
      text = await res.body.text();
    } catch (err) {
      if ((err as { code?: unknown }).code === 'UND_ERR_RES_EXCEEDED_MAX_SIZE') {
        return {
          status: 200,
          body: undefined,
          unusable: `the answer is larger than ${MAX_ANSWER_BYTES} bytes`,
          tooLarge: true,
        };
      }
      throw new ContentUnavailableError(`${what} failed: ${failure(err, this.#config.timeoutMs)}`, { cause: err });
    }
    try {
      return { status: 200, body: JSON.parse(text) };
    } catch {
      // Never the parser's message: it quotes the start of the body (an error page, PHI).
      const type = String(res.headers['content-type'] ?? 'none').slice(0, 60);
      return {
        status: 200,
        body: undefined,
        unusable: `the answer is not JSON (${text.length} characters, content-type ${type})`,
      };
    }
  }

  async #sign(url: URL, headers: Record<string, string>): Promise<Record<string, string>> {
    // The query as sent, decoded as AWS reads it (RFC 3986: a `+` is a plus, not a space; what
    // URLSearchParams would make of it), each value of a repeated parameter signed.
    const query: Record<string, string | string[]> = {};
    for (const pair of url.search.slice(1).split('&')) {
      if (pair === '') continue;
      const cut = pair.indexOf('=');
      const k = decodeComponent(cut === -1 ? pair : pair.slice(0, cut));
      const v = cut === -1 ? '' : decodeComponent(pair.slice(cut + 1));
      const before = query[k];
      query[k] = before === undefined ? v : [...(Array.isArray(before) ? before : [before]), v];
    }
    // HealthLake is signed for its own region, which its host names (an event's datastore may be in
    // another region than the broker's default).
    const region = /^healthlake\.([a-z0-9-]+)\.amazonaws\.com$/.exec(url.hostname)?.[1] ?? this.#config.region;
    try {
      const signed = await (this.#signer as SignatureV4).sign(
        {
          method: 'GET',
          protocol: url.protocol,
          hostname: url.hostname,
          ...(url.port === '' ? {} : { port: Number(url.port) }),
          path: url.pathname,
          query,
          headers: { ...headers, host: url.host },
        },
        { signingRegion: region },
      );
      return signed.headers as Record<string, string>;
    } catch (err) {
      // No credentials in the chain, say: a fault to fix, and the events wait for it.
      throw new ContentUnavailableError(`cannot sign the FHIR read (SigV4): ${(err as Error).message}`, { cause: err });
    }
  }
}

/** Pages of one type's changes in one window: a server whose `next` links never end is stopped. */
const MAX_PAGES = 10_000;
/** Times a type's search starts over when its window changed while it was paged. */
const RESTARTS = 3;

/** A page's `next` link, only under `base` (absolute, or relative to it); undefined on the last page. */
function nextLink(links: unknown, base: string, what: string): string | undefined {
  const next = (Array.isArray(links) ? links : []).find((l: { relation?: unknown } | null) => l?.relation === 'next') as
    | { url?: unknown }
    | undefined;
  if (typeof next?.url !== 'string') return undefined;
  let url: URL;
  try {
    url = new URL(next.url, `${base}/`);
  } catch {
    throw new Error(`${what}: the next page's link is not a URL`);
  }
  const path = `${url.origin}${url.pathname}`;
  if (url.origin !== new URL(base).origin || (path !== base && !path.startsWith(`${base}/`))) {
    throw new Error(`${what}: the next page's link leads away from ${base}; not followed`);
  }
  return url.href;
}

/** A refusal: "not now" is a 503 for the sender to retry; any other will not change, and judges nothing. */
function refused(what: string, status: number): ReadResult {
  if (TRANSIENT(status)) throw new ContentUnavailableError(`${what}: the server answered ${status}`);
  return { missing: `${what}: the server answered ${status}`, anomaly: true };
}

/** CloudTrail's event times have whole seconds: a version written in the event's second is before it. */
const EVENT_TIME_SLACK_MS = 1000;

/**
 * The version an event concerns, from an instance history: the newest version with the resource
 * written at or before the event (its second included). A delete so gets what it deleted, not a
 * re-creation after it; an update whose resource is gone since gets what it wrote. Entries are
 * ordered by their own times (`meta.lastUpdated`, or the entry's `response.lastModified`), not the
 * server's order. Without times to go by: after a delete, the first version past the newest delete
 * marker (an entry without a resource, or a DELETE request), none without a marker on the page;
 * otherwise the newest version.
 */
function versionAt(entries: readonly HistoryEntry[], change: ResourceChange): unknown {
  const withResource = entries.filter(
    (e) => typeof e?.resource === 'object' && e.resource !== null && !Array.isArray(e.resource),
  );
  const timeOf = (e: HistoryEntry): number => {
    const meta = (e.resource as { meta?: { lastUpdated?: unknown } } | undefined)?.meta;
    const at = typeof meta?.lastUpdated === 'string' ? meta.lastUpdated : e.response?.lastModified;
    return typeof at === 'string' ? Date.parse(at) : Number.NaN;
  };
  const eventAt = Date.parse(change.time);
  if (!Number.isNaN(eventAt) && withResource.length > 0 && withResource.every((e) => !Number.isNaN(timeOf(e)))) {
    const before = withResource
      .filter((e) => timeOf(e) <= eventAt + EVENT_TIME_SLACK_MS)
      .sort((a, b) => timeOf(b) - timeOf(a));
    return before[0]?.resource;
  }
  if (change.interaction !== 'delete') return withResource[0]?.resource;
  const marker = entries.findIndex((e) => e?.request?.method === 'DELETE' || e?.resource === undefined);
  if (marker === -1) return undefined;
  return entries
    .slice(marker + 1)
    .find((e) => typeof e?.resource === 'object' && e.resource !== null && !Array.isArray(e.resource))?.resource;
}

/** `%XX` decoded; a malformed escape left as it is (signed as sent). */
function decodeComponent(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

function failure(err: unknown, timeoutMs: number): string {
  const e = err as Error;
  return e.name === 'TimeoutError' || e.name === 'AbortError' ? `no whole answer within ${timeoutMs} ms` : e.message;
}

type SourceData = string | ArrayBuffer | ArrayBufferView;

/** SHA-256 for the SigV4 signer (its `Checksum` interface), from node:crypto. */
export class Sha256 {
  readonly #secret: Buffer | undefined;
  #hash: Hash | Hmac;

  constructor(secret?: SourceData) {
    this.#secret = secret === undefined ? undefined : bytes(secret);
    this.#hash = this.#fresh();
  }

  update(data: SourceData): void {
    this.#hash.update(bytes(data));
  }

  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#hash.digest());
  }

  reset(): void {
    this.#hash = this.#fresh();
  }

  #fresh(): Hash | Hmac {
    return this.#secret === undefined ? createHash('sha256') : createHmac('sha256', this.#secret);
  }
}

function bytes(data: SourceData): Buffer {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.from(data);
}
