import type { Context, Hono } from 'hono';
import { BrokerError } from '../core/errors.js';
import { BACKPORT_EXT, BACKPORT_PROFILE, BROKER_BASE, BROKER_EXT, FHIR_EXT } from '../core/fhir-urls.js';
import { checkAcceptable, mediaType, otherCharset } from '../core/media-type.js';
import { buildNotificationBundle, buildStatusBundle, withDeliveryStates } from '../core/notification.js';
import { contentNow, instantProblem } from '../core/subscription.js';
import type { TopicCatalog, TopicDefinition } from '../core/topics.js';
import type { Clock, IdSource, PayloadContent, StoredNotification, SubscriptionRecord } from '../core/types.js';
import type { BindingTokens } from '../delivery/ws-binding-token.js';
import { type SubscriptionRegistry, versionId } from '../service/subscription-registry.js';
import { EARLIER_VERSIONS_KEPT, type Store } from '../store/store.js';
import type { ApiKeyAuth } from './auth.js';
import { readBody, readJsonBody } from './body.js';
import { fhirJsonRepresentation, fhirResponse } from './outcome.js';

/** The `/fhir` routes: Subscription CRUD and operations, SubscriptionTopic, metadata. */

export interface FhirRouteDeps {
  readonly registry: SubscriptionRegistry;
  readonly store: Store;
  readonly topics: TopicCatalog;
  readonly auth: ApiKeyAuth;
  readonly clock: Clock;
  readonly ids: IdSource;
  readonly publicUrl: string;
  readonly maxBodyBytes: number;
  readonly version: string;
  readonly bindingTokens: BindingTokens;
  readonly wsTokenTtlMs: number;
  readonly websocketUrl: string;
  /** `BROKER_FULL_RESOURCE_CLIENTS`: `$events` of another client's full-resource subscription is id-only. */
  readonly fullResourceClients?: readonly string[] | '*';
  /** `BROKER_CORS_ORIGINS`: browser origins that may call the FHIR routes (`*`: any); none, no CORS. */
  readonly corsOrigins?: readonly string[];
  /** The broker reads resources (`BROKER_FHIR_READ`): topics offer their content filters too. */
  readonly contentFilters?: boolean;
}

/** 100: subscriptions one binding token may name (a socket binds them all at once). */
const MAX_BINDING_SUBSCRIPTIONS = 100;

/** 1,000: the most stored notifications one `$events` call returns; a `next` link asks for the rest. */
const MAX_EVENTS_PAGE = 1000;

/** 1,000: the most Subscriptions one search page returns (the default page); `_count` asks for fewer. */
const MAX_SEARCH_PAGE = 1000;
/**
 * Values one search or operation parameter may carry (`_id=a,b,...`, repeated or comma-separated):
 * as many as a page holds. Unbounded, a 1 MiB form body of ids held the event loop ~0.5 s per request.
 */
const MAX_PARAMETER_VALUES = MAX_SEARCH_PAGE;

type Env = { Variables: { owner: string } };

export function mountFhirRoutes(app: Hono<Env>, deps: FhirRouteDeps): void {
  const { registry, topics, auth } = deps;
  const fhirBase = `${deps.publicUrl}/fhir`;
  const now = (): string => new Date(deps.clock.now()).toISOString();
  const ctx = () => ({ fhirBase, newId: () => deps.ids.uuid(), timestamp: now() });

  // Before all else, so every answer under /fhir (a 401 too) is labelled as the request asked:
  // application/json to a client that asked for that generic type (R4 http.html#mime-type).
  app.use('/fhir/*', fhirJsonRepresentation);

  // Authentication first (hono runs middleware in the order it is added): a request without a
  // valid token learns nothing else, not even that its Accept would have been a 406.
  app.use('/fhir/Subscription', async (c, next) => {
    c.set('owner', auth.authenticate(c.req.header('authorization')));
    await next();
  });
  app.use('/fhir/Subscription/*', async (c, next) => {
    c.set('owner', auth.authenticate(c.req.header('authorization')));
    await next();
  });
  app.use('/fhir/SubscriptionTopic', async (c, next) => {
    auth.authenticate(c.req.header('authorization'));
    await next();
  });
  app.use('/fhir/SubscriptionTopic/*', async (c, next) => {
    auth.authenticate(c.req.header('authorization'));
    await next();
  });

  // JSON is the one format: a request that accepts only XML gets 406, not JSON it cannot read.
  app.use('/fhir/*', async (c, next) => {
    checkAcceptable(c.req.query('_format'), c.req.header('accept'));
    await next();
  });

  app.get('/fhir/metadata', () => fhirResponse(capabilityStatement(deps, now())));

  const TOPIC_SEARCH = ['url', '_id', ...GENERAL_PARAMETERS];
  const served = (t: TopicDefinition) => (deps.contentFilters === true ? t.resource : t.eventOnlyResource);
  const topicSearch = (query: SearchQuery): Response => {
    const urls = query.groups('url');
    const ids = query.groups('_id');
    const found = topics
      .all()
      .filter(
        (t) =>
          (urls === undefined || urls.every((group) => group.some((u) => topics.byCanonical(u) === t))) &&
          everyHas(ids, t.id),
      );
    return fhirResponse({
      resourceType: 'Bundle',
      type: 'searchset',
      total: found.length,
      link: [{ relation: 'self', url: `${fhirBase}/SubscriptionTopic${query.applied()}` }],
      // R4 JSON has no empty arrays: no match, no `entry`.
      ...(found.length === 0
        ? {}
        : {
            entry: found.map((t) => ({
              fullUrl: `${fhirBase}/SubscriptionTopic/${t.id}`,
              resource: served(t),
              search: { mode: 'match' },
            })),
          }),
    });
  };
  app.get('/fhir/SubscriptionTopic', (c) => topicSearch(searchQuery(c, TOPIC_SEARCH)));
  app.post('/fhir/SubscriptionTopic/_search', async (c) =>
    topicSearch(searchQuery(c, TOPIC_SEARCH, await readFormBody(c, deps.maxBodyBytes))),
  );
  app.get('/fhir/SubscriptionTopic/:id', (c) => {
    const topic = topics.byId(c.req.param('id'));
    if (topic === undefined) throw new BrokerError('NOT_FOUND', `SubscriptionTopic/${c.req.param('id')} not found`);
    return fhirResponse(served(topic));
  });

  app.post('/fhir/Subscription', async (c) => {
    const condition = conditionalCreate(c.req.header('if-none-exist'));
    const body = await readJsonBody(c, deps.maxBodyBytes);
    const { record, shownSecret, existing } = await registry.create(c.get('owner'), body, condition);
    // R4 http.html#create: Location carries the id and the version id.
    const location = `${fhirBase}/Subscription/${record.id}/_history/${versionId(record)}`;
    return preferredReturn(
      c,
      registry.render(record, { secret: shownSecret }),
      existing === true ? 200 : 201,
      { location, ...etag(record) },
      shownSecret !== undefined,
      existing === true
        ? `Subscription/${record.id} matches If-None-Exist: nothing created`
        : `Subscription/${record.id} created`,
    );
  });

  const search = async (c: Context<Env>, query: SearchQuery): Promise<Response> => {
    const count = countParam(query.one('_count'));
    const offset = offsetParam(query.one('_offset'));
    // _count=0 asks for the total only, as _summary=count does (FHIR search); _summary=false is the
    // default. The other values (true, text, data) would subset the resources, which the broker
    // does not do: refused, not ignored, since the `self` link would claim them applied.
    const summary = query.one('_summary');
    const summaryCount = summary === 'count' || count === 0;
    if (summary !== undefined && summary !== 'count' && summary !== 'false') {
      throw new BrokerError(
        'INVALID_PARAMETER',
        `_summary=${summary.slice(0, 32)} is not supported; use count or false`,
      );
    }
    const subs = (await registry.search(c.get('owner'))).filter(subscriptionFilter(query));
    const page = summaryCount ? [] : subs.slice(offset, offset + count);
    const link = [{ relation: 'self', url: `${fhirBase}/Subscription${query.applied()}` }];
    if (!summaryCount && offset + count < subs.length) {
      link.push({
        relation: 'next',
        url: `${fhirBase}/Subscription${query.applied({ _offset: String(offset + count) })}`,
      });
    }
    return fhirResponse({
      resourceType: 'Bundle',
      type: 'searchset',
      total: subs.length,
      link,
      // R4 JSON has no empty arrays: a count, or no match on this page, has no `entry`.
      ...(page.length === 0
        ? {}
        : {
            entry: page.map((s) => ({
              fullUrl: `${fhirBase}/Subscription/${s.id}`,
              resource: registry.render(s),
              search: { mode: 'match' },
            })),
          }),
    });
  };
  const SUBSCRIPTION_SEARCH = ['_id', 'status', 'url', '_count', '_offset', '_summary', ...GENERAL_PARAMETERS];
  app.get('/fhir/Subscription', (c) => search(c, searchQuery(c, SUBSCRIPTION_SEARCH)));
  // FHIR search by POST: the parameters as a form body (and any in the URL).
  app.post('/fhir/Subscription/_search', async (c) =>
    search(c, searchQuery(c, SUBSCRIPTION_SEARCH, await readFormBody(c, deps.maxBodyBytes))),
  );

  const typeStatus = async (c: Context<Env>): Promise<Response> => {
    const params = await operationParams(c, deps.maxBodyBytes);
    const ids = valueSet(params.values('id'));
    const statuses = valueSet(params.values('status'));
    const subs = (await registry.search(c.get('owner'))).filter(
      (s) => (ids === undefined || ids.has(s.id)) && (statuses === undefined || statuses.has(s.status)),
    );
    return fhirResponse(buildStatusBundle(subs, ctx()));
  };
  app.get('/fhir/Subscription/$status', typeStatus);
  app.post('/fhir/Subscription/$status', typeStatus);

  const wsUrl = deps.websocketUrl;
  const bindingToken = async (owner: string, ids: readonly string[] | undefined): Promise<Response> => {
    const unique = ids === undefined ? undefined : [...new Set(ids)];
    if (unique !== undefined && unique.length > MAX_BINDING_SUBSCRIPTIONS) {
      throw new BrokerError(
        'INVALID_PARAMETER',
        `At most ${MAX_BINDING_SUBSCRIPTIONS} subscriptions per binding token`,
      );
    }
    const subs =
      unique === undefined
        ? (await registry.search(owner))
            .filter((s) => s.channel.type === 'websocket' && s.status !== 'off')
            .slice(0, MAX_BINDING_SUBSCRIPTIONS)
        : await Promise.all(unique.map((id) => registry.read(owner, id)));
    for (const s of subs) {
      if (s.channel.type !== 'websocket') {
        throw new BrokerError('UNSUPPORTED_CHANNEL', `Subscription/${s.id} is not a websocket subscription`);
      }
      if (s.status === 'off') {
        throw new BrokerError(
          'INVALID_STATUS_CHANGE',
          `Subscription/${s.id} is off; set it to requested to bind again`,
        );
      }
    }
    if (subs.length === 0) throw new BrokerError('NOT_FOUND', 'No websocket subscriptions to bind');
    const expiresAt = deps.clock.now() + deps.wsTokenTtlMs;
    const token = deps.bindingTokens.issue({ owner, subscriptions: subs.map((s) => s.id), expiresAt });
    return fhirResponse({
      resourceType: 'Parameters',
      parameter: [
        { name: 'token', valueString: token },
        { name: 'expiration', valueDateTime: new Date(expiresAt).toISOString() },
        ...subs.map((s) => ({ name: 'subscription', valueString: s.id })),
        { name: 'websocket-url', valueUrl: wsUrl },
      ],
    });
  };
  const tokenFor = async (c: Context<Env>): Promise<Response> =>
    bindingToken(c.get('owner'), (await operationParams(c, deps.maxBodyBytes)).values('id'));
  app.get('/fhir/Subscription/$get-ws-binding-token', tokenFor);
  app.post('/fhir/Subscription/$get-ws-binding-token', tokenFor);
  // At instance level the id is the URL's; a body is still read as Parameters (a bad one is a 400).
  const instanceToken = async (c: Context<Env>): Promise<Response> => {
    await operationParams(c, deps.maxBodyBytes);
    return bindingToken(c.get('owner'), [c.req.param('id') ?? '']);
  };
  app.get('/fhir/Subscription/:id/$get-ws-binding-token', instanceToken);
  app.post('/fhir/Subscription/:id/$get-ws-binding-token', instanceToken);

  const instanceStatus = async (c: Context<Env>): Promise<Response> => {
    await operationParams(c, deps.maxBodyBytes);
    const sub = await registry.read(c.get('owner'), c.req.param('id') ?? '');
    return fhirResponse(buildStatusBundle([sub], ctx()));
  };
  app.get('/fhir/Subscription/:id/$status', instanceStatus);
  app.post('/fhir/Subscription/:id/$status', instanceStatus);

  const events = async (c: Context<Env>): Promise<Response> => {
    const params = await operationParams(c, deps.maxBodyBytes);
    const sub = await registry.read(c.get('owner'), c.req.param('id') ?? '');
    const since = eventNumberParam(params.one('eventsSinceNumber'), 'eventsSinceNumber') ?? 1;
    const askedUntil = eventNumberParam(params.one('eventsUntilNumber'), 'eventsUntilNumber');
    const until = askedUntil ?? sub.eventsSinceStart;
    // (Without an end, a start past the last number asks for what is new: nothing yet, not an error.)
    if (askedUntil !== undefined && since > askedUntil) {
      throw new BrokerError(
        'INVALID_PARAMETER',
        `eventsSinceNumber ${since} is above eventsUntilNumber ${until}: the range is empty`,
      );
    }
    const asked = params.one('content');
    const own = contentNow(sub, deps.fullResourceClients ?? []);
    const content = contentParam(asked) ?? own;
    // Stored with their resources (whatever this answer shows of them): read a few at a time.
    const { notes, cut } =
      sub.channel.content === 'full-resource'
        ? await withinResourceBudget(deps.store, sub.id, since, until)
        : { notes: await deps.store.notificationsInRange(sub.id, since, until, MAX_EVENTS_PAGE), cut: false };
    const { entry, ...head } = withDeliveryStates(
      buildNotificationBundle(sub, 'query-event', notes, content, ctx()),
      notes,
      sub,
    );
    // A full page (in count, or in resource bytes) that stops short of `until`: the rest is a `next`
    // link away (as search pages are).
    const last = notes.at(-1)?.eventNumber;
    const full = notes.length === MAX_EVENTS_PAGE || cut;
    if (!full || last === undefined || last >= until) return fhirResponse({ ...head, entry });
    const next = new URLSearchParams({ eventsSinceNumber: String(last + 1), eventsUntilNumber: String(until) });
    if (asked !== undefined) next.set('content', asked);
    const url = `${fhirBase}/Subscription/${sub.id}/$events?${next}`;
    return fhirResponse({ ...head, link: [{ relation: 'next', url }], entry });
  };
  app.get('/fhir/Subscription/:id/$events', events);
  app.post('/fhir/Subscription/:id/$events', events);

  // $expunge (as HAPI FHIR names it) of a Subscription's previous versions only: POST, since it
  // forgets; the current version stays (DELETE removes the Subscription with its versions).
  app.post('/fhir/Subscription/:id/$expunge', async (c) => {
    const params = await operationParams(c, deps.maxBodyBytes);
    for (const other of ['expungeDeletedResources', 'expungeEverything']) {
      if (params.one(other) === 'true') {
        throw new BrokerError(
          'INVALID_PARAMETER',
          `${other} is not supported: a deleted Subscription keeps nothing; expunge a Subscription's previous versions with expungePreviousVersions=true`,
        );
      }
    }
    if (params.one('expungePreviousVersions') !== 'true') {
      throw new BrokerError(
        'INVALID_PARAMETER',
        "$expunge needs expungePreviousVersions=true: it forgets a Subscription's previous versions, and only those",
      );
    }
    const count = await registry.expungeVersions(c.get('owner'), c.req.param('id'));
    return fhirResponse({ resourceType: 'Parameters', parameter: [{ name: 'count', valueInteger: count }] });
  });

  app.get('/fhir/Subscription/:id', async (c) => {
    const sub = await registry.read(c.get('owner'), c.req.param('id'));
    return fhirResponse(registry.render(sub), 200, etag(sub));
  });

  // vread: the current version, or one of the earlier ones the store keeps (EARLIER_VERSIONS_KEPT).
  app.get('/fhir/Subscription/:id/_history/:vid', async (c) => {
    const id = c.req.param('id');
    const vid = c.req.param('vid');
    const found = await registry.version(c.get('owner'), id, vid);
    if (found === undefined) {
      throw new BrokerError(
        'NOT_FOUND',
        `Subscription/${id}/_history/${vid.slice(0, 64)} not found: the broker keeps the current version of a Subscription and the last ${EARLIER_VERSIONS_KEPT} before it`,
      );
    }
    return fhirResponse(registry.render(found), 200, etag(found));
  });

  // history-instance: those versions, newest first (R4 http.html#history), `_since` and `_count` applied,
  // paged by `_offset` as searches are. A version written between two pages shifts the older ones
  // down by one: the next page may repeat a version, never skip one.
  app.get('/fhir/Subscription/:id/_history', async (c) => {
    const id = c.req.param('id');
    const query = searchQuery(c, ['_since', '_count', '_offset', ...GENERAL_PARAMETERS]);
    const since = sinceParam(query.one('_since'));
    const count = countParam(query.one('_count'));
    const offset = offsetParam(query.one('_offset'));
    const versions = await registry.history(c.get('owner'), id);
    const oldest = versions.at(-1);
    const kept = versions.filter((v) => since === undefined || Date.parse(v.updatedAt) >= since);
    const page = kept.slice(offset, offset + count);
    const url = (applied: string) => `${fhirBase}/Subscription/${id}/_history${applied}`;
    const link = [{ relation: 'self', url: url(query.applied()) }];
    if (count > 0 && offset + count < kept.length) {
      link.push({ relation: 'next', url: url(query.applied({ _offset: String(offset + count) })) });
    }
    return fhirResponse({
      resourceType: 'Bundle',
      type: 'history',
      total: kept.length,
      link,
      ...(page.length === 0
        ? {}
        : {
            entry: page.map((v) => {
              // The create, when it is still among the versions kept; every later one as an update.
              const created = v === oldest && v.updatedAt === v.createdAt;
              return {
                fullUrl: `${fhirBase}/Subscription/${id}`,
                resource: registry.render(v),
                request: created
                  ? { method: 'POST', url: 'Subscription' }
                  : { method: 'PUT', url: `Subscription/${id}` },
                response: {
                  status: created ? '201 Created' : '200 OK',
                  etag: `W/"${versionId(v)}"`,
                  lastModified: v.updatedAt,
                },
              };
            }),
          }),
    });
  });

  app.put('/fhir/Subscription/:id', async (c) => {
    const body = await readJsonBody(c, deps.maxBodyBytes);
    const { record, shownSecret } = await registry.update(
      c.get('owner'),
      c.req.param('id'),
      body,
      ifMatch(c.req.header('if-match')),
    );
    return preferredReturn(
      c,
      registry.render(record, { secret: shownSecret }),
      200,
      etag(record),
      shownSecret !== undefined,
      `Subscription/${record.id} updated`,
    );
  });

  app.delete('/fhir/Subscription/:id', async (c) => {
    const condition = c.req.header('if-match');
    try {
      await registry.delete(c.get('owner'), c.req.param('id'), ifMatch(condition));
    } catch (err) {
      // R4 http.html#delete: 204 also "if the resource does not exist at all", so a DELETE tried
      // again after a lost answer is no error. Another client's is answered the same, untouched.
      // With If-Match (`*` too) there is nothing to match: the 404 stays.
      if (!(err instanceof BrokerError && err.code === 'NOT_FOUND' && condition === undefined)) throw err;
    }
    return new Response(null, { status: 204 });
  });
}

/**
 * Whether the request came with a body: a length other than 0, or without a length (chunked) a
 * media type. `Content-Length: 0` is no body whatever the type (RFC 9110 §8.6): fhir-kit-client
 * POSTs an operation without inputs so, `Content-Type: application/fhir+json` and nothing after it.
 */
function sentBody(c: Context<Env>): boolean {
  const length = c.req.header('content-length');
  if (length !== undefined) return Number(length) !== 0;
  return c.req.header('content-type') !== undefined;
}

/** Values of one parameter, comma lists split; undefined when absent. `one`: a single value (more is a 400). */
interface ParameterSource {
  values(name: string): string[] | undefined;
  /**
   * Each occurrence's values, comma lists split: FHIR search ANDs repeats (`status=a&status=b`)
   * and ORs a comma list (`status=a,b`). Undefined when absent.
   */
  groups(name: string): string[][] | undefined;
  one(name: string): string | undefined;
}

/** The Subscription search parameters that select (`_id`, `status`, `url`), as a filter. */
function subscriptionFilter(query: ParameterSource): (s: SubscriptionRecord) => boolean {
  const ids = query.groups('_id');
  const statuses = query.groups('status')?.map((group) => group.map(statusCode));
  // `url` (uri): exact match on channel.endpoint, as the R4 Subscription-url SearchParameter defines it.
  const urls = query.groups('url');
  return (s) => everyHas(ids, s.id) && everyHas(statuses, s.status) && everyHas(urls, s.channel.endpoint);
}

/**
 * `If-None-Exist` (R4 http.html#ccreate): search parameters that select (`_id`, `status`, `url`),
 * as a filter. Any other parameter, or none, is a 400: ignored, it would create a duplicate or match
 * every subscription.
 */
function conditionalCreate(header: string | undefined): ((s: SubscriptionRecord) => boolean) | undefined {
  if (header === undefined) return undefined;
  const pairs = [...new URLSearchParams(header.trim().replace(/^(Subscription)?\?/, ''))].filter(([, v]) => v !== '');
  const other = [...new Set(pairs.map(([k]) => k).filter((k) => !CONDITION_PARAMETERS.includes(k)))];
  if (pairs.length === 0 || other.length > 0) {
    throw new BrokerError(
      'INVALID_PARAMETER',
      `If-None-Exist takes ${CONDITION_PARAMETERS.join(', ')}${other.length > 0 ? `, not ${other.join(', ').slice(0, 64)}` : ''}`,
    );
  }
  return subscriptionFilter(parameterSource(pairs));
}

const CONDITION_PARAMETERS = ['_id', 'status', 'url'];

/**
 * The answer to a create or update as `Prefer: return=` asks (R4 http.html "Managing Return
 * Content"): `representation` (the default), `minimal` (no body) or `OperationOutcome`. An answer
 * that shows a generated webhook secret carries the resource whatever is asked: it is the only time
 * the secret is shown.
 */
function preferredReturn(
  c: Context<Env>,
  resource: unknown,
  status: number,
  headers: Record<string, string>,
  showsSecret: boolean,
  outcome: string,
): Response {
  const asked = /return\s*=\s*(minimal|OperationOutcome)/i.exec(c.req.header('prefer') ?? '')?.[1]?.toLowerCase();
  if (showsSecret || asked === undefined) return fhirResponse(resource, status, headers);
  if (asked === 'minimal') return new Response(null, { status, headers });
  return fhirResponse(
    {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'information', code: 'informational', diagnostics: outcome }],
    },
    status,
    headers,
  );
}

/** Whether every group (an AND of ORs, see `groups`) has `value`; no groups, no condition. */
function everyHas(groups: readonly (readonly string[])[] | undefined, value: string | undefined): boolean {
  return groups === undefined || groups.every((group) => value !== undefined && group.includes(value));
}

/** R4's system of Subscription.status codes: `status` as a token may name it (`system|code`). */
const STATUS_SYSTEM = 'http://hl7.org/fhir/subscription-status';

/** A `status` token's code: `active`, or `http://hl7.org/fhir/subscription-status|active`. */
function statusCode(token: string): string {
  const bar = token.indexOf('|');
  if (bar < 0) return token;
  // Another system (or `|code`, no system) names no status: left as it is, it matches none.
  return token.slice(0, bar) === STATUS_SYSTEM ? token.slice(bar + 1) : token;
}

/**
 * An operation's input parameters: the query string, and for a POST with a body, a `Parameters`
 * resource (FHIR: every operation may be invoked by POST; clients such as HAPI's generic client do
 * by default). A body parameter's value is its `value[x]`, whatever the type.
 */
async function operationParams(c: Context<Env>, maxBytes: number): Promise<ParameterSource> {
  const pairs: [string, string][] = [...new URL(c.req.url).searchParams];
  if (c.req.method === 'POST' && sentBody(c)) {
    const body = (await readJsonBody(c, maxBytes)) as { resourceType?: unknown; parameter?: unknown } | null;
    if (body?.resourceType !== 'Parameters') {
      throw new BrokerError('INVALID_RESOURCE', 'The body of an operation must be a Parameters resource');
    }
    if (body.parameter !== undefined && !Array.isArray(body.parameter)) {
      throw new BrokerError('INVALID_RESOURCE', 'Parameters.parameter must be an array', {
        expression: 'Parameters.parameter',
      });
    }
    // Every input of these operations is a primitive: one given otherwise (a `resource`, `part`s,
    // no name) is refused, not skipped, since the answer would claim it applied.
    for (const [i, p] of ((body.parameter ?? []) as unknown[]).entries()) {
      const where = `Parameters.parameter[${i}]`;
      const param = (typeof p === 'object' && p !== null ? p : {}) as Record<string, unknown>;
      if (typeof param.name !== 'string') {
        throw new BrokerError('INVALID_RESOURCE', `${where} has no name`, { expression: where });
      }
      const key = Object.keys(param).find((k) => k.startsWith('value'));
      const value = key === undefined ? undefined : param[key];
      if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') {
        throw new BrokerError(
          'INVALID_RESOURCE',
          `${where} (${param.name.slice(0, 64)}) needs a value[x] of a primitive type (valueString, valueInteger, …)`,
          { expression: where },
        );
      }
      pairs.push([param.name, String(value)]);
    }
  }
  return parameterSource(pairs);
}

function valueSet(values: readonly string[] | undefined): ReadonlySet<string> | undefined {
  return values === undefined ? undefined : new Set(values);
}

function parameterSource(pairs: readonly [string, string][]): ParameterSource {
  const groups = (name: string): string[][] | undefined => {
    const found: string[][] = [];
    let count = 0;
    for (const [k, v] of pairs) {
      if (k !== name) continue;
      const group = splitValues(v);
      found.push(group);
      count += group.length;
      if (count > MAX_PARAMETER_VALUES) {
        throw new BrokerError('INVALID_PARAMETER', `At most ${MAX_PARAMETER_VALUES} values of ${name} per request`);
      }
    }
    return found.length === 0 ? undefined : found;
  };
  const values = (name: string): string[] | undefined => groups(name)?.flat();
  return {
    values,
    groups,
    one: (name) => {
      const all = values(name);
      if (all !== undefined && all.length > 1) {
        throw new BrokerError('INVALID_PARAMETER', `${name} takes one value, not ${all.length}`);
      }
      return all?.[0];
    },
  };
}

/**
 * A parameter's comma-separated values (any one matches). As FHIR search escapes them, `\,` is a
 * comma within a value (an endpoint URL may have one), and `\\`, `\$`, `\|` stand for themselves.
 */
function splitValues(text: string): string[] {
  const out: string[] = [];
  let value = '';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i] as string;
    const next = text[i + 1];
    if (ch === '\\' && next !== undefined && ',\\$|'.includes(next)) {
      value += next;
      i++;
    } else if (ch === ',') {
      out.push(value);
      value = '';
    } else {
      value += ch;
    }
  }
  out.push(value);
  return out;
}

/** Parameters of any FHIR interaction: `_format` (checked before routing) and `_pretty` (output is compact). */
const GENERAL_PARAMETERS = ['_format', '_pretty'];

interface SearchQuery extends ParameterSource {
  /** The query string of the parameters applied (`?a=b&…`, or ''), with `overrides` set. */
  applied(overrides?: Record<string, string>): string;
}

/**
 * Search parameters from the query string (and a POST `_search` form body). Unknown ones are
 * ignored, as FHIR search allows, and left out of the `self` link so it shows what was applied;
 * with `Prefer: handling=strict` they are refused instead.
 */
function searchQuery(c: Context<Env>, known: readonly string[], form?: URLSearchParams): SearchQuery {
  // "Empty parameters are not an error - they are just ignored" (FHIR search, Handling Errors).
  const pairs = [...new URL(c.req.url).searchParams, ...(form ?? [])].filter(([, v]) => v !== '');
  const unknown = [...new Set(pairs.map(([k]) => k).filter((k) => !known.includes(k)))];
  const strict = /handling\s*=\s*strict/i.test(c.req.header('prefer') ?? '');
  if (unknown.length > 0 && strict) {
    throw new BrokerError(
      'INVALID_PARAMETER',
      `Unsupported search parameter(s): ${unknown.join(', ')} (supported: ${known.join(', ')})`,
    );
  }
  const used = pairs.filter(([k]) => known.includes(k));
  return {
    ...parameterSource(used),
    applied(overrides = {}) {
      const out = new URLSearchParams(used.filter(([k]) => !(k in overrides)));
      for (const [k, v] of Object.entries(overrides)) out.set(k, v);
      const text = out.toString();
      return text === '' ? '' : `?${text}`;
    },
  };
}

const FORM = 'application/x-www-form-urlencoded';

/** A `_search` body: form-encoded parameters (none when there is no body), read within the size cap. */
async function readFormBody(c: Context<Env>, maxBytes: number): Promise<URLSearchParams> {
  if (!sentBody(c)) return new URLSearchParams();
  const contentType = c.req.header('content-type');
  const type = mediaType(contentType);
  if (type !== FORM) {
    throw new BrokerError('UNSUPPORTED_MEDIA_TYPE', `POST _search takes ${FORM}, not ${type === '' ? '(none)' : type}`);
  }
  // A form is percent-encoded UTF-8 (WHATWG URL): a form in another charset would be read garbled.
  const charset = contentType === undefined ? undefined : otherCharset(contentType);
  if (charset !== undefined) {
    throw new BrokerError(
      'UNSUPPORTED_MEDIA_TYPE',
      `POST _search takes a UTF-8 form, not charset ${charset.slice(0, 32)}`,
    );
  }
  return new URLSearchParams((await readBody(c, maxBytes)).toString('utf8'));
}

/** `_history?_since=`: an R4 instant, as epoch ms. */
function sinceParam(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const problem = instantProblem(value);
  if (problem !== undefined) {
    throw new BrokerError(
      'INVALID_PARAMETER',
      `_since ${JSON.stringify(value.slice(0, 64))} is not an instant: ${problem}`,
    );
  }
  return Date.parse(value);
}

/** Search page size: `_count` (default and maximum 1,000: more asks for a page of 1,000, as FHIR search lets a server). */
function countParam(value: string | undefined): number {
  if (value === undefined) return MAX_SEARCH_PAGE;
  if (!/^\d+$/.test(value)) throw new BrokerError('INVALID_PARAMETER', '_count must be a non-negative integer');
  return Math.min(Number(value), MAX_SEARCH_PAGE);
}

/**
 * `$events` `content`: the level to return instead of the subscription's own (empty or id-only).
 * The IG's OperationDefinition makes it "a hint ... and MAY be ignored": full-resource is ignored
 * (only a full-resource subscription's notifications were stored with their resources, and its
 * own content gives them); a code outside the value set is refused.
 */
function contentParam(value: string | undefined): PayloadContent | undefined {
  if (value === undefined || value === 'empty' || value === 'id-only') return value;
  if (value === 'full-resource') return undefined;
  throw new BrokerError(
    'INVALID_PARAMETER',
    `content must be empty, id-only or full-resource, not ${value.slice(0, 32)}`,
  );
}

function offsetParam(value: string | undefined): number {
  if (value === undefined) return 0;
  if (!/^\d{1,9}$/.test(value)) throw new BrokerError('INVALID_PARAMETER', '_offset must be a non-negative integer');
  return Number(value);
}

/** `ETag: W/"<versionId>"` (FHIR's weak ETag of the version) and `Last-Modified`. */
function etag(sub: SubscriptionRecord): Record<string, string> {
  return { etag: `W/"${versionId(sub)}"`, 'last-modified': new Date(sub.updatedAt).toUTCString() };
}

/**
 * The versions an `If-Match` names (`W/"3"`, `"3"` or `3`, or a list of them: any one matches, RFC
 * 9110 §13.1.1); undefined without one, or for `*` (any version: the route's own 404 covers a
 * missing subscription).
 */
function ifMatch(header: string | undefined): string[] | undefined {
  if (header === undefined || header.trim() === '' || header.trim() === '*') return undefined;
  return header.split(',').map((tag) =>
    tag
      .trim()
      .replace(/^W\//, '')
      .replace(/^"(.*)"$/, '$1'),
  );
}

function eventNumberParam(value: string | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d{1,15}$/.test(value)) throw new BrokerError('INVALID_PARAMETER', `${name} must be a non-negative integer`);
  return Number(value);
}

function capabilityStatement(deps: FhirRouteDeps, date: string): unknown {
  const fhirBase = `${deps.publicUrl}/fhir`;
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date,
    kind: 'instance',
    software: { name: 'fhir-subscription-broker', version: deps.version },
    implementation: { description: 'FHIR Subscriptions (R5 Backport IG) broker', url: fhirBase },
    fhirVersion: '4.0.1',
    format: ['json'],
    instantiates: ['http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4'],
    implementationGuide: [
      'http://hl7.org/fhir/uv/subscriptions-backport/ImplementationGuide/hl7.fhir.uv.subscriptions-backport|1.1.0',
    ],
    rest: [
      {
        mode: 'server',
        // Where websocket-channel clients connect (also returned by $get-ws-binding-token): the
        // broker's own extension, which clients already read, and R4's standard one.
        extension: [
          { url: BROKER_EXT.websocketUrl, valueUrl: deps.websocketUrl },
          { url: FHIR_EXT.websocket, valueUri: deps.websocketUrl },
        ],
        security: {
          // R4: "Server adds CORS headers when responding to requests" (BROKER_CORS_ORIGINS).
          cors: (deps.corsOrigins ?? []).length > 0,
          description: 'Authorization: Bearer <API key>. Each client sees only its own Subscriptions.',
        },
        resource: [
          {
            extension: deps.topics.all().map((t) => ({ url: BACKPORT_EXT.topicCanonical, valueCanonical: t.url })),
            type: 'Subscription',
            supportedProfile: [BACKPORT_PROFILE.subscription],
            interaction: ['create', 'read', 'vread', 'update', 'delete', 'history-instance', 'search-type'].map(
              (code) => ({ code }),
            ),
            // Every change makes a version; vread serves the current one and the last few before it.
            versioning: 'versioned-update',
            readHistory: true,
            // Ids are the broker's (POST): a PUT to an id that is nobody's is a 404, as one to another
            // client's is, so a PUT cannot tell whether an id is taken.
            updateCreate: false,
            // If-None-Exist on _id, status and url (a 412 when several match).
            conditionalCreate: true,
            searchParam: [
              { name: '_id', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Resource-id' },
              { name: 'status', type: 'token', definition: 'http://hl7.org/fhir/SearchParameter/Subscription-status' },
              { name: 'url', type: 'uri', definition: 'http://hl7.org/fhir/SearchParameter/Subscription-url' },
            ],
            operation: [
              {
                name: 'status',
                definition:
                  'http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status',
              },
              {
                name: 'events',
                definition:
                  'http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events',
              },
              {
                name: 'get-ws-binding-token',
                definition:
                  'http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-get-ws-binding-token',
              },
              {
                // HAPI FHIR's operation, on an instance (no R4 or IG definition exists: the broker's own canonical).
                name: 'expunge',
                definition: `${BROKER_BASE}/OperationDefinition/Subscription-expunge`,
                documentation:
                  'POST /Subscription/{id}/$expunge with expungePreviousVersions=true: forgets the earlier versions, keeps the current one.',
              },
            ],
          },
          // GET /fhir/SubscriptionTopic serves the topics too, but SubscriptionTopic is not an R4
          // resource type (the binding of `type` is required): on R4 the Backport IG advertises
          // topics as the topic-canonical extensions above.
        ],
      },
    ],
  };
}

/**
 * Resource bytes (UTF-8) one full-resource `$events` page carries at most, at least one
 * notification however large: on AWS the API function's answer, its body escaped once more in
 * Lambda's response, must stay under Lambda's 6 MB.
 */
const EVENTS_PAGE_RESOURCE_BYTES = 2 * 1024 * 1024;
/** Notifications read at a time for a full-resource page: up to 256 KiB each, never a thousand at once. */
const EVENTS_RESOURCE_READ = 16;

/**
 * The first notifications from `since` to `until` whose resources fit a page's budget, read a few
 * at a time; `cut`: the budget (not the range or the page's count) ended it.
 */
async function withinResourceBudget(
  store: Store,
  subscriptionId: string,
  since: number,
  until: number,
): Promise<{ notes: StoredNotification[]; cut: boolean }> {
  const notes: StoredNotification[] = [];
  let bytes = 0;
  for (let from = since; from <= until && notes.length < MAX_EVENTS_PAGE; ) {
    const want = Math.min(EVENTS_RESOURCE_READ, MAX_EVENTS_PAGE - notes.length);
    const read = await store.notificationsInRange(subscriptionId, from, until, want);
    for (const n of read) {
      const size = n.change.resource === undefined ? 0 : Buffer.byteLength(n.change.resource);
      if (notes.length > 0 && bytes + size > EVENTS_PAGE_RESOURCE_BYTES) return { notes, cut: true };
      bytes += size;
      notes.push(n);
    }
    const last = read.at(-1);
    if (read.length < want || last === undefined) break;
    from = last.eventNumber + 1;
  }
  return { notes, cut: false };
}
