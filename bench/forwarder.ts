import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Pool } from 'undici';
import { panelsOf, SUBSCRIPTIONS } from './pipeline.js';

/**
 * The speed limit for suite `outbox`: a minimal forwarder run as its own child process, like the
 * broker, and what issue #3 names as the speed limit: "receive the event, POST it straight to the
 * receiver, no storage". `POST /events` (one event or an array) answers 202 at once and POSTs each
 * event (a single event: the bytes as received) to the same 1–2 receiver paths the broker would
 * use (`panelsOf`), over an undici keep-alive Pool of 32 connections (the broker's sender has 32
 * per origin too). No storage, no retries, no signing.
 *
 * Until 2026-11-27 it POSTed a ~250-byte made-up bundle instead of the event; the ~1.3 KB event is
 * what the issue describes, and closer to the broker's ~1.6 KB bundles for the receiver, which
 * shares the machine. Two interleaved pairs of 10,000-event bursts showed no difference in its
 * rate beyond the machine's noise (11,600–16,600 notifications/s either way).
 *
 * env: FORWARD_TO (receiver base URL), PORT (0), FORWARD_FAIL_EVERY (optional: subscriber n with
 * n % FORWARD_FAIL_EVERY === FORWARD_FAIL_EVERY - 1 goes to /fail/n, like the broker's failing mix).
 */

const target = process.env.FORWARD_TO;
if (target === undefined) throw new Error('FORWARD_TO is required');
const failEvery = Number(process.env.FORWARD_FAIL_EVERY ?? 0);
const pool = new Pool(target, { connections: 32, pipelining: 1, keepAliveTimeout: 30_000 });

interface EventLike {
  detail?: { additionalEventData?: { resourceId?: string } };
}

/** POSTs the event, as received, to each receiver path the broker would use for it. */
function forward(event: EventLike, body: string | Buffer): void {
  const resourceId = event.detail?.additionalEventData?.resourceId ?? '';
  const i = Number(resourceId.slice(4));
  if (!Number.isInteger(i)) return;
  for (const n of panelsOf(i)) {
    const path = failEvery > 0 && n % failEvery === failEvery - 1 ? `/fail/${n}` : `/hook/${n}`;
    pool
      .request({ path, method: 'POST', headers: { 'content-type': 'application/json' }, body })
      .then((res) => res.body.dump())
      .catch(() => undefined);
  }
}

const server = createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/events') {
    res.writeHead(404).end();
    return;
  }
  const chunks: Buffer[] = [];
  req.on('data', (c: Buffer) => chunks.push(c));
  req.on('end', () => {
    const raw = Buffer.concat(chunks);
    let parsed: EventLike | EventLike[];
    try {
      parsed = JSON.parse(raw.toString('utf8')) as EventLike | EventLike[];
    } catch {
      res.writeHead(400).end();
      return;
    }
    const events = Array.isArray(parsed) ? parsed : [parsed];
    res.writeHead(202, { 'content-type': 'application/json' }).end(JSON.stringify({ accepted: events.length }));
    // One event: its bytes as they came. Several: each re-serialized on its own.
    if (Array.isArray(parsed)) for (const e of parsed) forward(e, JSON.stringify(e));
    else forward(parsed, raw);
  });
});
server.keepAliveTimeout = 60_000;
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const { port } = server.address() as AddressInfo;
  console.log(JSON.stringify({ msg: 'listening', port, subscriptions: SUBSCRIPTIONS }));
});
process.on('SIGTERM', () => {
  server.close();
  void pool.close().finally(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
});
