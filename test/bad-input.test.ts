import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Broker, createBroker } from '../src/broker.js';
import { loadConfig } from '../src/config.js';
import { silentLogger } from '../src/observability/logger.js';
import { fixture, type Json, topicSubscription } from './support/fhir-client.js';
import { tempDir } from './support/temp-dirs.js';

/**
 * Bad input at the front door (`app.request`, in-process, real SQLite): each gets a clear
 * OperationOutcome with the documented status and code, and the store is left exactly as it was.
 */

const ALICE = 'alice-token-0123456789abcdef';
const BOB = 'bob-token-0123456789abcdef01';
const INGEST = 'ingest-token-0123456789abcdef';

describe('bad input', () => {
  let broker: Broker;
  let aliceSub: Json;

  beforeAll(async () => {
    const dataDir = tempDir('fsb-bad-');
    const config = loadConfig({
      BROKER_DATA_DIR: dataDir,
      BROKER_API_KEYS: `alice:${ALICE},bob:${BOB}`,
      BROKER_INGEST_TOKEN: INGEST,
      BROKER_MAX_BODY_BYTES: '4096',
      BROKER_MAX_INGEST_BYTES: '65536',
      // Allow-listed and resolved to loopback below: handshakes stay on this machine.
      BROKER_ENDPOINT_ALLOWLIST: 'hooks.example.com',
      BROKER_MAX_SUBSCRIPTIONS_PER_CLIENT: '3',
      // One handshake attempt: the quota test waits for its subscriptions' handshakes to be over.
      BROKER_HANDSHAKE_RETRY_DELAYS: 'none',
    });
    // DNS is the one injected part, answering like DNS would for these names.
    broker = await createBroker(config, {
      logger: silentLogger,
      resolver: async (host) => {
        if (host === 'hooks.example.com') return [{ address: '127.0.0.1', family: 4 }];
        if (host === 'internal.example.com') return [{ address: '10.1.2.3', family: 4 }];
        throw Object.assign(new Error('not found'), { code: 'ENOTFOUND' });
      },
    });
    const res = await call(
      'POST',
      '/fhir/Subscription',
      ALICE,
      topicSubscription('patient-change', 'https://hooks.example.com/a'),
    );
    expect(res.status).toBe(201);
    aliceSub = res.body;
  });

  afterAll(async () => broker?.close(0));

  async function call(
    method: string,
    path: string,
    token: string | undefined,
    body?: unknown,
    contentType = 'application/fhir+json',
  ) {
    const headers: Record<string, string> = {};
    if (token !== undefined) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers['content-type'] = contentType;
    const res = await broker.app.request(path, {
      method,
      headers,
      ...(body === undefined ? {} : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
    });
    const text = await res.text();
    return { status: res.status, body: (text === '' ? {} : JSON.parse(text)) as Json, headers: res.headers };
  }

  const snapshot = async () => JSON.stringify(await broker.store.listSubscriptions());

  function codeOf(outcome: Json): string {
    expect(outcome.resourceType).toBe('OperationOutcome');
    const issue = (outcome.issue as Json[])[0] as Json;
    expect(typeof issue.diagnostics).toBe('string');
    return (((issue.details as Json).coding as Json[])[0] as Json).code as string;
  }

  const valid = () => topicSubscription('patient-change', 'https://hooks.example.com/b');
  const cases: [string, () => Promise<{ status: number; body: Json }>, number, string][] = [
    [
      'malformed JSON',
      () => call('POST', '/fhir/Subscription', ALICE, '{"resourceType": "Subscription",'),
      400,
      'BAD_JSON',
    ],
    ['an empty body', () => call('POST', '/fhir/Subscription', ALICE, ''), 400, 'BAD_JSON'],
    [
      'the wrong media type',
      () => call('POST', '/fhir/Subscription', ALICE, valid(), 'text/plain'),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    ],
    [
      'XML',
      () => call('POST', '/fhir/Subscription', ALICE, '<Subscription/>', 'application/fhir+xml'),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    ],
    [
      'an oversize body',
      () => call('POST', '/fhir/Subscription', ALICE, { ...valid(), reason: 'x'.repeat(5000) }),
      413,
      'PAYLOAD_TOO_LARGE',
    ],
    [
      'another resource type',
      () => call('POST', '/fhir/Subscription', ALICE, { resourceType: 'Patient' }),
      400,
      'INVALID_RESOURCE',
    ],
    [
      'a missing channel',
      () => call('POST', '/fhir/Subscription', ALICE, { ...valid(), channel: undefined }),
      400,
      'INVALID_RESOURCE',
    ],
    [
      'an unknown topic',
      () =>
        call('POST', '/fhir/Subscription', ALICE, {
          ...valid(),
          criteria: 'https://example.org/SubscriptionTopic/nope',
        }),
      422,
      'UNKNOWN_TOPIC',
    ],
    [
      'an unsupported filter',
      () =>
        call(
          'POST',
          '/fhir/Subscription',
          ALICE,
          topicSubscription('patient-change', 'https://hooks.example.com/c', { filters: ['Patient?name=smith'] }),
        ),
      422,
      'UNSUPPORTED_FILTER',
    ],
    [
      'unsupported classic criteria',
      () =>
        call('POST', '/fhir/Subscription', ALICE, {
          resourceType: 'Subscription',
          reason: 'test',
          criteria: 'Observation?code=1234-5',
          channel: { type: 'rest-hook', endpoint: 'https://hooks.example.com/d' },
        }),
      422,
      'UNSUPPORTED_CRITERIA',
    ],
    [
      'full-resource content',
      () =>
        call(
          'POST',
          '/fhir/Subscription',
          ALICE,
          topicSubscription('patient-change', 'https://hooks.example.com/e', { content: 'full-resource' }),
        ),
      422,
      'UNSUPPORTED_CONTENT',
    ],
    [
      'an http endpoint',
      () =>
        call(
          'POST',
          '/fhir/Subscription',
          ALICE,
          topicSubscription('patient-change', 'http://elsewhere.example.com/f'),
        ),
      422,
      'INVALID_ENDPOINT',
    ],
    ...(
      [
        'https://127.0.0.1/hook',
        'https://10.0.0.7/hook',
        'https://169.254.169.254/latest/meta-data/',
        'https://[::1]/hook',
        'https://[::ffff:127.0.0.1]/hook',
        'https://internal.example.com/hook',
      ] as const
    ).map((endpoint): [string, () => Promise<{ status: number; body: Json }>, number, string] => [
      `a private endpoint ${endpoint}`,
      () => call('POST', '/fhir/Subscription', ALICE, topicSubscription('patient-change', endpoint)),
      422,
      'ENDPOINT_FORBIDDEN',
    ]),
    ['no token', () => call('POST', '/fhir/Subscription', undefined, valid()), 401, 'UNAUTHORIZED'],
    [
      'a wrong token',
      () => call('POST', '/fhir/Subscription', 'not-a-real-token-at-all', valid()),
      401,
      'UNAUTHORIZED',
    ],
    ['the ingest token on /fhir', () => call('GET', '/fhir/Subscription', INGEST), 401, 'UNAUTHORIZED'],
    [
      'another client’s subscription (read)',
      () => call('GET', `/fhir/Subscription/${aliceSub.id}`, BOB),
      404,
      'NOT_FOUND',
    ],
    [
      'another client’s subscription (update)',
      () => call('PUT', `/fhir/Subscription/${aliceSub.id}`, BOB, { ...valid(), id: aliceSub.id }),
      404,
      'NOT_FOUND',
    ],
    [
      // No update-as-create (CapabilityStatement updateCreate false): the same answer as above.
      'an update of an id that is nobody’s',
      () => call('PUT', '/fhir/Subscription/nobody-has-this-id', ALICE, { ...valid(), id: 'nobody-has-this-id' }),
      404,
      'NOT_FOUND',
    ],
    [
      'an id that does not match the URL',
      () => call('PUT', `/fhir/Subscription/${aliceSub.id}`, ALICE, { ...valid(), id: 'other-id' }),
      400,
      'ID_MISMATCH',
    ],
    [
      'an update whose body has no id',
      () => call('PUT', `/fhir/Subscription/${aliceSub.id}`, ALICE, valid()),
      400,
      'ID_MISMATCH',
    ],
    [
      'a client setting status error',
      () => call('PUT', `/fhir/Subscription/${aliceSub.id}`, ALICE, { ...valid(), id: aliceSub.id, status: 'error' }),
      422,
      'INVALID_STATUS_CHANGE',
    ],
    ['an unknown subscription', () => call('GET', '/fhir/Subscription/does-not-exist', ALICE), 404, 'NOT_FOUND'],
    [
      'a method the route does not allow',
      () => call('PATCH', `/fhir/Subscription/${aliceSub.id}`, ALICE, valid()),
      405,
      'METHOD_NOT_ALLOWED',
    ],
    [
      'a bad $events range',
      () => call('GET', `/fhir/Subscription/${aliceSub.id}/$events?eventsSinceNumber=x`, ALICE),
      400,
      'INVALID_PARAMETER',
    ],
  ];

  it.each(cases)('refuses %s with an OperationOutcome and changes nothing', async (_name, run, status, code) => {
    const before = await snapshot();
    const res = await run();
    expect([res.status, codeOf(res.body)]).toEqual([status, code]);
    expect(await snapshot()).toBe(before);
  });

  it('names the filter it cannot honour and why', async () => {
    const res = await call(
      'POST',
      '/fhir/Subscription',
      ALICE,
      topicSubscription('patient-change', 'https://hooks.example.com/g', { filters: ['Patient?deceased=true'] }),
    );
    const issue = (res.body.issue as Json[])[0] as Json;
    expect(issue.diagnostics).toContain('deceased');
    expect(issue.diagnostics).toContain('canFilterBy');
    expect(issue.expression).toEqual(['Subscription._criteria.extension']);
  });

  it('refuses a content filter the topic offers when the broker does not read resources (BROKER_FHIR_READ unset)', async () => {
    const before = await snapshot();
    const res = await call(
      'POST',
      '/fhir/Subscription',
      ALICE,
      topicSubscription('patient-change', 'https://hooks.example.com/g', { filters: ['Patient?birthdate=2000'] }),
    );
    expect([res.status, codeOf(res.body)]).toEqual([422, 'UNSUPPORTED_FILTER']);
    const issue = (res.body.issue as Json[])[0] as Json;
    expect(issue.diagnostics).toContain('birthdate is decided on the resource');
    expect(issue.diagnostics).toContain('BROKER_FHIR_READ');
    expect(await snapshot()).toBe(before);
  });

  describe('POST /events', () => {
    const post = (body: unknown, token: string | null = INGEST, contentType = 'application/json') =>
      call('POST', '/events', token ?? undefined, body, contentType);

    it.each([
      ['no token', () => post(fixture('healthlake-create-patient'), null), 401, 'UNAUTHORIZED'],
      [
        'an API key instead of the ingest token',
        () => post(fixture('healthlake-create-patient'), ALICE),
        401,
        'UNAUTHORIZED',
      ],
      ['malformed JSON', () => post('[{"id":'), 400, 'BAD_JSON'],
      [
        'the wrong media type',
        () => post(fixture('healthlake-create-patient'), INGEST, 'text/plain'),
        415,
        'UNSUPPORTED_MEDIA_TYPE',
      ],
      [
        'a body over the limit',
        () => post(Array.from({ length: 100 }, () => fixture('healthlake-create-patient'))),
        413,
        'PAYLOAD_TOO_LARGE',
      ],
      ['more than 1,000 events', () => post(Array.from({ length: 1001 }, () => ({}))), 413, 'TOO_MANY_EVENTS'],
      ['a string', () => post('"hello"'), 400, 'INVALID_EVENT'],
    ] as [string, () => Promise<{ status: number; body: Json }>, number, string][])(
      'refuses %s',
      async (_name, run, status, code) => {
        const res = await run();
        expect([res.status, codeOf(res.body)]).toEqual([status, code]);
      },
    );

    it('refuses a batch with one malformed event whole, so its good events stay unaccepted', async () => {
      const good = { ...fixture('healthlake-create-patient'), id: 'batch-good-1' };
      const res = await post([good, { id: 'no-source' }]);
      expect(res.status).toBe(400);
      expect(codeOf(res.body)).toBe('INVALID_EVENT');
      expect(((res.body.issue as Json[])[0] as Json).diagnostics).toContain('event [1]');
      // Nothing of the refused batch was stored: the good event is new when it comes again.
      expect((await post(good)).body).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    });
  });
  it('refuses an EventBridge id that is not printable ASCII, so ids differing in a lone surrogate are never one', async () => {
    const detail = fixture('healthlake-update-patient').detail as Json;
    for (const id of ['evt-\ud800', 'evt-\udc00', 'evt\t1', 'évt-1']) {
      const res = await call('POST', '/events', INGEST, { ...fixture('healthlake-update-patient'), id, detail });
      expect([res.status, codeOf(res.body)]).toEqual([400, 'INVALID_EVENT']);
      expect(((res.body.issue as Json[])[0] as Json).diagnostics).toBe('event: /id must be printable ASCII');
    }
    // A space is printable: another sender's ids may have them.
    for (const id of ['evt-1', 'replay 2026-11-27 #1']) {
      const plain = await call('POST', '/events', INGEST, { ...fixture('healthlake-update-patient'), id, detail });
      expect(plain.body).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    }
  });

  it('refuses a subscription beyond the per-client quota, for that client only', async () => {
    const ids: string[] = [];
    for (const n of [1, 2]) {
      const res = await call(
        'POST',
        '/fhir/Subscription',
        ALICE,
        topicSubscription('patient-change', `https://hooks.example.com/q${n}`),
      );
      expect(res.status).toBe(201);
      ids.push(String(res.body.id));
    }
    // Their handshakes (nothing listens on 127.0.0.1:443) must be over before the snapshot: each
    // moves its subscription to `error`, a change the refused create has nothing to do with.
    const settled = async () => (await broker.store.listSubscriptions('alice')).filter((s) => ids.includes(s.id));
    const deadline = Date.now() + 10_000;
    while ((await settled()).some((s) => s.status === 'requested')) {
      if (Date.now() > deadline) throw new Error('the handshakes did not end within 10 s');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const before = await snapshot();
    const over = await call(
      'POST',
      '/fhir/Subscription',
      ALICE,
      topicSubscription('patient-change', 'https://hooks.example.com/q3'),
    );
    expect([over.status, codeOf(over.body)]).toEqual([422, 'QUOTA_EXCEEDED']);
    expect(await snapshot()).toBe(before);
    const bobs = await call(
      'POST',
      '/fhir/Subscription',
      BOB,
      topicSubscription('patient-change', 'https://hooks.example.com/b1'),
    );
    expect(bobs.status).toBe(201);
  });
});
