import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Pool } from 'undici';
import {
  type Broker,
  BURST_EVENTS,
  type BurstResult,
  burst,
  fsyncProbe,
  INGEST_TOKEN,
  openLoop,
  panelsOf,
  procStatus,
  RATE,
  RATE_SECONDS,
  type RateResult,
  Receiver,
  SUBSCRIPTIONS,
  settleDisk,
  subscribe,
  withBroker,
} from './pipeline.js';
import { fmt, median, percentile, printTable, type TargetCheck } from './util.js';

/**
 * Suite `outbox` ("Delivery that loses nothing"): the real broker (durable SQLite outbox,
 * synchronous=FULL) against a minimal forwarder (bench/forwarder.ts, no storage) as the speed limit.
 * Same load generator, same receiver, same 100 subscribers / 1–2 targets per event as `pipeline`.
 *
 * Two configurations, each a fresh broker child beside a fresh forwarder child with the same mix:
 *   (a) healthy — every subscriber answers 204;
 *   (b) 10% failing — subscribers n % 10 === 9 point at /fail/n (204 to the broker's handshake, 503
 *       to every notification); the broker retries on BROKER_RETRY_DELAYS, short so that retries run
 *       during the measurement; the forwarder (FORWARD_FAIL_EVERY=10) posts there once and moves on.
 *       Both sides are measured on their healthy subscribers only.
 *
 * Latency: open loop RATE events/s for RATE_SECONDS, each side alone, after an unmeasured warm-up
 * (a burst, then 3 s of the same open loop). Throughput: closed-loop bursts
 * of BURST_EVENTS single-event requests, forwarder and broker alternating burst by burst, at each
 * client count of CLIENTS. While one side runs a burst the other is stopped (SIGSTOP) so that it
 * takes no CPU, not even the retries of (b); alternating keeps both sides in the same phase of this
 * machine, whose speed drifts by ~20% within minutes.
 *
 * A side's throughput is its best client count (the median of its bursts there): a closed loop with
 * a fixed number of clients measures clients / latency, and a store that answers only after an fsync
 * needs more requests in flight than a forwarder that answers before it forwards. Latency has its own
 * target. The ratio at 32 clients (the one figure of earlier runs) is printed too.
 */

const FAIL_EVERY = 10;
/** Closed-loop client counts (requests in flight). */
const CLIENTS = [32, 64, 128] as const;
/** Bursts per side and client count; the median (by notifications/s) is reported. */
const BURSTS = 3;
const RETRY_DELAYS = '200ms,1s,5s,5s,5s,5s';
const WARM_UP_EVENTS = 2_000;
const WARM_UP_SECONDS = 3;
const THROUGHPUT_TARGET = 0.5;
const P99_FACTOR_TARGET = 3;

/** Notifications delivered per second of a burst: the figure compared with the forwarder's. */
const notificationsPerSecond = (b: BurstResult): number => b.notifications / b.deliverSeconds;
const failing = (n: number): boolean => n % FAIL_EVERY === FAIL_EVERY - 1;
const healthyCount = (i: number): number => panelsOf(i).filter((n) => !failing(n)).length;

/**
 * (c) `batching`: all healthy, subscribers with `backport-max-count` 16, so a lane with a backlog
 * sends several events in one bundle (issue #3: "when a backlog builds, the broker may batch
 * several events into one bundle, up to max-count"). Reported beside (a) and (b), not a target:
 * the forwarder posts each event on its own either way.
 */
type Kind = 'healthy' | 'failing' | 'batching';
const BATCH_MAX_COUNT = 16;

/** One burst of each side at one client count, back to back. */
interface Pair {
  readonly clients: number;
  readonly forwarder: BurstResult;
  readonly broker: BurstResult;
  /** CPU µs per event of the broker's threads (event loop first) and of this bench process. */
  readonly threads: readonly number[];
  readonly benchUs: number;
  readonly forwarderUs: number;
  readonly forwarderBenchUs: number;
}

interface ConfigResult {
  readonly kind: Kind;
  readonly label: string;
  readonly forwarderRate: RateResult;
  readonly forwarderRssMiB: number;
  readonly rate: RateResult;
  readonly pairs: readonly Pair[];
  readonly refused: number;
  readonly retried: string;
  readonly rssMiB: number;
  /** Seconds `settleDisk` took before the forwarder's and the broker's latency runs. */
  readonly settled: readonly [number, number];
}

async function metric(pool: Pool, name: string, outcome: string): Promise<string> {
  try {
    const res = await pool.request({
      path: '/metrics',
      method: 'GET',
      headers: { authorization: `Bearer ${INGEST_TOKEN}` },
    });
    const text = await res.body.text();
    const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && l.includes(`outcome="${outcome}"`));
    return line?.split(' ').pop() ?? '0';
  } catch {
    return '?';
  }
}

/**
 * Runs `fn` with `others` stopped (SIGSTOP), and continues them whatever happens. A Ctrl-C
 * meanwhile kills them: a stopped child would not act on its own SIGINT, and would be left behind.
 */
async function alone<T>(others: readonly ChildProcess[], fn: () => Promise<T>): Promise<T> {
  const interrupted = (signal: NodeJS.Signals): void => {
    for (const c of others) {
      c.kill('SIGCONT');
      c.kill('SIGKILL');
    }
    process.kill(process.pid, signal);
  };
  process.once('SIGINT', interrupted);
  process.once('SIGTERM', interrupted);
  for (const c of others) c.kill('SIGSTOP');
  try {
    return await fn();
  } finally {
    process.off('SIGINT', interrupted);
    process.off('SIGTERM', interrupted);
    for (const c of others) c.kill('SIGCONT');
  }
}

/** CPU seconds per thread of `pid` (user + system), by thread id. */
export function threadCpu(pid: number): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const f = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
      out.set(Number(tid), (Number(f[11]) + Number(f[12])) / 100);
    } catch {
      // the thread ended between the listing and the read
    }
  }
  return out;
}

/** µs per event of each thread that used any CPU: the event loop (tid = pid) first, then busiest first. */
function perThread(pid: number, before: Map<number, number>, after: Map<number, number>, events: number): number[] {
  const used = [...after].map(([tid, s]) => [tid, ((s - (before.get(tid) ?? 0)) * 1e6) / events] as const);
  const loop = used.find(([tid]) => tid === pid)?.[1] ?? 0;
  const others = used
    .filter(([tid, us]) => tid !== pid && us >= 1)
    .map(([, us]) => us)
    .sort((a, b) => b - a);
  return [loop, ...others];
}

async function measuredBurst(
  pool: Pool,
  receiver: Receiver,
  side: Broker,
  run: string,
  clients: number,
  countOf: ((i: number) => number) | undefined,
): Promise<{ result: BurstResult; threads: number[]; benchUs: number }> {
  const pid = side.child.pid as number;
  const t0 = threadCpu(pid);
  const me0 = process.cpuUsage();
  const result = await burst(
    pool,
    receiver,
    pid,
    run,
    1,
    BURST_EVENTS,
    clients,
    countOf === undefined ? {} : { countOf },
  );
  const me = process.cpuUsage(me0);
  return {
    result,
    threads: perThread(pid, t0, threadCpu(pid), result.events),
    benchUs: (me.user + me.system) / result.events,
  };
}

/**
 * Before a side's latency run, unmeasured: a burst, then WARM_UP_SECONDS of the open loop itself, so
 * that neither side is timed while its JIT, heap and (for the broker) WAL settle after the burst.
 * Measured: the first open loop after a bare burst had a p99 1–2 ms above the next.
 */
async function warmUp(
  pool: Pool,
  receiver: Receiver,
  side: Broker,
  run: string,
  countOf: ((i: number) => number) | undefined,
): Promise<void> {
  const pid = side.child.pid as number;
  const counted = countOf === undefined ? {} : { countOf };
  await burst(pool, receiver, pid, `${run}-warm`, 1, WARM_UP_EVENTS, Math.min(...CLIENTS), counted);
  await openLoop(pool, receiver, pid, `${run}-warm-open`, { ...counted, seconds: WARM_UP_SECONDS });
}

async function runConfig(receiver: Receiver, receiverPort: number, kind: Kind): Promise<ConfigResult> {
  const fwdDir = mkdtempSync(join(tmpdir(), 'broker-bench-forwarder-'));
  const fwdEnv: Record<string, string> = { FORWARD_TO: `http://127.0.0.1:${receiverPort}` };
  if (kind === 'failing') fwdEnv.FORWARD_FAIL_EVERY = String(FAIL_EVERY);
  const connections = Math.max(...CLIENTS);
  return withBroker(fwdDir, { script: 'bench/forwarder.ts', env: fwdEnv, connections }, (fwd, fwdPool) => {
    const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-outbox-'));
    const env = kind === 'failing' ? { env: { BROKER_RETRY_DELAYS: RETRY_DELAYS } } : {};
    return withBroker(dataDir, { ...env, connections }, async (broker, pool) => {
      const pid = broker.child.pid as number;
      await subscribe(
        pool,
        receiverPort,
        (n) => (kind === 'failing' && failing(n) ? `/fail/${n}` : `/hook/${n}`),
        kind === 'batching' ? BATCH_MAX_COUNT : undefined,
      );
      // 503s the broker got from failing subscribers (the forwarder's are counted out: it is stopped
      // during the broker's phases and the other way round).
      let refused = 0;
      const brokerPhase = async <T>(fn: () => Promise<T>): Promise<T> => {
        const before = receiver.refused;
        try {
          return await alone([fwd.child], fn);
        } finally {
          refused += receiver.refused - before;
        }
      };
      const run = `outbox-${kind}-${Date.now().toString(36)}`;
      const countOf = kind === 'failing' ? healthyCount : undefined;
      const counted = countOf === undefined ? {} : { countOf };
      const settled: [number, number] = [0, 0];
      const forwarderRate = await alone([broker.child], async () => {
        await warmUp(fwdPool, receiver, fwd, `${run}-fwd`, countOf);
        settled[0] = settleDisk(fwdDir);
        return openLoop(fwdPool, receiver, fwd.child.pid as number, `${run}-fwd`, counted);
      });
      const rate = await brokerPhase(async () => {
        await warmUp(pool, receiver, broker, run, countOf);
        settled[1] = settleDisk(dataDir);
        return openLoop(pool, receiver, pid, run, counted);
      });
      const pairs: Pair[] = [];
      for (const clients of CLIENTS) {
        for (let k = 0; k < BURSTS; k++) {
          const f = await alone([broker.child], () =>
            measuredBurst(fwdPool, receiver, fwd, `${run}-f${clients}-${k}`, clients, countOf),
          );
          const b = await brokerPhase(() =>
            measuredBurst(pool, receiver, broker, `${run}-b${clients}-${k}`, clients, countOf),
          );
          pairs.push({
            clients,
            forwarder: f.result,
            broker: b.result,
            threads: b.threads,
            benchUs: b.benchUs,
            forwarderUs: f.threads.reduce((sum, us) => sum + us, 0),
            forwarderBenchUs: f.benchUs,
          });
        }
      }
      const retried = `${await metric(pool, 'broker_notifications_total', 'retried')} retried, ${await metric(pool, 'broker_notifications_total', 'dead-lettered')} dead-lettered`;
      const label =
        kind === 'healthy'
          ? '(a) all healthy'
          : kind === 'failing'
            ? '(b) 10% failing'
            : `(c) max-count ${BATCH_MAX_COUNT}`;
      if (broker.warnings.length > 0 && kind !== 'failing')
        console.log(`broker ${label} warnings/errors:\n  ${broker.warnings.slice(0, 5).join('\n  ')}`);
      return {
        kind,
        label,
        forwarderRate,
        forwarderRssMiB: procStatus(fwd.child.pid as number).rssKb / 1024,
        rate,
        pairs,
        refused,
        retried,
        rssMiB: procStatus(pid).rssKb / 1024,
        settled,
      };
    });
  });
}

/** Median notifications/s of one side's bursts at `clients`. */
function throughputAt(r: ConfigResult, side: 'forwarder' | 'broker', clients: number): number {
  return median(r.pairs.filter((p) => p.clients === clients).map((p) => notificationsPerSecond(p[side])));
}

/** A side's best client count and its median notifications/s there. */
function capacity(r: ConfigResult, side: 'forwarder' | 'broker'): { clients: number; perSecond: number } {
  let best = { clients: 0, perSecond: 0 };
  for (const clients of CLIENTS) {
    const perSecond = throughputAt(r, side, clients);
    if (perSecond > best.perSecond) best = { clients, perSecond };
  }
  return best;
}

export async function runOutbox(): Promise<TargetCheck[]> {
  console.log(
    `\n## outbox: broker (durable SQLite outbox) vs a minimal forwarder, same load, same receiver (${SUBSCRIPTIONS} subscribers, 1–2 per event)\n`,
  );
  const probeDir = mkdtempSync(join(tmpdir(), 'broker-bench-probe-'));
  try {
    const probe = fsyncProbe(probeDir);
    console.log(`fsync probe: p50 ${fmt(probe.p50, 2)} ms, p99 ${fmt(probe.p99, 2)} ms`);
  } finally {
    rmSync(probeDir, { recursive: true, force: true });
  }
  const receiver = new Receiver();
  const receiverPort = await receiver.listen();
  const results: ConfigResult[] = [];
  try {
    for (const kind of ['healthy', 'failing', 'batching'] as const)
      results.push(await runConfig(receiver, receiverPort, kind));
  } finally {
    await receiver.close();
  }
  const [healthy, failingRun] = results as [ConfigResult, ConfigResult];
  const p = (rate: RateResult, q: number): number => percentile(rate.latencies, q);
  const pct = (a: number, b: number): string => `${fmt((100 * a) / b)}%`;

  console.log(
    `\nlatency, open loop ${RATE} events/s for ${RATE_SECONDS} s, each side alone (ms, ingest → webhook received):`,
  );
  printTable([
    [
      'side',
      'p50',
      'p90',
      'p99',
      'max',
      'p99 vs fwd',
      '202 p99',
      'send lag max',
      'CPU',
      'RSS MiB',
      '503s to broker (≈)',
      'broker counters',
    ],
    ...results.flatMap((r) => [
      [
        `forwarder ${r.label}`,
        fmt(p(r.forwarderRate, 50), 1),
        fmt(p(r.forwarderRate, 90), 1),
        fmt(p(r.forwarderRate, 99), 1),
        fmt(p(r.forwarderRate, 100), 1),
        '1.0x',
        fmt(percentile(r.forwarderRate.ingest, 99), 1),
        fmt(r.forwarderRate.maxLagMs, 1),
        `${fmt(r.forwarderRate.brokerCpu * 100)}%`,
        fmt(r.forwarderRssMiB, 1),
        '-',
        '-',
      ],
      [
        `broker ${r.label}`,
        fmt(p(r.rate, 50), 1),
        fmt(p(r.rate, 90), 1),
        fmt(p(r.rate, 99), 1),
        fmt(p(r.rate, 100), 1),
        `${fmt(p(r.rate, 99) / p(r.forwarderRate, 99), 1)}x`,
        fmt(percentile(r.rate.ingest, 99), 1),
        fmt(r.rate.maxLagMs, 1),
        `${fmt(r.rate.brokerCpu * 100)}%`,
        fmt(r.rssMiB, 1),
        fmt(r.refused),
        r.retried,
      ],
    ]),
  ]);
  console.log(
    `before each latency run: sync, then 20 fdatasyncs in a row under 5 ms (earlier phases' deleted data dirs stall fsyncs on this VM): ${results
      .map((r) => `${r.label} ${fmt(r.settled[0], 1)} s / ${fmt(r.settled[1], 1)} s`)
      .join(', ')} (forwarder / broker)`,
  );

  console.log(
    `\nthroughput, closed loop: bursts of ${fmt(BURST_EVENTS)} single-event requests, forwarder and broker alternating (the other stopped), median of ${BURSTS} per row:`,
  );
  printTable([
    [
      'config',
      'clients',
      'forwarder notif/s',
      'broker notif/s',
      'broker events/s',
      'broker drain (s)',
      'broker/forwarder',
      'broker bursts',
      'forwarder bursts',
    ],
    ...results.flatMap((r) =>
      CLIENTS.map((clients) => {
        const pairs = r.pairs.filter((x) => x.clients === clients);
        const mid = [...pairs].sort((x, y) => notificationsPerSecond(x.broker) - notificationsPerSecond(y.broker))[
          Math.floor(pairs.length / 2)
        ] as Pair;
        return [
          r.label,
          String(clients),
          fmt(throughputAt(r, 'forwarder', clients)),
          fmt(throughputAt(r, 'broker', clients)),
          fmt(mid.broker.events / mid.broker.ingestSeconds),
          fmt(mid.broker.deliverSeconds - mid.broker.ingestSeconds, 2),
          pct(throughputAt(r, 'broker', clients), throughputAt(r, 'forwarder', clients)),
          pairs.map((x) => fmt(notificationsPerSecond(x.broker))).join(' / '),
          pairs.map((x) => fmt(notificationsPerSecond(x.forwarder))).join(' / '),
        ];
      }),
    ),
  ]);
  for (const r of results) {
    const b = capacity(r, 'broker');
    const f = capacity(r, 'forwarder');
    console.log(
      `broker ${r.label}: capacity ${fmt(b.perSecond)} notifications/s (${b.clients} clients) vs forwarder ${fmt(f.perSecond)} (${f.clients} clients) = ${pct(b.perSecond, f.perSecond)}`,
    );
  }
  console.log(
    `(b) counts healthy subscribers only, on both sides; broker BROKER_RETRY_DELAYS=${RETRY_DELAYS}, forwarder FORWARD_FAIL_EVERY=${FAIL_EVERY}`,
  );
  console.log(
    `(c) is (a) with subscribers that allow ${BATCH_MAX_COUNT} events per bundle (backport-max-count): not a target, the forwarder posts each event on its own`,
  );

  // Where the CPU goes, per event, for (a): the broker's threads and this process (load generator + receiver).
  console.log(
    '\nCPU µs per event in the bursts of (a) (medians; broker threads: event loop first, then busiest first):',
  );
  for (const clients of CLIENTS) {
    const pairs = healthy.pairs.filter((x) => x.clients === clients);
    const width = Math.max(...pairs.map((x) => x.threads.length));
    const threads = Array.from({ length: width }, (_, i) => median(pairs.map((x) => x.threads[i] ?? 0)));
    console.log(
      `  ${clients} clients: broker ${threads.map((us) => fmt(us)).join(' + ')} = ${fmt(threads.reduce((s, us) => s + us, 0))}, load generator + receiver ${fmt(median(pairs.map((x) => x.benchUs)))}; forwarder ${fmt(median(pairs.map((x) => x.forwarderUs)))}, load generator + receiver ${fmt(median(pairs.map((x) => x.forwarderBenchUs)))}`,
    );
  }
  for (const r of results) {
    for (const [side, rate] of [
      ['forwarder', r.forwarderRate],
      ['broker', r.rate],
    ] as const) {
      if (rate.failures > 0 || rate.unexpected > 0)
        console.log(
          `${side} ${r.label}: ${rate.failures} failed requests, ${rate.unexpected} unexpected notifications`,
        );
    }
  }
  for (const r of results) {
    const failed = r.pairs.reduce((s, x) => s + x.broker.failures + x.forwarder.failures, 0);
    if (failed > 0) console.log(`${r.label}: ${failed} failed requests in the bursts`);
  }
  const kept = p(failingRun.rate, 99) <= Math.max(1.5 * p(healthy.rate, 99), p(healthy.rate, 99) + 5);
  console.log(
    `healthy subscribers with 10% failing: p99 ${fmt(p(failingRun.rate, 99), 1)} ms vs ${fmt(p(healthy.rate, 99), 1)} ms all healthy → ${kept ? 'kept their latency (within 1.5x or +5 ms)' : 'did NOT keep their latency'}`,
  );

  const ok = (r: ConfigResult): boolean =>
    r.rate.failures === 0 &&
    r.forwarderRate.failures === 0 &&
    r.pairs.every((x) => x.broker.failures === 0 && x.forwarder.failures === 0);
  const throughputCheck = (r: ConfigResult, name: string): TargetCheck => {
    const b = capacity(r, 'broker');
    const f = capacity(r, 'forwarder');
    return {
      suite: 'outbox',
      target: `${name} notifications/s ≥ 50% of forwarder (each at its best client count)`,
      measured: `${fmt(b.perSecond)} vs ${fmt(f.perSecond)} /s = ${pct(b.perSecond, f.perSecond)} (at 32 clients ${pct(throughputAt(r, 'broker', 32), throughputAt(r, 'forwarder', 32))})`,
      met: b.perSecond >= THROUGHPUT_TARGET * f.perSecond && ok(r),
    };
  };
  const latencyCheck = (r: ConfigResult, name: string): TargetCheck => ({
    suite: 'outbox',
    target: `${name} p99 ≤ 3x forwarder p99 at ${RATE}/s`,
    measured: `${fmt(p(r.rate, 99), 1)} vs ${fmt(p(r.forwarderRate, 99), 1)} ms = ${fmt(p(r.rate, 99) / p(r.forwarderRate, 99), 1)}x`,
    met: p(r.rate, 99) <= P99_FACTOR_TARGET * p(r.forwarderRate, 99) && ok(r),
  });
  return [
    throughputCheck(healthy, 'broker (a)'),
    latencyCheck(healthy, 'broker (a)'),
    throughputCheck(failingRun, 'broker (b) 10% failing: healthy'),
    latencyCheck(failingRun, 'broker (b) 10% failing: healthy'),
  ];
}
