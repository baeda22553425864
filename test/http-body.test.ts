import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BrokerProcess, INGEST_TOKEN, startBroker } from './support/broker-process.js';
import { fixture } from './support/fhir-client.js';

/**
 * Request bodies on the real server, where they are read straight from the socket stream (not the
 * web `Request` body that `app.request` tests go through): the byte cap holds for chunked bodies
 * without a Content-Length, an over-long body does not keep the connection draining, and a client
 * that hangs up mid-body leaves the broker serving.
 */

interface RawAnswer {
  readonly status: number;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly body: string;
}

/** POST `path` written as `chunks` with chunked transfer encoding (no Content-Length). */
function postChunked(url: string, path: string, chunks: readonly string[]): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${url}${path}`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${INGEST_TOKEN}`, 'content-type': 'application/json' },
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          body += c;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      },
    );
    // The broker may answer 413 and close before every chunk is written: that is the point.
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'ECONNRESET' && err.code !== 'EPIPE') reject(err);
    });
    for (const c of chunks) req.write(c);
    req.end();
  });
}

// `/events` is served by the ingest listener ahead of hono; with a query string it goes through the
// hono app and its body reader (the one every other POST and PUT uses): both must hold the cap.
describe.each([
  ['the ingest listener', '/events'],
  ['the hono app', '/events?door=hono'],
])('request bodies on the real server, through %s', (_door, path) => {
  let broker: BrokerProcess;

  beforeAll(async () => {
    broker = await startBroker({ BROKER_MAX_INGEST_BYTES: '8192' });
  });

  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  it('accepts a chunked body under the cap', async () => {
    const text = JSON.stringify(fixture('healthlake-create-patient'));
    const res = await postChunked(broker.url, path, [text.slice(0, 100), text.slice(100)]);
    expect(res.status).toBe(202);
    expect(JSON.parse(res.body)).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
  });

  it('refuses a chunked body over the cap with an OperationOutcome and closes the connection', async () => {
    const event = JSON.stringify(fixture('healthlake-update-patient'));
    const chunks = [`[${event}`, ...Array.from({ length: 40 }, () => `,${event}`), ']'];
    const res = await postChunked(broker.url, path, chunks);
    expect(res.status).toBe(413);
    expect(res.headers.connection).toBe('close');
    const outcome = JSON.parse(res.body) as {
      resourceType: string;
      issue: { details?: { coding?: { code?: string }[] } }[];
    };
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(outcome.issue[0]?.details?.coding?.[0]?.code).toBe('PAYLOAD_TOO_LARGE');
    // Nothing of the refused request was accepted: the same event is still new afterwards.
    const again = await postChunked(broker.url, path, [event]);
    expect(JSON.parse(again.body)).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
  });

  it('keeps serving after a client hangs up mid-body', async () => {
    await new Promise<void>((resolve) => {
      const req = request(`${broker.url}${path}`, {
        method: 'POST',
        headers: {
          authorization: `Bearer ${INGEST_TOKEN}`,
          'content-type': 'application/json',
          'content-length': '1000',
        },
      });
      req.on('error', () => resolve());
      req.write('[{"id":');
      setTimeout(() => {
        req.destroy();
        resolve();
      }, 50);
    });
    const health = await fetch(`${broker.url}/healthz`);
    expect(health.status).toBe(200);
    const text = JSON.stringify(fixture('healthlake-delete-patient'));
    const res = await postChunked(broker.url, path, [text]);
    expect(res.status).toBe(202);
  });
});

describe('keep-alive (real server)', () => {
  let broker: BrokerProcess;

  beforeAll(async () => {
    broker = await startBroker();
  });

  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  it('keeps idle connections 65 s, so a client with a shorter idle timeout always closes first', async () => {
    const res = await fetch(`${broker.url}/healthz`);
    expect(res.status).toBe(200);
    expect(res.headers.get('keep-alive')).toBe('timeout=65');
  });
});
