import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Pool } from 'undici';
import { panelsOf, SUBSCRIPTIONS } from './pipeline.js';

/**
 * The speed limit for suite `outbox`: a minimal forwarder run as its own child process, like the
 * broker. `POST /events` (one event or an array) answers 202 at once and, for each event,
 * immediately POSTs a tiny notification to the same 1–2 receiver paths the broker would use
 * (`panelsOf`), over an undici keep-alive Pool of 32 connections (the broker's sender has 32 per
 * origin too). No storage, no parsing beyond the resource id, no retries, no signing.
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

function notification(resourceId: string): string {
  return JSON.stringify({
    resourceType: 'Bundle',
    type: 'history',
    entry: [
      {
        resource: {
          resourceType: 'Parameters',
          parameter: [
            { name: 'type', valueCode: 'event-notification' },
            {
              name: 'notification-event',
              part: [{ name: 'focus', valueReference: { reference: `Patient/${resourceId}` } }],
            },
          ],
        },
      },
    ],
  });
}

function forward(event: EventLike): void {
  const resourceId = event.detail?.additionalEventData?.resourceId ?? '';
  const i = Number(resourceId.slice(4));
  if (!Number.isInteger(i)) return;
  const body = notification(resourceId);
  for (const n of panelsOf(i)) {
    const path = failEvery > 0 && n % failEvery === failEvery - 1 ? `/fail/${n}` : `/hook/${n}`;
    pool
      .request({ path, method: 'POST', headers: { 'content-type': 'application/fhir+json' }, body })
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
    let events: EventLike[];
    try {
      const parsed = JSON.parse(Buffer.concat(chunks).toString('utf8')) as EventLike | EventLike[];
      events = Array.isArray(parsed) ? parsed : [parsed];
    } catch {
      res.writeHead(400).end();
      return;
    }
    res.writeHead(202, { 'content-type': 'application/json' }).end(JSON.stringify({ accepted: events.length }));
    for (const e of events) forward(e);
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
