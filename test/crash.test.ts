import { rmSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BACKPORT_EXT } from '../src/core/fhir-urls.js';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, newDataDir, startBroker } from './support/broker-process.js';
import { Client, eventLike, focusOf, type Json, statusOf, topicSubscription } from './support/fhir-client.js';
import { prng } from './support/prng.js';
import type { ReceivedRequest } from './support/receiver.js';
import { Receiver } from './support/receiver.js';

/**
 * Crash safety of the real process: a stream of events is posted by concurrent senders, the broker
 * is SIGKILLed mid-stream, and restarted on the same data dir. Every event that got a 202 must be
 * delivered to every matching subscriber, nothing that was never sent or does not match may be,
 * event numbers stay gap-free, and a redelivery after the crash carries the first delivery's
 * `webhook-id`. Then the senders retry what was never acknowledged (as EventBridge would): the
 * events committed before the crash must come back as duplicates, and the rest be delivered once.
 */

const WORKERS = 4;

interface StreamEvent {
  readonly key: string; // "Patient/p-7": what the notification's focus names
  readonly type: 'Patient' | 'Observation';
  readonly event: Json;
}

interface SubSpec {
  readonly name: string;
  readonly matches: (e: { type: string; id: string }) => boolean;
}

interface Delivery {
  readonly n: number;
  /** The request that carried it (its index among the receiver's requests). */
  readonly request: number;
  readonly focus: string | undefined;
  readonly webhookId: string;
  readonly instance: 'before' | 'after';
}

function streamEvent(run: string, type: 'Patient' | 'Observation', id: string, eventId: string): StreamEvent {
  const fixture = type === 'Patient' ? 'healthlake-update-patient' : 'healthlake-create-observation';
  return { key: `${type}/${id}`, type, event: eventLike(fixture, `${run}-${eventId}`, id) };
}

/** "https://…/r4/Patient/p-7" → "Patient/p-7". */
function focusKey(reference: string | undefined): string | undefined {
  return reference?.split('/').slice(-2).join('/');
}

async function postEvents(base: string, events: readonly Json[]): Promise<{ status: number; body?: Json }> {
  const res = await fetch(`${base}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${INGEST_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(events),
    signal: AbortSignal.timeout(10_000),
  });
  // A 202 means committed, even if the process dies before the body is read.
  const text = await res.text().catch(() => undefined);
  try {
    return text === undefined ? { status: res.status } : { status: res.status, body: JSON.parse(text) as Json };
  } catch {
    return { status: res.status };
  }
}

describe('crash safety: SIGKILL mid-stream, restart on the same data dir', () => {
  let receiver: Receiver;
  const live: BrokerProcess[] = [];
  const dirs: string[] = [];

  beforeAll(async () => {
    receiver = await Receiver.start();
  });

  afterEach(async () => {
    await Promise.all(live.splice(0).map((b) => b.kill('SIGKILL')));
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  afterAll(async () => {
    await receiver?.close();
  });

  // The last run leaves more pending notifications on one lane than the dispatcher buffers (256),
  // so recovery also reads the outbox back in pages.
  it.each([
    { killAt: 20, n: 300, seed: 11 },
    { killAt: 120, n: 300, seed: 22 },
    { killAt: 250, n: 300, seed: 33 },
    { killAt: 480, n: 600, seed: 44 },
  ])(
    'loses nothing acknowledged when killed after $killAt acknowledged of $n events',
    async ({ killAt, n: total, seed }) => {
      const run = `k${killAt}`;
      const label = `[killAt=${killAt} seed=${seed}]`;
      const rand = prng(seed);
      const dataDir = newDataDir();
      dirs.push(dataDir);

      // --- the stream: distinct EventBridge ids, distinct resource ids
      const stream: StreamEvent[] = [];
      for (let i = 1; i <= total; i++) {
        stream.push(
          i % 3 === 0
            ? streamEvent(run, 'Observation', `o-${i}`, `e-${i}`)
            : streamEvent(run, 'Patient', `p-${i}`, `e-${i}`),
        );
      }
      // Every 7th event number's Patient, plus the sentinels: a filter with ~30–60 ids.
      const subsetIds = stream
        .filter((e) => e.type === 'Patient' && Number(e.key.split('-')[1]) % 7 === 1)
        .map((e) => e.key.split('/')[1] as string)
        .concat('s1-sub', 's2-sub');
      const specs: SubSpec[] = [
        { name: 'patients', matches: (e) => e.type === 'Patient' },
        { name: 'observations', matches: (e) => e.type === 'Observation' },
        { name: 'subset', matches: (e) => e.type === 'Patient' && subsetIds.includes(e.id) },
        // Up to five events per bundle (`backport-max-count`): a bundle resent after the crash is the same bundle.
        { name: 'bundled', matches: (e) => e.type === 'Patient' },
      ];
      const matches = (spec: SubSpec, key: string): boolean => {
        const [type, id] = key.split('/') as [string, string];
        return spec.matches({ type, id });
      };

      // --- first instance: subscriptions, activated by handshake
      const first = await startBroker({}, dataDir);
      live.push(first);
      const alice = new Client(first.url, API_KEYS.alice);
      const path = (name: string) => `/hook/${run}/${name}`;
      const ids: Record<string, string> = {};
      ids.patients = (await alice.create(topicSubscription('patient-change', `${receiver.url}${path('patients')}`)))
        .id as string;
      ids.observations = (
        await alice.create(
          topicSubscription('resource-change', `${receiver.url}${path('observations')}`, {
            filters: ['_type=Observation'],
          }),
        )
      ).id as string;
      ids.subset = (
        await alice.create(
          topicSubscription('patient-change', `${receiver.url}${path('subset')}`, {
            filters: [`Patient?_id=${subsetIds.join(',')}`],
          }),
        )
      ).id as string;
      ids.bundled = (
        await alice.create(
          topicSubscription('patient-change', `${receiver.url}${path('bundled')}`, {
            channel: { extension: [{ url: BACKPORT_EXT.maxCount, valuePositiveInt: 5 }] },
          }),
        )
      ).id as string;
      for (const id of Object.values(ids)) await first.waitForStatus(id, 'active');

      // --- 4 concurrent senders, 1–5 events per request; SIGKILL once killAt events are acknowledged
      const acked = new Set<string>();
      const unacked = new Set<string>();
      const unexpected: string[] = [];
      let next = 0;
      let ackedCount = 0;
      let exited: Promise<number | null> | undefined;
      const worker = async (): Promise<void> => {
        for (let guard = 0; guard < total && exited === undefined && next < stream.length; guard++) {
          const batch = stream.slice(next, next + 1 + Math.floor(rand() * 5));
          next += batch.length;
          let outcome: { status: number; body?: Json } | undefined;
          try {
            outcome = await postEvents(
              first.url,
              batch.map((e) => e.event),
            );
          } catch {
            outcome = undefined; // connection refused or reset: the process died
          }
          if (outcome?.status === 202) {
            for (const e of batch) acked.add(e.key);
            if (outcome.body !== undefined && outcome.body.accepted !== batch.length) {
              unexpected.push(`202 with ${JSON.stringify(outcome.body)} for ${batch.length} new events`);
            }
            ackedCount += batch.length;
            if (ackedCount >= killAt && exited === undefined) exited = first.kill('SIGKILL');
          } else {
            for (const e of batch) unacked.add(e.key);
            if (outcome !== undefined) unexpected.push(`status ${outcome.status} ${JSON.stringify(outcome.body)}`);
          }
        }
      };
      await Promise.all(Array.from({ length: WORKERS }, worker));
      expect(exited, `${label} the kill point was never reached`).toBeDefined();
      await exited;
      expect(unexpected, `${label} answers other than 202 before the crash`).toEqual([]);
      const sent = new Set([...acked, ...unacked]);
      const beforeRestart = receiver.requests.length;

      // --- second instance on the same data dir
      const second = await startBroker({}, dataDir);
      live.push(second);
      const admin = new Client(second.url, API_KEYS.alice);
      const instanceOf = (req: ReceivedRequest, bundle: Json): 'before' | 'after' => {
        // The bundle names the instance that built it (its own port); fall back to arrival order.
        if (first.url !== second.url) {
          const ref = (statusOf(bundle).params.get('subscription')?.valueReference as Json | undefined)?.reference;
          if (String(ref).startsWith(`${second.url}/`)) return 'after';
          if (String(ref).startsWith(`${first.url}/`)) return 'before';
        }
        return receiver.requests.indexOf(req) < beforeRestart ? 'before' : 'after';
      };

      const deliveries = (name: string): Delivery[] => {
        const out: Delivery[] = [];
        for (const req of receiver.on(path(name))) {
          const bundle = JSON.parse(req.body) as Json;
          const { params, events } = statusOf(bundle);
          if (params.get('type')?.valueCode !== 'event-notification') continue;
          for (const ev of events) {
            const part = (ev.part as Json[]).find((p) => p.name === 'event-number') as Json;
            out.push({
              n: Number(part.valueString),
              request: receiver.requests.indexOf(req),
              focus: focusKey(focusOf(ev)),
              webhookId: String(req.headers['webhook-id']),
              instance: instanceOf(req, bundle),
            });
          }
        }
        return out;
      };
      const focuses = (name: string): Set<string | undefined> => new Set(deliveries(name).map((d) => d.focus));

      const sentinels = async (phase: 's1' | 's2'): Promise<void> => {
        const batch = [
          streamEvent(run, 'Patient', `${phase}-all`, `${phase}-all`),
          streamEvent(run, 'Patient', `${phase}-sub`, `${phase}-sub`),
          streamEvent(run, 'Observation', `${phase}-obs`, `${phase}-obs`),
        ];
        const res = await postEvents(
          second.url,
          batch.map((e) => e.event),
        );
        expect(res, `${label} sentinels ${phase}`).toEqual({
          status: 202,
          body: { accepted: 3, ignored: 0, duplicates: 0 },
        });
        // Delivery within a subscription is in event-number order: once its sentinels have arrived,
        // everything numbered before them has too.
        for (const spec of specs) {
          const want = batch.filter((e) => matches(spec, e.key)).map((e) => e.key);
          expect(want.length, `${label} ${spec.name} matches a ${phase} sentinel`).toBeGreaterThan(0);
          await receiver.waitFor(
            () => want.every((k) => focuses(spec.name).has(k)),
            `${label} ${phase} sentinels on ${spec.name}`,
            20_000,
          );
        }
      };

      const statusCount = async (name: string): Promise<number> => {
        const res = await admin.call('GET', `/fhir/Subscription/${ids[name]}/$status`);
        expect(res.status).toBe(200);
        return Number(statusOf(res.body).params.get('events-since-subscription-start')?.valueString);
      };

      /** The invariants every subscription's deliveries must hold; returns the delivered focus set. */
      const check = async (spec: SubSpec, phase: string): Promise<Set<string>> => {
        const all = deliveries(spec.name);
        const where = `${label} ${phase} ${spec.name}`;
        const byNumber = new Map<number, Delivery[]>();
        for (const d of all) byNumber.set(d.n, [...(byNumber.get(d.n) ?? []), d]);
        const max = Math.max(0, ...byNumber.keys());
        // 1..max with no gaps, and max is what the subscription counted.
        expect(
          [...byNumber.keys()].sort((a, b) => a - b),
          `${where}: event numbers`,
        ).toEqual(Array.from({ length: max }, (_, i) => i + 1));
        expect(await statusCount(spec.name), `${where}: $status events-since-subscription-start`).toBe(max);
        // A number is delivered at most once per instance; a second copy only as a redelivery after
        // the crash, with the same focus and the same webhook-id as the first.
        const badDuplicates = [...byNumber.entries()]
          .filter(
            ([, ds]) =>
              ds.length > 2 ||
              (ds.length === 2 && (ds[0]?.instance !== 'before' || ds[1]?.instance !== 'after')) ||
              new Set(ds.map((d) => d.focus)).size !== 1 ||
              new Set(ds.map((d) => d.webhookId)).size !== 1,
          )
          .map(([n, ds]) => ({ n, ds }));
        expect(badDuplicates, `${where}: duplicate deliveries`).toEqual([]);
        // A webhook-id names one bundle: every request that carried it carried the same events.
        const bundles = new Map<string, Map<number, number[]>>();
        for (const d of all) {
          const requests = bundles.get(d.webhookId) ?? new Map<number, number[]>();
          requests.set(d.request, [...(requests.get(d.request) ?? []), d.n]);
          bundles.set(d.webhookId, requests);
        }
        const regrouped = [...bundles.entries()]
          .filter(([, requests]) => new Set([...requests.values()].map((ns) => ns.join(','))).size > 1)
          .map(([webhookId, requests]) => ({ webhookId, bundles: [...requests.values()] }));
        expect(regrouped, `${where}: one webhook-id, different events`).toEqual([]);
        // One event, one number: no event was committed twice.
        const numbersOf = new Map<string | undefined, Set<number>>();
        for (const d of all) numbersOf.set(d.focus, new Set([...(numbersOf.get(d.focus) ?? []), d.n]));
        const renumbered = [...numbersOf.entries()].filter(([, ns]) => ns.size > 1).map(([f, ns]) => [f, [...ns]]);
        expect(renumbered, `${where}: events with more than one event number`).toEqual([]);
        const delivered = new Set([...numbersOf.keys()].map(String));
        // Nothing that was never sent, and nothing outside the filter.
        const sentinelKeys = (p: string) => [`Patient/${p}-all`, `Patient/${p}-sub`, `Observation/${p}-obs`];
        const legit = new Set([...sent, ...sentinelKeys('s1'), ...(phase === 'after retry' ? sentinelKeys('s2') : [])]);
        const foreign = [...delivered].filter((k) => !legit.has(k) || !matches(spec, k));
        expect(foreign, `${where}: delivered but never sent or not matching`).toEqual([]);
        return delivered;
      };

      // --- phase 1: what was acknowledged before the crash is delivered, nothing else
      await sentinels('s1');
      const committed = new Set<string>();
      for (const spec of specs) {
        const delivered = await check(spec, 'after restart');
        for (const k of delivered) committed.add(k);
        const missing = [...acked].filter((k) => matches(spec, k) && !delivered.has(k));
        expect(missing, `${label} ${spec.name}: acknowledged but never delivered`).toEqual([]);
      }

      // --- phase 2: the senders retry what was never acknowledged, and EventBridge (at least once)
      // redelivers some acknowledged events too. Everything committed is delivered (phase 1 showed
      // 1..max = $status) and every event matches some subscription, so the delivered set tells
      // exactly which unacknowledged events were committed: those, and the acknowledged ones, must
      // come back as duplicates across the restart.
      const committedUnacked = stream.filter((e) => unacked.has(e.key) && committed.has(e.key)).length;
      const again = stream.filter((e, i) => unacked.has(e.key) || (acked.has(e.key) && i % 10 === 0));
      const againAcked = again.filter((e) => acked.has(e.key)).length;
      expect(againAcked, `${label} acknowledged events to redeliver`).toBeGreaterThan(0);
      const res = await postEvents(
        second.url,
        again.map((e) => e.event),
      );
      expect(res, `${label} ${unacked.size} unacknowledged and ${againAcked} acknowledged events again`).toEqual({
        status: 202,
        body: { accepted: unacked.size - committedUnacked, ignored: 0, duplicates: committedUnacked + againAcked },
      });
      await sentinels('s2');
      for (const spec of specs) {
        const delivered = await check(spec, 'after retry');
        const expected = [...sent, 's1-all', 's1-sub', 's2-all', 's2-sub']
          .map((k) => (k.includes('/') ? k : `Patient/${k}`))
          .concat('Observation/s1-obs', 'Observation/s2-obs')
          .filter((k) => matches(spec, k))
          .sort();
        expect([...delivered].sort(), `${label} ${spec.name}: every sent event, once`).toEqual(expected);
      }

      // Only handshakes and event notifications, every one answered 2xx.
      for (const spec of specs) {
        const types = receiver
          .on(path(spec.name))
          .map((r) => statusOf(JSON.parse(r.body) as Json).params.get('type')?.valueCode);
        expect(
          types.filter((t) => t !== 'event-notification'),
          `${label} ${spec.name}`,
        ).toEqual(['handshake']);
      }
      expect(receiver.failures).toEqual([]);
    },
  );
});
