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

/** POST /events written as `chunks` with chunked transfer encoding (no Content-Length). */
function postChunked(url: string, chunks: readonly string[]): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${url}/events`,
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

describe('request bodies on the real server', () => {
  let broker: BrokerProcess;

  beforeAll(async () => {
    broker = await startBroker({ BROKER_MAX_INGEST_BYTES: '8192' });
  });

  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  it('accepts a chunked body under the cap', async () => {
    const text = JSON.stringify(fixture('healthlake-create-patient'));
    const res = await postChunked(broker.url, [text.slice(0, 100), text.slice(100)]);
    expect(res.status).toBe(202);
    expect(JSON.parse(res.body)).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
  });

  it('refuses a chunked body over the cap with an OperationOutcome and closes the connection', async () => {
    const event = JSON.stringify(fixture('healthlake-update-patient'));
    const chunks = [`[${event}`, ...Array.from({ length: 40 }, () => `,${event}`), ']'];
    const res = await postChunked(broker.url, chunks);
    expect(res.status).toBe(413);
    expect(res.headers.connection).toBe('close');
    const outcome = JSON.parse(res.body) as {
      resourceType: string;
      issue: { details?: { coding?: { code?: string }[] } }[];
    };
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(outcome.issue[0]?.details?.coding?.[0]?.code).toBe('PAYLOAD_TOO_LARGE');
    // Nothing of the refused request was accepted: the same event is still new afterwards.
    const again = await postChunked(broker.url, [event]);
    expect(JSON.parse(again.body)).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
  });

  it('keeps serving after a client hangs up mid-body', async () => {
    await new Promise<void>((resolve) => {
      const req = request(`${broker.url}/events`, {
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
    const res = await postChunked(broker.url, [text]);
    expect(res.status).toBe(202);
  });
});
