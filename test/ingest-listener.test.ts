import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { getRequestListener } from '@hono/node-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixture, type Json } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';

/**
 * `npm start` serves `POST /events` with the ingest listener (src/http/ingest-listener.ts) ahead of
 * the hono app. Here one broker is served through both doors, each on a real server: every request
 * goes through both, and status, the headers that matter and the body must be the same, for the
 * good and the bad requests alike; a refused request must store nothing.
 */

const MAX_INGEST_BYTES = 4096;

interface Answer {
  readonly status: number;
  readonly contentType: string | null;
  readonly wwwAuthenticate: string | null;
  /** `close` when the request was refused before its body was read: not kept alive to read it. */
  readonly connection: string | null;
  readonly body: unknown;
}

interface Case {
  readonly name: string;
  readonly headers: Record<string, string>;
  /** The body for a door; events get ids of their own per door so neither sees the other's as duplicates. */
  readonly body: (door: string) => string;
  readonly status: number;
  /** Refused before its body is read: the answer closes the connection. */
  readonly unread?: true;
}

const auth = { authorization: `Bearer ${TOKENS.ingest}` };
const json = { ...auth, 'content-type': 'application/json' };

/** The fixture as another API call: its own EventBridge id and CloudTrail eventID. */
function event(name: string, id: string): Json {
  const f = fixture(name);
  return { ...f, id, ...(f.detail === undefined ? {} : { detail: { ...(f.detail as Json), eventID: id } }) };
}

const CASES: readonly Case[] = [
  {
    name: 'one event',
    headers: json,
    body: (d) => JSON.stringify(event('healthlake-update-patient', `one-${d}`)),
    status: 202,
  },
  {
    name: 'an array with an ignored event',
    headers: { ...auth, 'content-type': 'application/fhir+json; charset=utf-8' },
    body: (d) =>
      JSON.stringify([
        event('healthlake-create-patient', `arr-1-${d}`),
        event('healthlake-read-patient', `arr-2-${d}`),
      ]),
    status: 202,
  },
  {
    name: 'a duplicate',
    headers: json,
    body: (d) => JSON.stringify(event('healthlake-update-patient', `one-${d}`)),
    status: 202,
  },
  {
    name: 'no credentials',
    headers: { 'content-type': 'application/json' },
    body: (d) => JSON.stringify(event('healthlake-update-patient', `noauth-${d}`)),
    status: 401,
    unread: true,
  },
  {
    name: 'a wrong token',
    headers: { authorization: 'Bearer nope', 'content-type': 'application/json' },
    body: (d) => JSON.stringify(event('healthlake-update-patient', `wrong-${d}`)),
    status: 401,
    unread: true,
  },
  {
    name: 'no content type',
    headers: auth,
    body: (d) => JSON.stringify(event('healthlake-update-patient', `notype-${d}`)),
    status: 415,
    unread: true,
  },
  {
    name: 'text/plain',
    headers: { ...auth, 'content-type': 'text/plain' },
    body: (d) => JSON.stringify(event('healthlake-update-patient', `plain-${d}`)),
    status: 415,
    unread: true,
  },
  { name: 'an empty body', headers: json, body: () => '', status: 400 },
  { name: 'broken JSON', headers: json, body: () => '{"id": ', status: 400 },
  { name: 'not an EventBridge event', headers: json, body: () => JSON.stringify({ hello: 'world' }), status: 400 },
  {
    name: 'an array with one malformed element',
    headers: json,
    body: (d) => JSON.stringify([event('healthlake-create-patient', `half-${d}`), { id: 'x' }]),
    status: 400,
  },
  {
    name: 'a body over the cap',
    headers: json,
    body: (d) =>
      JSON.stringify(Array.from({ length: 8 }, (_, i) => event('healthlake-update-patient', `big-${i}-${d}`))),
    status: 413,
    unread: true,
  },
];

async function send(url: string, c: Case, door: string): Promise<Answer> {
  const res = await fetch(`${url}/events`, { method: 'POST', headers: c.headers, body: c.body(door) });
  const text = await res.text();
  return {
    status: res.status,
    contentType: res.headers.get('content-type'),
    wwwAuthenticate: res.headers.get('www-authenticate'),
    connection: res.headers.get('connection'),
    body: text === '' ? '' : (JSON.parse(text) as unknown),
  };
}

async function listen(server: Server): Promise<string> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

describe('POST /events: the ingest listener answers as the hono app does', () => {
  let test: TestBroker;
  const servers: Server[] = [];
  const urls = { listener: '', app: '' };

  beforeAll(async () => {
    test = await inProcessBroker({ BROKER_MAX_INGEST_BYTES: String(MAX_INGEST_BYTES) });
    const { broker } = test;
    const app = getRequestListener((req: Request, env: unknown) => broker.app.fetch(req, env));
    servers.push(createServer((req, res) => void broker.serveIngest(req, res)));
    servers.push(createServer((req, res) => void app(req, res)));
    urls.listener = await listen(servers[0] as Server);
    urls.app = await listen(servers[1] as Server);
  });

  afterAll(async () => {
    for (const s of servers) s.close();
    await test?.broker.close();
  });

  for (const c of CASES) {
    it(`${c.name}: ${c.status}, the same both ways`, async () => {
      const listener = await send(urls.listener, c, 'listener');
      const app = await send(urls.app, c, 'app');
      expect(listener.status).toBe(c.status);
      expect(listener.connection).toBe(c.unread ? 'close' : 'keep-alive');
      expect(listener).toEqual(app);
      if (c.status >= 400) {
        expect((listener.body as Json).resourceType).toBe('OperationOutcome');
        expect(listener.contentType).toBe('application/fhir+json; charset=utf-8');
      } else {
        expect(listener.contentType).toBe('application/json');
      }
    });
  }

  it('stored nothing of a refused request: its events are new when sent again whole', async () => {
    const events = (door: string) => [
      event('healthlake-create-patient', `half-${door}`),
      event('healthlake-update-patient', `half-2-${door}`),
    ];
    for (const door of ['listener', 'app'] as const) {
      const res = await fetch(`${urls[door]}/events`, {
        method: 'POST',
        headers: json,
        body: JSON.stringify(events(door)),
      });
      expect(await res.json()).toEqual({ accepted: 2, ignored: 0, duplicates: 0 });
    }
  });

  it('counts what each door accepted in the metrics', async () => {
    const text = await test.broker.metrics.render();
    // Per door: one event, an array of two of which one ignored, the two re-sent halves; one duplicate.
    expect(text).toContain('broker_events_total{outcome="accepted"} 8');
    expect(text).toContain('broker_events_total{outcome="ignored"} 2');
    expect(text).toContain('broker_events_total{outcome="duplicate"} 2');
  });
});
