import type { Context, Hono } from 'hono';
import { BrokerError } from '../core/errors.js';
import { BACKPORT_EXT, BACKPORT_PROFILE, BROKER_EXT } from '../core/fhir-urls.js';
import { buildNotificationBundle, buildStatusBundle } from '../core/notification.js';
import type { TopicCatalog } from '../core/topics.js';
import type { Clock, IdSource, SubscriptionRecord } from '../core/types.js';
import type { BindingTokens } from '../delivery/ws-binding-token.js';
import type { SubscriptionRegistry } from '../service/subscription-registry.js';
import type { Store } from '../store/store.js';
import type { ApiKeyAuth } from './auth.js';
import { readJsonBody } from './body.js';
import { fhirResponse } from './outcome.js';

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
}

/** 100: subscriptions one binding token may name (a socket binds them all at once). */
const MAX_BINDING_SUBSCRIPTIONS = 100;

/** 1,000: the most stored notifications one `$events` call returns; page with eventsSinceNumber. */
const MAX_EVENTS_PAGE = 1000;

type Env = { Variables: { owner: string } };

export function mountFhirRoutes(app: Hono<Env>, deps: FhirRouteDeps): void {
  const { registry, topics, auth } = deps;
  const fhirBase = `${deps.publicUrl}/fhir`;
  const now = (): string => new Date(deps.clock.now()).toISOString();
  const ctx = () => ({ fhirBase, newId: () => deps.ids.uuid(), timestamp: now() });

  app.get('/fhir/metadata', () => fhirResponse(capabilityStatement(deps, now())));

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

  app.get('/fhir/SubscriptionTopic', () => {
    const all = topics.all();
    return fhirResponse({
      resourceType: 'Bundle',
      type: 'searchset',
      total: all.length,
      link: [{ relation: 'self', url: `${fhirBase}/SubscriptionTopic` }],
      entry: all.map((t) => ({
        fullUrl: `${fhirBase}/SubscriptionTopic/${t.id}`,
        resource: t.resource,
        search: { mode: 'match' },
      })),
    });
  });
  app.get('/fhir/SubscriptionTopic/:id', (c) => {
    const topic = topics.byId(c.req.param('id'));
    if (topic === undefined) throw new BrokerError('NOT_FOUND', `SubscriptionTopic/${c.req.param('id')} not found`);
    return fhirResponse(topic.resource);
  });

  app.post('/fhir/Subscription', async (c) => {
    const body = await readJsonBody(c, deps.maxBodyBytes);
    const { record, generatedSecret } = await registry.create(c.get('owner'), body);
    const location = `${fhirBase}/Subscription/${record.id}`;
    return fhirResponse(
      registry.render(record, generatedSecret === undefined ? {} : { secret: generatedSecret }),
      201,
      {
        location,
      },
    );
  });

  app.get('/fhir/Subscription', async (c) => {
    const ids = c.req.queries('_id')?.flatMap((v) => v.split(','));
    const statuses = c.req.queries('status')?.flatMap((v) => v.split(','));
    const subs = (await registry.search(c.get('owner'))).filter(
      (s) => (ids === undefined || ids.includes(s.id)) && (statuses === undefined || statuses.includes(s.status)),
    );
    return fhirResponse({
      resourceType: 'Bundle',
      type: 'searchset',
      total: subs.length,
      link: [{ relation: 'self', url: `${fhirBase}/Subscription` }],
      entry: subs.map((s) => ({
        fullUrl: `${fhirBase}/Subscription/${s.id}`,
        resource: registry.render(s),
        search: { mode: 'match' },
      })),
    });
  });

  app.get('/fhir/Subscription/$status', async (c) => {
    const ids = c.req.queries('id')?.flatMap((v) => v.split(','));
    const statuses = c.req.queries('status')?.flatMap((v) => v.split(','));
    const subs = (await registry.search(c.get('owner'))).filter(
      (s) => (ids === undefined || ids.includes(s.id)) && (statuses === undefined || statuses.includes(s.status)),
    );
    return fhirResponse(buildStatusBundle(subs, ctx()));
  });

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
  /** Type-level POST may name the subscriptions in a Parameters body (`id` parameters). */
  const idsFromBody = async (c: Context<Env>): Promise<string[] | undefined> => {
    if (c.req.header('content-type') === undefined) return undefined;
    const body = (await readJsonBody(c, deps.maxBodyBytes)) as { resourceType?: unknown; parameter?: unknown };
    if (body.resourceType !== 'Parameters')
      throw new BrokerError('INVALID_RESOURCE', 'The body must be a Parameters resource');
    const params = Array.isArray(body.parameter)
      ? (body.parameter as { name?: unknown; valueString?: unknown; valueId?: unknown }[])
      : [];
    const ids = params.filter((p) => p.name === 'id').map((p) => String(p.valueString ?? p.valueId ?? ''));
    return ids.length === 0 ? undefined : ids;
  };
  const queryIds = (c: Context<Env>) => c.req.queries('id')?.flatMap((v) => v.split(','));
  app.get('/fhir/Subscription/$get-ws-binding-token', (c) => bindingToken(c.get('owner'), queryIds(c)));
  app.post('/fhir/Subscription/$get-ws-binding-token', async (c) =>
    bindingToken(c.get('owner'), (await idsFromBody(c)) ?? queryIds(c)),
  );
  app.get('/fhir/Subscription/:id/$get-ws-binding-token', (c) => bindingToken(c.get('owner'), [c.req.param('id')]));
  app.post('/fhir/Subscription/:id/$get-ws-binding-token', (c) => bindingToken(c.get('owner'), [c.req.param('id')]));

  app.get('/fhir/Subscription/:id/$status', async (c) => {
    const sub = await registry.read(c.get('owner'), c.req.param('id'));
    return fhirResponse(buildStatusBundle([sub], ctx()));
  });

  app.get('/fhir/Subscription/:id/$events', async (c) => {
    const sub = await registry.read(c.get('owner'), c.req.param('id'));
    const since = eventNumberParam(c.req.query('eventsSinceNumber'), 'eventsSinceNumber') ?? 1;
    const until = eventNumberParam(c.req.query('eventsUntilNumber'), 'eventsUntilNumber') ?? sub.eventsSinceStart;
    const notes = await deps.store.notificationsInRange(sub.id, since, until, MAX_EVENTS_PAGE);
    const content =
      sub.channel.content === 'empty' && c.req.query('content') === 'id-only' ? 'id-only' : sub.channel.content;
    return fhirResponse(buildNotificationBundle(sub, 'query-event', notes, content, ctx()));
  });

  app.get('/fhir/Subscription/:id', async (c) => {
    const sub = await registry.read(c.get('owner'), c.req.param('id'));
    return fhirResponse(registry.render(sub), 200, etag(sub));
  });

  app.put('/fhir/Subscription/:id', async (c) => {
    const body = await readJsonBody(c, deps.maxBodyBytes);
    const sub = await registry.update(c.get('owner'), c.req.param('id'), body);
    return fhirResponse(registry.render(sub), 200, etag(sub));
  });

  app.delete('/fhir/Subscription/:id', async (c) => {
    await registry.delete(c.get('owner'), c.req.param('id'));
    return new Response(null, { status: 204 });
  });
}

function etag(sub: SubscriptionRecord): Record<string, string> {
  return { 'last-modified': new Date(sub.updatedAt).toUTCString() };
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
        // Where websocket-channel clients connect (also returned by $get-ws-binding-token).
        extension: [{ url: BROKER_EXT.websocketUrl, valueUrl: deps.websocketUrl }],
        security: {
          description: 'Authorization: Bearer <API key>. Each client sees only its own Subscriptions.',
        },
        resource: [
          {
            extension: deps.topics.all().map((t) => ({ url: BACKPORT_EXT.topicCanonical, valueCanonical: t.url })),
            type: 'Subscription',
            supportedProfile: [BACKPORT_PROFILE.subscription],
            interaction: ['create', 'read', 'update', 'delete', 'search-type'].map((code) => ({ code })),
            searchParam: [
              { name: '_id', type: 'token' },
              { name: 'status', type: 'token' },
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
            ],
          },
          {
            type: 'SubscriptionTopic',
            interaction: [{ code: 'read' }, { code: 'search-type' }],
          },
        ],
      },
    ],
  };
}
