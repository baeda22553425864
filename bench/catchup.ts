import { mkdtempSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Pool } from 'undici';
import { API_TOKEN, json, postEvents, subscriptionBody, updatePatientEvent, waitFor, withBroker } from './pipeline.js';
import { fmt, printTable, type TargetCheck } from './util.js';

/**
 * Suite `catchup`: how fast a backlog drains once an endpoint that was down comes back. The
 * endpoints answer 503 while BACKLOG events per subscriber go in (each lane retrying on a 1 s
 * schedule), then 204: measured from the first notification delivered after the recovery to the
 * last. Lanes with a backlog hand the sender runs of bundles (`Sender.sendInOrder`), sent one after
 * another without a trip back to the event loop. Every notification must arrive once, in order.
 */

const CASES = [
  { subscribers: 1, backlog: 5_000 },
  { subscribers: 20, backlog: 1_000 },
] as const;

interface Drain {
  readonly subscribers: number;
  readonly backlog: number;
  readonly seconds: number;
  readonly inOrder: boolean;
}

/** An endpoint per subscriber path: 503 to notifications until `up`, and what came in, by path. */
class FlakyEndpoint {
  up = false;
  firstAt = 0;
  lastAt = 0;
  readonly received = new Map<string, number[]>();
  readonly server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      if (!body.includes('"event-notification"')) return void res.writeHead(204).end();
      if (!this.up) return void res.writeHead(503).end();
      const at = performance.now();
      if (this.firstAt === 0) this.firstAt = at;
      this.lastAt = at;
      const numbers = [...body.matchAll(/"name":"event-number","valueString":"(\d+)"/g)].map((m) => Number(m[1]));
      const seen = this.received.get(req.url ?? '') ?? [];
      seen.push(...numbers);
      this.received.set(req.url ?? '', seen);
      res.writeHead(204).end();
    });
  });
  total(): number {
    let n = 0;
    for (const seen of this.received.values()) n += seen.length;
    return n;
  }
}

async function drain(subscribers: number, backlog: number): Promise<Drain> {
  const endpoint = new FlakyEndpoint();
  endpoint.server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => endpoint.server.listen(0, '127.0.0.1', resolve));
  const port = (endpoint.server.address() as AddressInfo).port;
  const env = { BROKER_RETRY_DELAYS: Array.from({ length: 30 }, () => '1s').join(',') };
  try {
    return await withBroker(
      mkdtempSync(join(tmpdir(), 'broker-bench-catchup-')),
      { env, connections: 8 },
      async (_b, pool) => {
        await register(pool, port, subscribers);
        for (let k = 0; k < backlog; k += 50) {
          const events = [];
          for (let s = 0; s < subscribers; s++)
            for (let j = k; j < Math.min(backlog, k + 50); j++)
              events.push(updatePatientEvent(`cu-${s}-${j}`, `cu-${s}`));
          for (let i = 0; i < events.length; i += 100) await postEvents(pool, events.slice(i, i + 100));
        }
        endpoint.up = true;
        await waitFor('the backlog', 120_000, () => endpoint.total() >= subscribers * backlog);
        const expected = Array.from({ length: backlog }, (_, i) => i + 1).join();
        return {
          subscribers,
          backlog,
          seconds: (endpoint.lastAt - endpoint.firstAt) / 1000,
          inOrder: [...endpoint.received.values()].every((seen) => seen.join() === expected),
        };
      },
    );
  } finally {
    endpoint.server.closeAllConnections();
    endpoint.server.close();
  }
}

async function register(pool: Pool, port: number, subscribers: number): Promise<void> {
  const ids: string[] = [];
  for (let s = 0; s < subscribers; s++) {
    const res = await json(
      pool,
      '/fhir/Subscription',
      'POST',
      API_TOKEN,
      subscriptionBody(s, `http://127.0.0.1:${port}/s${s}`, [`cu-${s}`]),
    );
    ids.push(String(res.body?.id));
  }
  await waitFor('active subscriptions', 20_000, async () => {
    for (const id of ids)
      if ((await json(pool, `/fhir/Subscription/${id}`, 'GET', API_TOKEN)).body?.status !== 'active') return false;
    return true;
  });
}

export async function runCatchup(): Promise<TargetCheck[]> {
  console.log('\n## catchup: a backlog after an outage (503 until the recovery, then 204), drained\n');
  const results: Drain[] = [];
  for (const c of CASES) results.push(await drain(c.subscribers, c.backlog));
  printTable([
    ['subscribers', 'backlog each', 'drained in (s)', 'notifications/s', 'each once, in order'],
    ...results.map((r) => [
      String(r.subscribers),
      fmt(r.backlog),
      fmt(r.seconds, 2),
      fmt((r.subscribers * r.backlog) / r.seconds),
      r.inOrder ? 'yes' : 'NO',
    ]),
  ]);
  return results.map((r) => ({
    suite: 'catchup',
    target: `${r.subscribers} × ${fmt(r.backlog)} backlog: every notification once, in order`,
    measured: `${fmt((r.subscribers * r.backlog) / r.seconds)} notifications/s`,
    met: r.inOrder,
  }));
}
