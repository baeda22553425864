import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Pool } from 'undici';
import { threadCpu } from './outbox.js';
import { type Broker, burst, Receiver, subscribe, withBroker } from './pipeline.js';

/**
 * A/B of broker (or forwarder) variants, for a change to the burst path: alternating 10,000-event
 * bursts of single-event requests (each side alone, the others stopped with SIGSTOP; the order
 * flips every pair), CPU µs per event of each side's threads and of this process (load generator +
 * receiver). Not part of `npm run bench`; the machine drifts ~20% within minutes, so compare pairs.
 *
 *   npx tsx bench/ab.ts PAIRS CLIENTS VARIANT...
 *
 * VARIANT: `broker`; `env:K=V,K2=V2` (the broker with that environment); `batch` (the broker's
 * threads under SCHED_BATCH, `chrt -a -b`); `maxcount:N` (subscribers with backport-max-count N);
 * `fwd` / `fwdbatch` (bench/forwarder.ts, likewise); `at:DIR` (the broker of another checkout, e.g.
 * `git worktree add /tmp/old <commit>` with `ln -s $PWD/node_modules /tmp/old/`: A/B of two commits;
 * `at:DIR+maxcount:N` for both);
 * `flags:--a,--b` (the broker with Node flags beyond `npm start`'s).
 */

interface Side {
  readonly name: string;
  readonly broker: Broker;
  readonly pool: Pool;
  readonly rows: { perSecond: number; brokerUs: number; benchUs: number }[];
}

const [pairs = '4', clients = '128', ...variants] = process.argv.slice(2);
const receiver = new Receiver();
const port = await receiver.listen();
const sides: Side[] = [];

/** Starts variant i (and, nested, the rest), then measures them all. */
async function start(i: number): Promise<void> {
  if (i === variants.length) return measure();
  const variant = variants[i] as string;
  const env: Record<string, string> = {};
  if (variant.startsWith('env:')) {
    for (const pair of variant.slice(4).split(',')) {
      const [k, v] = pair.split('=');
      env[k as string] = v ?? '';
    }
  }
  const forwarder = variant.startsWith('fwd');
  if (forwarder) env.FORWARD_TO = `http://127.0.0.1:${port}`;
  const dir = mkdtempSync(join(tmpdir(), 'bench-ab-'));
  const script = forwarder
    ? 'bench/forwarder.ts'
    : variant.startsWith('at:')
      ? `${variant.slice(3).split('+')[0]}/src/main.ts`
      : undefined;
  const nodeFlags = variant.startsWith('flags:') ? variant.slice(6).split(',') : [];
  const options = { env, connections: Number(clients), nodeFlags, ...(script === undefined ? {} : { script }) };
  await withBroker(dir, options, async (broker, pool) => {
    const pid = broker.child.pid as number;
    if (variant.endsWith('batch')) execFileSync('chrt', ['-a', '-b', '-p', '0', String(pid)]);
    // `maxcount:N` alone, or after another variant: `at:DIR+maxcount:16`.
    const maxCountAt = variant.indexOf('maxcount:');
    const maxCount = maxCountAt >= 0 ? Number(variant.slice(maxCountAt + 9)) : undefined;
    if (!forwarder) await subscribe(pool, port, undefined, maxCount);
    sides.push({ name: variant, broker, pool, rows: [] });
    await burst(pool, receiver, pid, `warm-${i}-${Date.now()}`, 1, 3_000, Number(clients));
    broker.child.kill('SIGSTOP');
    await start(i + 1);
  });
}

async function measure(): Promise<void> {
  for (let k = 0; k < Number(pairs); k++) {
    for (const side of k % 2 === 0 ? sides : [...sides].reverse()) {
      const pid = side.broker.child.pid as number;
      side.broker.child.kill('SIGCONT');
      await new Promise((resolve) => setTimeout(resolve, 300));
      const before = threadCpu(pid);
      const me = process.cpuUsage();
      const r = await burst(side.pool, receiver, pid, `${side.name}-${k}-${Date.now()}`, 1, 10_000, Number(clients));
      const mine = process.cpuUsage(me);
      const threads = [...threadCpu(pid)]
        .map(([tid, s]) => ((s - (before.get(tid) ?? 0)) * 1e6) / r.events)
        .filter((us) => us >= 1)
        .sort((a, b) => b - a);
      side.broker.child.kill('SIGSTOP');
      const row = {
        perSecond: r.notifications / r.deliverSeconds,
        brokerUs: threads.reduce((a, b) => a + b, 0),
        benchUs: (mine.user + mine.system) / r.events,
      };
      side.rows.push(row);
      console.log(
        `${k} ${side.name.padEnd(24)} ${row.perSecond.toFixed(0).padStart(6)} notifications/s, ` +
          `side ${row.brokerUs.toFixed(0)} µs/event [${threads.map((us) => us.toFixed(0)).join(' ')}], bench ${row.benchUs.toFixed(0)}`,
      );
    }
  }
  const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
  for (const side of sides) {
    const { rows } = side;
    console.log(
      `mean ${side.name.padEnd(24)} ${mean(rows.map((r) => r.perSecond)).toFixed(0)} notifications/s, side ` +
        `${mean(rows.map((r) => r.brokerUs)).toFixed(1)} + bench ${mean(rows.map((r) => r.benchUs)).toFixed(1)} µs/event`,
    );
    side.broker.child.kill('SIGCONT');
  }
}

await start(0);
await receiver.close();
process.exit(0);
