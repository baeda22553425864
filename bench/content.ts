import { mkdtempSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Pool } from 'undici';
import {
  API_TOKEN,
  burst,
  json,
  openLoop,
  PATIENTS,
  patientId,
  Receiver,
  SUBSCRIPTIONS,
  settleDisk,
  subscriptionBody,
  waitFor,
  withBroker,
} from './pipeline.js';
import { fmt, percentile, printTable, type TargetCheck } from './util.js';

/**
 * Suite `content`: what content filters cost. The same 100 subscribers, each matching exactly one
 * in 100 patients, filtered two ways back to back:
 * - by `_id` (stage one: decided on the event, nothing read);
 * - by `general-practitioner` (stage two: every event's Patient is read from a FHIR server over
 *   HTTP before the commit, and the filter decided on it);
 * - the same with `full-resource` content: the Patient read is also stored with the notification
 *   and sent in it.
 * The FHIR server is in this process (node:http on 127.0.0.1, answers from memory), beside the load
 * generator and the receiver. No target: the issue-free figure is the price of a read per event.
 */

const BURST = 5_000;
const CLIENTS = 32;
const RATE = 200;
const SECONDS = 10;
const gpOf = (i: number): string => `gp-${i % SUBSCRIPTIONS}`;

/** A FHIR server that knows every bench patient, with its general practitioner. */
class PatientServer {
  reads = 0;
  readonly server: Server = createServer((req, res) => {
    const m = /^\/fhir\/Patient\/(pat-(\d+))$/.exec(req.url ?? '');
    if (m === null) return void res.writeHead(404).end();
    this.reads++;
    const body = JSON.stringify({
      resourceType: 'Patient',
      id: m[1],
      meta: { versionId: '1', lastUpdated: '2026-01-01T00:00:00Z' },
      active: true,
      name: [{ family: 'Bench', given: [`P${m[2]}`] }],
      generalPractitioner: [{ reference: `Practitioner/${gpOf(Number(m[2]))}` }],
    });
    res.writeHead(200, { 'content-type': 'application/fhir+json' }).end(body);
  });

  async listen(): Promise<string> {
    this.server.keepAliveTimeout = 60_000;
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/fhir`;
  }
}

interface Result {
  readonly label: string;
  readonly eventsPerSecond: number;
  readonly notificationsPerSecond: number;
  readonly brokerCpu: number;
  readonly p50: number;
  readonly p99: number;
  readonly ingestP99: number;
  readonly readsPerEvent: number;
  readonly exact: boolean;
}

/** How the 100 subscribers are filtered, and what their notifications carry. */
type Variant = 'id' | 'gp' | 'gp-full';

async function register(pool: Pool, receiverPort: number, variant: Variant): Promise<void> {
  const content = variant !== 'id';
  const ids: string[] = [];
  for (let n = 0; n < SUBSCRIPTIONS; n++) {
    const endpoint = `http://127.0.0.1:${receiverPort}/content/${n}`;
    const body = subscriptionBody(n, endpoint, []) as { _criteria: { extension: { valueString: string }[] } };
    const ext = body._criteria.extension[0] as { valueString: string };
    if (variant === 'gp-full') {
      const channel = body as unknown as { channel: { _payload: { extension: { valueCode: string }[] } } };
      (channel.channel._payload.extension[0] as { valueCode: string }).valueCode = 'full-resource';
    }
    ext.valueString = content
      ? `Patient?general-practitioner=Practitioner/gp-${n}`
      : `Patient?_id=${Array.from({ length: PATIENTS / SUBSCRIPTIONS }, (_, k) => patientId(k * SUBSCRIPTIONS + n)).join(',')}`;
    const res = await json(pool, '/fhir/Subscription', 'POST', API_TOKEN, body);
    if (res.status !== 201) throw new Error(`create subscription ${n}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    ids.push(String(res.body?.id));
  }
  await waitFor('active subscriptions', 30_000, async () => {
    for (const id of ids)
      if ((await json(pool, `/fhir/Subscription/${id}`, 'GET', API_TOKEN)).body?.status !== 'active') return false;
    return true;
  });
}

const LABELS: Record<Variant, string> = {
  id: '_id= (nothing read)',
  gp: 'general-practitioner= (a read per event)',
  'gp-full': 'general-practitioner=, full-resource (read, stored, sent)',
};

async function measure(fhir: PatientServer, fhirUrl: string, receiver: Receiver, variant: Variant): Promise<Result> {
  const content = variant !== 'id';
  const receiverPort = (receiver.server.address() as AddressInfo).port;
  const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-content-'));
  const env = { BROKER_FHIR_READ: fhirUrl, BROKER_FULL_RESOURCE_CLIENTS: 'bench' };
  return withBroker(dataDir, { env, connections: CLIENTS }, async (broker, pool) => {
    const pid = broker.child.pid as number;
    await register(pool, receiverPort, variant);
    const run = `content-${variant}-${Date.now().toString(36)}`;
    const one = () => 1;
    await burst(pool, receiver, pid, `${run}-warm`, 1, 1_000, CLIENTS, { countOf: one });
    const reads0 = fhir.reads;
    const resources0 = receiver.resources;
    const b = await burst(pool, receiver, pid, run, 1, BURST, CLIENTS, { countOf: one });
    const readsPerEvent = (fhir.reads - reads0) / b.events;
    settleDisk(dataDir);
    const r = await openLoop(pool, receiver, pid, run, { countOf: one, rate: RATE, seconds: SECONDS });
    return {
      label: LABELS[variant],
      eventsPerSecond: b.events / b.ingestSeconds,
      notificationsPerSecond: b.notifications / b.deliverSeconds,
      brokerCpu: b.brokerCpu,
      p50: percentile(r.latencies, 50),
      p99: percentile(r.latencies, 99),
      ingestP99: percentile(r.ingest, 99),
      readsPerEvent,
      exact:
        b.failures === 0 &&
        b.notifications === b.events &&
        r.failures === 0 &&
        r.unexpected === 0 &&
        r.notifications === r.events &&
        (content ? Math.abs(readsPerEvent - 1) < 1e-9 : readsPerEvent === 0) &&
        receiver.resources - resources0 === (variant === 'gp-full' ? b.notifications + r.notifications : 0),
    };
  });
}

export async function runContent(): Promise<TargetCheck[]> {
  console.log(
    `\n## content: ${SUBSCRIPTIONS} subscribers, each matching 1 in ${SUBSCRIPTIONS} patients, filtered on the event (_id) or on the resource read from a FHIR server (general-practitioner)\n`,
  );
  const fhir = new PatientServer();
  const fhirUrl = await fhir.listen();
  const receiver = new Receiver();
  await receiver.listen();
  const results: Result[] = [];
  try {
    for (const variant of ['id', 'gp', 'gp-full'] as const)
      results.push(await measure(fhir, fhirUrl, receiver, variant));
  } finally {
    await receiver.close();
    fhir.server.closeAllConnections();
    fhir.server.close();
  }
  printTable([
    [
      'filter',
      `events/s (${fmt(BURST)} single-event requests, ${CLIENTS} clients)`,
      'notifications/s',
      'broker CPU',
      `p50 / p99 ingest→webhook at ${RATE}/s (ms)`,
      'POST→202 p99 (ms)',
      'FHIR reads per event',
      'each event to its one subscriber',
    ],
    ...results.map((r) => [
      r.label,
      fmt(r.eventsPerSecond),
      fmt(r.notificationsPerSecond),
      `${fmt(r.brokerCpu * 100)}%`,
      `${fmt(r.p50, 1)} / ${fmt(r.p99, 1)}`,
      fmt(r.ingestP99, 1),
      fmt(r.readsPerEvent, 2),
      r.exact ? 'yes' : 'NO',
    ]),
  ]);
  return results.map((r) => ({
    suite: 'content',
    target: `${r.label}: every event to its one subscriber, once; ${r.label.startsWith('_id') ? 'nothing read' : 'each resource read once'}${r.label.includes('full-resource') ? ', and in every notification' : ''} (reported: throughput, latency)`,
    measured: `${fmt(r.eventsPerSecond)} events/s, p99 ${fmt(r.p99, 1)} ms`,
    met: r.exact,
  }));
}
