import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Broker, type BrokerOverrides, createBroker } from '../../src/broker.js';
import { loadConfig } from '../../src/config.js';
import type { Json } from './fhir-client.js';
import { RecordingLogger } from './recording-logger.js';

/**
 * A broker built in-process (real SQLite in a temp dir, real sockets to receivers), driven through
 * `app.request()`: fast, and with direct access to its parts for exact assertions.
 */

export const TOKENS = {
  alice: 'alice-token-0123456789abcdef',
  bob: 'bob-token-0123456789abcdef01',
  ingest: 'ingest-token-0123456789abcdef',
} as const;

export interface TestBroker {
  readonly broker: Broker;
  readonly logger: RecordingLogger;
  call(method: string, path: string, body?: unknown, token?: string): Promise<{ status: number; body: Json }>;
  create(sub: Json, token?: string): Promise<Json>;
  post(events: unknown): Promise<Json>;
}

/** An answer as a test reads it: the body as text, and parsed (`{}` when there is none). */
export interface RawAnswer {
  readonly status: number;
  readonly text: string;
  readonly body: Json;
  readonly headers: Headers;
}

/**
 * A request to `t`'s app with any headers: `body` sent as FHIR JSON (a string as it is), `raw`
 * as it is with no Content-Type of its own; alice's token unless `token` says otherwise.
 */
export async function request(
  t: TestBroker,
  method: string,
  path: string,
  options: { body?: unknown; raw?: string; token?: string; headers?: Record<string, string> } = {},
): Promise<RawAnswer> {
  const { body, raw, token = TOKENS.alice, headers = {} } = options;
  const res = await t.broker.app.request(path, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      ...(body === undefined ? {} : { 'content-type': 'application/fhir+json' }),
      ...headers,
    },
    ...(body === undefined ? {} : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
    ...(raw === undefined ? {} : { body: raw }),
  });
  const text = await res.text();
  return { status: res.status, text, body: (text === '' ? {} : JSON.parse(text)) as Json, headers: res.headers };
}

export async function inProcessBroker(
  env: Record<string, string> = {},
  overrides: BrokerOverrides = {},
): Promise<TestBroker> {
  const logger = new RecordingLogger();
  const dataDir = mkdtempSync(join(tmpdir(), 'fsb-ip-'));
  const config = loadConfig({
    BROKER_DATA_DIR: dataDir,
    BROKER_API_KEYS: `alice:${TOKENS.alice},bob:${TOKENS.bob}`,
    BROKER_INGEST_TOKEN: TOKENS.ingest,
    BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
    BROKER_PUBLIC_URL: 'http://broker.test',
    ...env,
  });
  const broker = await createBroker(config, { logger, ...overrides });
  // Closing it removes its data directory (every test run left one per broker in the temp dir).
  const close = broker.close;
  broker.close = async (graceMs) => {
    try {
      await close(graceMs);
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  };
  await broker.start();
  const call = async (method: string, path: string, body?: unknown, token: string = TOKENS.alice) => {
    const res = await broker.app.request(path, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/fhir+json' }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    const text = await res.text();
    return { status: res.status, body: (text === '' ? {} : JSON.parse(text)) as Json };
  };
  return {
    broker,
    logger,
    call,
    async create(sub, token) {
      const res = await call('POST', '/fhir/Subscription', sub, token);
      if (res.status !== 201) throw new Error(`create failed ${res.status}: ${JSON.stringify(res.body)}`);
      return res.body;
    },
    async post(events) {
      const res = await call('POST', '/events', events, TOKENS.ingest);
      if (res.status !== 202) throw new Error(`ingest failed ${res.status}: ${JSON.stringify(res.body)}`);
      return res.body;
    },
  };
}

export function secretOf(sub: Json): string {
  const ext = ((sub.channel as Json).extension as Json[] | undefined)?.find((e) =>
    String(e.url).endsWith('/webhook-secret'),
  );
  if (typeof ext?.valueString !== 'string') throw new Error('no webhook secret in the create response');
  return ext.valueString;
}
