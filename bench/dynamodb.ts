import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type DynamoDbLocal, dynamoDbEnv, startDynamoDbLocal } from '../test/support/dynamodb-local.js';
import { type BurstResult, burst, procStatus, Receiver, SUBSCRIPTIONS, subscribe, withBroker } from './pipeline.js';
import { fmt, printTable, type TargetCheck } from './util.js';

/**
 * Suite `dynamodb` ("Run on AWS"): the same broker process with BROKER_STORE=dynamodb against
 * DynamoDB Local (in-memory, a JVM on this machine: test/support/dynamodb-local.ts), next to the
 * same workload on SQLite in the same run. 100 rest-hook subscribers as in `pipeline`; closed-loop
 * bursts of EVENTS events (1 per request, 16 clients; 10 per request, 8 clients), each stopped
 * after MAX_SECONDS of sending. DynamoDB Local is not DynamoDB: its latency and throughput say
 * nothing about the service's, only about the broker's round trips per event.
 */

const EVENTS = 2_000;
const MAX_SECONDS = 20;
// 3 min: DynamoDB Local delivers ~60–120 notifications/s on these shared cores, slower still after the fan-out suite.
const DELIVER_TIMEOUT_MS = 180_000;

interface StoreResult {
  readonly store: string;
  readonly bursts: BurstResult[];
  readonly subscribeSeconds: number;
}

async function runStore(receiver: Receiver, receiverPort: number, env: Record<string, string>, label: string) {
  const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-ddb-'));
  return withBroker(dataDir, { env, connections: 16 }, async (broker, pool) => {
    const pid = broker.child.pid as number;
    const t = performance.now();
    await subscribe(pool, receiverPort);
    const subscribeSeconds = (performance.now() - t) / 1000;
    const run = `ddb-${label}-${Date.now().toString(36)}`;
    const opts = { maxSeconds: MAX_SECONDS, deliverTimeoutMs: DELIVER_TIMEOUT_MS };
    const bursts = [
      await burst(pool, receiver, pid, run, 1, EVENTS, 16, opts),
      await burst(pool, receiver, pid, run, 10, EVENTS, 8, opts),
    ];
    if (broker.warnings.length > 0)
      console.log(`${label} warnings/errors:\n  ${broker.warnings.slice(0, 5).join('\n  ')}`);
    return { store: label, bursts, subscribeSeconds, rssMiB: procStatus(pid).rssKb / 1024 };
  });
}

export async function runDynamodb(): Promise<TargetCheck[]> {
  console.log('\n## dynamodb: the broker on DynamoDB Local vs on SQLite, same workload, same run\n');
  const receiver = new Receiver();
  const receiverPort = await receiver.listen();
  const results: StoreResult[] = [];
  let ddb: DynamoDbLocal | undefined;
  try {
    results.push(await runStore(receiver, receiverPort, {}, 'sqlite'));
    const t = performance.now();
    ddb = await startDynamoDbLocal();
    console.log(`DynamoDB Local (in-memory JVM) answering after ${fmt((performance.now() - t) / 1000, 1)} s`);
    const env = dynamoDbEnv(ddb.endpoint, `bench-${Date.now().toString(36)}-`);
    results.push(await runStore(receiver, receiverPort, env, 'dynamodb (Local)'));
  } finally {
    await ddb?.stop();
    await receiver.close();
  }
  printTable([
    [
      'store',
      'burst',
      'events',
      'events/s accepted',
      'notifications',
      'notifications/s delivered',
      'drain after last 202 (s)',
      'broker CPU',
      'failures',
      `${SUBSCRIPTIONS} subs active (s)`,
    ],
    ...results.flatMap((r) =>
      r.bursts.map((b) => [
        r.store,
        `${b.label}, ${b.label.startsWith('1 ') ? 16 : 8} clients`,
        fmt(b.events),
        fmt(b.events / b.ingestSeconds),
        fmt(b.notifications),
        fmt(b.notifications / b.deliverSeconds),
        fmt(b.deliverSeconds - b.ingestSeconds, 2),
        `${fmt(b.brokerCpu * 100)}%`,
        fmt(b.failures),
        fmt(r.subscribeSeconds, 1),
      ]),
    ),
  ]);
  console.log(
    `\nup to ${fmt(EVENTS)} events per burst, sending stopped after ${MAX_SECONDS} s; broker CPU excludes the DynamoDB Local JVM, which shares the same two cores`,
  );
  // The issue names no numeric target for DynamoDB; the suite reports figures only.
  return [];
}
