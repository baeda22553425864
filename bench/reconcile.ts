import { mkdtempSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Pool } from 'undici';
import {
  cpuSeconds,
  INGEST_TOKEN,
  PATIENTS,
  panelsOf,
  patientId,
  postEvents,
  Receiver,
  subscribe,
  updatePatientEvent,
  waitFor,
  withBroker,
} from './pipeline.js';
import { fmt, printTable, type TargetCheck } from './util.js';

/**
 * Suite `reconcile`: how fast the reconciler (src/service/reconciler.ts) works through a window of
 * changed resources. The pipeline's 100 subscribers (`_id` panels, 1.5 per patient) and 10,000
 * patients, on a FHIR server in this process that answers `_lastUpdated` searches from memory, 100
 * per page; the broker runs the reconciler every second with no lag:
 * - **missed**: every patient changed and no event came: each is found, matched and notified;
 * - **already notified**: every patient changed and its event came first: each is found, matched,
 *   and checked against what its subscribers hold (`Store.notifiedSince`), and nothing is notified.
 * No target: the figures say how large a window one run clears per second.
 */

const CLIENTS = 32;
const PER_REQUEST = 10;

/** Patients with a `meta.lastUpdated` each, searched by `_lastUpdated` window, `_count` per page. */
class PatientServer {
  searches = 0;
  /** performance.now() of the first search that found something, since `reset`. */
  firstHit: number | undefined;
  readonly #updated = new Map<string, number>();
  readonly server: Server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname !== '/fhir/Patient') return void res.writeHead(404).end();
    this.searches++;
    const bounds = url.searchParams.getAll('_lastUpdated');
    const from = Date.parse(bounds.find((b) => b.startsWith('ge'))?.slice(2) ?? '');
    const to = Date.parse(bounds.find((b) => b.startsWith('lt'))?.slice(2) ?? '');
    const count = Number(url.searchParams.get('_count') ?? 100);
    const offset = Number(url.searchParams.get('_offset') ?? 0);
    const hits = [...this.#updated].filter(([, at]) => at >= from && at < to);
    const page = hits.slice(offset, offset + count);
    if (page.length > 0) this.firstHit ??= performance.now();
    const base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/fhir`;
    const next = new URL(`${base}/Patient${url.search}`);
    next.searchParams.set('_offset', String(offset + count));
    const body = JSON.stringify({
      resourceType: 'Bundle',
      type: 'searchset',
      link: offset + count < hits.length ? [{ relation: 'next', url: next.href }] : [],
      entry: page.map(([id, at]) => ({
        fullUrl: `${base}/Patient/${id}`,
        search: { mode: 'match' },
        resource: {
          resourceType: 'Patient',
          id,
          meta: { versionId: '2', lastUpdated: new Date(at).toISOString() },
          active: true,
          name: [{ family: 'Bench', given: [id] }],
        },
      })),
    });
    res.writeHead(200, { 'content-type': 'application/fhir+json' }).end(body);
  });

  /** Every patient changed at `at` (epoch ms). */
  touchAll(at: number): void {
    for (let i = 0; i < PATIENTS; i++) this.#updated.set(patientId(i), at);
    this.firstHit = undefined;
  }

  async listen(): Promise<string> {
    this.server.keepAliveTimeout = 60_000;
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/fhir`;
  }
}

interface Result {
  readonly label: string;
  readonly seconds: number;
  readonly notifications: number;
  readonly brokerCpu: number;
  readonly exact: boolean;
}

/** A counter of the broker's /metrics. */
async function metric(pool: Pool, line: string): Promise<number> {
  const res = await pool.request({
    path: '/metrics',
    method: 'GET',
    headers: { authorization: `Bearer ${INGEST_TOKEN}` },
  });
  const text = await res.body.text();
  const found = text.split('\n').find((l) => l.startsWith(`${line} `));
  return found === undefined ? 0 : Number(found.slice(line.length + 1));
}

const RESOURCES = (outcome: string) => `broker_reconcile_resources_total{outcome="${outcome}"}`;

async function measure(fhir: PatientServer, fhirUrl: string, receiver: Receiver, missed: boolean): Promise<Result> {
  const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-reconcile-'));
  const env = { BROKER_FHIR_READ: fhirUrl, BROKER_RECONCILE_EVERY: '1s', BROKER_RECONCILE_LAG: '0s' };
  return withBroker(dataDir, { env, connections: CLIENTS }, async (broker, pool) => {
    const pid = broker.child.pid as number;
    await subscribe(pool, (receiver.server.address() as AddressInfo).port);
    await waitFor(
      'the first reconcile run',
      10_000,
      async () => (await metric(pool, 'broker_reconcile_runs_total{outcome="completed"}')) >= 1,
    );
    const expected = Array.from({ length: PATIENTS }, (_, i) => panelsOf(i).length).reduce((a, b) => a + b, 0);
    const before = receiver.notifications;
    if (!missed) {
      // Every change's event first, delivered. The versions are stamped once that is done (the
      // reconciler's windows have passed everything before), so the events carry a CloudTrail time
      // after that: each event is about the version the search then finds.
      const eventTime = new Date(Date.now() + 600_000).toISOString();
      let next = 0;
      const client = async () => {
        while (next < PATIENTS) {
          const first = next;
          next += PER_REQUEST;
          const ids = Array.from({ length: Math.min(PER_REQUEST, PATIENTS - first) }, (_, k) => patientId(first + k));
          const events = ids.map((id) => {
            const event = updatePatientEvent(`rec-${id}`, id) as { detail: Record<string, unknown> };
            return { ...event, detail: { ...event.detail, eventTime } };
          });
          const res = await postEvents(pool, events);
          if (res.status !== 202) throw new Error(`events: HTTP ${res.status}`);
        }
      };
      await Promise.all(Array.from({ length: CLIENTS }, client));
      await waitFor(
        `${expected} notifications of the events`,
        120_000,
        () => receiver.notifications - before >= expected,
      );
    }
    const delivered = receiver.notifications;
    const cpu0 = cpuSeconds(pid);
    fhir.touchAll(Date.now());
    const outcome = missed ? 'notified' : 'already_notified';
    await waitFor(
      `${PATIENTS} resources ${outcome}`,
      300_000,
      async () => (await metric(pool, RESOURCES(outcome))) >= PATIENTS,
    );
    if (missed)
      await waitFor(
        `${expected} reconciled notifications`,
        120_000,
        () => receiver.notifications - delivered >= expected,
      );
    const end = missed ? receiver.lastAt : performance.now();
    const seconds = (end - (fhir.firstHit as number)) / 1000;
    const cpu = (cpuSeconds(pid) - cpu0) / seconds;
    const notified = await metric(pool, RESOURCES('notified'));
    const already = await metric(pool, RESOURCES('already_notified'));
    return {
      label: missed ? 'missed: every change notified' : 'already notified: every event came',
      seconds,
      notifications: receiver.notifications - delivered,
      brokerCpu: cpu,
      exact: missed
        ? notified === PATIENTS && already === 0 && receiver.notifications - delivered === expected
        : already === PATIENTS && notified === 0 && receiver.notifications - delivered === 0,
    };
  });
}

export async function runReconcile(): Promise<TargetCheck[]> {
  console.log(
    `\n## reconcile: ${fmt(PATIENTS)} patients changed in one window, 100 subscribers (1.5 per patient), a FHIR server answering _lastUpdated searches 100 per page\n`,
  );
  const fhir = new PatientServer();
  const fhirUrl = await fhir.listen();
  const receiver = new Receiver();
  await receiver.listen();
  const results: Result[] = [];
  try {
    for (const missed of [true, false]) results.push(await measure(fhir, fhirUrl, receiver, missed));
  } finally {
    await receiver.close();
    fhir.server.closeAllConnections();
    fhir.server.close();
  }
  printTable([
    ['window', 'seconds (first page found → done)', 'resources/s', 'notifications sent', 'broker CPU', 'exact'],
    ...results.map((r) => [
      r.label,
      fmt(r.seconds, 2),
      fmt(PATIENTS / r.seconds),
      fmt(r.notifications),
      `${fmt(r.brokerCpu * 100)}%`,
      r.exact ? 'yes' : 'NO',
    ]),
  ]);
  return results.map((r) => ({
    suite: 'reconcile',
    target: `${r.label}: each resource counted once, ${r.label.startsWith('missed') ? 'every subscriber notified once' : 'nothing notified again'} (reported: resources/s)`,
    measured: `${fmt(PATIENTS / r.seconds)} resources/s`,
    met: r.exact,
  }));
}
