import { once } from 'node:events';
import { Agent, request } from 'node:http';
import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, startBroker } from './support/broker-process.js';
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

/** 64 MiB: far more than the kernel's socket buffers hold, so only a server that reads can take it all. */
const FLOOD_BYTES = 64 * 1024 * 1024;

interface EarlyAnswer {
  /** What the server sent back to the start of the body: status line and headers at least. */
  readonly answer: string;
  /** Body bytes the client got onto the wire after the answer, before the server closed or it gave up. */
  readonly sentAfter: number;
  readonly closedByServer: boolean;
}

/**
 * Writes the request `head` and one `chunk` of its body, waits for the answer, then goes on
 * writing `chunk` while the server takes it, up to FLOOD_BYTES. Stops when the server closes the
 * connection, or when it has taken nothing for a second (it stopped reading but kept the socket:
 * `closedByServer` false). (Waiting for the answer first: a client still writing when the server
 * closes on unread bytes may get the reset before it reads the answer.)
 */
async function answeredEarly(url: string, head: string, chunk: Buffer): Promise<EarlyAnswer> {
  const socket = connect(Number(new URL(url).port), '127.0.0.1');
  let answer = '';
  let closed = false;
  let headers: () => void = () => undefined;
  const answered = new Promise<void>((resolve) => {
    headers = resolve;
  });
  socket.setEncoding('latin1');
  socket.on('data', (d: string) => {
    answer += d;
    if (answer.includes('\r\n\r\n')) headers();
  });
  // A write after the server closed fails (EPIPE, ECONNRESET): that is the point.
  socket.on('error', () => undefined);
  const gone = new Promise<boolean>((resolve) =>
    socket.once('close', () => {
      closed = true;
      headers();
      resolve(false);
    }),
  );
  await once(socket, 'connect');
  socket.write(head);
  socket.write(chunk);
  await answered;
  let sentAfter = 0;
  while (!closed && sentAfter < FLOOD_BYTES) {
    if (!socket.write(chunk)) {
      let timer: NodeJS.Timeout | undefined;
      const stalled = await Promise.race([
        new Promise<boolean>((resolve) => socket.once('drain', () => resolve(false))),
        gone,
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), 1000);
        }),
      ]);
      clearTimeout(timer);
      if (stalled) break;
    }
    sentAfter += chunk.length;
  }
  socket.destroy();
  return { answer, sentAfter, closedByServer: closed };
}

/**
 * A request that asks to wait before its body (`Expect: 100-continue`): writes `head`, reads the
 * first answer's status line; sends `body` only after a `100`, then reads the final status line.
 */
async function withContinue(url: string, head: string, body: string): Promise<{ first: string; final: string }> {
  const socket = connect(Number(new URL(url).port), '127.0.0.1');
  socket.setEncoding('latin1');
  socket.on('error', () => undefined);
  let received = '';
  const heads: string[] = [];
  let wake: () => void = () => undefined;
  socket.on('data', (d: string) => {
    received += d;
    for (let end = received.indexOf('\r\n\r\n'); end >= 0; end = received.indexOf('\r\n\r\n')) {
      heads.push(received.slice(0, received.indexOf('\r\n')));
      // The final answer's body, if any, follows; only status lines are compared.
      received = received.slice(end + 4).replace(/^[^H]*/, '');
    }
    wake();
  });
  socket.once('close', () => wake());
  const nthHead = async (n: number): Promise<string> => {
    const deadline = Date.now() + 5_000;
    while (heads.length < n && !socket.destroyed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, 100);
      });
    }
    return heads[n - 1] ?? '(none)';
  };
  try {
    await once(socket, 'connect');
    socket.write(head);
    const first = await nthHead(1);
    if (!first.startsWith('HTTP/1.1 100 ')) return { first, final: first };
    socket.write(body);
    return { first, final: await nthHead(2) };
  } finally {
    socket.destroy();
  }
}

const floodHead = (method: string, path: string, headers: readonly string[]): string =>
  [`${method} ${path} HTTP/1.1`, 'Host: 127.0.0.1', ...headers, '', ''].join('\r\n');

/** One chunk of a chunked body of spaces (valid JSON whitespace), 64 KiB. */
const SPACES = Buffer.alloc(64 * 1024, 0x20);
const CHUNK = Buffer.concat([Buffer.from(`${SPACES.length.toString(16)}\r\n`), SPACES, Buffer.from('\r\n')]);

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

  it('refuses a request without a token before its body, closes the connection and reads no more', async () => {
    const res = await answeredEarly(
      broker.url,
      floodHead('POST', path, ['Content-Type: application/json', `Content-Length: ${FLOOD_BYTES}`]),
      SPACES,
    );
    expect(res.answer).toMatch(/^HTTP\/1\.1 401 /);
    expect(res.answer.toLowerCase()).toContain('\r\nconnection: close\r\n');
    expect(res.closedByServer).toBe(true);
    expect(res.sentAfter).toBeLessThan(FLOOD_BYTES / 2);
  });

  it('answers Expect: 100-continue only once the checks that need no body have passed', async () => {
    const body = JSON.stringify({ ...fixture('healthlake-update-patient'), id: `continue-${path.length}` });
    const head = (headers: readonly string[]) =>
      floodHead('POST', path, ['Content-Type: application/json', 'Expect: 100-continue', ...headers]);
    const auth = `Authorization: Bearer ${INGEST_TOKEN}`;
    // Authorized and within the cap: told to go on, then the answer to the body.
    expect(await withContinue(broker.url, head([auth, `Content-Length: ${Buffer.byteLength(body)}`]), body)).toEqual({
      first: 'HTTP/1.1 100 Continue',
      final: 'HTTP/1.1 202 Accepted',
    });
    // Declared over the cap (8 KiB here), or no token: the refusal instead, so the body is never sent.
    expect(await withContinue(broker.url, head([auth, 'Content-Length: 100000']), body)).toEqual({
      first: 'HTTP/1.1 413 Payload Too Large',
      final: 'HTTP/1.1 413 Payload Too Large',
    });
    expect(await withContinue(broker.url, head([`Content-Length: ${Buffer.byteLength(body)}`]), body)).toEqual({
      first: 'HTTP/1.1 401 Unauthorized',
      final: 'HTTP/1.1 401 Unauthorized',
    });
  });

  it('refuses a chunked body of the wrong media type unread, closes the connection and reads no more', async () => {
    const res = await answeredEarly(
      broker.url,
      floodHead('POST', path, [
        `Authorization: Bearer ${INGEST_TOKEN}`,
        'Content-Type: text/plain',
        'Transfer-Encoding: chunked',
      ]),
      CHUNK,
    );
    expect(res.answer).toMatch(/^HTTP\/1\.1 415 /);
    expect(res.answer.toLowerCase()).toContain('\r\nconnection: close\r\n');
    expect(res.closedByServer).toBe(true);
    expect(res.sentAfter).toBeLessThan(FLOOD_BYTES / 2);
  });

  it('keeps the connection after a 202 and after a refusal of a body it read', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    const send = (body: string) =>
      keptAlive(agent, 'POST', `${broker.url}${path}`, INGEST_TOKEN, 'application/json', body);
    try {
      const text = JSON.stringify({ ...fixture('healthlake-update-patient'), id: `keep-${path.length}` });
      const answers = [await send(text), await send('{"not": "an event"}'), await send(text)];
      expect(answers).toEqual([
        { status: 202, connection: 'keep-alive', reused: false },
        { status: 400, connection: 'keep-alive', reused: true },
        { status: 202, connection: 'keep-alive', reused: true },
      ]);
    } finally {
      agent.destroy();
    }
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

describe('request bodies on the real server, on the FHIR routes', () => {
  let broker: BrokerProcess;

  beforeAll(async () => {
    broker = await startBroker();
  });

  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  it.each([
    ['without a token', 'POST', '/fhir/Subscription', [], 401],
    ['to no route', 'POST', '/fhir/Nothing', [`Authorization: Bearer ${API_KEYS.alice}`], 404],
    [
      'with a method the route does not allow',
      'PATCH',
      '/fhir/Subscription/x',
      [`Authorization: Bearer ${API_KEYS.alice}`],
      405,
    ],
  ])(
    'answers a request %s before its body, closes the connection and reads no more',
    async (_name, method, path, headers, status) => {
      const res = await answeredEarly(
        broker.url,
        floodHead(method, path, [...headers, 'Content-Type: application/fhir+json', `Content-Length: ${FLOOD_BYTES}`]),
        SPACES,
      );
      expect(res.answer).toMatch(new RegExp(`^HTTP/1\\.1 ${status} `));
      expect(res.answer.toLowerCase()).toContain('\r\nconnection: close\r\n');
      expect(res.closedByServer).toBe(true);
      expect(res.sentAfter).toBeLessThan(FLOOD_BYTES / 2);
    },
  );

  it('keeps the connection after a 201', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    const body = JSON.stringify({
      resourceType: 'Subscription',
      status: 'requested',
      reason: 'keep-alive',
      criteria: 'Patient',
      channel: { type: 'rest-hook', endpoint: 'https://hooks.example.com/k', payload: 'application/fhir+json' },
    });
    const send = (method: string, url: string, payload?: string) =>
      keptAlive(agent, method, url, API_KEYS.alice, 'application/fhir+json', payload);
    try {
      const first = await send('GET', `${broker.url}/fhir/metadata`);
      const created = await send('POST', `${broker.url}/fhir/Subscription`, body);
      expect([first, created.connection, created.reused]).toEqual([
        { status: 200, connection: 'keep-alive', reused: false },
        'keep-alive',
        true,
      ]);
    } finally {
      agent.destroy();
    }
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

describe('slow requests (real server, BROKER_REQUEST_TIMEOUT=2s)', () => {
  let broker: BrokerProcess;

  beforeAll(async () => {
    broker = await startBroker({ BROKER_REQUEST_TIMEOUT: '2s' });
  });

  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  /** Opens a raw connection, writes `head`, then `drop` every 300 ms; resolves with what came back and when the socket closed. */
  function trickle(head: string, drop: string): Promise<{ answer: string; closedAfterMs: number }> {
    const { port } = new URL(broker.url);
    const socket = connect(Number(port), '127.0.0.1');
    const started = Date.now();
    let answer = '';
    socket.setEncoding('utf8');
    socket.on('data', (c: string) => {
      answer += c;
    });
    socket.on('error', () => undefined);
    socket.write(head);
    const drip = setInterval(() => socket.write(drop), 300);
    return new Promise((resolve) => {
      socket.on('close', () => {
        clearInterval(drip);
        resolve({ answer, closedAfterMs: Date.now() - started });
      });
      // Far past the timeout: a connection still open then fails the test below.
      setTimeout(() => socket.destroy(), 20_000).unref();
    });
  }

  it('closes a connection whose authenticated body trickles in past the timeout, with 408', async () => {
    const { answer, closedAfterMs } = await trickle(
      'POST /fhir/Subscription HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n' +
        `Authorization: Bearer ${API_KEYS.alice}\r\nContent-Length: 100000\r\n\r\n{`,
      'x',
    );
    expect(answer).toMatch(/^HTTP\/1\.1 408/);
    expect(closedAfterMs).toBeLessThan(15_000);
    // The broker goes on serving.
    expect((await fetch(`${broker.url}/healthz`)).status).toBe(200);
  });

  it('closes a connection whose headers trickle in past the timeout', async () => {
    const { closedAfterMs } = await trickle('GET /healthz HTTP/1.1\r\n', 'X-Slow: 1\r\n');
    expect(closedAfterMs).toBeLessThan(15_000);
  });
});

/** One request on `agent` (keep-alive, one socket): its status, its `Connection` header, and whether it reused the socket. */
function keptAlive(
  agent: Agent,
  method: string,
  url: string,
  token: string,
  contentType: string,
  body?: string,
): Promise<{ status: number; connection: string | undefined; reused: boolean }> {
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      { method, agent, headers: { authorization: `Bearer ${token}`, 'content-type': contentType } },
      (res) => {
        res.resume();
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, connection: res.headers.connection, reused: req.reusedSocket }),
        );
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}
