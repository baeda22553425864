import { createHmac } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { RunStop, type WebhookRequest } from '../src/delivery/rest-hook-sender.js';
import { ThreadedSender } from '../src/delivery/threaded-sender.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * The webhook sender on worker threads (what `npm start` uses): real threads, a real receiver. It
 * must sign and send like the in-thread sender, keep the SSRF guard (the allow-list travels to the
 * threads), and answer — never hang — when a thread dies.
 */

const SECRET = `whsec_${Buffer.alloc(32, 7).toString('base64')}`;

function request(endpoint: string, over: Partial<WebhookRequest> = {}): WebhookRequest {
  return {
    endpoint,
    headers: ['X-App: one'],
    contentType: 'application/fhir+json',
    body: '{"resourceType":"Bundle"}',
    webhookId: 'sub-1-1',
    secrets: [SECRET],
    timeoutMs: 2000,
    ...over,
  };
}

/** One sender thread, 32 connections per origin, the given allow-list. */
const oneThread = (allowlist: readonly string[] = ['127.0.0.1']): ThreadedSender =>
  new ThreadedSender({
    threads: 1,
    allowlist,
    userAgent: 'ua',
    connectionsPerOrigin: 32,
    logger: new RecordingLogger(),
  });

/** Two threads sharing an origin's 32 connections. */
const twoThreads = (): ThreadedSender =>
  new ThreadedSender({
    threads: 2,
    allowlist: ['127.0.0.1'],
    userAgent: 'ua',
    connectionsPerOrigin: 32,
    logger: new RecordingLogger(),
  });

/** A run of `n` requests to `${base}/${prefix}1`…, webhook ids `${prefix}-1`…. */
const runOf = (base: string, prefix: string, n: number): WebhookRequest[] =>
  Array.from({ length: n }, (_, i) => request(`${base}/${prefix}${i + 1}`, { webhookId: `${prefix}-${i + 1}` }));

describe('ThreadedSender', () => {
  let sender: ThreadedSender | undefined;
  let receiver: Receiver | undefined;

  afterEach(async () => {
    await sender?.close();
    await receiver?.close();
  });

  it('sends signed requests from its threads and returns their results', async () => {
    receiver = await Receiver.start();
    receiver.respond = (req) => ({ status: req.path === '/gone' ? 410 : 204 });
    sender = new ThreadedSender({
      threads: 2,
      allowlist: ['127.0.0.1'],
      userAgent: 'ua-test',
      connectionsPerOrigin: 32,
      logger: new RecordingLogger(),
    });
    const results = await Promise.all([
      sender.send(request(`${receiver.url}/a`)),
      sender.send(request(`${receiver.url}/b`, { webhookId: 'sub-1-2' })),
      sender.send(request(`${receiver.url}/gone`, { webhookId: 'sub-1-3' })),
    ]);
    expect(results).toEqual([
      { ok: true, status: 204 },
      { ok: true, status: 204 },
      { ok: false, status: 410, error: 'HTTP 410' },
    ]);
    const a = receiver.on('/a')[0];
    expect(a?.headers['user-agent']).toBe('ua-test');
    expect(a?.headers['x-app']).toBe('one');
    const timestamp = a?.headers['webhook-timestamp'] as string;
    const mac = createHmac('sha256', Buffer.alloc(32, 7))
      .update(`sub-1-1.${timestamp}.{"resourceType":"Bundle"}`)
      .digest('base64');
    expect(a?.headers['webhook-signature']).toBe(`v1,${mac}`);
  });

  /** Most requests the receiver held at once, from arrival times and a fixed hold. */
  /** How many requests each connection the receiver accepted carried, by connection. */
  function perConnection(r: Receiver): number[] {
    const counts = new Map<number, number>();
    for (const req of r.requests) counts.set(req.connection, (counts.get(req.connection) ?? 0) + 1);
    return [...counts.keys()].sort((a, b) => a - b).map((c) => counts.get(c) as number);
  }

  it.each([
    { threads: 1, connectionsPerOrigin: 2 },
    { threads: 2, connectionsPerOrigin: 3 },
  ])(
    'keeps $connectionsPerOrigin requests on the wire to one origin with $threads thread(s), queueing the rest',
    async ({ threads, connectionsPerOrigin }) => {
      receiver = await Receiver.start();
      const holdMs = 300;
      receiver.respond = () => ({ status: 204, delayMs: holdMs });
      sender = new ThreadedSender({
        threads,
        allowlist: ['127.0.0.1'],
        userAgent: 'ua',
        connectionsPerOrigin,
        logger: new RecordingLogger(),
      });
      const count = 3 * connectionsPerOrigin;
      const results = await Promise.all(
        Array.from({ length: count }, (_, i) =>
          sender?.send(request(`${receiver?.url}/q${i}`, { webhookId: `q-${i}` })),
        ),
      );
      expect(results.every((r) => r?.ok === true)).toBe(true);
      expect(receiver.requests).toHaveLength(count);
      // Every connection used at once (the shares add up), none beyond the cap (no thread over its
      // share): counted at the receiver, requests in and not yet answered.
      expect(receiver.peakOpen).toBe(connectionsPerOrigin);
      // Three requests on each connection: requests were dealt by share (round robin would give the
      // one-connection thread 4 or 5 of 9, one after another on its one connection).
      expect(perConnection(receiver)).toEqual(Array.from({ length: connectionsPerOrigin }, () => 3));
    },
  );

  it("keeps each origin's connections on every thread busy when requests to two origins interleave", async () => {
    receiver = await Receiver.start();
    const other = await Receiver.start();
    const holdMs = 300;
    receiver.respond = () => ({ status: 204, delayMs: holdMs });
    other.respond = () => ({ status: 204, delayMs: holdMs });
    // Four connections per origin, two on each thread; twice as many requests to each origin, x, y, x, y….
    sender = new ThreadedSender({
      threads: 2,
      allowlist: ['127.0.0.1'],
      userAgent: 'ua',
      connectionsPerOrigin: 4,
      logger: new RecordingLogger(),
    });
    try {
      const sends = Array.from({ length: 16 }, (_, i) =>
        sender?.send(request(`${(i % 2 === 0 ? receiver : other)?.url}/i${i}`, { webhookId: `i-${i}` })),
      );
      expect((await Promise.all(sends)).every((r) => r?.ok === true)).toBe(true);
      // Both threads' connections to each origin were used at once: four, not the two of one thread.
      expect(receiver.peakOpen).toBe(4);
      expect(other.peakOpen).toBe(4);
    } finally {
      await other.close();
    }
  });

  it('sends a run in order, one request at a time, and ends it at the first failure or after stop', async () => {
    receiver = await Receiver.start();
    receiver.respond = (req) => ({ status: req.path === '/r4' ? 503 : 204, delayMs: 5 });
    sender = twoThreads();
    const run = (prefix: string, n: number) => runOf(receiver?.url ?? '', prefix, n);
    expect(await sender.sendInOrder(run('r', 6), 60_000)).toEqual([
      { ok: true, status: 204 },
      { ok: true, status: 204 },
      { ok: true, status: 204 },
      { ok: false, status: 503, error: 'HTTP 503' },
    ]);
    const paths = [...receiver.requests, ...receiver.failures].sort((a, b) => a.at - b.at).map((r) => r.path);
    expect(paths).toEqual(['/r1', '/r2', '/r3', '/r4']);

    // Stopped while the second request of a long run is on the wire: the run ends with it.
    receiver.respond = (req) => {
      if (req.path === '/s2') sender?.stop();
      return { status: 204, delayMs: 50 };
    };
    expect(await sender.sendInOrder(run('s', 20), 60_000)).toHaveLength(2);
    expect(receiver.on('/s3')).toEqual([]);
    // Both threads got the word: new runs send their first request only.
    const after = await Promise.all([sender.sendInOrder(run('t', 3), 60_000), sender.sendInOrder(run('u', 3), 60_000)]);
    expect(after).toEqual([[{ ok: true, status: 204 }], [{ ok: true, status: 204 }]]);
  });

  it('stops one run at its RunStop, on its thread, after the request on the wire; the others go on', async () => {
    receiver = await Receiver.start();
    const stopped = new RunStop();
    // The stop comes while /c2 is on the wire, long enough for it to reach the thread.
    receiver.respond = (req) => {
      if (req.path !== '/c2') return { status: 204, delayMs: 20 };
      stopped.stop();
      return { status: 204, delayMs: 300 };
    };
    sender = twoThreads();
    const run = (prefix: string, n: number) => runOf(receiver?.url ?? '', prefix, n);
    // Beside it, on the other thread, a run that is not stopped.
    const [cut, whole] = await Promise.all([
      sender.sendInOrder(run('c', 20), 60_000, stopped),
      sender.sendInOrder(run('w', 6), 60_000, new RunStop()),
    ]);
    expect(cut).toEqual([
      { ok: true, status: 204 },
      { ok: true, status: 204 },
    ]);
    expect(whole).toHaveLength(6);
    expect(receiver.requests.map((r) => r.path).filter((p) => p.startsWith('/c'))).toEqual(['/c1', '/c2']);
    // Stopped before its batch was posted to the thread: none of it is sent.
    const early = new RunStop();
    const pending = sender.sendInOrder(run('e', 3), 60_000, early);
    early.stop();
    expect(await pending).toEqual([]);
    // Stopped before it was handed over: none either.
    expect(await sender.sendInOrder(run('f', 3), 60_000, early)).toEqual([]);
    expect(await sender.sendInOrder(run('g', 2), 60_000)).toHaveLength(2);
    expect(receiver.requests.map((r) => r.path).filter((p) => /^\/[ef]/.test(p))).toEqual([]);
  });

  it('sends nothing of a run stopped while its thread is still loading, not even a run of one', async () => {
    receiver = await Receiver.start();
    sender = oneThread();
    // Handed over at once, as lanes resuming a backlog at start-up do, and stopped a moment later
    // (a DELETE answered meanwhile), before the thread has loaded.
    const stopped = new RunStop();
    const single = sender.sendInOrder([request(`${receiver.url}/s1`, { webhookId: 's-1' })], 60_000, stopped);
    const longer = new RunStop();
    const several = sender.sendInOrder(runOf(receiver.url, 'm', 3), 60_000, longer);
    await new Promise((resolve) => setTimeout(resolve, 5));
    stopped.stop();
    longer.stop();
    // A run after them, not stopped: once it is answered the thread has had everything before it.
    const after = await sender.sendInOrder([request(`${receiver.url}/after`, { webhookId: 'a-1' })], 60_000);
    expect([await single, await several, after]).toEqual([[], [], [{ ok: true, status: 204 }]]);
    expect(receiver.requests.map((r) => r.path)).toEqual(['/after']);
  });

  it('answers a run its thread died in with what the thread saw delivered, then the one it was on, failed', async () => {
    receiver = await Receiver.start();
    // The third request of the run is held far longer than the test; its arrival means the thread
    // took the second answer (and counted it) and moved on.
    let third = (): void => undefined;
    const thirdArrived = new Promise<void>((resolve) => (third = resolve));
    receiver.respond = (req) => {
      if (req.path !== '/d3') return { status: 204, delayMs: 5 };
      third();
      return { status: 204, delayMs: 60_000 };
    };
    sender = oneThread();
    const run = Array.from({ length: 5 }, (_, i) => request(`${receiver?.url}/d${i + 1}`, { webhookId: `d-${i + 1}` }));
    const pending = sender.sendInOrder(run, 60_000);
    await thirdArrived;
    await sender.close(); // the thread ends as a crash would end it: no answer
    expect(receiver.requests.map((r) => r.path)).toEqual(['/d1', '/d2']);
    expect(await pending).toEqual([
      { ok: true, status: 204 },
      { ok: true, status: 204 },
      { ok: false, error: expect.stringMatching(/^webhook sender thread stopped/) },
    ]);
  });

  it('refuses endpoints the allow-list does not cover, in the thread, as permanent', async () => {
    receiver = await Receiver.start();
    sender = oneThread([]);
    const result = await sender.send(request(`${receiver.url}/private`));
    expect(result).toMatchObject({ ok: false, permanent: true });
    expect((result as { error: string }).error).toMatch(/^endpoint refused: /);
    expect(receiver.requests).toEqual([]);
  });

  it('answers a request its sender throws on, and keeps serving', async () => {
    receiver = await Receiver.start();
    sender = oneThread();
    const broken = { ...request(`${receiver.url}/x`), secrets: [42] } as unknown as WebhookRequest;
    expect(await sender.send(broken)).toMatchObject({ ok: false, error: expect.stringMatching(/^sender failed: /) });
    expect(await sender.send(request(`${receiver.url}/after`))).toEqual({ ok: true, status: 204 });
  });

  it('answers requests as failed when the broker shuts it down, instead of leaving them hanging', async () => {
    receiver = await Receiver.start();
    receiver.respond = () => ({ status: 204, delayMs: 5000 });
    sender = oneThread();
    const pending = sender.send(request(`${receiver.url}/slow`));
    await new Promise((resolve) => setTimeout(resolve, 300));
    await sender.close();
    expect(await pending).toMatchObject({ ok: false, error: expect.stringMatching(/^webhook sender thread stopped/) });
    expect(await sender.send(request(`${receiver.url}/late`))).toEqual({
      ok: false,
      error: 'the broker is shutting down',
    });
  });
});
