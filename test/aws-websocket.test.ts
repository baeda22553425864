import { randomUUID } from 'node:crypto';
import { ApiGatewayManagementApiClient } from '@aws-sdk/client-apigatewaymanagementapi';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AwsBroker, createAwsBroker } from '../src/aws/aws-broker.js';
import { createHandlers, type Handlers } from '../src/aws/handlers.js';
import type { BrokerOverrides } from '../src/broker.js';
import type { loadConfig } from '../src/config.js';
import { ensureTables } from '../src/store/dynamodb/tables.js';
import { ManagementApiDouble, type RecordedRequest } from './support/aws-doubles.js';
import { DUMMY_CREDENTIALS, type DynamoDbLocal, LOCAL_REGION, startDynamoDbLocal } from './support/dynamodb-local.js';
import { eventLike, eventNumbers, type Json, statusOf } from './support/fhir-client.js';
import { httpApiEvent } from './support/http-api-event.js';
import { LAMBDA_TOKENS, lambdaConfig, websocketSubscription, wsEvent } from './support/lambda-stack.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * The WebSocket functions on DynamoDB Local with a double of the API Gateway management API:
 * binds in a warm container whose subscriptions were read before the subscription existed, and
 * pushes API Gateway refuses (a throttled PostToConnection) to one connection of several or in
 * the middle of a catch-up.
 */

const ALICE = LAMBDA_TOKENS.alice;
const context = {} as Context;

/** The management API double, refusing posts as throttled (429 LimitExceededException) where `throttle` says. */
class ThrottlingManagementApi extends ManagementApiDouble {
  throttle: (connectionId: string, body: string) => boolean = () => false;

  static async startThrottling(): Promise<ThrottlingManagementApi> {
    const d = new ThrottlingManagementApi();
    await d.listen();
    return d;
  }

  protected override answer(req: RecordedRequest) {
    const id = decodeURIComponent(req.path.replace(/^\/@connections\//, ''));
    if (req.method === 'POST' && this.live.has(id) && this.throttle(id, req.body)) {
      return {
        status: 429,
        headers: { 'content-type': 'application/json', 'x-amzn-errortype': 'LimitExceededException' },
        body: JSON.stringify({ message: 'Rate exceeded' }),
      };
    }
    return super.answer(req);
  }
}

const ws = wsEvent;

/** A posted bundle's type and event numbers (`handshake []`, `event-notification [2]`); any other text as it is. */
const describePost = (body: string): string => {
  if (!body.startsWith('{')) return body;
  const bundle = JSON.parse(body) as Json;
  return `${statusOf(bundle).params.get('type')?.valueCode} [${eventNumbers(bundle).join(',')}]`;
};

describe('WebSocket functions on DynamoDB Local', () => {
  let local: DynamoDbLocal;
  let management: ThrottlingManagementApi;
  let config: ReturnType<typeof loadConfig>;
  const brokers: AwsBroker[] = [];
  const logger = new RecordingLogger();

  /** A broker as a fresh Lambda container builds it: same tables, its own caches. */
  const container = (overrides: BrokerOverrides = {}): Promise<AwsBroker> =>
    createAwsBroker({
      config,
      dynamodb: local.client,
      management: new ApiGatewayManagementApiClient({
        endpoint: management.url,
        region: LOCAL_REGION,
        credentials: DUMMY_CREDENTIALS,
        // A refused post is the SDK's last answer (its retries of a throttled one, not waited through here).
        maxAttempts: 1,
      }),
      overrides: { logger, ...overrides },
    }).then((b) => {
      brokers.push(b);
      return b;
    });

  async function api(via: Handlers, method: string, path: string, body?: unknown) {
    const res = await via.api(
      httpApiEvent(method, path, { token: ALICE, body }) as unknown as Parameters<Handlers['api']>[0],
      context,
    );
    const text = 'body' in res && typeof res.body === 'string' ? res.body : '';
    return { status: res.statusCode, body: (text === '' ? {} : JSON.parse(text)) as Json };
  }
  const tokenOf = async (via: Handlers, id: string) => {
    const res = await api(via, 'POST', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    return ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
  };
  /** Opens `connectionId` through `$connect` and sends `body` through `$default`. */
  const open = async (via: Handlers, connectionId: string, body: string, headers?: Record<string, string>) => {
    management.live.add(connectionId);
    expect(await via.connect(ws(connectionId, '$connect', headers === undefined ? {} : { headers }))).toEqual({
      statusCode: 200,
    });
    expect(await via.message(ws(connectionId, '$default', { body }))).toEqual({ statusCode: 200 });
  };
  const deletes = (connectionId: string) =>
    management.requests.filter((r) => r.method === 'DELETE' && r.path === `/@connections/${connectionId}`).length;

  beforeAll(async () => {
    local = await startDynamoDbLocal();
    management = await ThrottlingManagementApi.startThrottling();
    const prefix = `aws-ws-${randomUUID().slice(0, 8)}-`;
    await ensureTables(local.client, prefix);
    config = lambdaConfig(prefix);
  });

  afterAll(async () => {
    for (const b of brokers) await b.close(0).catch(() => undefined);
    await management?.close();
    await local?.stop();
  });

  it('binds in a warm WebSocket container a subscription created after it read the subscriptions', async () => {
    // The WebSocket container's clock stands still: its subscriptions, read at its first message, are
    // not re-read (they are every 5 s), however long this test takes.
    const frozen = Date.now();
    const wsFn = createHandlers(container({ clock: { now: () => frozen } }));
    const apiFn = createHandlers(container());
    await open(wsFn, 'warm-up', 'unbind');

    // Created through the API function a moment later: a topic-based one and a classic R4 one.
    const id = (await api(apiFn, 'POST', '/fhir/Subscription', websocketSubscription('fresh-p'))).body.id as string;
    const r4 = (
      await api(apiFn, 'POST', '/fhir/Subscription', {
        resourceType: 'Subscription',
        reason: 'test',
        criteria: 'Patient?_id=fresh-r4',
        channel: { type: 'websocket' },
      })
    ).body.id as string;
    await open(wsFn, 'fresh-token', `bind-with-token ${await tokenOf(apiFn, id)}`);
    await open(wsFn, 'fresh-r4', `bind ${r4}`, { Authorization: `Bearer ${ALICE}` });

    expect(management.posted('fresh-token').map(describePost)).toEqual(['handshake []']);
    expect(management.posted('fresh-r4')).toEqual([`bound ${r4}`]);
    expect([deletes('fresh-token'), deletes('fresh-r4')]).toEqual([0, 0]);
  });

  it('refuses in a warm WebSocket container a subscription deleted elsewhere a moment ago', async () => {
    const apiFn = createHandlers(container());
    const id = (await api(apiFn, 'POST', '/fhir/Subscription', websocketSubscription('gone-p'))).body.id as string;
    const token = await tokenOf(apiFn, id);
    // The WebSocket container reads the subscriptions (this one included) and its clock stands still.
    const frozen = Date.now();
    const wsFn = createHandlers(container({ clock: { now: () => frozen } }));
    await open(wsFn, 'warm-up-2', 'unbind');
    expect((await api(apiFn, 'DELETE', `/fhir/Subscription/${id}`)).status).toBe(204);

    await open(wsFn, 'stale-token', `bind-with-token ${token}`);
    expect(management.posted('stale-token')).toEqual([`error unknown subscription ${id}`]);
    expect(deletes('stale-token')).toBe(1);
  });

  it('closes a connection whose push is refused while another got it; it catches up on its next bind', async () => {
    const broker = await container();
    const fn = createHandlers(Promise.resolve(broker));
    const id = (await api(fn, 'POST', '/fhir/Subscription', websocketSubscription('tabs-p'))).body.id as string;
    await open(fn, 'tab-a', `bind-with-token ${await tokenOf(fn, id)}`);
    await open(fn, 'tab-b', `bind-with-token ${await tokenOf(fn, id)}`);

    management.throttle = (connectionId) => connectionId === 'tab-b';
    await fn.events(eventLike('healthlake-update-patient', 'tabs-1', 'tabs-p'));
    management.throttle = () => false;
    // tab-a has it, so it is delivered (not retried to tab-a); tab-b is closed and no longer bound.
    expect(management.posted('tab-a').map(describePost)).toEqual(['handshake []', 'event-notification [1]']);
    const [stored] = await broker.store.notificationsInRange(id, 1, 1, 1);
    expect(stored?.state).toBe('delivered');
    expect(deletes('tab-b')).toBe(1);
    expect((await broker.bindings.bindingsFor(id)).map((b) => b.connectionId)).toEqual(['tab-a']);

    // Its client reconnects and binds from the last event it saw: the catch-up has the one it missed.
    const token = await tokenOf(fn, id);
    await open(fn, 'tab-b2', JSON.stringify({ type: 'bind-with-token', payload: { token, lastEventNumber: 0 } }));
    expect(management.posted('tab-b2').map(describePost)).toEqual(['handshake []', 'event-notification [1]']);
  });

  it('closes a connection that refuses a push of its catch-up, instead of leaving it bound past a gap', async () => {
    const broker = await container();
    const fn = createHandlers(Promise.resolve(broker));
    const id = (await api(fn, 'POST', '/fhir/Subscription', websocketSubscription('gap-p'))).body.id as string;
    for (let i = 1; i <= 4; i++) await fn.events(eventLike('healthlake-update-patient', `gap-${i}`, 'gap-p'));

    // Event 2 of the catch-up is refused.
    management.throttle = (connectionId, body) =>
      connectionId === 'gap-c' && describePost(body) === 'event-notification [2]';
    const token = await tokenOf(fn, id);
    await open(fn, 'gap-c', JSON.stringify({ type: 'bind-with-token', payload: { token, lastEventNumber: 0 } }));
    management.throttle = () => false;
    const posts = ['handshake []', 'event-notification [1]', 'event-notification [2]'];
    expect(management.posted('gap-c').map(describePost)).toEqual(posts);
    expect(deletes('gap-c')).toBe(1);
    expect(await broker.bindings.bindingsOf('gap-c')).toEqual([]);
    // Nothing more goes to it: the next event is not pushed past the gap.
    await fn.events(eventLike('healthlake-update-patient', 'gap-5', 'gap-p'));
    expect(management.posted('gap-c').map(describePost)).toEqual(posts);
  });
});
